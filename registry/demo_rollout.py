"""Two rollouts on the demo pair, end to end, with live traffic through the gateway; prints JSON figures.

``python -m registry.demo_rollout`` (``make demo-rollout``): in a scratch database under
``var/demo-rollout`` with eager Celery and the demo pair served in this process,

1. a good variant (the demo's transformers draft, exported to GGUF and converted to f16
   by llama.cpp's quantiser: half the bytes) goes convert -> validate -> evaluate -> canary
   -> promote;
2. a bad variant (the same draft with each layer's weights shuffled: it guesses badly) is
   let through evaluation (``min_eval_ratio`` 0) so that the canary must catch it, and is
   rolled back automatically while clients stream.

Every completion is greedy and checked against the verifier decoding alone (lossless), and
no client sees an error. The figures: each step's, the canary's comparison and decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CANARY_SHARE = "0.5"
CANARY_SAMPLES = 8
MAX_TOKENS = 24
PROMPTS = (
    "The Django ORM",
    "A view function takes",
    "Models are defined",
    "URL patterns map",
    "Class-based views",
    "The settings module",
    "A migration records",
    "Static files are",
)


def shuffled_draft(out: Path) -> Path:
    """The demo draft with every layer matrix's entries permuted: same tokenizer and shapes, useless guesses."""
    import torch
    from transformers import AutoModelForCausalLM

    from speculative.pair import DEMO_DRAFT_HF

    model = AutoModelForCausalLM.from_pretrained(DEMO_DRAFT_HF, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if ".layers." in name and weight.dim() == 2:
                weight.copy_(weight.flatten()[torch.randperm(weight.numel(), generator=generator)].view_as(weight))
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DRAFT_HF / name, out / name)
    return out


def _setup(var: Path) -> None:
    os.environ["TANDEM_VAR_DIR"] = str(var)
    os.environ["DATABASE_URL"] = f"sqlite:///{var / 'demo.sqlite3'}"
    os.environ["TANDEM_CELERY_EAGER"] = "1"
    os.environ["TANDEM_REGISTRY_PLAN_TTL_S"] = "1"
    # every request on the speculative tier and generated (no difficulty routing to the edge, no cached replays):
    # the canary compares drafts on the tier where they are drafts
    os.environ["TANDEM_ROUTE_BY_DIFFICULTY"] = "0"
    os.environ["TANDEM_CACHE_TTL_S"] = "0"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


class Traffic:
    """Greedy completions through the gateway, each checked against the verifier alone."""

    def __init__(self, principal, reference) -> None:
        self.principal, self.reference = principal, reference
        self.completions = self.errors = self.mismatches = 0

    async def one(self, prompt: str, during=None) -> str:
        """Stream one completion (calling ``during()`` after its first token); return the draft version that served."""
        from asgiref.sync import sync_to_async

        from inference import gateway
        from tenants.models import UsageRecord

        try:
            stream = await gateway.start(
                self.principal,
                gateway.CompletionCall(model="tandem-demo", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0),
            )
            first = await stream.__anext__()
            if during is not None:
                await sync_to_async(during)()
            text = first.text + "".join([d.text async for d in stream])
            await stream.settled()  # the ledger row is written (the canary reads it)
        except Exception:  # noqa: BLE001 - counted and reported: the demo's claim is that there are none
            self.errors += 1
            raise
        self.completions += 1
        if text != self.reference.generate(prompt, max_tokens=MAX_TOKENS).text:
            self.mismatches += 1
        row = await UsageRecord.objects.aget(request_id=stream.request_id)
        return row.draft_version


def _rollout_figures(rollout_id: int) -> dict:
    from registry.models import Rollout

    rollout = Rollout.objects.select_related("candidate").get(pk=rollout_id)
    return {
        "candidate": rollout.candidate.version if rollout.candidate else None,
        "status": rollout.status,
        "decision": rollout.decision,
        "steps": [
            {"name": s.name, "status": s.status, "seconds": s.seconds, "figures": s.figures, "error": s.error or None}
            for s in rollout.steps.order_by("id")
        ],
    }


