"""A verifier across the network: the client of ``python -m speculative.serve``.

:class:`RemoteVerifier` implements the same :class:`~speculative.verifier.Verifier`
protocol as :class:`~speculative.verifier.TransformersVerifier`, so an edge node's
engine runs its draft locally and verifies over HTTP without knowing the difference.

Every call has a timeout. Every call is idempotent on the server (a reopened session
with the same prompt, a repeated round, a second close all answer as the first did), so
connection errors, timeouts and 5xx answers are retried with exponential backoff; when
the retries are spent the call raises :class:`VerifierUnavailableError` naming the URL,
so the caller can fall back rather than hang. A 4xx answer is the request's fault: it is
raised at once as the ``speculative.errors`` class the server names.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Sequence
from urllib.parse import quote

import httpx
import numpy as np

from speculative import errors
from speculative.errors import SpeculativeError, VerifierUnavailableError
from speculative.types import SamplingParams, TokenLogprob, Verdict
from speculative.verifier import VerifyRequest, VerifyResult

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0  # generous: a long prompt's prefill on a busy verifier takes a while
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.1  # doubled after every failed attempt

# the exception classes a server may name in an error body
_ERRORS_BY_NAME: dict[str, type[SpeculativeError]] = {
    name: cls for name, cls in vars(errors).items() if isinstance(cls, type) and issubclass(cls, SpeculativeError)
}


def encode_q(q: np.ndarray) -> str:
    """q  # (k, vocab) -> base64 of its little-endian float32 bytes (row-major)"""
    return base64.b64encode(np.ascontiguousarray(q, dtype="<f4").tobytes()).decode("ascii")


def _round_body(r: VerifyRequest) -> dict:
    body = {
        "session_id": r.session_id,
        "tokens": [int(t) for t in r.tokens],
        "q": None if r.q is None else encode_q(r.q),
        "round": r.round,
    }
    if r.logprobs is not None:  # sent only when asked: a round without it is what older servers read
        body["logprobs"] = r.logprobs
    return body


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_logprobs(item: dict, n_emitted: int, top_n: int, vocab_size: int) -> tuple[TokenLogprob, ...] | None:
    """A verdict's ``logprobs`` and ``top_logprobs`` (one entry per emitted token), or None if malformed."""
    values, tops = item.get("logprobs"), item.get("top_logprobs")
    if not (isinstance(values, list) and isinstance(tops, list) and len(values) == len(tops) == n_emitted):
        return None
    want = min(top_n, vocab_size)
    entries = []
    for value, top in zip(values, tops, strict=True):
        if not (_is_number(value) and isinstance(top, list) and len(top) == want):
            return None
        pairs = []
        for pair in top:
            if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int and _is_number(pair[1])):
                return None
            if not 0 <= pair[0] < vocab_size:
                return None
            pairs.append((pair[0], float(pair[1])))
        entries.append(TokenLogprob(float(value), tuple(pairs)))
    return tuple(entries)


