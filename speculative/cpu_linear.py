"""oneDNN for the verifier's fp32 linear layers on CPU.

Verification multiplies a handful of positions (k + 1 per session) by every weight
matrix. For such skinny matmuls PyTorch's default fp32 CPU path is slow once there is
more than one row (measured on the demo verifier's shapes, 2 cores: the 384x4096 output
projection took ~3-4x longer at 3-8 rows than oneDNN's ``_linear_pointwise``, the op
Inductor itself emits for CPU linears). Swapping the kernel keeps the maths in fp32 and
the results within float rounding of ``F.linear``; a self-check at install time falls
back to ``F.linear`` if the op is missing or disagrees.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_CHECK_TOLERANCE = 1e-3


def _onednn_op():
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return None
    return getattr(ops, "_linear_pointwise", None)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = _OP(x.reshape(-1, self.in_features), self.weight, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], self.out_features)


_OP = _onednn_op()


def onednn_linear_works() -> bool:
    """True when the oneDNN op exists here and agrees with ``F.linear``."""
    if _OP is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in ((3, 16), (8, 16), (8,)))
        return bool(torch.allclose(_OP(x, w, b, "none", [], ""), F.linear(x, w, b), atol=_CHECK_TOLERANCE))
    except RuntimeError as exc:
        log.info("oneDNN linear unavailable: %s", exc)
        return False


def use_onednn_linears(model: nn.Module) -> int:
    """Route every fp32 CPU ``nn.Linear`` of ``model`` through oneDNN; return how many."""
    if not onednn_linear_works():
        return 0
    swapped = 0
    for module in model.modules():
        if (
            isinstance(module, nn.Linear)
            and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32
        ):
            module.forward = types.MethodType(_forward, module)  # type: ignore[method-assign]
            swapped += 1
    return swapped
