"""The elementwise chain around attention and FFN: LayerNorm + adaLN modulate, gated residual adds.

The model calls only :func:`norm_modulate` and :func:`add_norm_modulate`, so one fused kernel replaces each
whole chain in one place. On CUDA tensors they run the Triton kernels of ``stdit.kernels.adaln`` (one read
and one write of each activation, forward and backward); elsewhere, or with ``STDIT_FUSED_NORM=0``, the plain
torch functions below, which are also the kernels' reference twin.

Math follows Wan: norms and modulation in fp32 (or wider, for fp64 inputs), results cast to x's dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

ENV_VAR = "STDIT_FUSED_NORM"


def norm_modulate_torch(x, shift=None, scale=None, weight=None, bias=None, eps=1e-6):
    """``LN(x) * (1 + scale) + shift`` (LN over the last dim, optional affine), in fp32, cast to x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(x.to(dt), (x.shape[-1],), None if weight is None else weight.to(dt),
                     None if bias is None else bias.to(dt), eps)
    if scale is not None:
        y = y * (1 + scale.to(dt))
    if shift is not None:
        y = y + shift.to(dt)
    return y.to(x.dtype)


def add_norm_modulate_torch(x, y, gate=None, shift=None, scale=None, weight=None, bias=None, eps=1e-6, norm=True):
    """Residual ``h = x + gate * y`` (fp32 math, x's dtype), then ``norm_modulate_torch(h, ...)`` if ``norm``."""
    if gate is None:
        h = x + y
    else:
        dt = torch.promote_types(x.dtype, torch.float32)
        h = (x.to(dt) + y.to(dt) * gate.to(dt)).to(x.dtype)
    return h, (norm_modulate_torch(h, shift, scale, weight, bias, eps) if norm else None)


def _fused_enabled(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    # Under torch.compile the plain functions are traced instead: inductor fuses the chain into kernels of its own,
    # while tracing into our launch path would fail (Dynamo cannot wrap those launches).
    if not x.is_cuda or os.environ.get(ENV_VAR, "1") == "0" or torch.compiler.is_compiling():
        return False
    from stdit.kernels import adaln

    return adaln.supported(x, *tensors)


def norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` (LN with optional affine ``weight``/``bias``), in fp32, cast to x's dtype.

    x ``[B, S, D]``; shift/scale broadcast against it (``[B, 1, D]``), fp32.
    """
    if _fused_enabled(x, shift, scale):
        from stdit.kernels.adaln import fused_norm_modulate

        return fused_norm_modulate(x, shift, scale, weight, bias, eps)
    return norm_modulate_torch(x, shift, scale, weight, bias, eps)


def add_norm_modulate(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Residual ``h = x + gate * y`` (fp32 math, x's dtype), then ``norm_modulate(h, ...)`` if ``norm``.

    Returns ``(h, normed)``; ``normed`` is None when ``norm`` is False.
    """
    if y.shape == x.shape and y.dtype == x.dtype and _fused_enabled(x, gate, shift, scale):
        from stdit.kernels.adaln import fused_add_norm_modulate

        return fused_add_norm_modulate(x, y, gate, shift, scale, weight, bias, eps, norm)
    return add_norm_modulate_torch(x, y, gate, shift, scale, weight, bias, eps, norm)


def feed_forward(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' ``FeedForward`` with ``activation_fn="gelu-approximate"`` (Linear, GELU-tanh, Linear).

    On CUDA, when autograd will not ask for a backward (sampling), the GELU runs in the first matmul's epilogue
    (``torch._addmm_activation``: cuBLASLt's bias + GELU-tanh epilogue), which saves one read and one write of the
    widest activation of the block ([S, ffn_dim]). Elsewhere, in training, and with ``STDIT_FUSED_NORM=0`` the
    module runs as it is.
    """
    act = ffn.net[0]
    proj = getattr(act, "proj", None)
    fusable = (x.is_cuda and getattr(act, "approximate", None) == "tanh" and proj is not None
               and proj.bias is not None and x.dtype == proj.weight.dtype
               and not (torch.is_grad_enabled() and (x.requires_grad or proj.weight.requires_grad))
               and os.environ.get(ENV_VAR, "1") != "0")
    if not fusable:
        return ffn(x)
    h = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    h = h.view(*x.shape[:-1], h.shape[-1])
    for module in ffn.net[1:]:
        h = module(h)
    return h
