"""Importing the decoding core: what it sets up before llama.cpp's libraries load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT = "import os, speculative; print(os.environ['GOMP_SPINCOUNT'], speculative.SPINCOUNT_SET_HERE)"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ["30000", "True"]),  # Tandem's default: llama.cpp's OpenMP workers sleep ~1 ms after a decode
        ({"TANDEM_GOMP_SPINCOUNT": "5000"}, ["5000", "True"]),
        ({"GOMP_SPINCOUNT": "77", "TANDEM_GOMP_SPINCOUNT": "5000"}, ["77", "False"]),  # the caller's own is kept
    ],
)
def test_importing_speculative_sets_libgomps_spin_count_unless_one_is_set(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "TANDEM_GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PRINT], env={**base, **env}, capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected


@pytest.mark.parametrize("value", ["abc", "-5", "1e5"])
def test_a_spin_count_that_is_not_a_whole_number_is_refused_by_name(value):
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "TANDEM_GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", "import speculative"],
        env={**base, "TANDEM_GOMP_SPINCOUNT": value},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert f"TANDEM_GOMP_SPINCOUNT={value!r} is not valid: expected a whole number of spins" in out.stderr
