"""The teacher's side of the SmolLM2 distillation: its greedy chat answers and top-k logprobs, on llama.cpp.

``LlamaRunner`` runs a GGUF (the verifier's; the report runs the draft's too) through
llama-cpp-python's low-level API, as the draft and verifier backends do: up to ``batch``
answers under way in one context, each on its own sequence (and KV stream), every step one
``llama_decode`` for all of them, a finished answer's sequence taking the next prompt
(continuous batching). At every answer position it keeps the greedy token and the
teacher's top-k log-probabilities over the whole vocabulary: the logits that pick a token
are the scoring pass, so no second pass is needed. ``AnswerStore`` appends one JSON line
per answered prompt and skips the prompts already answered, so a stopped run resumes
where it was.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speculative.errors import ModelLoadError

log = logging.getLogger(__name__)

BATCH_TOKENS = 512  # positions one llama_decode takes; a larger prefill runs as several


@dataclass(frozen=True)
class Answer:
    """One prompt's greedy answer: ``top_ids``/``top_logprobs`` (answer length, k) score each answer position."""

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    top_ids: np.ndarray  # (len(answer_ids), k) int32, best first
    top_logprobs: np.ndarray  # (len(answer_ids), k) float16, log-softmax over the whole vocabulary

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "prompt_ids": self.prompt_ids,
                "answer_ids": self.answer_ids,
                "k": int(self.top_ids.shape[1]),
                "top_ids": base64.b64encode(self.top_ids.astype("<i4").tobytes()).decode(),
                "top_logprobs": base64.b64encode(self.top_logprobs.astype("<f2").tobytes()).decode(),
            }
        )

    @classmethod
    def from_json(cls, line: str) -> Answer:
        row = json.loads(line)
        n, k = len(row["answer_ids"]), row["k"]
        ids = np.frombuffer(base64.b64decode(row["top_ids"]), dtype="<i4").reshape(n, k)
        logprobs = np.frombuffer(base64.b64decode(row["top_logprobs"]), dtype="<f2").reshape(n, k)
        return cls(row["id"], row["prompt_ids"], row["answer_ids"], ids, logprobs)


