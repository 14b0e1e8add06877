"""The edge tier: the draft model decoding alone, without a verifier.

Used when the verifier is down or a request asks for the cheapest tier. The output is
the draft's own (not verifier quality), so every token is marked ``Provenance.EDGE``,
and its log-probabilities, when asked for, are the draft's.
Sessions share the draft backend exactly as speculative sessions do (llama.cpp batches
the steps of sessions that decode at the same moment).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence

from speculative.draft import DraftModel, DraftSession
from speculative.engine import CompletionRequest, Tokenizer, TokenStream, build_request
from speculative.types import Provenance, TokenEvent


class EdgeCompletion(TokenStream):
    """One draft-only completion: one token per step, sampled with the request's settings."""

    def __init__(self, engine: EdgeEngine, request: CompletionRequest):
        self._engine = engine
        super().__init__(engine.tokenizer, engine.eos_token_id, request)

    def _run(self) -> Generator[TokenEvent, None, None]:
        draft = DraftSession(self._engine.draft, self.request.prompt_ids, self.request.sampling)
        try:
            while True:
                draft.start_round()
                try:
                    proposal = draft.propose(1, logprobs=self.request.logprobs)
                finally:
                    draft.finish_round()
                token = proposal.tokens[0]  # never empty: build_request left room for max_tokens
                draft.extend([token])
                self.stats.rounds += 1
                self.stats.draft_ms += proposal.draft_ms
                yield from self._emit((token,), 0, provenance=Provenance.EDGE, logprobs=proposal.logprobs)
                if self.stats.finish_reason is not None:
                    return
        finally:
            draft.close()


class EdgeEngine:
    """Draft-only decoding with the speculative engine's interface (``request``/``stream``/``generate``)."""

    def __init__(self, draft: DraftModel, tokenizer: Tokenizer, eos_token_id: int | None):
        self.draft = draft
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.context_length = draft.context_length

    def request(self, prompt: str | Sequence[int], **kwargs) -> CompletionRequest:
        kwargs.pop("k", None)  # there is no draft length to pin without a verifier
        return build_request(self.tokenizer, self.context_length, prompt, **kwargs)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> EdgeCompletion:
        return EdgeCompletion(self, self.request(prompt, **kwargs))

    def generate(self, prompt: str | Sequence[int], **kwargs) -> EdgeCompletion:
        completion = self.stream(prompt, **kwargs)
        for _ in completion:
            pass
        return completion

    def close(self) -> None:
        """Nothing to stop: the draft backend belongs to whoever loaded it."""
