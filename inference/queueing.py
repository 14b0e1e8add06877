"""Slots on the engines, and a fair queue for the requests that wait for one.

A request takes a **slot** of the pool its tier runs on before it holds money or starts:
the edge and speculative tiers of a model share one pool (both run a draft sequence here,
and the draft has a fixed number), a model's cloud upstreams another. When a pool is full,
or the tenant already runs its limit of streams at once, the request **waits** instead of
being refused:

- Interactive requests go before batch ones; within a class, tenants share slots fairly
  (start-time fair queueing: each waiter is tagged ``max(virtual time, its tenant's last
  tag) + 1``, and the smallest tag goes next), so a tenant that sends 400 requests at once
  does not push back another that sends 4.
- Each waits at most its class's deadline (``TANDEM_QUEUE_DEADLINE_S``); a request that
  cannot start in time is refused at once where the pool's recent pace says so, else when
  its deadline passes: 503 with ``Retry-After``. A tenant past its share of the queue gets
  429, the queue past its bound 503, both with ``Retry-After``.
- A freed slot goes straight to the next waiter (no stampede), across event loops
  (a batch worker's loop and the web loop may share a process).

``slot = await scheduler.acquire(pool_key, capacity, tenant_id, limit, latency_class,
on_position=...)``; ``slot.release()`` once the stream settles (idempotent).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings

from inference.arrivals import arrived
from inference.errors import Overloaded, RateLimited

CLASS_RANK = {"interactive": 0, "batch": 1}
Owners = tuple[tuple[str, int], ...]  # who a stream counts against, with their limits: its tenant, its key
POSITION_EVERY_S = 1.0  # a waiter hears of its new place in the queue at most this often
PACE_WEIGHT = 0.2  # the weight of the newest slot's hold time in the pool's running average


@dataclass(eq=False)
class _Waiter:
    key: tuple[int, float, int]  # (class rank, fair tag, arrival): the queue's order
    tenant_id: int
    owners: Owners
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    on_position: Callable[[int], None] | None
    told: float = 0.0  # when it last heard its place
    told_position: int = -1


@dataclass(eq=False)
class Slot:
    """A place on a pool's engines; ``release()`` gives it to the next waiter."""

    pool: Pool
    tenant_id: int
    owners: Owners
    waited_s: float = 0.0
    taken_at: float = field(default_factory=time.monotonic)
    also: Callable[[], None] | None = None  # given back with it: its claim on the streams shared through Redis
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.pool.release(self)
            if self.also is not None:
                self.also()


