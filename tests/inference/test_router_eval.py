"""The router evaluation: its file format, its figures and its command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inference.router_eval import Row, read_rows, score
from tests.conftest import REPO


def rows(*labels: tuple[str | None, bool | None, str | None]) -> list[Row]:
    return [Row(str(i), "p", *label) for i, label in enumerate(labels)]


def test_the_figures_follow_the_issues_definitions():
    labelled = rows(
        ("routine", False, "edge"),
        ("hard", False, "cloud"),
        ("hard", True, "speculative"),
        ("hard", False, "speculative"),
    )
    routed = [{"tier": t} for t in ("edge", "cloud", "cloud", "edge")]
    report = score(labelled, routed)
    assert report["relative_cost"] == pytest.approx(0.02 + 1 + 1 + 0.02)
    assert report["saving_vs_all_cloud"] == pytest.approx(1 - 2.04 / 4, abs=1e-4)
    assert report["hard_on_edge"] == {"count": 1, "of": 3, "share": 0.3333}
    assert report["pii_to_cloud"] == {"count": 1, "of": 1}
    assert report["cloud_recall"] == {"count": 1, "of": 1, "share": 1.0}
    assert report["accuracy"] == 0.5
    assert report["confusion"]["speculative"] == [1, 0, 1] and report["confusion"]["edge"] == [1, 0, 0]


def test_rows_without_labels_are_scored_for_cost_only():
    report = score(rows((None, None, None)), [{"tier": "speculative"}])
    assert report["saving_vs_all_cloud"] == 0.75 and "accuracy" not in report and "pii_to_cloud" not in report


def test_a_bad_line_names_its_place(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"id": 1, "prompt": "hi"}\n{"id": 2, "prompt": "x", "expected_tier": "gpu"}\n')
    with pytest.raises(SystemExit, match=r"set.jsonl:2: expected_tier"):
        read_rows(path)


def test_the_shipped_set_reads_and_is_labelled_throughout():
    shipped = read_rows(REPO / "inference" / "assets" / "router_eval" / "tandem-router-eval.jsonl")
    assert len(shipped) >= 300
    assert all(r.difficulty and r.pii is not None and r.expected_tier for r in shipped)
    assert not any(r.pii and r.expected_tier == "cloud" for r in shipped)  # the issue's rule for the labels


def test_the_command_prints_one_json_object_of_figures(tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [
        {"id": "a", "prompt": "Say hello.", "difficulty": "routine", "pii": False, "expected_tier": "edge"},
        {"id": "b", "prompt": "My card is 4929 1412 3456 7891, book the flight.", "pii": True},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {"DJANGO_SETTINGS_MODULE": "config.settings.test"}
    out = subprocess.run(
        [sys.executable, "-m", "inference.router_eval", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    report = json.loads(out.stdout)
    assert report["rows"] == 2 and {d["id"] for d in report["decisions"]} == {"a", "b"}
    assert report["pii_to_cloud"]["count"] == 0 and report["decision_ms"]["p99"] > 0
    assert next(d for d in report["decisions"] if d["id"] == "b")["pii"]


def test_via_api_scores_what_the_platform_routed(platform_server, tmp_path):
    path = tmp_path / "set.jsonl"
    lines = [
        {"id": "a", "prompt": "Say hello.", "expected_tier": "speculative"},
        {"id": "b", "prompt": "Email maria.lopez.1987@gmail.com the notes.", "pii": True},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference.router_eval",
            str(path),
            "--model",
            "tandem-test",
            "--via-api",
            platform_server.url,
            platform_server.api_key,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test"},
    )
    report = json.loads(out.stdout)
    # the live server runs the test settings' builtin policy: speculative unless health says otherwise
    assert [d["tier"] for d in report["decisions"]] == ["speculative", "speculative"]
    assert all(d["request_id"] for d in report["decisions"]) and report["accuracy"] == 1.0
    assert report["pii_to_cloud"] == {"count": 0, "of": 1}
