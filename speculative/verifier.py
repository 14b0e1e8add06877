"""The verifier: scores many sessions' drafts in one forward pass and decides what stays.

Each session owns a *slot*: one row of a preallocated KV buffer per layer, holding that
session's keys and values at their absolute positions. A verify step runs the model once
over a contiguous range of slot rows, each row fed its pending token plus its draft
tokens (ragged lengths right-padded), with a 4D mask that lets row i see exactly its own
``length_i + t + 1`` positions. The model's attention writes the new keys and values
straight into the slots, so keeping the accepted prefix and dropping a rejected tail is
just moving the row's length back: no re-prefill, no copies of the cache per round.

Acceptance happens here, next to the logits: greedy needs only the argmax of each row
(one small device-to-host copy), sampling moves the (k + 1, vocab) warped rows of the
sessions that sample. Sessions that ask for log-probabilities get them from the same
logits, for every row of the batch at once (one more small copy), once their tokens are
known; a batch where no session asks does no extra work.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from speculative.acceptance import accept_greedy, accept_sampling
from speculative.cpu_linear import use_onednn_linears
from speculative.errors import (
    ContextOverflowError,
    InvalidRequestError,
    ModelLoadError,
    SessionNotFoundError,
)
from speculative.logprobs import check_logprobs, token_logprobs, truncate_top
from speculative.prefill import PrefillTicket, checked_prompt, open_batch, open_together, open_when_prefilled
from speculative.sampling import warp
from speculative.types import MAX_DRAFT_TOKENS, SamplingParams, Verdict

log = logging.getLogger(__name__)

DEFAULT_MAX_SESSIONS = 64
# The most positions (rows x the longest prompt, padding included) one batched prefill runs:
# sessions that open together are prefilled together, up to this much in one forward.
MAX_PREFILL_POSITIONS = 4096


@dataclass(frozen=True)
class VerifyRequest:
    """One session's round: its draft tokens and, when sampling, their ``q``.

    tokens    # (k,) draft token ids, 0 <= k <= MAX_DRAFT_TOKENS
    q         # (k, vocab) float32 or None (greedy)
    round     # the session's round number; a repeated round returns the same verdict
    logprobs  # None, or the verdict also carries each emitted token's logprob and top N
    """

    session_id: str
    tokens: tuple[int, ...]
    q: np.ndarray | None = None
    round: int = 0
    logprobs: int | None = None


@dataclass(frozen=True)
class VerifyResult:
    verdicts: list[Verdict]
    verify_ms: float  # the verifier's own time for the whole batch
    network_ms: float = 0.0  # time spent between the caller and the verifier


def checked_round(
    req: VerifyRequest, length: int, params: SamplingParams, context_length: int, vocab_size: int
) -> None:
    """Refuse a session's round (at ``length`` tokens so far) before any work when no backend could verify it."""
    k = len(req.tokens)
    if k > MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"at most {MAX_DRAFT_TOKENS} draft tokens per round, got {k}")
    if length + 1 + k > context_length:
        raise ContextOverflowError(f"session {req.session_id!r} would exceed the context of {context_length}")
    if any(not 0 <= t < vocab_size for t in req.tokens):
        raise InvalidRequestError(f"draft token ids must lie in [0, {vocab_size})")
    if not params.greedy and k and (req.q is None or req.q.shape != (k, vocab_size)):
        raise InvalidRequestError(f"sampling needs q of shape ({k}, {vocab_size})")
    check_logprobs(req.logprobs)


class Verifier(Protocol):
    """What the engine needs from a verifier, local or remote."""

    vocab_size: int
    context_length: int
    eos_token_id: int | None

    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        """Prefill the prompt; return this session's share of the verifier time that took, in ms."""
        ...

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult: ...

    def close_session(self, session_id: str) -> None: ...


@dataclass
class _Session:
    slot: int
    length: int  # positions 0 .. length-1 of the slot hold committed tokens
    pending: int  # the last committed token, not yet in the cache
    params: SamplingParams
    generator: torch.Generator
    round: int = -1
    last: Verdict | None = None