async def _run_rollout(traffic: Traffic, source: Path, **options) -> dict:
    """Start a rollout, then send traffic and check the canary after each completion until it is decided."""
    from asgiref.sync import sync_to_async

    from registry import services
    from registry.models import Rollout

    started = time.perf_counter()
    rollout = await sync_to_async(services.rollout_start)(
        model="tandem-demo", source=source, canary_share=CANARY_SHARE, canary_min_samples=CANARY_SAMPLES, **options
    )
    served: dict[str, int] = {}
    status = (await Rollout.objects.aget(pk=rollout.pk)).status
    check = lambda: services.rollout_canary_check(rollout_id=rollout.pk)  # noqa: E731
    for n in range(400):
        if status != "canary":
            break
        # the canary is decided while this completion streams: it finishes on the draft it started with
        version = await traffic.one(PROMPTS[n % len(PROMPTS)], during=check)
        served[version] = served.get(version, 0) + 1
        status = (await Rollout.objects.aget(pk=rollout.pk)).status
    figures = await sync_to_async(_rollout_figures)(rollout.pk)
    return {**figures, "sessions_by_draft": served, "seconds": round(time.perf_counter() - started, 1)}


async def _demo(var: Path) -> dict:
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import User

    from inference import gateway
    from inference.engines import load_default_engines, set_engines
    from registry import services
    from speculative.engine import SpeculativeEngine
    from speculative.pair import DEMO_DRAFT_HF
    from tenants.services import api_key_create, price_book_publish, tenant_create

    engines = load_default_engines()
    set_engines(engines)
    entry = engines.get("tandem-demo")
    speculative = entry.speculative
    assert isinstance(speculative, SpeculativeEngine)
    # the verifier alone, on the serving engine's scheduler: one thread calls the model (SpeculativeEngine)
    reference = SpeculativeEngine(speculative.verifier, speculative.tokenizer, None, scheduler=speculative.scheduler)

    def accounts() -> str:
        rates = {"prompt_per_mtok": "0.5", "completion_per_mtok": "1.5", "draft_per_mtok": "0.1", "gpu_per_hour": "2"}
        prices = [
            {"model": "tandem-demo", "tier": t, **rates, "max_gpu_ms_per_token": "50"}
            for t in ("edge", "speculative", "cloud")
        ]
        price_book_publish(version=1, prices=prices, note="demo rollout")
        user = User.objects.create_user(username="rollout-demo", password=os.urandom(12).hex())
        tenant = tenant_create(name="Rollout demo", owner=user)
        return api_key_create(tenant=tenant, created_by=user, name="demo")[1]

    raw_key = await sync_to_async(accounts)()
    versions = await sync_to_async(services.registry_sync)()
    traffic = Traffic(await gateway.authenticate_api_key(raw_key), reference)
    for prompt in PROMPTS:  # the current draft's recent record, before any canary
        await traffic.one(prompt)
    good = await _run_rollout(traffic, DEMO_DRAFT_HF, quantisation="f16")
    bad_source = shuffled_draft(Path(tempfile.mkdtemp(dir=var)))
    bad = await _run_rollout(traffic, bad_source, min_eval_ratio="0")
    reference.close()
    engines.close()
    return {
        "registered": [v.version for v in versions],
        "canary": {"share": float(CANARY_SHARE), "min_samples": CANARY_SAMPLES, "max_tokens": MAX_TOKENS},
        "good_variant_f16": good,
        "bad_variant_shuffled": bad,
        "clients": {"completions": traffic.completions, "errors": traffic.errors, "not_lossless": traffic.mismatches},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--var", type=Path, default=Path("var/demo-rollout"), help="scratch folder (emptied first)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.var, ignore_errors=True)
    args.var.mkdir(parents=True)
    _setup(args.var.resolve())
    figures = asyncio.run(_demo(args.var.resolve()))
    json.dump(figures, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