class RemoteVerifier:
    """The Verifier protocol over HTTP, with a keep-alive ``httpx.Client`` (thread-safe)."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ):
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self._client = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(timeout_s))
        try:
            health = self.health()
            self.model: str = str(health["model"])
            self.vocab_size: int = int(health["vocab_size"])
            self.context_length: int = int(health["context_length"])
            eos = health["eos_token_id"]
            self.eos_token_id: int | None = None if eos is None else int(eos)
        except (KeyError, TypeError, ValueError) as exc:
            self._client.close()
            raise VerifierUnavailableError(
                f"{self.base_url}/v1/health did not describe a verifier: {type(exc).__name__}: {exc}"
            ) from exc
        except BaseException:
            self._client.close()
            raise
        log.info(
            "remote_verifier url=%s model=%s vocab_size=%d context_length=%d",
            self.base_url,
            self.model,
            self.vocab_size,
            self.context_length,
        )

    # the Verifier protocol ------------------------------------------------------------
    def health(self) -> dict:
        response, _ = self._call("GET", "/v1/health")
        return self._json(response, "/v1/health")

    def open_session(self, session_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> float:
        body = {
            "session_id": session_id,
            "prompt_ids": [int(t) for t in prompt_ids],
            "sampling": {
                "temperature": params.temperature,
                "top_k": params.top_k,
                "top_p": params.top_p,
                "seed": params.seed,
            },
        }
        response, _ = self._call("POST", "/v1/sessions", body)
        return float(self._json(response, "/v1/sessions").get("prefill_ms", 0.0))

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        if not requests:
            return VerifyResult(verdicts=[], verify_ms=0.0)
        body = {"requests": [_round_body(r) for r in requests]}
        response, round_trip_ms = self._call("POST", "/v1/verify", body)
        data = self._json(response, "/v1/verify")
        verdicts = self._verdicts(data, requests)
        verify_ms = float(data.get("verify_ms", 0.0))
        return VerifyResult(verdicts=verdicts, verify_ms=verify_ms, network_ms=max(0.0, round_trip_ms - verify_ms))

    def close_session(self, session_id: str) -> None:
        """Best effort: a session on a verifier that is gone is gone anyway (the server
        also expires idle sessions), and the engine closes sessions while unwinding from
        the error that made the verifier unreachable."""
        try:
            self._call("DELETE", f"/v1/sessions/{quote(session_id, safe='')}")
        except VerifierUnavailableError as exc:
            log.warning("close_session_failed session=%s error=%s", session_id, exc)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteVerifier:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # HTTP -----------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[httpx.Response, float]:
        """Send with retries; return (a response below 500, its round trip in ms)."""
        url = self.base_url + path
        attempts = self.retries + 1
        failure = ""
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                response = self._client.request(method, path, json=body)
            except httpx.TransportError as exc:  # refused, reset, timed out, broken mid-response
                failure = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                elapsed_ms = (time.perf_counter() - started) * 1e3
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise self._client_error(response, method, url)
                    return response, elapsed_ms
                failure = f"HTTP {response.status_code}: {_error_message(response)}"
            if attempt + 1 < attempts:
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "verifier_retry method=%s url=%s attempt=%d/%d delay_s=%.2f error=%s",
                    method,
                    url,
                    attempt + 1,
                    attempts,
                    delay,
                    failure,
                )
                time.sleep(delay)
        raise VerifierUnavailableError(
            f"the verifier at {self.base_url} did not answer {method} {path} "
            f"after {attempts} attempt{'s' if attempts > 1 else ''}: {failure}"
        )

    def _client_error(self, response: httpx.Response, method: str, url: str) -> SpeculativeError:
        """The exception a 4xx names; an answer that names none is not from a verifier."""
        kind = _error_type(response)
        cls = _ERRORS_BY_NAME.get(kind or "")
        if cls is None:
            return VerifierUnavailableError(
                f"{method} {url} answered HTTP {response.status_code} ({_error_message(response)}): "
                f"is {self.base_url} a speculative verifier?"
            )
        return cls(_error_message(response))

    def _json(self, response: httpx.Response, path: str) -> dict:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise VerifierUnavailableError(f"{self.base_url}{path} answered something that is not a JSON object")
        return data

    def _verdicts(self, data: dict, requests: Sequence[VerifyRequest]) -> list[Verdict]:
        """The verdicts, checked: a malformed answer must never turn into a wrong token."""
        raw = data.get("verdicts")
        if not isinstance(raw, list) or len(raw) != len(requests):
            raise VerifierUnavailableError(
                f"{self.base_url}/v1/verify answered {len(raw) if isinstance(raw, list) else 'no'} verdicts "
                f"for {len(requests)} rounds"
            )
        verdicts = []
        for req, item in zip(requests, raw, strict=True):
            try:
                n, token = item["n_matches"], item["verifier_token"]
            except (KeyError, TypeError):
                n = token = None
            if not (
                type(n) is int and type(token) is int and 0 <= n <= len(req.tokens) and 0 <= token < self.vocab_size
            ):
                raise VerifierUnavailableError(f"{self.base_url}/v1/verify answered a malformed verdict: {item!r}")
            logprobs = None
            if req.logprobs is not None:
                logprobs = parse_logprobs(item, n + 1, req.logprobs, self.vocab_size)
                if logprobs is None:
                    raise VerifierUnavailableError(
                        f"{self.base_url}/v1/verify answered no or malformed logprobs for a round that asked "
                        f"for them (a verifier server older than this client?): {item!r}"
                    )
            verdicts.append(Verdict(n_matches=n, verifier_token=token, logprobs=logprobs))
        return verdicts


def _error_body(response: httpx.Response) -> dict:
    try:
        data = response.json()
    except ValueError:
        return {}
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else {}


def _error_type(response: httpx.Response) -> str | None:
    kind = _error_body(response).get("type")
    return kind if isinstance(kind, str) else None


def _error_message(response: httpx.Response) -> str:
    message = _error_body(response).get("message")
    if isinstance(message, str):
        return message
    return response.text[:200] or response.reason_phrase