class Pool:
    """One set of engine slots and the requests waiting for them."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self._lock = threading.Lock()
        self.running = 0
        self._by_owner: dict[str, int] = {}  # streams running per tenant ("t1") and per key with a limit ("k7")
        self._waiting: list[_Waiter] = []  # sorted by key
        self._waiting_by_tenant: dict[int, int] = {}
        self._tags: dict[int, float] = {}  # each tenant's last fair tag
        self._virtual = 0.0
        self._arrivals = itertools.count()
        self.hold_s = 0.0  # running average of how long a slot is held (0: no slot released yet)

    # state, for the console and the tests -------------------------------------------------------
    def waiting(self, tenant_id: int | None = None) -> int:
        with self._lock:
            return len(self._waiting) if tenant_id is None else self._waiting_by_tenant.get(tenant_id, 0)

    def running_for(self, tenant_id: int) -> int:
        with self._lock:
            return self._by_owner.get(f"t{tenant_id}", 0)

    def busy(self) -> bool:
        """Whether a new request would wait: every slot taken, or others already waiting."""
        with self._lock:
            return self.running >= self.capacity or bool(self._waiting)

    def expected_wait_s(self, ahead: int) -> float:
        """How long the ``ahead``-th waiter can expect to wait at the pool's recent pace (0: unknown)."""
        return self.hold_s * (ahead + 1) / max(1, self.capacity)

    # taking and giving back -------------------------------------------------------------------------
    async def acquire(
        self,
        tenant_id: int,
        tenant_limit: int,
        latency_class: str = "interactive",
        on_position: Callable[[int], None] | None = None,
        key: tuple[int, int] | None = None,
    ) -> Slot:
        """A slot now, or after waiting in the fair queue; raises RateLimited or Overloaded (with ``retry_after``).

        ``tenant_limit`` bounds the tenant's streams at once, ``key`` = (API key id, its own limit) its key's.
        """
        deadline_s = settings.TANDEM_QUEUE_DEADLINE_S[latency_class]
        loop = asyncio.get_running_loop()
        owners: Owners = ((f"t{tenant_id}", tenant_limit),) + (((f"k{key[0]}", key[1]),) if key else ())
        with self._lock:
            if not self._waiting and self._fits(owners):
                self._take(owners)
                return Slot(self, tenant_id, owners)
            waiter = self._enqueue(tenant_id, owners, latency_class, deadline_s, loop, on_position)
            # Slots may be free while every waiter's tenant is at its own limit: this one may go now.
            handed = self._hand_over()
        arrived()  # no telling when it starts: no scheduler waits for it meanwhile
        started = time.monotonic()
        self._resolve_all(handed)
        try:
            async with asyncio.timeout(deadline_s):
                slot = await waiter.future
        except TimeoutError:
            self._abandon(waiter)
            raise Overloaded(
                f"no slot on the {self.name} engines freed within this request's {deadline_s:g} s deadline "
                f"({latency_class}); retry later",
                retry_after=self._retry_after(len(self._waiting)),
                code="queue_timeout",
            ) from None
        except BaseException:  # cancelled (the client left) or timed out: give up the place, or the slot
            self._abandon(waiter)
            raise
        slot.waited_s = time.monotonic() - started
        return slot

    def _enqueue(
        self,
        tenant_id: int,
        owners: Owners,
        latency_class: str,
        deadline_s: float,
        loop: asyncio.AbstractEventLoop,
        on_position: Callable[[int], None] | None,
    ) -> _Waiter:
        ahead = len(self._waiting)
        if ahead >= settings.TANDEM_MAX_QUEUED:
            raise Overloaded(
                f"{ahead} requests already wait for the {self.name} engines; retry later",
                retry_after=self._retry_after(ahead),
            )
        mine = self._waiting_by_tenant.get(tenant_id, 0)
        if mine >= settings.TANDEM_MAX_QUEUED_PER_TENANT:
            raise RateLimited(
                f"this tenant already has {mine} requests waiting for the {self.name} engines; "
                "retry when some have finished",
                retry_after=self._retry_after(mine),
                code="too_many_queued",
            )
        expected = self.expected_wait_s(ahead)
        if expected > deadline_s:
            raise Overloaded(
                f"the {self.name} engines are busy: {ahead} requests wait, about {expected:.0f} s, longer than this "
                f"request's {deadline_s:g} s deadline ({latency_class}); retry later",
                retry_after=self._retry_after(ahead),
                code="queue_full",
            )
        tag = max(self._virtual, self._tags.get(tenant_id, 0.0)) + 1.0
        self._tags[tenant_id] = tag
        waiter = _Waiter(
            (CLASS_RANK[latency_class], tag, next(self._arrivals)),
            tenant_id,
            owners,
            loop,
            loop.create_future(),
            on_position,
        )
        bisect.insort(self._waiting, waiter, key=lambda w: w.key)
        self._waiting_by_tenant[tenant_id] = mine + 1
        return waiter

    def release(self, slot: Slot) -> None:
        with self._lock:
            held = time.monotonic() - slot.taken_at
            self.hold_s = held if self.hold_s == 0.0 else (1 - PACE_WEIGHT) * self.hold_s + PACE_WEIGHT * held
            self.running -= 1
            for owner, _ in slot.owners:
                left = self._by_owner[owner] - 1
                if left:
                    self._by_owner[owner] = left
                else:
                    del self._by_owner[owner]
            handed = self._hand_over()
        if handed:
            self._resolve_all(handed)

    def _resolve_all(self, handed: list[tuple[_Waiter, Slot]]) -> None:
        for waiter, given in handed:
            waiter.loop.call_soon_threadsafe(_resolve, waiter.future, given)
        self._tell_positions()

    def _hand_over(self) -> list[tuple[_Waiter, Slot]]:
        """Give free slots to the first waiters whose tenant is under its limit (under the lock)."""
        handed = []
        i = 0
        while self.running < self.capacity and i < len(self._waiting):
            waiter = self._waiting[i]
            if waiter.future.done() or not self._fits(waiter.owners):
                i += 1
                continue
            del self._waiting[i]
            self._unwait(waiter)
            self._virtual = max(self._virtual, waiter.key[1])
            self._take(waiter.owners)
            handed.append((waiter, Slot(self, waiter.tenant_id, waiter.owners)))
        return handed

    def _abandon(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
                self._unwait(waiter)
                return
        # Its slot was handed over as it gave up: pass it on.
        if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            waiter.future.result().release()

    def _fits(self, owners: Owners) -> bool:
        return self.running < self.capacity and all(self._by_owner.get(o, 0) < limit for o, limit in owners)

    def _take(self, owners: Owners) -> None:
        self.running += 1
        for owner, _ in owners:
            self._by_owner[owner] = self._by_owner.get(owner, 0) + 1

    def _unwait(self, waiter: _Waiter) -> None:
        left = self._waiting_by_tenant[waiter.tenant_id] - 1
        if left:
            self._waiting_by_tenant[waiter.tenant_id] = left
        else:
            del self._waiting_by_tenant[waiter.tenant_id]

    def _retry_after(self, ahead: int) -> int:
        """Whole seconds worth waiting before a retry: the expected wait, at least one."""
        return max(1, math.ceil(self.expected_wait_s(ahead)))

    def _tell_positions(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [
                (w, position)
                for position, w in enumerate(self._waiting, 1)
                if w.on_position is not None
                and position != w.told_position
                and (now - w.told >= POSITION_EVERY_S or w.told_position < 0)
            ]
            for w, position in due:
                w.told, w.told_position = now, position
        for w, position in due:
            w.loop.call_soon_threadsafe(_tell, w, position)


def _resolve(future: asyncio.Future, slot: Slot) -> None:
    if future.done():  # its waiter gave up just now: the slot goes on to the next
        slot.release()
    else:
        future.set_result(slot)


def _tell(waiter: _Waiter, position: int) -> None:
    if not waiter.future.done() and waiter.on_position is not None:
        waiter.on_position(position)


class Scheduler:
    """The process's pools, made on first use."""

    def __init__(self) -> None:
        self._pools: dict[str, Pool] = {}
        self._lock = threading.Lock()

    def pool(self, name: str, capacity: int) -> Pool:
        pool = self._pools.get(name)
        if pool is None:
            with self._lock:
                pool = self._pools.setdefault(name, Pool(name, capacity))
        pool.capacity = capacity  # an engine reloaded with another size
        return pool

    def pools(self) -> dict[str, Pool]:
        return dict(self._pools)

    def reset(self) -> None:
        """Forget every pool (tests; engines swapped)."""
        with self._lock:
            self._pools.clear()


scheduler = Scheduler()
