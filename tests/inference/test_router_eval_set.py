"""The shipped router evaluation set: its labels follow the rules and its synthetic values are valid.

The checksums are re-implemented here from the public specifications, independently of
``build.py``, so that a bug in the generator cannot also hide in the check.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO

SET_DIR = REPO / "inference" / "assets" / "router_eval"
SET_FILE = SET_DIR / "tandem-router-eval.jsonl"

TIERS = {"edge", "speculative", "cloud"}
PII_KINDS = {"name", "email", "phone", "address", "dob", "card", "iban", "national_id", "passport", "credential", "ip"}
ADVERSARIAL = {
    None,
    "obfuscated_pii",
    "long_context_pii",
    "pii_lookalike",
    "pii_kind_without_value",
    "short_hard",
    "long_routine",
}
IBAN_LENGTHS = {"DE": 22, "FR": 27, "ES": 24, "GB": 22, "NL": 18, "PL": 28}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [json.loads(line) for line in SET_FILE.read_text(encoding="utf-8").splitlines()]


def _values(rows: list[dict], kind: str) -> list[tuple[str, dict]]:
    return [(r["id"], v) for r in rows for v in r["pii_values"] if v["kind"] == kind]


def _canonical(v: dict) -> str:
    return v.get("canonical", v["text"])


# -- checksums, from the public specifications ------------------------------------------------
def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    if len(s) != IBAN_LENGTHS.get(s[:2], -1):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def icao_digit(s: str) -> str:
    weights = (7, 3, 1)
    return str(sum((0 if c == "<" else int(c, 36)) * weights[i % 3] for i, c in enumerate(s)) % 10)


def steuer_id_ok(s: str) -> bool:  # ISO 7064 MOD 11,10; one digit repeated once in the first ten
    product = 10
    for ch in s[:10]:
        total = (int(ch) + product) % 10 or 10
        product = total * 2 % 11
    check = (11 - product) % 10
    counts = Counter(s[:10]).values()
    return s[0] != "0" and check == int(s[10]) and sorted(counts)[-1] == 2 and list(counts).count(2) == 1


def kvnr_ok(s: str) -> bool:
    digits = f"{ord(s[0]) - 64:02d}" + s[1:9]
    total = sum(sum(divmod(int(c) * (1 + i % 2), 10)) for i, c in enumerate(digits))
    return total % 10 == int(s[9])


def es_letter(n: int) -> str:
    return "TRWAGMYFPDXBNJZSQVHLCKE"[n % 23]


def national_id_ok(subtype: str, value: str) -> bool:
    base = subtype.split("/")[0]
    if base == "us_ssn":
        area, group, serial = (int(x) for x in re.fullmatch(r"(\d{3})-(\d{2})-(\d{4})", value).groups())
        return 0 < area < 900 and area != 666 and group > 0 and serial > 0
    if base == "uk_nino":
        m = re.fullmatch(r"([A-Z])([A-Z])(\d{6})([A-D])", value)
        prefix_ok = m[1] not in "DFIQUV" and m[2] not in "DFIQUVO"
        return bool(m) and prefix_ok and m[1] + m[2] not in {"BG", "GB", "NK", "KN", "TN", "NT", "ZZ"}
    if base == "de_personalausweis":
        return bool(re.fullmatch(r"[CFGHJKLMNPRTVWXYZ0-9]{10}", value)) and icao_digit(value[:9]) == value[9]
    if base == "de_steuer_id":
        return bool(re.fullmatch(r"\d{11}", value)) and steuer_id_ok(value)
    if base == "de_kvnr":
        return bool(re.fullmatch(r"[A-Z]\d{9}", value)) and kvnr_ok(value)
    if base == "fr_nir":
        return bool(re.fullmatch(r"[12]\d{14}", value)) and 97 - int(value[:13]) % 97 == int(value[13:])
    if base == "es_dni":
        return bool(re.fullmatch(r"\d{8}[A-Z]", value)) and es_letter(int(value[:8])) == value[8]
    if base == "es_nie":
        return (
            bool(re.fullmatch(r"[XYZ]\d{7}[A-Z]", value))
            and es_letter("XYZ".index(value[0]) * 10**7 + int(value[1:8])) == value[8]
        )
    if base == "nl_bsn":  # the "elfproef": weights 9..2 and -1 on the last digit
        d = [int(c) for c in value]
        return len(d) == 9 and sum(x * w for x, w in zip(d, [9, 8, 7, 6, 5, 4, 3, 2, -1], strict=True)) % 11 == 0
    if base == "pt_nif":
        d = [int(c) for c in value]
        check = 11 - sum(x * w for x, w in zip(d[:8], range(9, 1, -1), strict=True)) % 11
        return len(d) == 9 and (0 if check >= 10 else check) == d[8]
    if base == "pl_pesel":
        d = [int(c) for c in value]
        month = int(value[2:4]) % 20
        check = (10 - sum(x * w for x, w in zip(d[:10], [1, 3, 7, 9, 1, 3, 7, 9, 1, 3], strict=True)) % 10) % 10
        return len(d) == 11 and 1 <= month <= 12 and 1 <= int(value[4:6]) <= 31 and check == d[10]
    raise AssertionError(f"no checksum known for national id subtype {subtype!r}")


def mrz_line2_ok(line: str) -> bool:
    composite = line[0:10] + line[13:20] + line[21:43]
    return (
        len(line) == 44
        and icao_digit(line[0:9]) == line[9]
        and icao_digit(line[13:19]) == line[19]
        and icao_digit(line[21:27]) == line[27]
        and icao_digit(composite) == line[43]
    )


# -- tests --------------------------------------------------------------------------------------
def test_every_row_has_the_required_fields_and_known_values(rows):
    for r in rows:
        assert isinstance(r["prompt"], str) and r["prompt"].strip(), r["id"]
        assert r["difficulty"] in {"routine", "hard"} and r["expected_tier"] in TIERS, r["id"]
        assert r["tier_if_no_pii"] in TIERS and r["adversarial"] in ADVERSARIAL, r["id"]
        assert isinstance(r["pii"], bool) and isinstance(r["category"], str) and r["category"], r["id"]
        assert re.fullmatch(r"[a-z]{2}", r["language"]) and r["chars"] == len(r["prompt"]), r["id"]
        assert set(r["pii_kinds"]) <= PII_KINDS and r["pii_kinds"] == sorted(r["pii_kinds"]), r["id"]
        if r["adversarial"]:
            assert r["notes"].startswith(f"[adversarial: {r['adversarial']}]"), r["id"]


def test_ids_are_sequential_and_ids_and_prompts_are_unique(rows):
    assert [r["id"] for r in rows] == [f"tre-{n:04d}" for n in range(1, len(rows) + 1)]
    duplicated = [p for p, n in Counter(r["prompt"] for r in rows).items() if n > 1]
    assert duplicated == []


def test_labels_follow_the_rules(rows):
    for r in rows:
        if r["difficulty"] == "routine":
            assert r["expected_tier"] == "edge" and r["tier_if_no_pii"] == "edge", r["id"]
        elif r["pii"]:
            assert r["expected_tier"] == "speculative" and r["tier_if_no_pii"] != "edge", r["id"]
        else:
            assert r["expected_tier"] in {"speculative", "cloud"} and r["expected_tier"] == r["tier_if_no_pii"], r["id"]


def test_pii_flag_matches_the_recorded_values_and_each_value_occurs_in_its_prompt(rows):
    for r in rows:
        assert r["pii"] == bool(r["pii_values"]), r["id"]
        assert sorted({v["kind"] for v in r["pii_values"]}) == r["pii_kinds"], r["id"]
        for v in r["pii_values"]:
            assert v["text"] in r["prompt"], (r["id"], v)
        if r["adversarial"] in ("pii_lookalike", "pii_kind_without_value"):
            assert not r["pii"], r["id"]


def test_cards_pass_luhn_and_ibans_pass_mod_97(rows):
    cards = _values(rows, "card")
    ibans = _values(rows, "iban")
    assert cards and ibans
    for rid, v in cards:
        digits = re.sub(r"\D", "", _canonical(v))
        assert len(digits) in (15, 16) and luhn_ok(digits), (rid, v)
    for rid, v in ibans:
        assert iban_ok(_canonical(v)), (rid, v)


def test_national_ids_and_passports_carry_valid_check_digits(rows):
    ids = _values(rows, "national_id")
    assert ids
    for rid, v in ids:
        value = re.sub(r"[\s.\-]", "", _canonical(v)) if "us_ssn" not in v["subtype"] else _canonical(v)
        assert national_id_ok(v["subtype"], value), (rid, v)
    for rid, v in _values(rows, "passport"):
        if v["subtype"] == "de/mrz":
            assert mrz_line2_ok(v["canonical"]) and v["canonical"].startswith(v["text"]), (rid, v)
        elif v["subtype"] == "de":
            assert icao_digit(v["text"][:9]) == v["text"][9], (rid, v)


def test_long_adversarial_prompts_are_long_and_hide_the_value_near_the_end(rows):
    long_rows = [r for r in rows if r["adversarial"] in ("long_routine", "long_context_pii")]
    assert long_rows
    for r in long_rows:
        assert 1500 <= r["chars"] <= 4000, r["id"]
        if r["adversarial"] == "long_context_pii":
            assert min(r["prompt"].rfind(v["text"]) for v in r["pii_values"]) > 0.7 * r["chars"], r["id"]


def test_build_script_reproduces_the_shipped_file(tmp_path):
    # build.py writes next to itself, so run a copy and compare what it writes.
    (tmp_path / "build.py").write_text((SET_DIR / "build.py").read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run([sys.executable, str(tmp_path / "build.py")], check=True, capture_output=True, timeout=60)
    assert (tmp_path / SET_FILE.name).read_bytes() == SET_FILE.read_bytes()
