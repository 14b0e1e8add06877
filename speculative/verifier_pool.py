"""Several verifiers of one model behind one ``Verifier``: each session on one of them, rounds sent to each at once.

A verifier holds a session's KV state, so a session stays on the verifier it was opened
on. ``open_session`` places it on the available verifier with the fewest sessions; a
verifier that failed (``VerifierUnavailableError``) takes no new session for
``cooldown_s``, so a server that went away costs new requests nothing while the ones it
served fail over (the gateway's business). ``verify`` splits a batch by verifier and sends
the parts at once, each from a thread of the pool's; a part whose verifier fails fails
the whole call with that error, which the engine turns into a failover for its sessions.

Time: ``verify_ms`` is the sum of the parts' verifier times (what the rounds cost, so the
sessions are charged the GPU time they used, wherever it ran), ``network_ms`` the longest
part's wait beyond its verifier time.

    pool = VerifierPool([RemoteVerifier(url) for url in urls])
    engine = SpeculativeEngine(pool, tokenizer, draft)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from speculative.errors import VerifierUnavailableError
from speculative.types import SamplingParams, Verdict
from speculative.verifier import Verifier, VerifyRequest, VerifyResult

log = logging.getLogger(__name__)

COOLDOWN_S = 10.0  # a verifier that failed takes no new session for this long


class VerifierPool:
    """The ``Verifier`` protocol over several verifiers of the same model (same vocabulary, context and EOS)."""

    def __init__(self, verifiers: Sequence[Verifier], *, cooldown_s: float = COOLDOWN_S) -> None:
        if not verifiers:
            raise ValueError("a verifier pool needs at least one verifier")
        first = verifiers[0]
        for other in verifiers[1:]:
            shape = (other.vocab_size, other.context_length, other.eos_token_id)
            if shape != (first.vocab_size, first.context_length, first.eos_token_id):
                raise ValueError(
                    f"the pool's verifiers serve different models: {shape} against "
                    f"{(first.vocab_size, first.context_length, first.eos_token_id)}"
                )
        self.verifiers = list(verifiers)
        self.vocab_size, self.context_length, self.eos_token_id = (
            first.vocab_size,
            first.context_length,
            first.eos_token_id,
        )
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._placed: dict[str, int] = {}  # session -> index of its verifier
        self._sessions = [0] * len(self.verifiers)
        self._down_until = [0.0] * len(self.verifiers)
        self._threads = ThreadPoolExecutor(max_workers=len(self.verifiers), thread_name_prefix="verifier-pool")

    def sessions(self) -> list[int]:
        """Sessions open on each verifier (tests, metrics)."""
        with self._lock:
            return list(self._sessions)

    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        tried: set[int] = set()
        while True:
            index = self._place(session_id, tried)
            try:
                return self.verifiers[index].open_session(session_id, prompt_ids, params)
            except VerifierUnavailableError:
                self._unplace(session_id)
                self._mark_down(index)
                tried.add(index)
                if len(tried) == len(self.verifiers):
                    raise  # every verifier failed: the caller fails over

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        if not requests:
            return VerifyResult(verdicts=[], verify_ms=0.0)
        with self._lock:
            parts: dict[int, list[int]] = {}
            for position, request in enumerate(requests):
                parts.setdefault(self._placed[request.session_id], []).append(position)
        if len(parts) == 1:
            (index,) = parts
            return self._verify_on(index, list(requests))
        futures = {
            index: self._threads.submit(self._verify_on, index, [requests[p] for p in positions])
            for index, positions in parts.items()
        }
        verdicts: list[Verdict | None] = [None] * len(requests)
        verify_ms = network_ms = 0.0
        for index, future in futures.items():
            result = future.result()  # a failed part raises here: its error is the call's
            for position, verdict in zip(parts[index], result.verdicts, strict=True):
                verdicts[position] = verdict
            verify_ms += result.verify_ms
            network_ms = max(network_ms, result.network_ms)
        assert all(v is not None for v in verdicts)
        return VerifyResult(verdicts=[v for v in verdicts if v is not None], verify_ms=verify_ms, network_ms=network_ms)

    def close_session(self, session_id: str) -> None:
        index = self._unplace(session_id)
        if index is not None:
            self.verifiers[index].close_session(session_id)

    def close(self) -> None:
        self._threads.shutdown(wait=False)
        for verifier in self.verifiers:
            close = getattr(verifier, "close", None)
            if close is not None:
                close()

    # placement ---------------------------------------------------------------------------------
    def _verify_on(self, index: int, requests: list[VerifyRequest]) -> VerifyResult:
        try:
            return self.verifiers[index].verify(requests)
        except VerifierUnavailableError:
            self._mark_down(index)
            raise

    def _place(self, session_id: str, tried: set[int]) -> int:
        now = time.monotonic()
        with self._lock:
            candidates = [i for i in range(len(self.verifiers)) if i not in tried]
            up = [i for i in candidates if self._down_until[i] <= now]
            # all down: try the one whose cool-down ends first rather than refuse (it may be back)
            index = min(up or candidates, key=lambda i: (self._sessions[i], self._down_until[i], i))
            self._placed[session_id] = index
            self._sessions[index] += 1
            return index

    def _unplace(self, session_id: str) -> int | None:
        with self._lock:
            index = self._placed.pop(session_id, None)
            if index is not None:
                self._sessions[index] -= 1
            return index

    def _mark_down(self, index: int) -> None:
        with self._lock:
            self._down_until[index] = time.monotonic() + self.cooldown_s
        log.warning("verifier %d of the pool failed: no new sessions on it for %.0f s", index, self.cooldown_s)
