"""The relay benchmark (``python -m inference.bench_relay``) runs end to end: upstream, platform, ledger."""

from __future__ import annotations

import json

import pytest

from inference import bench_relay


@pytest.mark.parametrize("client", ["aiohttp", "httpx"])
def test_the_relay_benchmark_compares_tandem_with_the_upstream_and_its_ledger_matches(tmp_path, capsys, client):
    out = tmp_path / "relay.json"
    argv = ["--rounds", "2", "--requests", "3", "--stream-requests", "2", "--warmup", "1", "--clients", "2"]
    bench_relay.main([*argv, "--seconds", "0.2", "--client", client, "--out", str(out)])
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["client"]["library"] == client
    assert "skipped" in report["litellm"] and len(report["per_round"]) == 2
    assert [r["order"] for r in report["per_round"]] == [["direct", "tandem"], ["tandem", "direct"]]
    for name in ("direct", "tandem"):
        load = report["per_round"][0][name]["load_2_clients"]
        assert load["errors"] == 0 and load["requests"] > 0, name
        low, high = report["summary"][name]["stream_last_byte_p50_ms"]
        assert 0 < low <= high, name
    assert set(report["summary"]["tandem"]) >= {"added_non_streaming_p50_ms", "added_stream_last_byte_p99_ms"}
    ledger = report["ledger"]
    # every request through the cloud tier wrote its row, each with the upstream's reported usage
    assert (
        ledger["matched"] and ledger["rows"] == ledger["requests_sent"] == ledger["by_tier_outcome"]["cloud/completed"]
    )
    assert ledger["cloud_completion_tokens"] == bench_relay.CHUNKS * ledger["rows"]
    assert report["aims"]["ledger_written"] is True


def test_the_upstream_streams_32_chunks_and_usage_then_done():
    events = bench_relay.upstream_stream()
    assert events[-1] == b"data: [DONE]\n\n"
    assert bench_relay.streamed_text(b"".join(events).decode()) == "".join(bench_relay.ANSWER)
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == bench_relay.CHUNKS == len(bench_relay.ANSWER)
