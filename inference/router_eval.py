"""Score the router on a labelled set of prompts: where each goes, why, how fast, and what it saves.

    python -m inference.router_eval FILE.jsonl [--policy VERSION] [--via-api BASE_URL KEY] [--model MODEL]

FILE holds one JSON object a line with ``id`` and ``prompt``, and optionally the labels
``difficulty`` (routine | hard), ``pii`` (bool) and ``expected_tier`` (edge | speculative
| cloud); other fields are ignored. Prints one JSON object: each row's tier and reason,
the decision time (p50, p99), and where labels exist: the cost saving against sending
everything to the cloud (relative prices edge 0.02, speculative 0.25, cloud 1.00 a
request), hard prompts left on the edge, PII prompts sent to the cloud (must be 0),
prompts labelled cloud that went there, accuracy and the confusion matrix.

By default the router decides in this process, with the default policy (the builtin
one: difficulty routing on, PII kept off the cloud) or the published ``--policy VERSION``
(``t3-v2``, ``default-v1``), for a model served on all three tiers. ``--via-api`` sends
each prompt through a running platform instead (``max_tokens`` 1, as a chat) and reads
the tier from the request's settlement (the ``tandem`` summary the ledger row is written
from), so what is scored is what production does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIERS = ("edge", "speculative", "cloud")
RELATIVE_PRICE = {"edge": 0.02, "speculative": 0.25, "cloud": 1.00}
DEFAULT_SET = Path(__file__).resolve().parent / "assets" / "router_eval" / "tandem-router-eval.jsonl"


@dataclass(frozen=True)
class Row:
    id: str
    prompt: str
    difficulty: str | None
    pii: bool | None
    expected_tier: str | None


def read_rows(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError as exc:
            raise SystemExit(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or "id" not in data:
            raise SystemExit(f"{path}:{number}: needs an object with 'id' and a string 'prompt'")
        difficulty, pii, expected = data.get("difficulty"), data.get("pii"), data.get("expected_tier")
        if difficulty not in (None, "routine", "hard"):
            raise SystemExit(f"{path}:{number}: difficulty must be 'routine' or 'hard', got {difficulty!r}")
        if pii is not None and not isinstance(pii, bool):
            raise SystemExit(f"{path}:{number}: pii must be true or false, got {pii!r}")
        if expected not in (None, *TIERS):
            raise SystemExit(f"{path}:{number}: expected_tier must be one of {', '.join(TIERS)}, got {expected!r}")
        rows.append(Row(str(data["id"]), data["prompt"], difficulty, pii, expected))
    return rows


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def score(rows: list[Row], decided: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures over the labelled rows (each label scored where it is present)."""
    tiers = [d["tier"] for d in decided]
    out: dict[str, Any] = {"rows": len(rows)}
    cost = sum(RELATIVE_PRICE[t] for t in tiers)
    out["relative_cost"] = round(cost, 4)
    out["saving_vs_all_cloud"] = round(1 - cost / len(rows), 4) if rows else 0.0
    hard = [t for r, t in zip(rows, tiers, strict=True) if r.difficulty == "hard"]
    if hard:
        out["hard_on_edge"] = {
            "count": hard.count("edge"),
            "of": len(hard),
            "share": round(hard.count("edge") / len(hard), 4),
        }
    pii = [t for r, t in zip(rows, tiers, strict=True) if r.pii]
    if any(r.pii is not None for r in rows):
        out["pii_to_cloud"] = {"count": pii.count("cloud"), "of": len(pii)}
    labelled = [(r.expected_tier, t) for r, t in zip(rows, tiers, strict=True) if r.expected_tier is not None]
    if labelled:
        cloud_labelled = [t for e, t in labelled if e == "cloud"]
        if cloud_labelled:
            out["cloud_recall"] = {
                "count": cloud_labelled.count("cloud"),
                "of": len(cloud_labelled),
                "share": round(cloud_labelled.count("cloud") / len(cloud_labelled), 4),
            }
        out["accuracy"] = round(sum(e == t for e, t in labelled) / len(labelled), 4)
        pairs = Counter(labelled)
        out["confusion"] = {"rows_expected_cols_routed": list(TIERS)} | {
            e: [pairs[(e, t)] for t in TIERS] for e in TIERS
        }
        if rows and all(r.expected_tier is not None for r in rows):
            expected_cost = sum(RELATIVE_PRICE[r.expected_tier] for r in rows if r.expected_tier)
            out["saving_of_the_labels_vs_all_cloud"] = round(1 - expected_cost / len(rows), 4)
    return out


