"""The teacher's side of the SmolLM2 distillation: its greedy chat answers, kept in git, and its top-k, rescored.

The teacher's greedy answers are what a run must not lose, and only they are kept:
``AnswerStore`` holds each answered prompt's id and answer token ids in gzipped JSON-lines
shards committed under ``speculative/assets/smollm2/teacher`` (a few bytes a token), so the
answers outlive the fresh machine each session runs on. Answers go first to an open,
uncompressed tail file (a kill loses at most its torn last line) that is closed into a shard
every ``SHARD_ANSWERS`` answers and when a run stops; a prompt already in the store is
never answered again.

``LlamaRunner`` decodes on llama.cpp through llama-cpp-python's low-level API, as the
draft and verifier backends do: up to ``batch`` answers under way in one context, each on
its own sequence and KV stream, every step one ``llama_decode`` for all of them, a finished
answer's sequence taking the next prompt (continuous batching). ``LlamaScorer`` recomputes
the teacher's top-k log-probabilities at every answer position of stored answers by
teacher forcing: prompt + answer of several sequences prefilled in one ``llama_decode``,
logits read at every answer position; it reproduces the decode's top-k (``UBATCH_TOKENS``), so
``DecodedTopK`` keeps the decode's own top-k on the machine that decoded, and only answers
decoded elsewhere are scored.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speculative.errors import ModelLoadError
from speculative.llama_sequences import in_sequence_order

log = logging.getLogger(__name__)

BATCH_TOKENS = 512  # positions one decoding llama_decode takes; a larger prefill runs as several
# Positions a ubatch (one pass over the weights inside a llama_decode) takes at most, decoding
# and scoring alike. ggml-cpu's flash attention takes another (tiled) path from 64 queries on,
# whose logits differ from the one-query path a decode step takes by up to 1.3 (top-1 flips at
# 1 to 4% of answer positions, SmolLM2 Q4_1, 2026-12-02). Below 64, a position's logits do not
# depend on how its sequence was cut into ubatches, so the scoring pass reproduces the decode's
# top-k, and a long prompt's prefill reads the same whatever the batch.
UBATCH_TOKENS = 63
SHARD_ANSWERS = 100  # answers a closed shard holds: the most a session on a fresh machine can lose
SCORE_TOKENS = 1024  # positions one scoring llama_decode takes: whole sequences packed up to this
SCORE_SEQUENCES = 16  # sequences one scoring llama_decode packs at most


@dataclass(frozen=True)
class Answer:
    """One prompt's greedy answer: ``top_ids``/``top_logprobs`` (answer length, k) score each answer position.

    ``k`` is 0 (arrays of shape (answer length, 0)) where the top-k was not computed.
    """

    id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    top_ids: np.ndarray  # (len(answer_ids), k) int32, best first
    top_logprobs: np.ndarray  # (len(answer_ids), k) float16, log-softmax over the whole vocabulary


@dataclass(frozen=True)
class StoredAnswer:
    """What the store keeps of an answer: the prompt's id (``smol_prompts.Prompt.id``) and the answer's tokens."""

    id: str
    answer_ids: list[int]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "answer": self.answer_ids}, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> StoredAnswer:
        row = json.loads(line)
        if not isinstance(row["id"], str) or not all(isinstance(t, int) for t in row["answer"]) or not row["answer"]:
            raise ValueError(f"not a stored answer: {line[:80]!r}")
        return cls(row["id"], row["answer"])


@dataclass(frozen=True)
class Source:
    """One file of a store (a closed shard or the open tail) and the answers first stored in it."""

    name: str  # the file's name, which names its scored cache too
    digest: str  # of the file's bytes: a cache scored from other bytes is stale
    answers: list[StoredAnswer]


class AnswerStore:
    """Append-only answers of one split (``train``, ``held_out``) in ``directory``.

    Closed shards are ``{split}-00000.jsonl.gz``, ``{split}-00001.jsonl.gz``...: written whole
    (beside, then renamed), so a reader never sees half a shard, and byte-for-byte reproducible
    (gzip without a timestamp). New answers are appended a line at a time to
    ``{split}-open.jsonl``; a torn last line (a kill mid-write) is cut off when read or appended to.
    """

    def __init__(self, directory: Path, split: str, shard_answers: int = SHARD_ANSWERS):
        assert re.fullmatch(r"[a-z_]+", split), split
        self.directory, self.split, self.shard_answers = directory, split, shard_answers
        self.open_path = directory / f"{split}-open.jsonl"

    def shards(self) -> list[Path]:
        pattern = re.compile(rf"{self.split}-(\d{{5}})\.jsonl\.gz")
        return sorted(p for p in self.directory.glob(f"{self.split}-*.jsonl.gz") if pattern.fullmatch(p.name))

    def sources(self) -> list[Source]:
        """Each shard, then the open tail, with the answers whose prompt no earlier file answered."""
        import hashlib

        seen: set[str] = set()
        out = []
        for path in [*self.shards(), self.open_path]:
            if not path.exists():
                continue
            data = path.read_bytes()
            lines = (gzip.decompress(data) if path.suffix == ".gz" else data).decode().splitlines()
            fresh = []
            for answer in self._parse(path, lines):
                if answer.id not in seen:  # a run killed between closing a shard and removing the tail
                    seen.add(answer.id)
                    fresh.append(answer)
            out.append(Source(path.name, hashlib.sha256(data).hexdigest(), fresh))
        return out

    @staticmethod
    def _parse(path: Path, lines: list[str]) -> list[StoredAnswer]:
        answers = []
        for n, line in enumerate(lines):
            try:
                answers.append(StoredAnswer.from_json(line))
            except (ValueError, KeyError, TypeError):
                if n < len(lines) - 1 or path.suffix == ".gz":  # only the tail's last line can be torn
                    raise ValueError(f"{path}: line {n + 1} is not a stored answer") from None
                log.warning("%s: dropping a torn last line", path)
        return answers

    def read(self) -> list[StoredAnswer]:
        return [a for source in self.sources() for a in source.answers]

    def done_ids(self) -> set[str]:
        return {a.id for a in self.read()}

    def append(self, answer: StoredAnswer) -> None:
        """Add ``answer`` to the open tail, closing the tail into a shard once it holds ``shard_answers``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = self._tail_lines()
        with self.open_path.open("a") as f:
            f.write(answer.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        if len(lines) + 1 >= self.shard_answers:
            self.close_shard()

    def close_shard(self) -> Path | None:
        """Close the open tail into the next shard (if it holds any answer); the shard's path."""
        lines = self._tail_lines()
        if not lines:
            self.open_path.unlink(missing_ok=True)
            return None
        shards = self.shards()
        number = int(shards[-1].name.split("-")[-1].split(".")[0]) + 1 if shards else 0
        path = self.directory / f"{self.split}-{number:05d}.jsonl.gz"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode(), compresslevel=9, mtime=0))
        os.replace(tmp, path)
        self.open_path.unlink()  # a kill before this leaves duplicates, which sources() skips
        return path

    def _tail_lines(self) -> list[str]:
        """The open tail's whole lines, its torn last line (if any) cut off the file."""
        if not self.open_path.exists():
            return []
        data = self.open_path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.open_path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
            data = data[: data.rfind(b"\n") + 1]
        return data.decode().splitlines()


