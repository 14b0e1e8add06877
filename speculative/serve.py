"""The verifier over HTTP: one async process per GPU, batching every client's rounds.

``python -m speculative.serve --model PATH --port 8765`` loads a
:class:`~speculative.verifier.TransformersVerifier` and wraps it in a
:class:`~speculative.scheduler.VerifyScheduler`. Each round an edge node posts is
submitted to the scheduler on its own, so rounds from many clients and sessions that
arrive together are verified in one forward pass. Endpoints (JSON):

    GET    /v1/health                 model, vocab_size, context_length, eos_token_id, open_sessions
    POST   /v1/sessions               {session_id, prompt_ids, sampling} -> {prefill_ms}
    POST   /v1/verify                 {requests: [{session_id, tokens, q, round, logprobs?}]}
                                      -> {verdicts: [{n_matches, verifier_token,
                                                      logprobs?, top_logprobs?}], verify_ms}
    DELETE /v1/sessions/{session_id}  204

``q`` is the base64 of a little-endian float32 ``(k, vocab)`` array, or null (greedy).
``logprobs`` is optional (absent or null: none; N in 0..MAX_TOP_LOGPROBS): a round that
sends it gets, for each of its ``n_matches + 1`` emitted tokens, ``logprobs[j]`` (the
verifier's log-probability of it, see ``speculative.types.TokenLogprob``) and
``top_logprobs[j]`` (``[[token_id, logprob], ...]``, N pairs, highest first); a round
without it gets the verdict as older servers sent it.
Every call is safe to retry: opening an open session with the same prompt succeeds, a
repeated round gets the verdict it already got, closing a closed session is a no-op.
:class:`~speculative.remote.RemoteVerifier` is the client.

Errors map to HTTP statuses in one place (:func:`error_response`) with the body
``{"error": {"type": <speculative.errors class name>, "message": ...}}``, so the client
raises the same exception class the verifier raised. The process holds the sessions'
KV caches, so it must run as a single worker.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from speculative.errors import (
    ContextOverflowError,
    InvalidRequestError,
    ModelLoadError,
    SessionNotFoundError,
    SpeculativeError,
    VerifierUnavailableError,
)
from speculative.logprobs import check_logprobs
from speculative.scheduler import DEFAULT_WINDOW_MS, VerifyScheduler
from speculative.steps import RoundResult
from speculative.types import MAX_DRAFT_TOKENS, SamplingParams, Verdict
from speculative.verifier import Verifier, VerifyRequest

log = logging.getLogger("speculative.serve")  # not __main__ under python -m

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_SESSION_TTL_S = 600.0  # a session idle this long is closed (its client went away)
MAX_SESSION_ID_CHARS = 256
MAX_REQUESTS_PER_CALL = 1024

# error_response walks the exception's MRO, so a subclass maps as its nearest listed base
_STATUS_BY_ERROR: dict[type[Exception], int] = {
    ContextOverflowError: 422,
    InvalidRequestError: 400,
    SessionNotFoundError: 404,
    VerifierUnavailableError: 503,
    ModelLoadError: 500,
    SpeculativeError: 500,
}


def error_response(exc: Exception) -> JSONResponse:
    """The one place errors become HTTP: status from the class, body naming the class."""
    status = next((_STATUS_BY_ERROR[c] for c in type(exc).__mro__ if c in _STATUS_BY_ERROR), 500)
    if isinstance(exc, SpeculativeError):
        kind, message = type(exc).__name__, str(exc)
    else:
        kind, message = "InternalError", f"internal error: {type(exc).__name__}"
    if status >= 500:
        log.error("request_failed type=%s message=%r", kind, str(exc), exc_info=exc)
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown paths and wrong methods get the same error body as everything else."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(
        {"error": {"type": "HTTPException", "message": f"{exc.detail}: {request.method} {request.url.path}"}},
        status_code=exc.status_code,
    )


def _mapped(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a typed error body
            return error_response(exc)

    return wrapper


# request parsing --------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


async def _json_object(request: Request) -> dict:
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return data


def _require(data: dict, name: str, check: Callable[[object], bool], what: str, where: str = "") -> Any:
    """``data[name]``, or InvalidRequestError naming the field when it is missing or fails ``check``."""
    if name not in data:
        raise InvalidRequestError(f"missing field '{where}{name}' ({what})")
    value = data[name]
    if not check(value):
        raise InvalidRequestError(f"field '{where}{name}' must be {what}, got {type(value).__name__}")
    return value


def _session_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_SESSION_ID_CHARS


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def _round_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_sampling(data: object) -> SamplingParams:
    if data is None:
        return SamplingParams()
    if not isinstance(data, dict):
        raise InvalidRequestError("field 'sampling' must be an object")
    default = SamplingParams()
    values = {}
    for name, check, what in (
        ("temperature", _is_number, "a number"),
        ("top_k", _is_int, "an integer"),
        ("top_p", _is_number, "a number"),
        ("seed", _is_int, "an integer"),
    ):
        values[name] = _require(data, name, check, what, "sampling.") if name in data else getattr(default, name)
    unknown = set(data) - set(values)
    if unknown:
        raise InvalidRequestError(f"unknown sampling fields: {sorted(unknown)}")
    return SamplingParams(
        temperature=float(values["temperature"]),
        top_k=int(values["top_k"]),
        top_p=float(values["top_p"]),
        seed=int(values["seed"]),
    )


def _parse_q(value: object, k: int, vocab_size: int, where: str) -> np.ndarray | None:
    """q  # (k, vocab) float32 from base64 little-endian bytes, checked, or None"""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequestError(f"field '{where}q' must be a base64 string or null")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"field '{where}q' is not valid base64") from None
    if len(raw) != k * vocab_size * 4:
        raise InvalidRequestError(
            f"field '{where}q' must hold a float32 array of shape ({k}, {vocab_size}) "
            f"({k * vocab_size * 4} bytes), got {len(raw)} bytes"
        )
    q = np.frombuffer(raw, dtype="<f4").reshape(k, vocab_size).astype(np.float32)  # a writable copy
    if not np.isfinite(q).all() or (q < 0).any():
        raise InvalidRequestError(f"field '{where}q' must hold finite probabilities >= 0")
    return q


