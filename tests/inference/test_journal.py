"""The settlement journal: a process that dies owing charges is charged by the next recovery, exactly, once.

A process's death is simulated by closing its journal's file without deleting it: the
``flock`` goes, as the kernel drops it when a process dies, and the streams it was serving
are never settled by it (the real SIGKILL of a server is ``make faults``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async

from inference import gateway, settlement, tasks
from inference.journal import Journal, recover
from inference.models import SloSample
from tenants.leases import LeasePool
from tenants.models import Budget, BudgetLease, Reservation, UsageRecord
from tenants.services import budget_set
from tests.inference.conftest import GatedEngine, serving_gated
from tests.inference.test_consumers import key_socket, receive, receive_tokens, run_to_end, start

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


@pytest.fixture
def journal(tmp_path, monkeypatch, settings) -> Journal:
    """This process's journal, in a folder of the test's own."""
    settings.TANDEM_JOURNAL_DIR = tmp_path / "journal"
    mine = Journal(settings.TANDEM_JOURNAL_DIR)
    monkeypatch.setattr(settlement, "journal", mine)
    return mine


@pytest.fixture
def gated() -> Iterator[GatedEngine]:
    with serving_gated(GatedEngine()) as engine:
        yield engine


def die(journal: Journal) -> Path:
    """The process 'dies': its journal file stays, its lock goes (and it journals nothing more to that file)."""
    path = journal.path
    assert path is not None and path.exists()
    journal._forget_in_child()
    return path


def records(path: Path, request_id: str) -> list[dict]:
    lines = path.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("id") == request_id]


async def journaled(journal: Journal, request_id: str, tokens: int) -> None:
    """Wait until the journal says the client was sent ``tokens`` (it is written once the send returns)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = [r for r in records(journal.path, request_id) if r["op"] == "n"] if journal.path else []
        if counts and counts[-1]["n"] == tokens:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the journal never showed {tokens} tokens sent")


async def streaming(account, journal: Journal, gated: GatedEngine, tokens: int):
    """A websocket stream whose client has received ``tokens`` tokens, journaled: (the socket, its request id)."""
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=20))
    gated.gate.release(tokens)
    request_id = (await receive(ws))["request_id"]
    await receive_tokens(ws, tokens)
    await journaled(journal, request_id, tokens)
    return ws, request_id


async def test_a_stream_cut_by_a_dead_process_is_charged_for_what_its_client_received(
    account, journal, gated, settings
):
    settings.TANDEM_RESERVATION_TTL_S = 0  # the stale-hold sweep would give the hold back at once
    ws, request_id = await streaming(account, journal, gated, 7)
    die(journal)

    # the sweep reads the dead process's journal before it gives holds back: charged, not released
    figures = await sync_to_async(tasks.settle_dead_processes)()
    assert figures["journal"]["charged"] == 1 and figures["journal"]["files"] == 1
    row = await UsageRecord.objects.aget(request_id=request_id)
    assert row.completion_tokens == 7 and row.outcome == "error" and row.cost_total > 0
    reservation = await Reservation.objects.aget(request_id=request_id)
    assert reservation.status == "settled"
    budget = await Budget.objects.filter(tenant=account.tenant).afirst()
    assert budget is None or (budget.reserved == 0 and budget.spent == row.cost_total)
    sample = await SloSample.objects.aget(request_id=request_id)
    assert sample.tokens == 7 and sample.outcome == "error"

    # the process was not really dead: its own settlement now finds the request charged and charges nothing more
    await ws.disconnect()
    await gateway.ledger_writes_flush()
    assert await UsageRecord.objects.filter(leg_of=request_id).acount() == 1
    assert (await UsageRecord.objects.aget(request_id=request_id)).cost_total == row.cost_total


