"""Load stdit.kernels so its Triton kernels can run here: compiled on CUDA, else under the Triton interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before the kernel modules are
imported; if something imported them earlier without it, they are reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def load_kernels():
    import stdit.kernels
    import stdit.kernels.attention
    import stdit.kernels.qk_norm_rope

    if not HAS_CUDA and not stdit.kernels.attention._INTERPRET:
        # Dependencies first: the attention module takes the reloaded tiles, configs and backward kernels.
        for name in ("stdit.kernels.attention_tiles", "stdit.kernels.attention_bwd", "stdit.kernels.attention_sm90",
                     "stdit.kernels.attention",
                     "stdit.kernels.qk_norm_rope", "stdit.kernels", "stdit.kernels.attention_sparse",
                     "stdit.kernels.attention_fp8", "stdit.kernels.qk_norm_rope_quant"):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return stdit.kernels


def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_rule(name: str, out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, rel_atol: float = 1e-3) -> None:
    """The flash-attention rule: error vs the fp32 reference <= 2x that of the same math in torch at low precision,
    plus a small atol relative to the reference's scale."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err, base = max_err(out, ref), max_err(low, ref)
    atol = rel_atol * ref.abs().max().item() + 1e-6
    assert err <= 2 * base + atol, f"{name}: error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"
