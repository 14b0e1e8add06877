"""The threads the gateway runs work on: one per stream for blocking engines, and this process's DB threads.

``stream_threads`` runs each stream's engine loop on a thread of its own; ``db(func)``
runs ORM work off the event loop; ``db_from_thread(func)`` runs it from a plain thread
(the lease keeper). The executors are created on first use, once per process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.db import connection

log = logging.getLogger(__name__)


class ReusedThreads:
    """Runs each job at once on a thread of its own: an idle one if there is one, else a new one.

    Each stream's engine loop blocks for the whole stream, so it needs a thread to itself,
    but starting a thread costs the event loop a wait until the new thread runs: measured
    at 0.1 ms on an idle machine and 2.6 ms on a busy one, per request. Finished threads
    wait ``idle_s`` for the next job, then end. Unlike a ThreadPoolExecutor, nothing ever
    queues behind a busy thread, and the threads are daemons: a stream still running
    never holds up the process's exit.
    """

    def __init__(self, name: str, idle_s: float = 60.0):
        self._name = name
        self._idle_s = idle_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a job; a job is only queued for one of them
        self._lock = threading.Lock()

    def run(self, fn: Callable[..., object], *args: object) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put((fn, args))
                return
        threading.Thread(target=self._work, args=(fn, args), name=self._name, daemon=True).start()

    def _work(self, fn: Callable[..., object], args: tuple) -> None:
        while True:
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a job's own handlers come first; this thread goes on
                log.exception("a job on a %s thread failed", self._name)
            threading.current_thread().name = self._name
            with self._lock:
                self._idle += 1
            try:
                fn, args = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:  # a job queued for this thread as it timed out is still taken
                    try:
                        fn, args = self._jobs.get_nowait()
                    except queue.Empty:
                        self._idle -= 1
                        return


stream_threads = ReusedThreads("stream")

_db_executor: ThreadPoolExecutor | None = None
_db_executor_lock = threading.Lock()


def db(func):
    """``func`` (ORM work) as a coroutine that runs off the event loop, on this process's DB threads.

    On SQLite that is one dedicated thread. SQLite has one writer at a time, and when
    connections of several threads contend, its busy handler sleeps in coarse steps (up to
    100 ms each): measured here, 8 concurrent requests had a p99 of 800 ms that way. One
    thread means one connection and writes queued in memory instead.

    Elsewhere it is a pool of as many threads as the connection pool holds, with row locks
    (``select_for_update``) doing the serialising where money moves. Not Django's default
    (the request's own thread, ``thread_sensitive``): that thread is created for each
    request and joined after it (a thread start and a join per request, measured at up to
    2 ms of the event loop's time on a busy machine), and a write-behind ledger write,
    which outlives its request, would get yet another. Each call here is a whole unit of
    work (its own transaction), so nothing needs the request's thread.
    """
    return DatabaseSyncToAsync(func, thread_sensitive=False, executor=_db_threads())


_reads_in_flight: dict[Hashable, asyncio.Future] = {}
T = TypeVar("T")


async def db_read_once(key: Hashable, func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``await db(func)(*args, **kwargs)``, shared by every caller asking for the same ``key`` meanwhile.

    For the reads behind this process's caches (a key, a price, a routing policy, the plans):
    when one expires, every request then in flight missed it at once and each read it again,
    one after the other on SQLite's one DB thread (measured on the served platform, 2026-12-03:
    four concurrent requests after an expiry made 20 reads, and the last one waited 38 ms for its
    first token). Now the first caller reads, and the others await its answer (or its error).
    The read runs as a task of its own, so a caller that leaves (its client disconnected) does
    not cancel it for the others. Only for reads whose answer depends on nothing but ``key``.
    Shared within one event loop: a read started on another (a Celery job's, a test's) is not
    awaited here, and its loop may have stopped before it ended.
    """
    loop = asyncio.get_running_loop()
    future = _reads_in_flight.get(key)
    if future is None or future.get_loop() is not loop or future.done():
        future = loop.create_task(db(func)(*args, **kwargs))
        _reads_in_flight[key] = future
        future.add_done_callback(functools.partial(_read_done, key))
    return await asyncio.shield(future)


def _read_done(key: Hashable, future: asyncio.Future) -> None:
    if _reads_in_flight.get(key) is future:
        del _reads_in_flight[key]
    if not future.cancelled():
        future.exception()  # retrieved: every caller may have left before it ended


def _db_threads() -> ThreadPoolExecutor:
    global _db_executor
    if _db_executor is None:
        with _db_executor_lock:
            if _db_executor is None:
                if connection.vendor == "sqlite":
                    workers, name = 1, "sqlite"
                else:
                    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
                    workers = pool.get("max_size", 20) if isinstance(pool, dict) else 20
                    name = "db"
                _db_executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
    return _db_executor


def db_from_thread(func: Callable[[], object]) -> object:
    """``func`` (ORM work) from a plain thread (the lease keeper): on SQLite's one DB thread, as ``db`` does."""
    if connection.vendor == "sqlite":
        return _db_threads().submit(func).result()
    try:
        return func()
    finally:
        connection.close()  # back to the pool: the keeper wakes rarely
