"""The threads a stream's engine loop runs on (``runtime.ReusedThreads``): reused, never queued."""

from __future__ import annotations

import threading
import time

from inference.runtime import ReusedThreads


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_a_finished_thread_runs_the_next_job_instead_of_a_new_thread():
    threads = ReusedThreads("t-reuse")
    seen: list[threading.Thread] = []
    for _ in range(5):
        done = threading.Event()
        threads.run(lambda done=done: (seen.append(threading.current_thread()), done.set()))
        assert done.wait(5)
        wait_for(lambda: threads._idle == 1)  # the thread is back, waiting for a job
    assert len(set(seen)) == 1 and seen[0].daemon


def test_jobs_never_queue_behind_a_busy_thread():
    # each stream blocks its thread for the whole stream: a second job must start at once
    threads = ReusedThreads("t-busy")
    release = threading.Event()
    running = threading.Barrier(4, timeout=5)  # three jobs and this test meet only if all run at once

    def job():
        running.wait()
        release.wait(5)

    for _ in range(3):
        threads.run(job)
    running.wait()
    release.set()
    wait_for(lambda: threads._idle == 3)


def test_a_failing_job_is_logged_and_its_thread_goes_on(caplog):
    threads = ReusedThreads("t-fail")
    threads.run(lambda: 1 / 0)
    wait_for(lambda: threads._idle == 1)
    assert "a job on a t-fail thread failed" in caplog.text
    done = threading.Event()
    threads.run(done.set)
    assert done.wait(5)


def test_an_idle_thread_ends_after_its_idle_time():
    threads = ReusedThreads("t-idle", idle_s=0.05)
    done = threading.Event()
    threads.run(done.set)
    assert done.wait(5)
    wait_for(lambda: threads._idle == 1)
    wait_for(lambda: threads._idle == 0 and not any(t.name == "t-idle" for t in threading.enumerate()))
    threads.run(done.clear)  # a new thread starts for the next job
    wait_for(lambda: not done.is_set())
