"""A transformers draft backend, for a draft that runs beside the verifier (same GPU).

Each session keeps a ``DynamicCache``; rolling back crops it to the kept length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from speculative.draft import draft_steps
from speculative.verifier import attention_backends, load_causal_lm, pick_device


class TransformersContext:
    def __init__(self, owner: TransformersDraft):
        from transformers import DynamicCache

        self._owner = owner
        self._cache = DynamicCache(config=owner.model.config)
        self._length = 0
        self.n_ctx = owner.context_length

    @torch.inference_mode()
    def evaluate(self, tokens: Sequence[int]) -> np.ndarray:
        ids = torch.tensor([list(tokens)], device=self._owner.device)
        positions = torch.arange(self._length, self._length + len(tokens), device=self._owner.device)
        with attention_backends(self._owner.device):
            out = self._owner.model(
                input_ids=ids,
                position_ids=positions.unsqueeze(0),
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self._length += len(tokens)
        return out.logits[0, -1].float().cpu().numpy()

    def draft(self, tokens: Sequence[int], k: int, choose: Callable[[np.ndarray], int]) -> list[int]:
        return draft_steps(self, tokens, k, choose)  # each session runs its own forward passes

    def truncate(self, n_keep: int) -> None:
        if n_keep < self._length:
            self._cache.crop(n_keep - self._length)  # transformers 5: a negative count to remove
            self._length = n_keep

    def begin_round(self) -> None:  # each session runs its own forward passes
        pass

    def end_round(self) -> None:
        pass

    def close(self) -> None:
        self._cache.reset()


class TransformersDraft:
    def __init__(
        self, model_path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None, model=None
    ):
        self.device = pick_device(device)
        self.model = model if model is not None else load_causal_lm(model_path, self.device, dtype or torch.float32)
        self.vocab_size: int = self.model.config.vocab_size
        self.context_length: int = self.model.config.max_position_embeddings

    def new_context(self, prefix: Sequence[int] = ()) -> TransformersContext:
        return TransformersContext(self)  # a cache of its own: nothing is kept between sessions
