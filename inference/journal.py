"""The settlement journal: what this process's requests delivered and owe, on local disk, until the ledger has it.

A request is charged in memory when it ends and its ledger row is written after the reply
(write-behind) or with its budget lease's next batch. A process that dies before that
(SIGKILL, the OOM killer, a crash) used to leave only its hold behind, which the stale-hold
task gave back: the tokens its clients had received were never charged. The journal closes
that gap. Each process appends to a file of its own (one JSON object a line, one
``write(2)`` each, no user-space buffer: what was written survives the process; a machine
that loses power may lose the page cache's last seconds, which this does not cover):

    {"op": "lease", "lease": 12}                              a budget lease this process opened
    {"op": "leg", "id", "leg", "hold", "price", "usage", "slo"}  a leg began delivering: its ledger row but the counts
    {"op": "n", "id", "leg", "n", "g", "d", "a", "t"}          after each write to the client: the counts sent so far
    {"op": "settle", "id", "hold", "legs", "slo"}             the request's exact charge, worked out at its end
    {"op": "end", "id"}                                       its ledger rows are committed (or nothing was owed)

Liveness is the kernel's: a process holds an exclusive ``flock`` on its file for as long as
it lives, and the lock goes when the process does, however it dies. ``recover()`` (the
stale-hold task runs it first; so does a starting server) takes the files whose lock it can
get, writes the ledger rows their requests still owe (the exact charge when the request had
ended; else what its client had been sent, as a request that failed mid-stream), closes the
dead process's leases, and deletes the file. Every write is idempotent (a request's ledger
id is unique; a settled reservation or closed lease refuses a second charge), so two
recoveries of one file charge nothing twice.

The journal is per host (``TANDEM_JOURNAL_DIR``, under the var dir): a process restarted on
another host leaves its predecessor's holds to the stale-hold task, as before.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference.stream import GatewayStream
    from tenants.services import LeaseCharge, Usage

log = logging.getLogger(__name__)

# A file whose every request has ended is emptied once it is this large (kept open: its lock is the process's life).
TRUNCATE_AT_BYTES = 4 << 20
INTERRUPTED = "the server stopped mid-stream; charged for what it had sent (settlement journal)"


def _hold_of(stream: GatewayStream) -> dict:
    hold = stream.hold
    if hold.lease_hold is not None:
        return {"lease": str(hold.lease_hold.lease.row.pk), "amount": str(hold.lease_hold.amount)}
    assert hold.reservation is not None
    return {"reservation": str(hold.reservation.pk), "amount": str(hold.reservation.amount)}


def usage_as_dict(usage: Usage) -> dict:
    # Usage's fields are flat (numbers, strings, None): read them directly, as dataclasses.asdict's
    # deep copy of each value cost a settlement more than the rest of its journal record.
    values = ((f.name, getattr(usage, f.name)) for f in dataclasses.fields(usage))
    return {k: (str(v) if isinstance(v, Decimal) else dict(v) if isinstance(v, Mapping) else v) for k, v in values}


def usage_from_dict(values: dict) -> Usage:
    from tenants.services import Usage

    fields = dict(values)
    for name in ("drafted_tokens", "gpu_ms"):
        fields[name] = Decimal(fields[name])
    if fields.get("replayed_cost") is not None:
        fields["replayed_cost"] = Decimal(fields["replayed_cost"])
    return Usage(**fields)


class Journal:
    """This process's journal file, opened on first use and locked for the process's life."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.path: Path | None = None
        self._open: set[str] = set()  # requests with records and no "end" yet
        me = weakref.ref(self)

        def forget_in_child() -> None:  # a forked child (Celery's prefork pool) writes a file of its own
            journal = me()
            if journal is not None:
                journal._forget_in_child()

        os.register_at_fork(after_in_child=forget_in_child)

    def _forget_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._fd is not None:
            os.close(self._fd)  # the parent's open file keeps its lock: closing our copy leaves it held
        self._fd, self.path, self._open = None, None, set()

    def _file(self) -> int:
        # caller holds self._lock
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
            path = self.directory / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd, self.path = fd, path
        return self._fd

    def _append(self, line: str, request_id: str | None = None, *, end: bool = False) -> None:
        data = line.encode()
        with self._lock:
            fd = self._file()
            if request_id is not None:
                if end:
                    if request_id not in self._open:
                        return  # nothing was journaled for it
                    self._open.discard(request_id)
                else:
                    self._open.add(request_id)
            os.write(fd, data)
            if end and not self._open and os.fstat(fd).st_size > TRUNCATE_AT_BYTES:
                os.ftruncate(fd, 0)  # O_APPEND: the next record goes at the new end

    def write(self, record: dict) -> None:
        self._append(_line(record), record.get("id"))

    # what the gateway writes ------------------------------------------------------------------
    def lease_opened(self, lease_id: object) -> None:
        self.write({"op": "lease", "lease": lease_id})

    def delivered(self, stream: GatewayStream) -> None:
        """After a write to the client: the counts of what it has been sent (a leg's own record first).

        The records of one call go in one ``write(2)``: the first delivery writes a leg's record
        and its counts together.
        """
        from inference.settlement import leg_usage, slo_sample

        legs = stream.legs()
        state = stream.journaled
        if state is None:
            if not stream.hold.held:
                return
            state = stream.journaled = JournalState()
        lines: list[str] = []
        for index in range(state.legs, len(legs)):
            leg = legs[index]
            if leg.price is None:
                continue
            usage = leg_usage(stream, leg, index, "error", INTERRUPTED)
            now = time.perf_counter()
            record = {
                "op": "leg",
                "id": stream.request_id,
                "leg": index,
                "hold": _hold_of(stream),
                "price": leg.price.pk,
                "usage": usage_as_dict(usage),
                "slo": slo_sample(stream, now, "error"),
            }
            lines.append(_line(record))
            if index < len(legs) - 1:  # a leg that ended: its final counts
                lines.append(_counts(stream.request_id, index, leg.tally, leg.prompt_tokens))
            state.legs = index + 1
        current = len(legs) - 1
        if state.legs > current:
            lines.append(_counts(stream.request_id, current, legs[current].tally, legs[current].prompt_tokens))
        if lines:
            self._append("".join(lines), stream.request_id)

    def settling(self, stream: GatewayStream, charges: list[LeaseCharge], slo: dict) -> None:
        """The exact charge of a request that ended (price, usage and what it held, per leg) and its SLO sample."""
        legs = [{"price": c.price.pk, "usage": usage_as_dict(c.usage), "held": str(c.held)} for c in charges]
        self.write({"op": "settle", "id": stream.request_id, "hold": _hold_of(stream), "legs": legs, "slo": slo})

    def ended(self, request_id: str) -> None:
        self._append(json.dumps({"op": "end", "id": request_id}) + "\n", request_id, end=True)

    def open_requests(self) -> int:
        with self._lock:
            return len(self._open)

    def close(self) -> None:
        """At a normal exit: the file goes if nothing in it is owed (else it stays for ``recover``)."""
        with self._lock:
            if self._fd is None:
                return
            if not self._open and self.path is not None:
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"), default=str) + "\n"