def parse_verify_body(data: dict, vocab_size: int) -> list[VerifyRequest]:
    """The rounds in a /v1/verify body, every shape and range checked before any work."""
    items = _require(data, "requests", lambda v: isinstance(v, list), "a list of rounds")
    if len(items) > MAX_REQUESTS_PER_CALL:
        raise InvalidRequestError(f"at most {MAX_REQUESTS_PER_CALL} rounds per call, got {len(items)}")
    requests: list[VerifyRequest] = []
    for i, item in enumerate(items):
        where = f"requests[{i}]."
        if not isinstance(item, dict):
            raise InvalidRequestError(f"requests[{i}] must be an object")
        session_id = _require(item, "session_id", _session_id, "a non-empty string", where)
        tokens = _require(item, "tokens", _int_list, "a list of integers", where)
        round_no = _require(item, "round", _round_number, "an integer >= 0", where)
        if len(tokens) > MAX_DRAFT_TOKENS:
            raise InvalidRequestError(f"{where}tokens: at most {MAX_DRAFT_TOKENS} draft tokens, got {len(tokens)}")
        if any(not 0 <= t < vocab_size for t in tokens):
            raise InvalidRequestError(f"{where}tokens: token ids must lie in [0, {vocab_size})")
        q = _parse_q(item.get("q"), len(tokens), vocab_size, where)
        logprobs = item.get("logprobs")
        if logprobs is not None and not _is_int(logprobs):
            raise InvalidRequestError(f"field '{where}logprobs' must be an integer or null")
        check_logprobs(logprobs)
        requests.append(VerifyRequest(session_id, tuple(tokens), q, round_no, logprobs))
    ids = [r.session_id for r in requests]
    if len(set(ids)) != len(ids):
        # two rounds of one session in one forward pass would both extend the same cache row
        raise InvalidRequestError("each session may appear at most once per verify call")
    return requests


def verdict_body(verdict: Verdict) -> dict:
    """A verdict as /v1/verify answers it; the logprob fields only when the round asked."""
    body: dict[str, Any] = {"n_matches": verdict.n_matches, "verifier_token": verdict.verifier_token}
    if verdict.logprobs is not None:
        body["logprobs"] = [e.logprob for e in verdict.logprobs]
        body["top_logprobs"] = [[[token, lp] for token, lp in e.top] for e in verdict.logprobs]
    return body