async def test_a_lease_charge_settled_in_memory_but_not_written_is_written_by_the_recovery(
    account, journal, settings, monkeypatch
):
    settings.TANDEM_BUDGET_LEASES = True
    settings.TANDEM_SETTLE_AFTER_REPLY = True
    # a pool whose batches are written only when asked: the process dies with its charge pending
    pool = LeasePool(keeper=False, on_flush=settlement._slo_samples_write, on_open=journal.lease_opened)
    monkeypatch.setattr(settlement, "leases", pool)
    monkeypatch.setattr(gateway, "leases", pool)
    await sync_to_async(budget_set)(tenant=account.tenant, period="month", hard_limit=Decimal("100"), soft_limit=None)
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=9))
    started, tokens, done = await run_to_end(ws, "s1")
    assert done["type"] == "done" and len(tokens) == 9
    lease = await BudgetLease.objects.aget()
    assert not await UsageRecord.objects.aexists() and lease.status == "active"
    die(journal)
    pool.forget_all()

    figures = await sync_to_async(recover)(journal.directory)
    assert figures.charged == 1 and figures.leases_closed == 1
    row = await UsageRecord.objects.aget(request_id=started["request_id"])
    assert row.completion_tokens == 9 and row.outcome == "completed" and row.lease_id == lease.pk
    assert row.cost_total == Decimal(done["usage"]["cost"]["total"]) > 0  # what the client was told
    lease = await BudgetLease.objects.aget()
    budget = await Budget.objects.aget(tenant=account.tenant)
    assert lease.status == "closed" and lease.charged == row.cost_total
    assert budget.reserved == 0 and budget.spent == row.cost_total
    await ws.disconnect()


async def test_a_living_process_journal_is_left_alone(account, journal, gated):
    ws, request_id = await streaming(account, journal, gated, 3)
    figures = await sync_to_async(recover)(journal.directory)  # its lock is held: the process lives
    assert figures.files == 0 and figures.charged == 0 and journal.path.exists()
    await ws.disconnect()
    await gateway.ledger_writes_flush()
    row = await UsageRecord.objects.aget(request_id=request_id)
    assert row.completion_tokens == 3  # settled by its own process, once
    assert journal.open_requests() == 0


async def test_recovering_one_journal_twice_charges_once_and_a_torn_last_line_is_ignored(account, journal, gated):
    ws, request_id = await streaming(account, journal, gated, 4)
    path = die(journal)
    with path.open("a") as file:
        file.write('{"op":"n","id":"' + request_id + '","leg":0,"n":')  # the writer died mid-line
    copy = path.with_suffix(".copy")
    shutil.copy(path, copy)

    first = await sync_to_async(recover)(journal.directory)
    copy.rename(path)  # the same file again, as a second recovery that opened it before the first deleted it
    second = await sync_to_async(recover)(journal.directory)
    assert (first.charged, second.charged, second.already_written) == (1, 0, 1)
    row = await UsageRecord.objects.aget(request_id=request_id)
    assert row.completion_tokens == 4
    assert await UsageRecord.objects.acount() == 1
    await ws.disconnect()


async def test_a_finished_request_leaves_nothing_owed_in_the_journal(account, journal):
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=5))
    started, _, done = await run_to_end(ws, "s1")
    await gateway.ledger_writes_flush()
    ops = [r["op"] for r in records(journal.path, started["request_id"])]
    assert ops[0] == "leg" and ops[-2:] == ["settle", "end"] and "n" in ops
    assert journal.open_requests() == 0
    journal.close()
    assert not journal.path.exists()  # a clean exit deletes a file that owes nothing
    await ws.disconnect()


async def test_a_legs_first_record_and_its_counts_go_to_the_file_in_one_write(account, journal, monkeypatch):
    import os

    writes: list[bytes] = []
    real_write = os.write

    def counted(fd: int, data: bytes) -> int:
        if fd == journal._fd:
            writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counted)
    ws = await key_socket(account)
    await ws.send_json_to(start(max_tokens=5))
    started, _, done = await run_to_end(ws, "s1")
    await gateway.ledger_writes_flush()
    mine = [w for w in writes if started["request_id"].encode() in w]
    first = [json.loads(line)["op"] for line in mine[0].decode().splitlines()]
    assert first == ["leg", "n"]  # one write(2): a crash cannot leave the leg without its counts
    assert all(w.endswith(b"\n") for w in mine)
    await ws.disconnect()


async def test_the_counts_a_recovery_charges_include_the_rounds_the_verifier_cut_short():
    from inference.journal import _counts, _Entry, _interrupted_legs, usage_as_dict
    from inference.stream import Tally
    from tests.tenants.factories import usage_for

    tally = Tally(delivered=9, accepted=5, rejections=2, drafted=8.0, gpu_ms=3.5)
    entry = _Entry("req")
    entry.legs[0] = {"price": 1, "usage": usage_as_dict(usage_for())}
    entry.counts[0] = json.loads(_counts("req", 0, tally, prompt_tokens=4))
    [(price, usage)] = _interrupted_legs(entry)
    assert (usage.completion_tokens, usage.accepted_tokens, usage.draft_rejections) == (9, 5, 2)
    assert usage.drafted_tokens == Decimal("8.000") and price == 1
    del entry.counts[0]["r"]  # a journal written before the count: none
    assert _interrupted_legs(entry)[0][1].draft_rejections == 0
