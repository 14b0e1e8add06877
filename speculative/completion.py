"""A completion request and the token stream every tier's completion is (torch-free).

``build_request`` validates and tokenises a request; :class:`TokenStream` turns a
backend's emitted token ids into :class:`TokenEvent` s with the same stop conditions
(EOS, stop strings, ``max_tokens``) and cost shares for every tier. Kept apart from
:mod:`speculative.engine` so that the platform's modules that only name requests and
streams (its engine registry, cache, gateway) do not import torch: a Django process
that serves no model starts seconds sooner.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from speculative.errors import ContextOverflowError, InvalidRequestError, SpeculativeError
from speculative.types import (
    MAX_DRAFT_TOKENS,
    CompletionStats,
    FinishReason,
    Provenance,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    TokenRun,
    check_logprobs,
    check_sampling,
)

# a drafting round as a run of them is emitted: its tokens, how many were the draft's, its share of verifier time,
# and how many it drafted (``TokenStream._emit_run``; a plain run is one round that drafted nothing)
DraftedRound = tuple[tuple[int, ...], int, float, int]


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True)
class CompletionRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    k: int | None = None  # pin the draft length; None lets the controller choose
    # None: no log-probabilities (nothing computed); 0: each token's own; N: also the top N
    # alternatives (N <= MAX_TOP_LOGPROBS). See TokenEvent and TokenLogprob.
    logprobs: int | None = None


def build_request(
    tokenizer: Tokenizer,
    context_length: int,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 64,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    k: int | None = None,
    logprobs: int | None = None,
) -> CompletionRequest:
    """Validate and tokenise a completion request (raises InvalidRequestError early)."""
    sampling = sampling or SamplingParams()
    check_sampling(sampling)
    ids = encode_text(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
    if k is not None and not 0 <= k <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"k must be in [0, {MAX_DRAFT_TOKENS}], got {k}")
    if any(not isinstance(s, str) or not s for s in stop):
        raise InvalidRequestError("stop strings must be non-empty strings")
    check_logprobs(logprobs)
    if len(ids) + max_tokens > context_length:
        raise ContextOverflowError(
            f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"context of {context_length} tokens"
        )
    return CompletionRequest(tuple(ids), max_tokens, sampling, tuple(stop), k, logprobs)


def _fast_backend(tokenizer: Tokenizer, method: str, step: str) -> Any:
    """The Rust tokenizer of a transformers fast tokenizer whose ``method`` and the ``step`` it calls are
    transformers' own (not overridden), else None.

    transformers is never imported here: a transformers tokenizer has loaded these modules already, and a
    process that serves no model (its tokenizers are the platform's own) must not pay for importing it.
    """
    base = sys.modules.get("transformers.tokenization_utils_base")
    fast = sys.modules.get("transformers.tokenization_utils_tokenizers")
    if base is None or fast is None or not isinstance(tokenizer, fast.TokenizersBackend):
        return None
    cls = type(tokenizer)
    if getattr(cls, method) is not getattr(base.PreTrainedTokenizerBase, method):
        return None
    if getattr(cls, step, None) is not getattr(fast.TokenizersBackend, step):
        return None
    return getattr(tokenizer, "_tokenizer", None)


def text_encoder(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """``tokenizer.encode(text, add_special_tokens=False)``, as a callable: the Rust tokenizer's own where that is the same.

    A transformers fast tokenizer's ``encode`` checks its arguments, sets the backend's
    truncation, padding and special-token splitting to its own (none, none, off) and calls the
    Rust ``encode``: where neither method is overridden and the backend is set so already, the
    Rust call alone returns the same ids, in a third of the time (23 against 70 us for a short
    prompt; every request's prompt is encoded). Anything else encodes through ``encode`` itself.
    """
    backend = _fast_backend(tokenizer, "encode", "_encode_plus")
    if (
        backend is not None
        and not getattr(tokenizer, "split_special_tokens", False)
        and not backend.encode_special_tokens
        and backend.truncation is None
        and backend.padding is None
    ):
        rust_encode = backend.encode
        return lambda text: rust_encode(text, add_special_tokens=False).ids
    return lambda text: tokenizer.encode(text, add_special_tokens=False)


# The last text encoded and its ids: the platform counts a prompt's tokens for its routing rules, then builds its
# request from the same prompt moments later on the same thread (``encode_text``).
_last_encoded: tuple[object, str, tuple[int, ...]] | None = None


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """``text_encoder(tokenizer)(text)``, the last text's ids reused when it is encoded again (the same tokenizer)."""
    global _last_encoded
    last = _last_encoded
    if last is not None and last[0] is tokenizer and last[1] == text:
        return list(last[2])
    ids = text_encoder(tokenizer)(text)
    _last_encoded = (tokenizer, text, tuple(ids))
    return ids


def text_decoder(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, as a callable: the Rust tokenizer's own where that is the same.

    A transformers fast tokenizer's ``decode`` converts its argument, calls the Rust
    ``decode`` and, if ``clean_up_tokenization_spaces`` is set, edits its text: where that is
    off and neither method is overridden, the Rust call alone returns the same string, without
    the Python around it (at 16 sessions the per-token decode was 3.8% of the scheduler's
    thread, two thirds of it that wrapper). Anything else decodes through ``decode`` itself.
    """
    backend = _fast_backend(tokenizer, "decode", "_decode")
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        rust_decode = backend.decode
        return lambda ids: rust_decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def decodes_piecewise(tokenizer: Tokenizer) -> bool:
    """Whether ``text_decoder(tokenizer)`` of a list is the decode of a prefix plus the decode of the rest.

    True for a transformers fast tokenizer that ``text_decoder`` decodes through the Rust call
    and whose decoder is byte-level (GPT-2's, the demo pair's and SmolLM2's): the text is the
    UTF-8 of the tokens' bytes one after another, so wherever a prefix's text ends in whole
    characters (no U+FFFD), the rest's text follows it. Anything else (a decoder that strips a
    word's leading space, a clean-up pass over the text) decodes the whole list each time.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or text_decoder(tokenizer).__code__.co_names:  # not the Rust call alone
        return False
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


class _TextTracker:
    """Turns emitted token ids into text deltas, holding back what might start a stop string.

    Where the tokenizer decodes piecewise (``decodes_piecewise``) only the ids since the text
    last ended in whole characters are decoded again for each token: decoding the whole list
    each time cost 12 us a token at 64 tokens and 59 us at 1,024, quadratic in the length.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._decode = text_decoder(tokenizer)
        self._piecewise = decodes_piecewise(tokenizer)
        self._stop = stop
        self.ids: list[int] = []
        self.text = ""  # the completion text so far (cut at a stop string when one is found)
        self._flushed = 0
        self._settled = 0  # piecewise: ids[:settled] decode to settled_text, which ends in whole characters
        self._settled_text = ""

    def _text_with(self, more: Sequence[int]) -> str:
        """The text of the ids so far followed by ``more`` (piecewise: only the ids since it last settled decoded)."""
        if self._piecewise:
            return self._settled_text + self._decode([*self.ids[self._settled :], *more])
        return self._decode([*self.ids, *more] if more else self.ids)

    def _settle(self, text: str) -> None:
        """``text`` (of every id, ending in whole characters) is the completion's text so far."""
        if self._piecewise:
            self._settled, self._settled_text = len(self.ids), text
        self.text = text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token_id)
        text = self._text_with(())
        if text.endswith("\ufffd"):
            return "", False  # an incomplete UTF-8 sequence: wait for the next byte token
        self._settle(text)
        for stop in self._stop:
            idx = text.find(stop, max(0, self._flushed - len(stop)))
            if idx != -1:
                self.text = text[:idx]
                return self._flush(idx), True
        hold = max((_overlap(text, s) for s in self._stop), default=0)
        return self._flush(len(text) - hold), False

    def push_run(self, token_ids: Sequence[int]) -> str | None:
        """Add several tokens at once, decoded together: the text they release, as pushing each would.

        None, and nothing added, where that could differ: a stop string to look for at each
        token, or a text that ends inside a character (one by one, each token releases the text
        up to the last whole character, which one decode of them all does not tell).
        """
        if self._stop or not token_ids:
            return None
        text = self._text_with(token_ids)
        if text.endswith("\ufffd"):
            return None
        self.ids.extend(token_ids)
        self._settle(text)
        return self._flush(len(text))

    def _flush(self, upto: int) -> str:
        """Release text up to ``upto`` (never backwards, never past the text)."""
        upto = min(max(upto, self._flushed), len(self.text))
        delta, self._flushed = self.text[self._flushed : upto], upto
        return delta

    def finish(self) -> str:
        """The held-back tail, released when the completion ends without a stop string."""
        return self._flush(len(self.text))


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class TokenStream:
    """An in-flight completion: iterate for tokens; ``stats`` and ``text`` when done.

    Subclasses produce the tokens (``_run``); this class turns them into events and
    enforces the stop conditions the same way for every tier.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None, request: CompletionRequest):
        self.request = request
        self.stats = CompletionStats(prompt_tokens=len(request.prompt_ids))
        self.session_id = uuid.uuid4().hex
        self._eos_token_id = eos_token_id
        self._tracker = _TextTracker(tokenizer, request.stop)
        self._unbilled_gpu_ms = 0.0  # verifier time not yet carried by an emitted token
        self._events = self._run()

    @property
    def text(self) -> str:
        return self._tracker.text

    @property
    def token_ids(self) -> list[int]:
        return list(self._tracker.ids)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def close(self) -> None:
        """Stop generating (a client went away); what was emitted stays counted."""
        self._events.close()

    def _run(self) -> Generator[TokenEvent, None, None]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this a generator for type checkers

    def _emit(
        self,
        emitted: tuple[int, ...],
        n_matches: int,
        gpu_ms: float = 0.0,
        drafted: int = 0,
        provenance: Provenance | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> Generator[TokenEvent, None, None]:
        """Yield a round's tokens, stopping at EOS, a stop string or max_tokens.

        The round's verifier time is shared evenly by the tokens it emits; each accepted
        draft token carries one drafted token and the verifier's token the rejected ones
        (see :class:`TokenEvent`); tokens past a stop condition are never emitted or charged.
        ``logprobs`` (one per emitted token) must be given when the request asked for them.
        """
        stats, req = self.stats, self.request
        if req.logprobs is not None and (logprobs is None or len(logprobs) != len(emitted)):
            # a backend that ignored the request: never stream tokens that silently lack them
            raise SpeculativeError(
                f"logprobs were requested but the model returned {'none' if logprobs is None else len(logprobs)} "
                f"for {len(emitted)} tokens"
            )
        gpu_each = gpu_ms / len(emitted)
        sources, drafts = _round_accounts(len(emitted), n_matches, drafted)
        for i, token in enumerate(emitted):
            source = provenance or sources[i]
            token_gpu_ms, self._unbilled_gpu_ms = gpu_each + self._unbilled_gpu_ms, 0.0
            token_drafted = drafts[i]
            stats.completion_tokens += 1
            stats.provenance.append(source)
            lp = logprobs[i] if logprobs is not None and req.logprobs is not None else None
            logprob, top = (lp.logprob, lp.top) if lp is not None else (None, ())
            if token == self._eos_token_id:
                # EOS ends the text: release what was held back for a stop string
                stats.finish_reason = FinishReason.STOP
                yield TokenEvent(token, self._tracker.finish(), source, token_gpu_ms, token_drafted, logprob, top)
                return
            delta, hit_stop = self._tracker.push(token)
            if hit_stop:
                stats.finish_reason = FinishReason.STOP
            elif stats.completion_tokens >= req.max_tokens:
                stats.finish_reason = FinishReason.LENGTH
                delta += self._tracker.finish()
            yield TokenEvent(token, delta, source, token_gpu_ms, token_drafted, logprob, top)
            if stats.finish_reason is not None:
                return

    def _emit_run(self, rounds: Sequence[DraftedRound]) -> Generator[TokenEvent | TokenRun, None, None]:
        """Rounds' tokens for a consumer that takes the answer whole: one :class:`TokenRun` (then EOS's event),
        each token's text, share, provenance and drafted count as ``_emit`` yields them round by round.

        A plain run is one round that drafted nothing. A lone session's drafting rounds come counted, of a
        request without stop strings, where nothing ends the completion before the last round
        (``speculate_greedy`` stops at the round that emits EOS or reaches max_tokens). Where the text could
        differ (logprobs, stop strings, a text ending inside a character): ``_emit``, round by round.
        """
        stats, req = self.stats, self.request
        ids: list[int] = []
        shares: list[float] = []
        sources: list[Provenance] = []
        drafted: list[float] = []
        for emitted, n_matches, gpu_ms, k in rounds:
            ids += emitted
            shares += [gpu_ms / len(emitted)] * len(emitted)  # as ``_emit`` shares a round's time
            round_sources, round_drafted = _round_accounts(len(emitted), n_matches, k)
            sources += round_sources
            drafted += round_drafted
        room = min(len(ids), req.max_tokens - stats.completion_tokens)
        eos = self._eos_token_id
        cut = ids.index(eos, 0, room) if eos is not None and eos in ids[:room] else room
        text = self._tracker.push_run(ids[:cut]) if req.logprobs is None else None
        if text is None:
            for emitted, n_matches, gpu_ms, k in rounds:
                yield from self._emit(emitted, n_matches, gpu_ms, k)
                if stats.finish_reason is not None:
                    return
            return
        shares[0], self._unbilled_gpu_ms = shares[0] + self._unbilled_gpu_ms, 0.0
        stats.completion_tokens += cut
        stats.provenance.extend(sources[:cut])
        if cut < room:  # EOS ends the text: its own event, as ``_emit`` yields it
            yield _token_run(rounds, ids, text, shares, sources, drafted, cut)
            stats.completion_tokens += 1
            stats.provenance.append(sources[cut])
            stats.finish_reason = FinishReason.STOP
            yield TokenEvent(ids[cut], self._tracker.finish(), sources[cut], shares[cut], drafted[cut])
            return
        if stats.completion_tokens >= req.max_tokens:
            stats.finish_reason = FinishReason.LENGTH
            text += self._tracker.finish()
        yield _token_run(rounds, ids, text, shares, sources, drafted, cut)


def _round_accounts(n: int, n_matches: int, drafted: int) -> tuple[list[Provenance], list[float]]:
    """A round's ``n`` emitted tokens, ``n_matches`` of them accepted of ``drafted``: each one's provenance and the
    drafts it accounts for (an accepted draft token carries itself; the verifier's token the drafts it rejected)."""
    verifier = n - n_matches
    return (
        [Provenance.DRAFTED] * n_matches + [Provenance.VERIFIER] * verifier,
        [1.0] * n_matches + [float(drafted - n_matches)] * verifier,
    )


def _token_run(
    rounds: Sequence[DraftedRound],
    ids: list[int],
    text: str,
    shares: list[float],
    sources: list[Provenance],
    drafted: list[float],
    n: int,
) -> TokenRun:
    """The first ``n`` of the rounds' tokens as one run: a plain run's as its first share and the one of every
    other token; drafting rounds' with each token's own share, provenance and drafted count."""
    if len(rounds) == 1 and rounds[0][3] == 0:  # one round that drafted nothing: the verifier's tokens
        emitted, _, gpu_ms, _ = rounds[0]
        return TokenRun(tuple(ids[:n]), text, shares[0], gpu_ms / len(emitted))
    return TokenRun(
        tuple(ids[:n]),
        text,
        shares[0],
        0.0,  # (each token's share is its own: ``shares``)
        shares=tuple(shares[:n]),
        provenance=tuple(sources[:n]),
        drafted=tuple(drafted[:n]),
    )