# sessions ---------------------------------------------------------------------------------
@dataclass
class _Session:
    """What the server remembers of a session to make open and verify safe to retry."""

    prompt: tuple[int, ...]
    params: SamplingParams
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once the open finished
    prefill_ms: float = 0.0
    round: int = -1  # the highest round submitted
    inflight: tuple[int, Future[RoundResult]] | None = None  # the round last submitted, and its future
    last_used: float = field(default_factory=time.monotonic)

    def busy_round(self) -> int | None:
        """The round the scheduler still holds, if any.

        Read from the future, not cleared by the handler: a handler that is cancelled
        must not make a still-queued round look finished.
        """
        if self.inflight is None or self.inflight[1].done():
            return None
        return self.inflight[0]


class SessionBook:
    """The open sessions, kept on the event loop (no locks: one thread touches it)."""

    def __init__(self, verifier: Verifier, scheduler: VerifyScheduler, ttl_s: float):
        self.verifier = verifier
        self.scheduler = scheduler
        self.ttl_s = ttl_s
        self.sessions: dict[str, _Session] = {}

    async def open(self, session_id: str, prompt: tuple[int, ...], params: SamplingParams) -> float:
        await self._expire_idle()
        while (entry := self.sessions.get(session_id)) is not None:
            if (entry.prompt, entry.params) != (prompt, params):
                raise InvalidRequestError(f"session {session_id!r} is already open with another prompt or sampling")
            await entry.ready.wait()  # a retry racing the first open: share its outcome
            if self.sessions.get(session_id) is entry:
                log.info("session_reopen id=%s", session_id)
                return entry.prefill_ms
            # the first open failed and was dropped: try again ourselves
        entry = _Session(prompt, params)
        self.sessions[session_id] = entry
        try:
            entry.prefill_ms = await asyncio.to_thread(self.verifier.open_session, session_id, prompt, params)
        except BaseException:
            if self.sessions.get(session_id) is entry:
                del self.sessions[session_id]
            raise
        finally:
            entry.ready.set()
        self.scheduler.join()  # the scheduler stops gathering early once every session is in
        log.info("session_open id=%s prompt_tokens=%d prefill_ms=%.2f", session_id, len(prompt), entry.prefill_ms)
        return entry.prefill_ms

    async def close(self, session_id: str) -> None:
        entry = self.sessions.get(session_id)
        if entry is not None:
            await entry.ready.wait()  # closing mid-prefill would leave the verifier's session behind
            if self.sessions.get(session_id) is entry:
                del self.sessions[session_id]
                self.scheduler.leave()
                log.info("session_close id=%s rounds=%d", session_id, entry.round + 1)
        await asyncio.to_thread(self.verifier.close_session, session_id)

    async def _expire_idle(self) -> None:
        now = time.monotonic()
        idle = [
            sid
            for sid, s in self.sessions.items()
            if s.ready.is_set() and s.busy_round() is None and now - s.last_used > self.ttl_s
        ]
        for sid in idle:
            log.warning("session_expired id=%s idle_s=%.0f", sid, now - self.sessions[sid].last_used)
            await self.close(sid)

    def submit(self, requests: Sequence[VerifyRequest]) -> list[Future[RoundResult]]:
        """Hand each round to the scheduler alone, so it batches with every other client's.

        A round already in flight (a client's retry after a timeout) shares the first
        submission's future: the verifier must never see one session twice in a batch.
        """
        for req in requests:
            entry = self.sessions.get(req.session_id)
            if entry is None:
                continue  # the verifier answers SessionNotFoundError
            if req.round < entry.round:
                raise InvalidRequestError(
                    f"session {req.session_id!r}: round {req.round} is stale (round {entry.round} was submitted)"
                )
            busy = entry.busy_round()
            if busy is not None and busy != req.round:
                raise InvalidRequestError(f"session {req.session_id!r}: round {busy} is still being verified")
        futures = []
        for req in requests:
            entry = self.sessions.get(req.session_id)
            if entry is None:
                futures.append(self.scheduler.submit(req))
                continue
            entry.last_used = time.monotonic()
            if entry.busy_round() is None:
                entry.round, entry.inflight = req.round, (req.round, self.scheduler.submit(req))
            assert entry.inflight is not None
            futures.append(entry.inflight[1])
        return futures


