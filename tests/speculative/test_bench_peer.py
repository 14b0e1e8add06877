"""The peer benchmark: its report's ratios, without servers; its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from speculative.bench_peer import _report


def _run(tokens_per_s: float, drafted: int = 0, accepted: int = 0) -> dict:
    return {
        "tokens_per_s": tokens_per_s,
        "p50_latency_ms": 10.0,
        "texts": {"p": "same"},
        "tokens": 64,
        "drafted": drafted,
        "accepted": accepted,
    }


def test_each_runs_own_ratio_is_reported_beside_the_ratio_of_medians():
    # the machine ran at half speed in the second run: every server slowed alike
    figures = {
        "tandem": {1: [_run(900), _run(450), _run(1000)]},
        "llama-server": {1: [_run(1000), _run(500), _run(1200)]},
        "llama-server -md": {1: [_run(800, 90, 60), _run(520, 100, 70), _run(1100, 98, 70)]},
    }
    args = argparse.Namespace(pair="demo", type="q8_0", max_tokens=64, runs=3, requests=96)
    report = _report(args, Path("llama-server"), Path("v.gguf"), Path("d.gguf"), figures)
    assert report["requests_per_measurement"] == 96
    assert report["pair"] == "demo" and report["verifier_gguf"] == "v.gguf (q8_0)"
    assert report["tandem_over_best_peer"] == {"1": round(900 / 1000, 3)}  # medians: 900 over max(1000, 800)
    paired = report["tandem_over_best_peer_paired"]["1"]
    assert paired["runs"] == [round(r, 3) for r in sorted([900 / 1000, 450 / 520, 1000 / 1200])]
    assert paired["median"] == round(450 / 520, 3)
    assert report["servers"]["tandem"]["1"]["greedy_agreement_with_llama_server"] == {"same_text": 1, "prompts": 1}
    # what the speculating peer drafted (its responses' timings): per completion token, and the share accepted
    md = report["servers"]["llama-server -md"]["1"]
    assert md["drafted_per_token"] == round(288 / 192, 3) and md["draft_acceptance"] == round(200 / 288, 3)
    assert "drafted_per_token" not in report["servers"]["tandem"]["1"]


def test_a_speculating_peer_that_drafts_nothing_stops_the_benchmark(monkeypatch):
    # llama-server given ``-md`` alone loads the draft and never uses it: a second plain server, not the peer asked for
    import asyncio

    from speculative import bench_peer

    async def one(client, server, prompt, max_tokens):
        return "text", 64, 0.01, 0, 0

    monkeypatch.setattr(bench_peer, "_one", one)
    md = bench_peer.Server("llama-server -md", "http://127.0.0.1:1", "verifier")
    with pytest.raises(SystemExit, match="llama-server -md drafted no token in 8 requests: its speculation is off"):
        asyncio.run(bench_peer.measure(md, 1, ["p"], 64))
    plain = bench_peer.Server("llama-server", "http://127.0.0.1:1", "verifier")
    assert asyncio.run(bench_peer.measure(plain, 1, ["p"], 64))["tokens"] == 8 * 64


def test_a_negative_request_count_is_refused_before_any_server_starts(capsys):
    from speculative.bench_peer import main

    with pytest.raises(SystemExit) as exited:
        main(["--requests", "-1"])
    assert exited.value.code == 2 and "--requests must be 0 (two a client) or more, got -1" in capsys.readouterr().err


def test_a_gguf_type_for_the_smollm2_pair_is_refused_before_any_server_starts(capsys):
    from speculative.bench_peer import main

    with pytest.raises(SystemExit) as exited:
        main(["--pair", "smollm2", "--type", "q8_0"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "the smollm2 verifier is served as its package ships it" in err


def test_the_smollm2_pair_is_prompted_with_held_out_chat_turns_in_its_template(smollm2_verifier):
    from speculative.bench_peer import pair_prompts
    from speculative.smol_prompts import chat_prompts, split
    from speculative.train_smol import Settings

    prompts = pair_prompts("smollm2", smollm2_verifier)
    _, held = split(chat_prompts(Settings().seed), Settings().held_out)
    assert len(prompts) == 16 and len(set(prompts)) == 16
    for prompt, turn in zip(prompts, held, strict=False):
        assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
        assert f"<|im_start|>user\n{turn.text}<|im_end|>" in prompt


def test_the_peers_run_with_libgomps_own_spin_unless_the_caller_set_one(monkeypatch):
    import speculative
    from speculative import bench_peer

    monkeypatch.setenv("GOMP_SPINCOUNT", speculative.GOMP_SPINCOUNT)
    monkeypatch.setattr(speculative, "SPINCOUNT_SET_HERE", True)  # Tandem's own setting: not the peers'
    assert "GOMP_SPINCOUNT" not in bench_peer.peer_env()
    monkeypatch.setattr(speculative, "SPINCOUNT_SET_HERE", False)  # the caller's: every server runs with it
    assert bench_peer.peer_env()["GOMP_SPINCOUNT"] == speculative.GOMP_SPINCOUNT