class DecodedTopK:
    """The top-k the decode saw, kept on the machine that decoded (a work folder, never git): one JSON
    line an answer. It equals what the scoring pass recomputes (ubatches below 64 positions), so the
    answers decoded here need no scoring; a torn or unreadable line is only scored again."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, answer: Answer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"id": answer.id, "n": len(answer.answer_ids), "k": int(answer.top_ids.shape[1]),
               "top_ids": base64.b64encode(answer.top_ids.astype("<i4").tobytes()).decode(),
               "top_logprobs": base64.b64encode(answer.top_logprobs.astype("<f2").tobytes()).decode()}  # fmt: skip
        with self.path.open("a") as f:
            f.write("\n" + json.dumps(row))  # a line of its own even after a torn one

    def read(self, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each answer id's (top ids (n, k) int32, logprobs (n, k) float16), for this ``k`` only."""
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if not self.path.exists():
            return out
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                shape = (row["n"], row["k"])
                ids = np.frombuffer(base64.b64decode(row["top_ids"]), dtype="<i4").reshape(shape)
                logprobs = np.frombuffer(base64.b64decode(row["top_logprobs"]), dtype="<f2").reshape(shape)
            except (ValueError, KeyError, TypeError):
                continue  # empty or torn: that answer is scored instead
            if row["k"] == k:
                out[row["id"]] = (ids.astype(np.int32), logprobs.astype(np.float16))
        return out


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


