"""The fused ops around attention and FFN: LayerNorm + adaLN modulate, gated residual adds, the FFN's GELU
epilogue, and QK RMSNorm + 3D RoPE (:func:`qk_norm_rope`).

The model calls only :func:`norm_modulate` and :func:`add_norm_modulate`, so one fused kernel replaces each
whole chain in one place. On CUDA tensors they run the Triton kernels of ``stdit.kernels.adaln`` (one read
and one write of each activation, forward and backward); elsewhere, or with ``FUSED["norm"]`` off, the plain
torch functions below, which are also the kernels' reference twin.

Math follows Wan: norms and modulation in fp32 (or wider, for fp64 inputs), results cast to x's dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Ablation switches of the fused paths, for tests and benchmarks (``monkeypatch.setitem(ops.FUSED, "norm", False)``).
# Users have no need of them: each fused path runs only where it computes what the torch path computes.
FUSED = {"norm": True, "rope": True}


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
    if not x.is_cuda or not FUSED["norm"]:
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

    x ``[B, S, D]``; shift/scale broadcast against it: ``[B, 1, D]``, or per token ``[B, S, D]`` (Wan 2.2 TI2V's
    per-token timesteps). The fused kernels read one vector per sample, so per-token vectors run the torch function
    (the same math, unfused: exact, at the eager cost).
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

    Returns ``(h, normed)``; ``normed`` is None when ``norm`` is False. Per-token vectors ``[B, S, D]`` run the
    torch function, as in :func:`norm_modulate`.
    """
    if y.shape == x.shape and y.dtype == x.dtype and _fused_enabled(x, gate, shift, scale):
        from stdit.kernels.adaln import fused_add_norm_modulate

        return fused_add_norm_modulate(x, y, gate, shift, scale, weight, bias, eps, norm)
    return add_norm_modulate_torch(x, y, gate, shift, scale, weight, bias, eps, norm)


def hookless(module: torch.nn.Module) -> bool:
    """No forward hooks of torch, accelerate (offloading, ``device_map``) or diffusers (group offloading, layerwise
    casting, caches) on ``module``, nor global ones."""
    return (not module._forward_hooks and not module._forward_pre_hooks
            and getattr(module, "_hf_hook", None) is None and getattr(module, "_diffusers_hook", None) is None
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks)


def is_plain(module: torch.nn.Module | None, cls: type) -> bool:
    """Whether a fused path may read ``module``'s weights directly instead of calling it: it is exactly a ``cls``
    (not a peft LoRA wrapper or another subclass) and :func:`hookless`. Anything else must run as a module, or its
    adapter or hook would be skipped silently. Its own parameters must be plain tensors too: a quantized weight
    (torchao's FP8 tensor subclass) computes through the module's ``F.linear``, not through a fused op's matmul."""
    return (type(module) is cls and hookless(module)
            and all(type(p) in _PLAIN_TENSORS for p in module._parameters.values() if p is not None))


_PLAIN_TENSORS = (torch.nn.Parameter, torch.Tensor)


def feed_forward(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' ``FeedForward`` with ``activation_fn="gelu-approximate"`` (Linear, GELU-tanh, Linear).

    On CUDA, when autograd will not ask for a backward (sampling), the GELU runs in the first matmul's epilogue
    (``torch._addmm_activation``: cuBLASLt's bias + GELU-tanh epilogue), which saves one read and one write of the
    widest activation of the block ([S, ffn_dim]). Elsewhere, in training, with ``FUSED["norm"]`` off, and whenever
    the first projection is not a plain hook-free ``nn.Linear`` (a LoRA, offloading or casting hook) the module runs
    as it is.
    """
    act = ffn.net[0]
    proj = getattr(act, "proj", None)
    fusable = (x.is_cuda and hookless(ffn) and hookless(act) and is_plain(proj, torch.nn.Linear)
               and getattr(act, "approximate", None) == "tanh"
               and proj.bias is not None and x.dtype == proj.weight.dtype
               and not (torch.is_grad_enabled() and (x.requires_grad or proj.weight.requires_grad))
               and FUSED["norm"])
    if not fusable:
        return ffn(x)
    h = torch._addmm_activation(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight.t(), use_gelu=True)
    h = h.view(*x.shape[:-1], h.shape[-1])
    for module in ffn.net[1:]:
        h = module(h)
    return h


# ---- QK RMSNorm + RoPE (the fused Triton kernel, its custom op, and the torch path) ----------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with fp32 statistics. On CUDA it is torch's ``F.rms_norm`` (what ``nn.RMSNorm``
    runs, so what diffusers' Wan computes) instead of five elementwise ops; elsewhere the math is spelled out in
    fp32 (matches ``torch.nn.RMSNorm`` on fp32 inputs)."""
    if x.is_cuda and (weight is None or weight.dtype == x.dtype):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def _fused_norm_rope_ok(q: torch.Tensor, num_heads: int, backend: str) -> bool:
    if not FUSED["rope"] or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not q.is_cuda and not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _kernels_importable() and (q.shape[-1] // num_heads) % 2 == 0


_KERNELS_IMPORTABLE: list[bool] = []  # the answer, once asked


@torch.compiler.assume_constant_result
def _kernels_importable() -> bool:
    """Whether stdit.kernels (Triton) imports here. Dynamo takes the answer as a constant: an import traced inside a
    compiled block is a graph break, and one inside a checkpointed block made its compiled checkpoint fall back to
    eager, where the selective-checkpointing policy no longer applied (keep_matmuls recomputed every product)."""
    if not _KERNELS_IMPORTABLE:
        try:
            import stdit.kernels  # noqa: F401
            _KERNELS_IMPORTABLE.append(True)
        except ImportError:
            _KERNELS_IMPORTABLE.append(False)
    return _KERNELS_IMPORTABLE[0]


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    weight_q: torch.Tensor | None,
    weight_k: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    num_heads: int,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QK RMSNorm across heads, then 3D RoPE: q, k ``[B, S, H*D]`` -> ``[B, S, H, D]`` each.

    ``cos``/``sin`` are ``[S, D/2]`` fp32 tables (see :mod:`stdit.rope`), or None for no rotation. On CUDA the
    three steps run as one fused Triton kernel whatever the attention backend (norm and RoPE are not attention;
    ``FUSED["rope"]`` off turns it off); on the CPU only with the triton backend under ``TRITON_INTERPRET=1``.
    Under ``torch.compile`` the kernel runs as the custom op ``stdit::qk_norm_rope_fwd``.
    """
    from stdit.attention import resolve_backend
    from stdit.rope import apply_rope

    if cos is not None and _fused_norm_rope_ok(q, num_heads, resolve_backend(backend)):
        from stdit.kernels import qk_norm_rope as fused  # under torch.compile it calls its custom op

        return fused(q, k, weight_q, weight_k, eps, cos, sin, num_heads)
    q = rms_norm(q, weight_q, eps).unflatten(-1, (num_heads, -1))
    k = rms_norm(k, weight_k, eps).unflatten(-1, (num_heads, -1))
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k