def _counts(request_id: str, leg: int, tally: Any, prompt_tokens: int) -> str:
    """A leg's "n" record: the counts of what its client has been sent so far."""
    first = tally.first_token_at
    ttft = "null" if first is None else f"{(first - tally.started) * 1e3:.3f}"
    elapsed = (time.perf_counter() - tally.started) * 1e3
    return (
        f'{{"op":"n","id":{json.dumps(request_id)},"leg":{leg},"p":{prompt_tokens},"n":{tally.delivered},'
        f'"g":"{tally.gpu_ms:.3f}","d":"{tally.drafted:.3f}","a":{tally.accepted},"r":{tally.rejections},'
        f'"t":{ttft},"e":{elapsed:.3f}}}\n'
    )


@dataclass
class JournalState:
    """What a stream has journaled so far (on the stream)."""

    legs: int = 0  # legs with their "leg" record written


# --- recovery -----------------------------------------------------------------------------------


@dataclass
class _Entry:
    request_id: str
    legs: dict[int, dict] = field(default_factory=dict)  # leg -> its "leg" record
    counts: dict[int, dict] = field(default_factory=dict)  # leg -> its last "n" record
    settle: dict | None = None
    ended: bool = False


def _read(fd: int) -> tuple[list[str], dict[str, _Entry]]:
    with os.fdopen(os.dup(fd), "rb") as file:
        lines = file.read().splitlines()
    leases: list[str] = []
    entries: dict[str, _Entry] = {}
    for raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a line torn by the death of its writer: nothing was owed on it yet
        op = record.get("op")
        if op == "lease":
            leases.append(record["lease"])
            continue
        entry = entries.setdefault(record["id"], _Entry(record["id"]))
        if op == "leg":
            entry.legs[record["leg"]] = record
        elif op == "n":
            entry.counts[record["leg"]] = record
        elif op == "settle":
            entry.settle = record
        elif op == "end":
            entry.ended = True
    return leases, entries


def _interrupted_legs(entry: _Entry) -> list[tuple[int, Usage]]:
    """What an unfinished request's client had been sent, leg by leg: charged as a request that failed mid-stream."""
    legs = []
    for index in sorted(entry.legs):
        counts = entry.counts.get(index)
        if counts is None or not counts["n"]:
            continue
        usage = usage_from_dict(entry.legs[index]["usage"])
        usage = dataclasses.replace(
            usage,
            prompt_tokens=counts["p"],
            completion_tokens=counts["n"],
            gpu_ms=Decimal(counts["g"]),
            drafted_tokens=Decimal(counts["d"]),
            accepted_tokens=counts["a"],
            draft_rejections=counts.get("r", 0),  # a journal written before the count
            ttft_ms=counts["t"],
            duration_ms=counts["e"],
            replayed_cost=None,  # what a replay saved is not known for part of one
        )
        legs.append((entry.legs[index]["price"], usage))
    return legs