class LlamaGguf:
    """A GGUF loaded by llama.cpp: its vocabulary and chat template (no context: subclasses make theirs)."""

    def __init__(self, model_path: Path):
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
        self._internals = internals
        self.vocab_size: int = self._model.n_vocab()
        self.metadata = self._model.metadata()

    def is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._model.vocab, token))

    def chat_prompt_ids(self, user: str) -> list[int]:
        """``user`` as one user turn in the model's own chat template, ready for the assistant's answer."""
        text = self.chat_prompt_text(user)
        return list(self._model.tokenize(text.encode(), add_bos=self._model.add_bos_token(), special=True))

    def chat_prompt_text(self, user: str) -> str:
        """``chat_prompt_ids``' text: the template rendered, special tokens as text."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelLoadError("the teacher GGUF has no tokenizer.chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=True, bos_token="", eos_token=""
        )

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._model.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def tokens(self) -> list[str]:
        """The vocabulary, by id, as llama.cpp read it from the GGUF."""
        return [self._model.token_get_text(i) for i in range(self.vocab_size)]

    def _context(self, *, sequences: int, n_ctx: int, batch_tokens: int, unified: bool, n_threads: int):
        params = self._llama_cpp.llama_context_default_params()
        params.n_seq_max = sequences
        params.kv_unified = unified
        params.n_ctx = n_ctx
        params.n_batch = batch_tokens
        params.n_ubatch = min(batch_tokens, UBATCH_TOKENS)
        params.n_threads = params.n_threads_batch = n_threads
        return self._internals.LlamaContext(model=self._model, params=params, verbose=False)


class LlamaRunner(LlamaGguf):
    """A GGUF on llama.cpp: batches of chat prompts answered greedily, teacher-forced argmaxes, decode speed."""

    def __init__(self, model_path: Path, *, batch: int, max_context: int, n_threads: int = 1):
        super().__init__(model_path)
        self.batch = batch
        self.max_context = max_context
        # A KV stream per sequence: in a unified cache each token attends over every sequence's
        # cells (masked), which at 16 answers costs several times the weights' arithmetic.
        self._ctx = self._context(sequences=batch, n_ctx=batch * max_context, batch_tokens=BATCH_TOKENS,
                                  unified=False, n_threads=n_threads)  # fmt: skip
        self._batch = self._internals.LlamaBatch(n_tokens=BATCH_TOKENS, embd=0, n_seq_max=1, verbose=False)

    def answer_stream(self, prompts: Iterable[tuple[str, list[int]]], max_new: int, k: int = 0) -> Iterator[Answer]:
        """Each (id, prompt)'s greedy answer, as it finishes.

        Continuous batching: ``self.batch`` answers are under way at once, and a finished one's
        sequence takes the next prompt in the same decode as the others' next tokens, so the
        batch stays full while long answers run on. An answer ends with its end-of-generation
        token unless cut at ``max_new``; with ``k`` > 0 it scores each of its positions by the
        top ``k`` logprobs (the teacher stage keeps none: ``LlamaScorer`` recomputes them).
        """
        queue = iter(prompts)
        live: dict[int, tuple[str, list[int], list[int], list[tuple[np.ndarray, np.ndarray]]]] = {}
        free = list(range(self.batch - 1, -1, -1))
        self._ctx.kv_cache_clear()
        rows: list[tuple[int, list[int], int]] = []
        no_top = (np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32))
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
            tops = top_logprobs(logits, k) if k else None
            fed, rows = rows, []
            for r, (seq, _, _) in enumerate(fed):
                pid, prompt, answer, kept = live[seq]
                token = int(np.argmax(logits[r]))
                answer.append(token)
                kept.append((tops[0][r], tops[1][r]) if tops else no_top)
                if self.is_end(token) or len(answer) == max_new:
                    del live[seq]
                    free.append(seq)
                    ids, lp = np.stack([t[0] for t in kept]), np.stack([t[1] for t in kept]).astype(np.float16)
                    yield Answer(pid, prompt, answer, ids, lp)
                else:
                    rows.append((seq, [token], len(prompt) + len(answer) - 1))

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
        for r, (seq, tokens, n_past) in in_sequence_order(enumerate(rows), lambda row: row[1][0]):
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


class LlamaScorer(LlamaGguf):
    """The teacher's top-k at every answer position of given answers, by teacher forcing on llama.cpp.

    Whole sequences (prompt + answer but its last token) are packed into one ``llama_decode``
    of up to ``tokens`` positions and ``sequences`` sequences, each its own sequence id in one
    KV pool (cleared after each decode, so attention spans only that pack), with logits at every
    position that predicts an answer token; llama.cpp runs it as ubatches of ``UBATCH_TOKENS``
    positions, each one pass over the weights where a decode step makes one per token of each sequence.
    """

    def __init__(self, model_path: Path, *, max_context: int, n_threads: int = 1,
                 tokens: int = SCORE_TOKENS, sequences: int = SCORE_SEQUENCES):  # fmt: skip
        super().__init__(model_path)
        self.tokens_per_decode = max(tokens, max_context)
        self.sequences = sequences
        self._ctx = self._context(sequences=sequences, n_ctx=self.tokens_per_decode,
                                  batch_tokens=self.tokens_per_decode, unified=True, n_threads=n_threads)  # fmt: skip
        self._batch = self._internals.LlamaBatch(n_tokens=self.tokens_per_decode, embd=0, n_seq_max=1, verbose=False)

    def score(self, rows: Iterable[tuple[list[int], list[int]]], k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """For each (prompt ids, answer ids), in order: top ids (len(answer), k) int32 and logprobs float16."""
        pack: list[tuple[list[int], list[int]]] = []
        used = 0
        for prompt, answer in rows:
            n = len(prompt) + len(answer) - 1
            assert prompt and answer and n <= self.tokens_per_decode, f"{len(prompt)} + {len(answer)} tokens"
            if pack and (used + n > self.tokens_per_decode or len(pack) == self.sequences):
                yield from self._score_pack(pack, k)
                pack, used = [], 0
            pack.append((prompt, answer))
            used += n
        if pack:
            yield from self._score_pack(pack, k)

    def _score_pack(self, pack: list[tuple[list[int], list[int]]], k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        b = self._batch.batch
        b.n_tokens = 0
        for seq, (prompt, answer) in enumerate(pack):
            first = len(prompt) - 1  # the position whose logits predict the answer's first token
            for pos, token in enumerate(prompt + answer[:-1]):
                i = b.n_tokens
                b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
                b.seq_id[i][0] = seq
                b.logits[i] = pos >= first
                b.n_tokens += 1
        self._ctx.kv_cache_clear()
        self._ctx.decode(self._batch)
        n_out = sum(len(answer) for _, answer in pack)
        # the rows with logits, in batch order  # (n_out, vocab)
        logits = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(n_out, self.vocab_size))
        ids, logprobs = top_logprobs(logits, k)
        offset = 0
        for _, answer in pack:
            yield ids[offset : offset + len(answer)], logprobs[offset : offset + len(answer)].astype(np.float16)
            offset += len(answer)


def answer_all(
    runner: LlamaRunner, prompts: Sequence[tuple[str, str]], store: AnswerStore, *, max_new: int, k: int = 0
) -> Iterator[dict]:
    """Answer every (id, text) not yet in ``store``, appending each answer as it finishes, and yield
    after each: the ``Answer`` (with its decode-time top ``k``), answers done and to do, and the
    seconds since the previous one finished (their sum is the decode's time). The caller closes the
    store's tail when it stops."""
    done = store.done_ids()
    encoded = [(pid, runner.chat_prompt_ids(text)) for pid, text in prompts if pid not in done]
    todo = [(pid, ids) for pid, ids in encoded if len(ids) + max_new <= runner.max_context]
    if len(todo) < len(encoded):
        log.info("skipping %d prompts longer than %d tokens", len(encoded) - len(todo), runner.max_context - max_new)
    answered, last = 0, time.perf_counter()
    for answer in runner.answer_stream(todo, max_new, k):
        store.append(StoredAnswer(answer.id, answer.answer_ids))
        answered, now = answered + 1, time.perf_counter()
        yield {"answer": answer, "done": len(done) + answered, "of": len(done) + len(todo), "seconds": now - last}
        last = now
