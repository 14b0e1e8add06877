"""The platform benchmark (``python -m inference.bench``) runs end to end against a live server."""

from __future__ import annotations

import json

from inference import bench


def test_the_platform_benchmark_reports_every_path_and_counts_frames(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--requests", "3", "--paced-requests", "2", "--tokens", "8", "--clients", "2", "--seconds", "0.3"]
    argv += ["--burst-tokens", "6"]  # the burst's 256 streams of 6 tokens, not 300: its path, not its figures
    bench.main([*argv, "--out", str(out)])
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    for path in ("websocket", "sse", "paced_websocket", "paced_sse"):
        assert report[path]["requests"] in (2, 3) and report[path]["per_request"]["p50_ms"] > -1.0, path
    frames = report["paced_websocket"]["delta_frames_per_request"]
    assert 1 <= frames["p50"] <= frames["max"] <= 8  # a frame carries one token or several
    assert report["paced_engine_direct"]["e2e_ms"] >= 2 * bench.PACED_ROUND_MS  # 8 tokens: rounds after the first wait
    assert report["non_streaming"]["errors"] == 0 and report["non_streaming"]["requests"] > 0
    burst = report["burst"]
    assert burst["answered"] + burst["refused"] == burst["streams"] == 4 * burst["capacity"]
    assert burst["refused_without_retry_after"] == 0, burst["errors"]  # which refusal went without, if one does