class AnswerStore:
    """An append-only JSON-lines file of answers; a torn last line (a run killed mid-write) is cut off."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[Answer]:
        if not self.path.exists():
            return []
        answers = []
        for line in self.path.read_text().splitlines():
            try:
                answers.append(Answer.from_json(line))
            except (ValueError, KeyError):
                log.warning("%s: dropping a torn line", self.path)
        return answers

    def done_ids(self) -> set[str]:
        return {a.id for a in self.read()}

    def append(self, answer: Answer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            text = self.path.read_bytes()
            if text and not text.endswith(b"\n"):  # a torn last line (a kill mid-write): cut it off
                with self.path.open("r+b") as f:
                    f.truncate(text.rfind(b"\n") + 1)
        with self.path.open("a") as f:
            f.write(answer.to_json() + "\n")
            f.flush()


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest log-softmax values of each row and their ids, best first.

    logits  # (rows, vocab) -> ids (rows, k) int32, logprobs (rows, k) float32
    """
    assert logits.ndim == 2 and 0 < k <= logits.shape[1], f"logits {logits.shape}, k {k}"
    peak = logits.max(axis=1, keepdims=True)
    lse = peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True))
    ids = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    values = np.take_along_axis(logits, ids, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    return ids.astype(np.int32), (np.take_along_axis(values, order, axis=1) - lse).astype(np.float32)


class LlamaRunner:
    """A GGUF on llama.cpp: batches of chat prompts answered greedily, teacher-forced argmaxes, decode speed."""

    def __init__(self, model_path: Path, *, batch: int, max_context: int, n_threads: int = 1):
        import llama_cpp
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        llama_cpp.llama_backend_init()
        set_verbose(False)
        model_params = llama_cpp.llama_model_default_params()
        # No extra buffer types: a llama.cpp built natively on a CPU with AMX puts Q4_1/Q8_0
        # weights on ggml's AMX matmul, which segfaults on batches of two tokens or more
        # (ggml_backend_amx_mul_mat). On the project's portable build it changes no logit.
        model_params.use_extra_bufts = False
        try:
            self._model = internals.LlamaModel(path_model=str(model_path), params=model_params, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"llama.cpp cannot load {str(model_path)!r}: {exc}") from exc
        self._llama_cpp = llama_cpp
        self.vocab_size: int = self._model.n_vocab()
        self.batch = batch
        self.max_context = max_context
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = batch
        # A KV stream per sequence: in a unified cache each token attends over every sequence's
        # cells (masked), which at 16 answers costs several times the weights' arithmetic.
        params.kv_unified = False
        params.n_ctx = batch * max_context
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_threads = params.n_threads_batch = n_threads
        self._ctx = internals.LlamaContext(model=self._model, params=params, verbose=False)
        self._batch = internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)
        self.metadata = self._model.metadata()

    def is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def chat_prompt_ids(self, user: str) -> list[int]:
        """``user`` as one user turn in the model's own chat template, ready for the assistant's answer."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError("the teacher GGUF has no tokenizer.chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=True, bos_token="", eos_token=""
        )
        return list(self._model.tokenize(text.encode(), add_bos=self._model.add_bos_token(), special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def answer_stream(self, prompts: Iterable[tuple[str, list[int]]], max_new: int, k: int) -> Iterator[Answer]:
        """Each (id, prompt)'s greedy answer, as it finishes.

        Continuous batching: ``self.batch`` answers are under way at once, and a finished one's
        sequence takes the next prompt in the same decode as the others' next tokens, so the
        batch stays full while long answers run on. An answer ends with its end-of-generation
        token unless cut at ``max_new``; it scores each of its positions by the top ``k`` logprobs.
        """
        queue = iter(prompts)
        live: dict[int, tuple[str, list[int], list[int], list[tuple[np.ndarray, np.ndarray]]]] = {}
        free = list(range(self.batch - 1, -1, -1))
        self._ctx.kv_cache_clear()
        rows: list[tuple[int, list[int], int]] = []
        while True:
            while free and (nxt := next(queue, None)) is not None:
                pid, prompt = nxt
                if len(prompt) + max_new > self.max_context:
                    raise ValueError(f"a {len(prompt)}-token prompt and {max_new} new tokens exceed {self.max_context}")
                seq = free.pop()
                self._ctx.kv_cache_seq_rm(seq, 0, -1)
                live[seq] = (pid, prompt, [], [])
                rows.append((seq, list(prompt), 0))
            if not rows:
                return
            logits = self._decode(rows)  # (rows, vocab)
            top_ids, top_lp = top_logprobs(logits, k)
            fed, rows = rows, []
            for r, (seq, _, _) in enumerate(fed):
                pid, prompt, answer, tops = live[seq]
                token = int(np.argmax(logits[r]))
                answer.append(token)
                tops.append((top_ids[r], top_lp[r]))
                if self.is_end(token) or len(answer) == max_new:
                    del live[seq]
                    free.append(seq)
                    ids, lp = np.stack([t[0] for t in tops]), np.stack([t[1] for t in tops]).astype(np.float16)
                    yield Answer(pid, prompt, answer, ids, lp)
                else:
                    rows.append((seq, [token], len(prompt) + len(answer) - 1))

    def tokens(self) -> list[str]:
        """The vocabulary, by id, as llama.cpp read it from the GGUF."""
        return [self._model.token_get_text(i) for i in range(self.vocab_size)]

    def logits_after(self, tokens: list[int], first: int) -> np.ndarray:
        """The logits after each of ``tokens[first:]``, the row read in one pass (teacher-forced): (n, vocab)."""
        assert 0 <= first < len(tokens) <= self.max_context, f"{len(tokens)} tokens from {first}"
        self._ctx.kv_cache_clear()
        # one sequence: the first row carries the prefix, each later row one more token
        rows = [(0, tokens[: first + 1], 0)] + [(0, [tokens[i]], i) for i in range(first + 1, len(tokens))]
        return self._decode(rows)

    def argmax_after(self, tokens: list[int], first: int) -> list[int]:
        return self.logits_after(tokens, first).argmax(axis=1).tolist()

    def decode_speed(self, prompt: list[int], n: int) -> float:
        """Greedy tokens a second, one sequence, over ``n`` single-token decodes after the prompt's prefill."""
        self._ctx.kv_cache_clear()
        logits = self._decode([(0, prompt, 0)])
        started = time.perf_counter()
        for i in range(n):
            logits = self._decode([(0, [int(np.argmax(logits[0]))], len(prompt) + i)])
        return n / (time.perf_counter() - started)

    def _decode(self, rows: list[tuple[int, list[int], int]]) -> np.ndarray:
        """Evaluate each (seq, tokens, n_past); the logits after each row's last token, (rows, vocab)."""
        b = self._batch.batch
        out = np.empty((len(rows), self.vocab_size), dtype=np.float32)
        pending: list[tuple[int, int]] = []  # (row, batch index) of the logits to read after a decode
        b.n_tokens = 0
        for r, (seq, tokens, n_past) in enumerate(rows):
            for offset, token in enumerate(tokens):
                if b.n_tokens == BATCH_TOKENS:
                    self._flush(pending, out)
                i = b.n_tokens
                b.token[i], b.pos[i], b.n_seq_id[i] = token, n_past + offset, 1
                b.seq_id[i][0] = seq
                b.logits[i] = offset == len(tokens) - 1
                if b.logits[i]:
                    pending.append((r, i))
                b.n_tokens += 1
        self._flush(pending, out)
        return out

    def _flush(self, pending: list[tuple[int, int]], out: np.ndarray) -> None:
        b = self._batch.batch
        if b.n_tokens:
            self._ctx.decode(self._batch)
            for r, i in pending:
                out[r] = np.ctypeslib.as_array(self._ctx.get_logits_ith(i), shape=(self.vocab_size,))
        pending.clear()
        b.n_tokens = 0


def answer_all(
    runner: LlamaRunner,
    prompts: Sequence[tuple[str, str]],
    store: AnswerStore,
    *,
    max_new: int,
    k: int,
    every: int = 16,
) -> Iterator[dict]:
    """Answer every (id, text) not yet in ``store``, appending each answer as it finishes; yields
    progress every ``every`` answers and at the end."""
    done = store.done_ids()
    encoded = [(pid, runner.chat_prompt_ids(text)) for pid, text in prompts if pid not in done]
    todo = [(pid, ids) for pid, ids in encoded if len(ids) + max_new <= runner.max_context]
    if len(todo) < len(encoded):
        log.info("skipping %d prompts longer than %d tokens", len(encoded) - len(todo), runner.max_context - max_new)
    answered, tokens, started = 0, 0, time.perf_counter()
    for answer in runner.answer_stream(todo, max_new, k):
        store.append(answer)
        answered, tokens = answered + 1, tokens + len(answer.answer_ids)
        if answered % every == 0 or answered == len(todo):
            seconds = time.perf_counter() - started
            yield {"done": len(done) + answered, "of": len(done) + len(todo), "tokens": tokens, "seconds": seconds}
            tokens, started = 0, time.perf_counter()