def _settle_entry(entry: _Entry) -> str:
    """Write what one request of a dead process owes; return what happened (for the figures)."""
    from django.db import transaction

    from inference.models import SloSample
    from tenants import errors as tenant_errors
    from tenants import services as tenant_services
    from tenants.models import BudgetLease, Price, Reservation, UsageRecord

    if entry.settle is not None:
        hold = entry.settle["hold"]
        legs = [(leg["price"], usage_from_dict(leg["usage"])) for leg in entry.settle["legs"]]
        slo = dict(entry.settle["slo"])
    else:
        legs = _interrupted_legs(entry)
        if not legs:
            return "nothing_owed"
        first = entry.legs[min(entry.legs)]
        hold = entry.legs[max(entry.legs)]["hold"]  # a move to a dearer tier may have held more
        slo = dict(first["slo"])
        tokens = sum(usage.completion_tokens for _, usage in legs)
        slo.update(tokens=tokens, e2e_ms=max(usage.duration_ms or 0.0 for _, usage in legs), inter_token_ms=None)
        slo["fallback"] = slo["fallback"] or len(legs) > 1
    if UsageRecord.objects.filter(request_id=legs[0][1].request_id).exists():
        return "already_written"
    prices = Price.objects.in_bulk([price for price, _ in legs])
    if any(price not in prices for price, _ in legs):
        # a database that is not the one this journal was written against (reset, or another deployment's)
        log.warning("journal: request %s names a price this database lacks; dropped", entry.request_id)
        return "hold_gone"
    priced = [(prices[price], usage) for price, usage in legs]
    try:
        with transaction.atomic():
            if "reservation" in hold:
                reservation = Reservation.objects.get(pk=hold["reservation"])
                tenant_services.usage_settle_legs(reservation=reservation, legs=[(u, p) for p, u in priced])
            else:
                costs = tenant_services.settlement_costs(legs=priced, held=Decimal(hold["amount"]))
                charges, left = [], Decimal(hold["amount"])
                for (price, usage), cost in zip(priced, costs, strict=True):
                    charges.append(tenant_services.LeaseCharge(usage=usage, price=price, held=left))
                    left -= cost.total
                lease = BudgetLease.objects.get(pk=hold["lease"])
                tenant_services.budget_lease_settle(lease=lease, charges=charges)
            if not SloSample.objects.filter(request_id=slo["request_id"]).exists():
                SloSample.objects.create(**slo)
    except (tenant_errors.AlreadySettled, Reservation.DoesNotExist, BudgetLease.DoesNotExist):
        # Its hold was given back before the journal was read (the stale-hold task ran first, or
        # the books were reset): the tokens it delivered stay uncharged, as before the journal.
        log.warning("journal: request %s could not be charged: its hold is gone", entry.request_id)
        return "hold_gone"
    return "charged"


@dataclass
class Recovered:
    files: int = 0
    charged: int = 0
    already_written: int = 0
    nothing_owed: int = 0
    hold_gone: int = 0
    leases_closed: int = 0
    request_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recover(directory: Path | str, *, skip: Iterable[Path | None] = ()) -> Recovered:
    """Charge what dead processes' requests owe (their journal files, by their released locks); close their leases."""
    from tenants import errors as tenant_errors
    from tenants import services as tenant_services
    from tenants.models import BudgetLease

    figures = Recovered()
    folder = Path(directory)
    if not folder.is_dir():
        return figures
    skipped = {p for p in skip if p is not None}
    for path in sorted(folder.glob("*.jsonl")):
        if path in skipped:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # another recovery took it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process lives
            if not path.exists():
                continue  # recovered and deleted between our open and our lock
            leases, entries = _read(fd)
            for entry in entries.values():
                if entry.ended:
                    continue
                outcome = _settle_entry(entry)
                setattr(figures, outcome, getattr(figures, outcome) + 1)
                if outcome == "charged":
                    figures.request_ids.append(entry.request_id)
            for lease_id in leases:
                try:
                    tenant_services.budget_lease_close(lease=BudgetLease(pk=lease_id))
                    figures.leases_closed += 1
                except (tenant_errors.AlreadySettled, BudgetLease.DoesNotExist):
                    pass  # returned at exit, or by the stale-hold task
            path.unlink()
            figures.files += 1
        except Exception:
            # Kept for the next run (a database that is down now): what it owes is still owed.
            log.exception("journal: recovering %s failed; it is kept and tried again", path.name)
        finally:
            os.close(fd)
    if figures.charged or figures.leases_closed:
        log.warning(
            "journal: charged %d requests of dead processes, closed %d leases", figures.charged, figures.leases_closed
        )
    return figures


def recover_in_background() -> threading.Thread:
    """``recover`` on a thread of its own (a server starting: the dead predecessor's charges, without delaying it)."""
    from django.conf import settings
    from django.db import connection

    from inference import settlement

    def run() -> None:
        try:
            recover(settings.TANDEM_JOURNAL_DIR, skip=[settlement.journal.path])
        except Exception:  # noqa: BLE001 - the stale-hold task tries again; a start-up must not fail for it
            log.exception("journal: recovery at start-up failed")
        finally:
            connection.close()

    thread = threading.Thread(target=run, name="journal-recovery", daemon=True)
    thread.start()
    return thread
