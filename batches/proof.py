"""The batch proof (``make batch-proof``): a real Celery worker runs a batch of 100, is SIGKILLed halfway, restarts.

Prints JSON: the broker used (Redis when one answers at ``--redis``, else the embedded
filesystem broker, and why), the worker's resident memory with the engines loaded, the
batch's counts, the ledger's charges for it, and whether each line's answer equals the
same request sent alone through the API. Exits non-zero when any check fails.

Everything runs as ``make run`` runs it: ``manage.py migrate`` and ``tandem_demo`` on a
fresh SQLite file, ``config.serve`` for the API, ``celery worker`` for the batch; the
official ``openai`` client uploads, creates, polls and downloads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACED_ROUND_S = (
    0.02  # the proof's engine: the trivial one, each round this long, so a batch is still running when killed
)


def proof_engines():
    """``tandem-test`` paced (``TANDEM_ENGINES=batches.proof.proof_engines``): a batch takes seconds, not milliseconds."""
    from inference.engines import EngineSet, trivial_entry

    return EngineSet([trivial_entry("tandem-test", round_s=PACED_ROUND_S)])


def redis_unreachable(url: str) -> str | None:
    """Why there is no Redis at ``url`` (None when it answers a ping): the proof's check, and the worker tests'."""
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "no Redis here": say which
        return f"no Redis at {url}: {type(exc).__name__}: {exc}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def _wait(what: str, check, timeout_s: float, every_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every_s)


class Platform:
    """migrate + tandem_demo, the web server, and workers started and killed on demand, in a var dir of their own."""

    def __init__(self, var: Path, env: dict[str, str], models: str):
        self.var, self.env = var, env
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True)
        boot = subprocess.run(
            [*manage, "tandem_demo", "--models", models], cwd=REPO, env=env, check=True, capture_output=True, text=True
        )
        self.api_key = next(line.split()[-1] for line in boot.stdout.splitlines() if line.strip().startswith("API key"))
        self.port = _free_port()
        self.server = self._start([sys.executable, "-m", "config.serve", "--port", str(self.port)], "server")
        _wait("the server", self._listening, 60, 0.2)
        self.workers: list[subprocess.Popen] = []

    def _start(self, argv: list[str], name: str) -> subprocess.Popen:
        log = (self.var / f"{name}.log").open("a")
        return subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def worker(self) -> subprocess.Popen:
        argv = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "--pool=solo", "--loglevel=info"]
        worker = self._start(argv, "worker")
        self.workers.append(worker)
        return worker

    def close(self) -> None:
        for proc in [*self.workers, self.server]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def requests_file(count: int, max_tokens: int, model: str) -> tuple[bytes, list[dict]]:
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Request {n}: say something about batch {n % 7}"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for n in range(count)
    ]
    rows = [
        {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        for n, b in enumerate(bodies)
    ]
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows), bodies


def _text(body: dict) -> str | None:
    choices = body.get("choices") or [{}]
    return (choices[0].get("message") or {}).get("content")


def run(count: int, max_tokens: int, redis_url: str, kill_at: float, demo: bool) -> dict:
    import openai

    var = Path(tempfile.mkdtemp(prefix="batch-proof-"))
    why_not_redis = redis_unreachable(redis_url)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_CELERY_EAGER": "0",
        "TANDEM_VAR_DIR": str(var),
        "DATABASE_URL": f"sqlite:///{var / 'proof.sqlite3'}",
        # the demo pair as make run serves it, or the trivial engine paced (seconds per batch, not minutes)
        "TANDEM_ENGINES": "inference.engines.load_default_engines" if demo else "batches.proof.proof_engines",
        "TANDEM_BATCH_STALE_S": "3",
    }
    if why_not_redis is None:
        env["REDIS_URL"] = redis_url
        import redis

        redis.Redis.from_url(redis_url).flushdb()  # this proof's own database number: no one else's queue
    model = "tandem-demo" if demo else "tandem-test"
    platform = Platform(var, env, model)
    os.environ.update({k: env[k] for k in ("DJANGO_SETTINGS_MODULE", "TANDEM_VAR_DIR", "DATABASE_URL")})
    import django

    django.setup()
    from batches.models import Batch
    from tenants.models import UsageRecord

    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{platform.port}/v1", api_key=platform.api_key, max_retries=0)
        content, bodies = requests_file(count, max_tokens, model)
        first = platform.worker()
        started = time.perf_counter()
        uploaded = client.files.create(file=("proof.jsonl", io.BytesIO(content)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        def done_count() -> int:
            row = Batch.objects.get(public_id=batch.id)
            return row.completed + row.failed

        _wait("the batch to be halfway", lambda: done_count() >= int(count * kill_at), 300)
        rss_mib = _rss_mib(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        done_at_kill = done_count()
        charged_at_kill = UsageRecord.objects.filter(tags__batch_id=batch.id).count()
        platform.worker()  # restarted: it resumes the batch once its dead runner has been silent TANDEM_BATCH_STALE_S
        ended = _wait(
            "the batch to end",
            lambda: (
                (b := client.batches.retrieve(batch.id)).status in ("completed", "failed", "cancelled", "expired") and b
            ),
            300,
            0.25,
        )
        elapsed = time.perf_counter() - started
        output = (
            [json.loads(row) for row in client.files.content(ended.output_file_id).text.splitlines()]
            if ended.output_file_id
            else []
        )
        errors = (
            [json.loads(row) for row in client.files.content(ended.error_file_id).text.splitlines()]
            if ended.error_file_id
            else []
        )
        rows = list(UsageRecord.objects.filter(tags__batch_id=batch.id).values_list("request_id", flat=True))
        by_custom_id = {e["custom_id"]: e["response"]["body"] for e in output}
        mismatched = []
        for n, body in enumerate(bodies):  # the same request sent alone through the API
            alone = client.chat.completions.create(**body).model_dump()
            batch_body = by_custom_id.get(f"req-{n}") or {}
            if _text(batch_body) != _text(alone):
                tiers = [(b.get("tandem") or {}).get("route", {}).get("tier") for b in (batch_body, alone)]
                mismatched.append({"custom_id": f"req-{n}", "tiers (batch, alone)": tiers})
        figures = {
            "broker": "redis" if why_not_redis is None else "filesystem",
            "broker_note": why_not_redis or f"Redis at {redis_url}",
            "requests": count,
            "max_tokens": max_tokens,
            "worker_rss_mib_with_engines": rss_mib,
            "model": model,
            "engines": env["TANDEM_ENGINES"],
            "done_when_killed": done_at_kill,
            "charged_when_killed": charged_at_kill,
            "status": ended.status,
            "request_counts": ended.request_counts.model_dump(),
            "ledger_charges": len(rows),
            "distinct_request_ids": len(set(rows)),
            "lines_lost": count - len(output) - len(errors),
            "errors": [e["error"] or e["response"] for e in errors][:5],
            "equal_to_alone": count - len(mismatched),
            "mismatched": mismatched[:5],
            "elapsed_s": round(elapsed, 2),
        }
        figures["ok"] = (
            ended.status == "completed"
            and ended.request_counts.completed == count
            and len(rows) == count == len(set(rows))
            and not mismatched
            and 0 < done_at_kill < count
        )
        return figures
    finally:
        platform.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--redis", default=os.environ.get("TANDEM_PROOF_REDIS_URL", "redis://127.0.0.1:6379/10"))
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the lines done when the worker is killed")
    parser.add_argument("--demo", action="store_true", help="the demo pair (tandem-demo), not the paced trivial engine")
    args = parser.parse_args(argv)
    figures = run(args.requests, args.max_tokens, args.redis, args.kill_at, args.demo)
    print(json.dumps(figures, indent=2))
    sys.exit(0 if figures["ok"] else 1)


if __name__ == "__main__":
    main()