class SlotKVCache:
    """Per-layer KV buffers ``(slots, kv_heads, capacity, head_dim)`` that HF attention writes into.

    Duck-types the one method transformers' attention calls, ``update``. Before each
    forward, :meth:`bind` says which rows run and where each row's new tokens go.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device):
        self.shape = (0, kv_heads, capacity, head_dim)
        self.layers = layers
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows = slice(0, 0)
        self._positions: torch.Tensor | None = None  # (rows, t) absolute positions to write
        self._kv_len = 0
        self._grow(4)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    def ensure_slots(self, n: int) -> None:
        if n > self.slots:
            self._grow(max(n, 2 * self.slots))

    def _grow(self, slots: int) -> None:
        shape = (slots, *self.shape[1:])
        old_k, old_v = self.keys, self.values
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        if old_k:  # a grown buffer keeps the rows it had
            for new, old in zip(self.keys + self.values, old_k + old_v, strict=True):
                new[: old.shape[0]].copy_(old)

    def bind(self, rows: slice, positions: torch.Tensor, kv_len: int) -> None:
        self._rows, self._positions, self._kv_len = rows, positions, kv_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key_states, value_states  # (rows, kv_heads, t, head_dim)"""
        assert self._positions is not None
        n, t = self._positions.shape
        row_idx = torch.arange(n, device=self.device).unsqueeze(1).expand(n, t)
        for buf, new in ((self.keys[layer_idx], key_states), (self.values[layer_idx], value_states)):
            # (rows, capacity, heads, dim) view; index (row, position) pairs
            buf[self._rows].transpose(1, 2)[row_idx, self._positions] = new.transpose(1, 2).to(buf.dtype)
        return (
            self.keys[layer_idx][self._rows, :, : self._kv_len],
            self.values[layer_idx][self._rows, :, : self._kv_len],
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len


# cuDNN's fused attention rebuilds its execution plan whenever the key length changes,
# which in decoding is every step: on an H200 with torch 2.11 that cost 21 ms of host
# time per layer call and made an 8B-shaped verify step 120 ms instead of 26 ms
# (docs/bench/2026-11-27-gpu-h200-*). The other fused kernels take our masks as well.
CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> AbstractContextManager:
    """The scaled-dot-product attention kernels a forward on ``device`` may use."""
    return sdpa_kernel(CUDA_ATTENTION_BACKENDS) if device.type == "cuda" else nullcontext()


def pick_device(device: str | None = None) -> torch.device:
    """The device, chosen once: CUDA when there is one, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TransformersVerifier:
    """A transformers causal LM as verifier, on CPU or CUDA, with slot KV caches."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        model=None,
        fast_cpu_linears: bool = True,
    ):
        self.device = pick_device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = model if model is not None else load_causal_lm(model_path, self.device, dtype)
        if self.device.type == "cpu" and fast_cpu_linears:
            use_onednn_linears(self.model)
        config = self.model.config
        self.model_path = str(model_path)
        self.vocab_size: int = config.vocab_size
        self.context_length: int = config.max_position_embeddings
        eos = config.eos_token_id
        self.eos_token_id: int | None = eos[0] if isinstance(eos, list) else eos
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.cache = SlotKVCache(
            config.num_hidden_layers,
            kv_heads,
            head_dim,
            self.context_length + MAX_DRAFT_TOKENS + 1,
            dtype,
            self.device,
        )
        self.max_sessions = max_sessions
        self._sessions: dict[str, _Session] = {}
        self._free_slots: list[int] = []
        self._slot_owner: dict[int, _Session] = {}
        self._next_slot = 0
        self._lock = threading.Lock()  # one forward at a time; sessions open/close around it
        self._prefill_lock = threading.Lock()  # guards the queue of sessions waiting to open
        self._prefills: deque[PrefillTicket] = deque()
        # a model that can skip the logits of positions nobody reads (prefill) is told to
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    # sessions -------------------------------------------------------------------------
    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        prompt = checked_prompt(prompt_ids, params, self.context_length, self.vocab_size)
        ticket = PrefillTicket(session_id, prompt, params)
        return open_when_prefilled(ticket, self._prefills, self._prefill_lock, self._lock, self._prefill_queued)

    def open_many(self, openings: Sequence[tuple[str, Sequence[int], SamplingParams]]) -> list[float | BaseException]:
        """Open several sessions with shared prefills; each one's prefill ms or its error."""
        return open_together(self, openings)

    def _prefill_queued(self) -> None:
        """Open the queued sessions (as many as fit one forward) and prefill their prompts together.

        Runs under ``self._lock`` (``open_batch``).
        """
        with self._prefill_lock:
            batch: list[PrefillTicket] = []
            longest = 0  # the longest prompt in the batch: every row is padded to it
            while self._prefills:
                with_next = max(longest, len(self._prefills[0].prompt))
                if batch and (len(batch) + 1) * with_next > MAX_PREFILL_POSITIONS:
                    break
                longest = with_next
                batch.append(self._prefills.popleft())
        open_batch(
            batch,
            self._sessions,
            self.max_sessions,
            self._new_session,
            lambda s: self._release_slot(s.slot),
            self._prefill,
        )

    def _new_session(self, ticket: PrefillTicket) -> _Session:
        slot = self._free_slots.pop() if self._free_slots else self._take_new_slot()
        generator = torch.Generator().manual_seed(ticket.params.seed)
        session = _Session(slot=slot, length=0, pending=ticket.prompt[-1], params=ticket.params, generator=generator)
        self._slot_owner[slot] = session
        return session

    def _prefill(self, opened: list[tuple[PrefillTicket, _Session]]) -> None:
        """One forward over every prompt but its last token (that one is the session's pending token).

        Each session is billed its positions' share of the forward's time.
        """
        rows = [(ticket.prompt[:-1], session) for ticket, session in opened if len(ticket.prompt) > 1]
        if not rows:
            return
        started = time.perf_counter()
        self._forward([session for _, session in rows], [ids for ids, _ in rows], logits=False)
        forward_ms = (time.perf_counter() - started) * 1e3
        positions = sum(len(ids) for ids, _ in rows)
        for ids, session in rows:
            session.length = len(ids)
        for ticket, session in opened:
            ticket.prefill_ms = forward_ms * session.length / positions

    def _take_new_slot(self) -> int:
        slot = self._next_slot
        self._next_slot += 1
        self.cache.ensure_slots(self._next_slot)
        return slot

    def close_session(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._release_slot(session.slot)

    def _release_slot(self, slot: int) -> None:
        del self._slot_owner[slot]
        self._free_slots.append(slot)
        self._free_slots.sort(reverse=True)  # reuse low slots first: keeps batches dense

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # verification ---------------------------------------------------------------------
    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        started = time.perf_counter()
        with self._lock:
            sessions = [self._session(r.session_id) for r in requests]
            verdicts: list[Verdict | None] = [None] * len(requests)
            todo: list[int] = []
            if len({id(s) for s in sessions}) < len(sessions):
                raise InvalidRequestError("a session may appear only once per verify call")
            for i, (req, s) in enumerate(zip(requests, sessions, strict=True)):
                if req.round < s.round:
                    raise InvalidRequestError(f"round {req.round} of {req.session_id!r} is stale (now {s.round})")
                if req.round == s.round and s.last is not None:
                    verdicts[i] = s.last  # a retried round: answer it again, change nothing
                else:
                    self._check_request(req, s)
                    todo.append(i)
            if todo:
                run = [sessions[i] for i in todo]
                logits = self._forward(run, [[s.pending, *requests[i].tokens] for i, s in zip(todo, run, strict=True)])
                # one device-to-host copy of every row's argmax, not one sync per session
                argmax = logits.argmax(-1).cpu()  # (rows, t_max)
                for row, i in enumerate(todo):
                    verdicts[i] = self._decide(sessions[i], requests[i], logits[row], argmax[row])
                if any(requests[i].logprobs is not None for i in todo):
                    self._add_logprobs(logits, [requests[i] for i in todo], [sessions[i] for i in todo])
                    for i in todo:
                        verdicts[i] = sessions[i].last
        assert all(v is not None for v in verdicts)
        return VerifyResult(verdicts=verdicts, verify_ms=(time.perf_counter() - started) * 1e3)  # type: ignore[arg-type]

    def _session(self, session_id: str) -> _Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionNotFoundError(f"no open verifier session {session_id!r}") from None

    def _check_request(self, req: VerifyRequest, s: _Session) -> None:
        checked_round(req, s.length, s.params, self.context_length, self.vocab_size)

    def _decide(self, s: _Session, req: VerifyRequest, logits: torch.Tensor, argmax: torch.Tensor) -> Verdict:
        """Judge the round, then keep what it accepted."""
        verdict = self._judge(s, req, logits, argmax)
        # keep the pending token and the accepted draft tokens; the verifier's token is next
        s.length += 1 + verdict.n_matches
        s.pending = verdict.verifier_token
        s.round, s.last = req.round, verdict
        return verdict

    def _judge(self, s: _Session, req: VerifyRequest, logits: torch.Tensor, argmax: torch.Tensor) -> Verdict:
        """The acceptance rule. logits  # (t_max, vocab) on the model's device; argmax  # (t_max,) on the host"""
        k = len(req.tokens)
        draft = torch.tensor(req.tokens, dtype=torch.long)
        if s.params.greedy:
            return accept_greedy(draft, argmax[: k + 1])
        p = warp(logits[: k + 1], s.params).cpu()
        q = torch.from_numpy(np.asarray(req.q, dtype=np.float32)) if k else torch.zeros(0, p.size(-1))
        return accept_sampling(draft, q, p, s.generator)

    @torch.inference_mode()
    def _add_logprobs(self, logits: torch.Tensor, requests: list[VerifyRequest], sessions: list[_Session]) -> None:
        """Put each emitted token's logprob under the verifier on the verdicts of the rows that asked.

        logits  # (rows, t_max, vocab) on the model's device, row r for requests[r] and sessions[r]
        Emitted token j of a row was scored at position j: the accepted draft tokens, then the
        verifier's own token at position n_matches (greedy or resampled alike). Every row that
        asked goes through one log_softmax and one device-to-host copy. The verdicts are
        already committed (``s.last``): a retried round gets them with their logprobs.
        """
        assert logits.shape[0] == len(requests) == len(sessions)
        asked = [
            (row, r, s) for row, (r, s) in enumerate(zip(requests, sessions, strict=True)) if r.logprobs is not None
        ]
        rows: list[int] = []
        positions: list[int] = []
        tokens: list[int] = []
        for row, req, s in asked:
            assert s.last is not None
            emitted = s.last.emitted_tokens(req.tokens)
            rows += [row] * len(emitted)
            positions += range(len(emitted))
            tokens += emitted
        top_n = max(req.logprobs or 0 for _, req, _ in asked)
        index = torch.tensor([rows, positions, tokens], dtype=torch.long).to(self.device)  # (3, emitted)
        entries = iter(token_logprobs(logits[index[0], index[1]], index[2], top_n))
        for _, req, s in asked:
            assert s.last is not None and req.logprobs is not None
            lps = tuple(truncate_top(next(entries), req.logprobs) for _ in range(s.last.n_matches + 1))
            s.last = dataclasses.replace(s.last, logprobs=lps)

    @torch.inference_mode()
    def _forward(self, sessions: list[_Session], inputs: list[list[int]], logits: bool = True) -> torch.Tensor:
        """Run ``inputs[i]`` after session i's cached prefix, all rows in one forward pass.

        returns  # (len(sessions), t_max, vocab) logits, rows in the order given; with
        ``logits=False`` (prefill: only the cache is wanted) the model may compute just the
        last position's, and nothing should read them
        """
        lo = min(s.slot for s in sessions)
        hi = max(s.slot for s in sessions) + 1
        t_max = max(len(x) for x in inputs)
        n_rows = hi - lo
        ids = torch.full((n_rows, t_max), self.eos_token_id or 0, dtype=torch.long)
        # rows in [lo, hi) that are not in this batch run throw-away tokens placed after
        # their owner's committed length: those positions are rewritten before they are
        # ever read, so the owner's cache is untouched; their logits are dropped
        lengths = torch.tensor(
            [owner.length if (owner := self._slot_owner.get(slot)) else 0 for slot in range(lo, hi)],
            dtype=torch.long,
        )
        for s, x in zip(sessions, inputs, strict=True):
            ids[s.slot - lo, : len(x)] = torch.tensor(x, dtype=torch.long)
        positions = lengths.unsqueeze(1) + torch.arange(t_max).unsqueeze(0)  # (rows, t_max)
        kv_len = int(positions.max()) + 1
        assert kv_len <= self.cache.shape[2], f"{kv_len} positions exceed the slot capacity"
        keys = torch.arange(kv_len)
        mask = keys.view(1, 1, 1, kv_len) <= positions.view(n_rows, 1, t_max, 1)  # causal per row
        positions, mask = positions.to(self.device), mask.to(self.device)
        self.cache.bind(slice(lo, hi), positions, kv_len)
        extra = {"logits_to_keep": 1} if not logits and self._logits_to_keep else {}
        with attention_backends(self.device):
            out = self.model(
                input_ids=ids.to(self.device),
                position_ids=positions,
                attention_mask=mask,
                past_key_values=self.cache,
                use_cache=True,
                **extra,
            )
        rows = torch.tensor([s.slot - lo for s in sessions], device=self.device)
        return out.logits.index_select(0, rows)


def load_causal_lm(model_path: str | Path, device: torch.device, dtype: torch.dtype):
    """Load a transformers causal LM from a path or hub id, or raise ModelLoadError."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {model_path!r}: {exc}") from exc
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        model.config._attn_implementation = "sdpa"
    return model
