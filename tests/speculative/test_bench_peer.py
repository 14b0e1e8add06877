"""The peer benchmark: its report's ratios, without servers; its arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from speculative.bench_peer import _report


def _run(tokens_per_s: float) -> dict:
    return {"tokens_per_s": tokens_per_s, "p50_latency_ms": 10.0, "texts": {"p": "same"}}


def test_each_runs_own_ratio_is_reported_beside_the_ratio_of_medians():
    # the machine ran at half speed in the second run: every server slowed alike
    figures = {
        "tandem": {1: [_run(900), _run(450), _run(1000)]},
        "llama-server": {1: [_run(1000), _run(500), _run(1200)]},
        "llama-server -md": {1: [_run(800), _run(520), _run(1100)]},
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
