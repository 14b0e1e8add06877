"""The router's own checks benchmark runs end to end and reports what the aims are stated in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_router_benchmark_prints_p50_and_p99_for_typical_and_long_prompts():
    out = subprocess.run(
        [sys.executable, "-m", "inference.bench_router", "--repeats", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"},
    )
    report = json.loads(out.stdout)
    for kind in ("typical", "chars_4000_no_pii", "chars_4000_pii"):
        assert report[kind]["calls"] == 20 and 0 < report[kind]["p50_ms"] <= report[kind]["p99_ms"]
    assert report["chars_4000_pii"]["chars"] == 4000