# the app ----------------------------------------------------------------------------------
def create_app(
    verifier: Verifier, scheduler: VerifyScheduler, *, session_ttl_s: float = DEFAULT_SESSION_TTL_S
) -> Starlette:
    """The verifier server's ASGI app; the caller owns (and closes) the scheduler."""
    book = SessionBook(verifier, scheduler, session_ttl_s)
    model_name = str(getattr(verifier, "model_path", type(verifier).__name__))

    async def health(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "model": model_name,
                "vocab_size": verifier.vocab_size,
                "context_length": verifier.context_length,
                "eos_token_id": verifier.eos_token_id,
                "open_sessions": len(book.sessions),
            }
        )

    async def open_session(request: Request) -> Response:
        data = await _json_object(request)
        session_id = _require(data, "session_id", _session_id, "a non-empty string")
        prompt = _require(data, "prompt_ids", _int_list, "a list of integers")
        params = _parse_sampling(data.get("sampling"))
        prefill_ms = await book.open(session_id, tuple(prompt), params)
        return JSONResponse({"prefill_ms": prefill_ms})

    async def verify(request: Request) -> Response:
        started = time.perf_counter()
        requests = parse_verify_body(await _json_object(request), verifier.vocab_size)
        futures = book.submit(requests)
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]  # the rounds that succeeded are kept: a retry gets their verdicts again
        rounds = cast(list[RoundResult], results)
        verify_ms = (time.perf_counter() - started) * 1e3
        log.debug(
            "verify rounds=%d batch_sizes=%s verify_ms=%.2f", len(rounds), [r.batch_size for r in rounds], verify_ms
        )
        return JSONResponse(
            {
                "verdicts": [verdict_body(r.verdict) for r in rounds],
                # the server's whole time on the call (queueing, batching window, forward), so
                # the client's round trip minus this is the network alone
                "verify_ms": verify_ms,
            }
        )

    async def close_session(request: Request) -> Response:
        await book.close(request.path_params["session_id"])
        return Response(status_code=204)

    app = Starlette(
        routes=[
            Route("/v1/health", _mapped(health), methods=["GET"]),
            Route("/v1/sessions", _mapped(open_session), methods=["POST"]),
            Route("/v1/verify", _mapped(verify), methods=["POST"]),
            Route("/v1/sessions/{session_id:path}", _mapped(close_session), methods=["DELETE"]),
        ],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.sessions = book
    return app


# the process ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from speculative.pair import DEMO_VERIFIER

    parser = argparse.ArgumentParser(
        prog="python -m speculative.serve",
        description="Serve a verifier over HTTP (one process per GPU; edge nodes draft and call it).",
    )
    parser.add_argument("--model", default=str(DEMO_VERIFIER), help="verifier model path or hub id")
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--window-ms", type=float, default=DEFAULT_WINDOW_MS, help="how long a batch waits for more sessions' rounds"
    )
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument(
        "--session-ttl-s",
        type=float,
        default=DEFAULT_SESSION_TTL_S,
        help="close sessions idle this long (their client went away)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from speculative.verifier import TransformersVerifier

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        verifier = TransformersVerifier(args.model, device=args.device, max_sessions=args.max_sessions)
    except ModelLoadError as exc:
        log.error("verifier_load_failed model=%s error=%s", args.model, exc)
        raise SystemExit(1) from None  # a clear line, not a traceback: the path is wrong
    log.info(
        "verifier_loaded model=%s device=%s vocab_size=%d context_length=%d",
        args.model,
        verifier.device,
        verifier.vocab_size,
        verifier.context_length,
    )
    scheduler = VerifyScheduler(verifier, window_ms=args.window_ms, max_batch=args.max_sessions)
    app = create_app(verifier, scheduler, session_ttl_s=args.session_ttl_s)
    try:
        # one worker: the sessions' KV caches live in this process
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    finally:
        scheduler.close()


if __name__ == "__main__":
    main()