def decide_here(rows: list[Row], policy_version: str | None, model: str) -> list[dict[str, Any]]:
    """The router's decision for each row, in this process, timing the checks and the decision together."""
    import django

    django.setup()
    from inference.completion import CompletionCall
    from inference.engines import CharTokenizer, ModelEntry, TrivialEngine
    from inference.errors import GatewayError
    from inference.router import decide
    from inference.selectors import builtin_policy
    from inference.signals import check
    from tenants.tiers import Tier

    policy = _evaluation_policy(builtin_policy()) if policy_version is None else _published(policy_version)

    class EveryTenant:  # a cloud tier every tenant may use, always up: what is scored is the policy
        def allows(self, tenant_id: int | None) -> bool:
            return True

        def available(self, tenant_id: int | None) -> bool:
            return True

    engine = TrivialEngine()
    entry = ModelEntry(model, engine, engine, "eval", "eval", 1 << 20, CharTokenizer(), cloud=EveryTenant())  # type: ignore[arg-type]
    tokenizer = _demo_tokenizer() or entry.tokenizer
    check(CompletionCall(model=model, prompt="warm up", max_tokens=1), policy, tokenizer)  # loads the models
    decided = []
    for row in rows:
        call = CompletionCall(
            model=model, prompt=row.prompt, max_tokens=1, messages=({"role": "user", "content": row.prompt},)
        )
        started = time.perf_counter()
        try:
            signals = check(call, policy, tokenizer)
            route = decide(entry, signals, policy, tenant_id=0)
            tier, reason = route.tier.value, route.reason
        except GatewayError as err:  # a refusal (a policy that refuses PII): scored as kept off the cloud
            tier, reason, signals = Tier.EDGE.value, f"refused:{err.code}", None
        elapsed_ms = (time.perf_counter() - started) * 1e3
        decided.append(
            {
                "id": row.id,
                "tier": tier,
                "reason": reason,
                "ms": round(elapsed_ms, 3),
                "pii": list(signals.pii_kinds) if signals else [],
                "difficulty": signals.difficulty if signals else None,
            }
        )
    return decided


def _evaluation_policy(policy):
    """The evaluation's default policy: difficulty routing on, PII kept off the cloud (whatever the settings say)."""
    import dataclasses

    return dataclasses.replace(policy, difficulty_routing=True, pii_action="keep_off_cloud")


def _published(version: str):
    from inference.models import RoutingPolicy
    from inference.router import Policy

    for row in RoutingPolicy.objects.all():
        if row.label == version:
            return Policy.from_row(row)
    raise SystemExit(f"no published routing policy {version!r} (labels look like t3-v2 or default-v1)")


def _demo_tokenizer():
    """The demo pair's tokenizer, which counts the prompt for the policy's prompt-length rule (None: characters do)."""
    try:
        from speculative.pair import DEMO_VERIFIER, load_tokenizer

        return load_tokenizer(DEMO_VERIFIER)
    except Exception:  # noqa: BLE001 - without it the character count stands in, and the report says which
        return None


def decide_via_api(rows: list[Row], base_url: str, key: str, model: str) -> list[dict[str, Any]]:
    """Each row through the platform's chat API (``max_tokens`` 1): the route its settlement recorded."""
    import httpx

    decided = []
    with httpx.Client(base_url=base_url.rstrip("/"), timeout=120) as client:
        for row in rows:
            started = time.perf_counter()
            response = client.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": model, "messages": [{"role": "user", "content": row.prompt}], "max_tokens": 1},
            )
            elapsed_ms = (time.perf_counter() - started) * 1e3
            body = response.json()
            if response.status_code != 200:
                error = body.get("error", {})
                decided.append(
                    {"id": row.id, "tier": "edge", "reason": f"refused:{error.get('code')}", "ms": round(elapsed_ms, 3)}
                )
                continue
            route = body["tandem"]["route"]
            decided.append(
                {
                    "id": row.id,
                    "tier": route["tier"],
                    "reason": route["reason"],
                    "ms": round(elapsed_ms, 3),
                    "request_id": response.headers.get("x-request-id"),
                }
            )
    return decided


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=DEFAULT_SET, help=f"default: {DEFAULT_SET.name}")
    parser.add_argument("--policy", default=None, help="a published policy's label (default: the default policy)")
    parser.add_argument("--via-api", nargs=2, metavar=("BASE_URL", "KEY"), default=None)
    parser.add_argument("--model", default="tandem-demo")
    parser.add_argument(
        "--rows", action="store_true", help="include every row's decision (default: yes, unless --summary)"
    )
    parser.add_argument("--summary", action="store_true", help="only the figures, not every row")
    args = parser.parse_args(argv)
    rows = read_rows(args.file)
    if args.via_api:
        decided = decide_via_api(rows, *args.via_api, model=args.model)
        how = {"via_api": args.via_api[0]}
    else:
        decided = decide_here(rows, args.policy, args.model)
        how = {"policy": args.policy or "default (builtin, difficulty routing on, PII kept off the cloud)"}
    times = [d["ms"] for d in decided]
    report: dict[str, Any] = {
        "file": str(args.file),
        **how,
        "decision_ms": {"p50": round(percentile(times, 50), 3), "p99": round(percentile(times, 99), 3)},
        **score(rows, decided),
        "reasons": dict(Counter(d["reason"] for d in decided).most_common()),
    }
    if not args.summary:
        report["decisions"] = decided
    json.dump(report, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    main()
