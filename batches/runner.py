"""Running a batch: its pending lines through the gateway, several at once, until none is left; then its files.

    batch = claim (or leave it: another live runner holds it, or it ended)
    N line workers: take the next pending line, stop if the batch is cancelled or expired,
                    claim it (a request id of its own), run it through the gateway, record its answer
    finalize: output and error files, the final status

Lines run concurrently (``TANDEM_BATCH_CONCURRENCY``) so that on the speculative tier
their rounds share the verifier's batched forwards; each waits its turn at batch priority
(``inference.queueing`` serves interactive requests first). Each line is one gateway
request, as ``inference.tasks.complete`` makes one: budget, limits, routing, the ledger
row (tagged ``batch_id``), at the price book's batch discount.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from django.conf import settings

from batches import lines, services
from batches.models import Batch, BatchLine
from inference import gateway
from inference.engines import ModelEntry
from inference.errors import GatewayError
from inference.gateway import GatewayStream, Principal, TokenDelta
from inference.runtime import db
from tenants.models import UsageRecord

log = logging.getLogger(__name__)

STOP_CHECK_S = 0.2  # how stale a worker's view of a cancel may be: lines started after it are at most this late
MAX_REFUSALS = 50  # a line refused this often for a passing reason (429/503) fails with that error


async def run_batch(
    batch_pk: int, *, on_line_done: Callable[[BatchLine], Awaitable[None]] | None = None
) -> Batch | None:
    """Run what is left of a batch; return it once ended (None: another runner holds it, or it had ended).

    ``on_line_done`` (tests) is awaited after each line is recorded.
    """
    runner = f"{os.getpid()}-{secrets.token_hex(4)}"
    batch = await db(services.batch_claim)(batch_pk=batch_pk, runner=runner)
    if batch is None:
        return None
    pending = iter(await db(services.lines_pending)(batch_pk=batch_pk))
    beat = asyncio.ensure_future(_heartbeat(batch_pk, runner))
    try:
        stopping = _Stop(batch_pk)
        workers = [_worker(batch, pending, stopping, on_line_done) for _ in range(settings.TANDEM_BATCH_CONCURRENCY)]
        await asyncio.gather(*workers)
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        _principals.pop(batch_pk, None)
    return await db(services.batch_finalize)(batch_pk=batch_pk, runner=runner)


async def _heartbeat(batch_pk: int, runner: str) -> None:
    while True:
        await asyncio.sleep(settings.TANDEM_BATCH_STALE_S / 3)
        if not await db(services.batch_heartbeat)(batch_pk=batch_pk, runner=runner):
            log.warning("batch %s: another runner took it over", batch_pk)
            return


class _Stop:
    """Whether the batch starts no more lines, read from the database at most every ``STOP_CHECK_S``."""

    def __init__(self, batch_pk: int):
        self.batch_pk, self.stopping = batch_pk, False
        self.checked_at: float | None = None
        self._lock = asyncio.Lock()  # workers asking while a read is in flight wait for its answer

    async def __call__(self) -> bool:
        async with self._lock:
            now = time.monotonic()
            if not self.stopping and (self.checked_at is None or now - self.checked_at >= STOP_CHECK_S):
                self.stopping = await db(services.batch_stopping)(batch_pk=self.batch_pk)
                self.checked_at = now
        return self.stopping


async def _worker(batch: Batch, pending, stopping: _Stop, on_line_done) -> None:
    for line_pk in pending:  # one iterator shared by the workers: each line is taken once
        if await stopping():
            return  # cancelled or past its window: lines not started are not run
        line = await db(services.line_claim)(line_pk=line_pk, batch=batch)
        if line is None:
            continue
        ok, status_code, body, recorded = await _run_line(batch, line)
        if not recorded:
            recorded = await db(services.line_record)(line_pk=line.pk, ok=ok, status_code=status_code, body=body)
        if recorded and on_line_done is not None:
            await on_line_done(line)


async def _run_line(batch: Batch, line: BatchLine) -> tuple[bool, int, dict, bool]:
    """One line through the gateway: (answered?, status code, body or OpenAI's error body, recorded with its charge?)."""
    assert isinstance(line.request, dict)
    url, request_id = line.request["url"], line.request_id
    for _ in range(MAX_REFUSALS):
        try:
            body, recorded = await _complete(batch, line, url, request_id)
            return True, 200, body, recorded
        except GatewayError as err:
            if err.retry_after is None or err.status not in (429, 503):
                return False, err.status, {"error": err.as_dict()}, False
            last = err
        # refused before anything was charged, for now (a rate limit, a full queue): wait, retry under a new id
        await asyncio.sleep(last.retry_after or 1)
        request_id = await db(services.line_retry_id)(line_pk=line.pk)
    return False, last.status, {"error": last.as_dict()}, False


@dataclass
class _InFlight:
    """A line's request while it runs: what ``record_with_charge`` needs to record its answer in the ledger's commit."""

    line_pk: int
    stream: GatewayStream
    entry: ModelEntry
    url: str
    deltas: list[TokenDelta] = field(default_factory=list)
    recorded: bool = False


# request id -> the line running under it, in this process (read on the DB thread by record_with_charge)
_in_flight: dict[str, _InFlight] = {}


async def _complete(batch: Batch, line: BatchLine, url: str, request_id: str) -> tuple[dict, bool]:
    assert isinstance(line.request, dict)
    principal = await _principal(batch)
    call, entry = await lines.line_call(
        line.request["body"], url, request_id=request_id, tags={"batch_id": batch.public_id}
    )
    stream = await gateway.start(principal, call)
    running = _in_flight[request_id] = _InFlight(line.pk, stream, entry, url)
    try:
        async for delta in stream:  # gateway.collect, keeping the deltas where record_with_charge sees them
            running.deltas.append(delta)
        await stream.settled()  # the ledger holds the charge
    finally:
        _in_flight.pop(request_id, None)
        await asyncio.shield(stream.aclose())  # a no-op when it ended; settles what was delivered if not
    text = "".join(d.text for d in running.deltas)
    return lines.response_body(stream, entry, url, text, running.deltas), running.recorded


# batch pk -> (when read, its key's principal): re-read after TANDEM_API_KEY_CACHE_TTL_S, as the API's key cache is
_principals: dict[int, tuple[float, Principal]] = {}


async def _principal(batch: Batch) -> Principal:
    """The batch's key acting again (refused once it is revoked or expired), read at most once per key-cache TTL."""
    now = time.monotonic()
    cached = _principals.get(batch.pk)
    if cached is not None and now - cached[0] < settings.TANDEM_API_KEY_CACHE_TTL_S:
        return cached[1]
    principal = await gateway.principal_for_api_key_id(batch.api_key_id or 0, batch.tenant_id)
    _principals[batch.pk] = (now, principal)
    return principal


def record_with_charge(sender, instance: UsageRecord, created: bool, **_: object) -> None:
    """Record a batch line's answer in the same commit as its ledger row (``post_save`` of ``UsageRecord``).

    Money and lines: recorded after the charge, a worker killed between the two commits
    would leave a line charged with its answer lost (``services.line_recover`` could only
    fail it); recorded with it, the answer and the charge exist together or not at all.
    Runs on the DB thread inside the settlement's transaction; only for a whole answer of
    one leg (every token collected), else the line is recorded after the charge as usual.
    A failure here is logged and never fails the ledger write.
    """
    running = _in_flight.get(instance.request_id)
    if running is None or not created:
        return
    stream, usage = running.stream, running.stream.usage
    if usage is None or usage.outcome != "completed" or stream.legs_done:
        return
    if len(running.deltas) != usage.completion_tokens:
        return
    try:
        text = "".join(d.text for d in running.deltas)
        body = lines.response_body(stream, running.entry, running.url, text, list(running.deltas))
        running.recorded = services.line_record(line_pk=running.line_pk, ok=True, status_code=200, body=body)
    except Exception:  # noqa: BLE001 - the charge must commit; the line is then recorded after it, as usual
        log.exception("batch line %s: its answer could not be recorded with its charge", running.line_pk)
