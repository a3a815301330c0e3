"""Attention dispatch.

Every attention in the model goes through :func:`attention`, with q, k, v laid out ``[B, S, H, D]`` as the
projections produce them (no transposes on our side). The backend is a run-time choice, never stored in a
config. Resolution order: the :func:`attention_backend` context manager, then the model's
``set_attention_backend`` choice, then ``STDIT_ATTENTION``, then the default, ``auto``.

Backends:
    ``auto``      per call, the fastest we measure: ``triton`` where our Hopper kernels cover the call (sampling:
                  the forward; B1 H12 S32760 d128 on an H200: 601 vs cuDNN's 568 TFLOP/s; training: the
                  one-pass backward too, from 8,192 queries on), ``sdpa`` otherwise
    ``triton``    our fused flash-attention kernels (``stdit.kernels``), CUDA or ``TRITON_INTERPRET=1``
    ``sdpa``      ``torch.nn.functional.scaled_dot_product_attention`` (torch picks flash/cuDNN/efficient)
    ``xformers``  ``xformers.ops.memory_efficient_attention`` (optional extra: ``pip install stdit[xformers]``)
    ``eager``     plain math in fp32, the reference
    ``fp8``       our 8-bit forward (INT8 Q/K, FP8 P/V: ``stdit.kernels.attention_fp8``), inference only; a call
                  that autograd would need gradients of is refused
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import warnings
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "xformers", "eager", "fp8")
ENV_VAR = "STDIT_ATTENTION"

_context_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("stdit_attention", default=None)
# Open attention_backend() blocks in any thread. torch.compile cannot trace ContextVar.get (a graph break in every
# attention call); with no block open the resolution never reads the ContextVar, and compiled code guards on this.
_open_contexts = 0
_open_lock = threading.Lock()
_warned: set[str] = set()


def check_backend(name: str) -> str:
    """Return ``name`` if it is a known backend, else raise one clear error."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for every attention call inside the ``with`` block (overrides the model's choice)."""
    global _open_contexts
    token = _context_backend.set(check_backend(name))
    with _open_lock:
        _open_contexts += 1
    try:
        yield
    finally:
        with _open_lock:
            _open_contexts -= 1
        _context_backend.reset(token)


def default_backend() -> str:
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend(env.strip().lower())
    return "auto"


# With a backward to come, ``auto`` takes our kernels from this many queries on (see :func:`auto_backend`).
AUTO_TRAIN_MIN_QUERIES = 8192


def auto_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: torch.Tensor | None = None) -> str:
    """What ``auto`` runs for this call: ``triton`` where our Hopper kernels cover it, else ``sdpa``.

    Without a backward to come, where our Hopper forward covers the call (it beats cuDNN on sm_90 at head dims 64
    and 128: benchmarks/results/attention-*.md). When autograd will ask for a backward, also the one-pass backward
    must cover it, with at least ``AUTO_TRAIN_MIN_QUERIES`` queries: on an H200 it beats cuDNN's on self-attention
    at 16k-76k tokens and on text cross-attention with 32k queries (and the Wan-1.3B training step), while at 4k
    tokens cuDNN's backward is ~3% faster. Depends only on shapes, strides, dtypes, the device, the grad mode and
    the deterministic-algorithms switch, so the same call picks the same backend again (activation-checkpoint
    recompute, torch.compile)."""
    if not q.is_cuda:
        return "sdpa"
    try:
        from stdit.kernels.attention import sm90_backward_covers, sm90_forward_covers
    except ImportError:  # pragma: no cover - triton missing on a CUDA machine
        return "sdpa"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if q.shape[1] < AUTO_TRAIN_MIN_QUERIES or not sm90_backward_covers(q, k, v, key_padding_mask):
            return "sdpa"
    return "triton" if sm90_forward_covers(q, k, v, key_padding_mask) else "sdpa"


def context_backend() -> str | None:
    """The backend of the innermost open :func:`attention_backend` block in this context, or None."""
    return _context_backend.get() if _open_contexts else None


def resolve_backend(preferred: str | None = None) -> str:
    """The backend an attention call uses now: context manager > ``preferred`` (the model's) > env > default."""
    ctx = context_backend()
    if ctx is not None:
        return ctx
    if preferred is not None:
        return check_backend(preferred)
    return default_backend()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def as_keep_mask(mask: torch.Tensor | None, name: str = "key_padding_mask") -> torch.Tensor | None:
    """A key padding mask ``[B, S]`` as bool, True = attend. Takes bool masks, 0/1 integer masks (a tokenizer's
    ``attention_mask``) and additive float masks (0 = attend, -inf or a large negative number such as
    ``torch.finfo(dtype).min`` = padding). A float mask is never read as 0/1: ``.bool()`` would invert an additive
    one, so a float mask holding anything but 0 and large negatives (a 0/1 float mask, a soft bias) is refused."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        keep = mask == 0
        if not torch.compiler.is_compiling() and not (keep | (mask <= -1e4)).all():
            bad = mask[~(keep | (mask <= -1e4))]
            raise ValueError(
                f"{name} is a float mask, read as additive (0 = attend, -inf = padding), but it holds "
                f"{bad[0].item():g}: pass a bool mask (True = real token) or a 0/1 integer mask instead.")
        return keep
    if mask.is_complex():
        raise ValueError(f"{name} must be bool (True = attend), 0/1 integer or additive float; got {mask.dtype}.")
    return mask != 0


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference attention in fp32. q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]``, mask ``[B, Sk]`` (True = attend)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if key_padding_mask is not None:
        # A query whose keys are all padding attends to nothing: output zero, not NaN.
        p = torch.nan_to_num(p, nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()).to(q.dtype)


def sdpa_attention(q, k, v, key_padding_mask=None, scale=None):
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)
    out = out.transpose(1, 2)
    if key_padding_mask is not None:
        out = out.masked_fill(~key_padding_mask.any(dim=1)[:, None, None, None], 0.0)
    return out


def xformers_attention(q, k, v, key_padding_mask=None, scale=None):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise ImportError(
            "The 'xformers' attention backend needs xformers: pip install 'stdit[xformers]' "
            "(or choose another backend: triton, sdpa, eager)."
        ) from e
    if key_padding_mask is None:
        return xops.memory_efficient_attention(q, k, v, scale=scale)
    b, sk = key_padding_mask.shape
    # xformers reads the bias with rows aligned to 8 elements: allocate padded keys and pass a view.
    padded = -(-sk // 8) * 8
    bias = torch.zeros(b, q.shape[2], q.shape[1], padded, device=q.device, dtype=q.dtype)[..., :sk]
    bias.masked_fill_(~key_padding_mask[:, None, None, :], float("-inf"))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
    # A batch whose keys are all masked gives zeros, as the other backends do (not NaN).
    return out.masked_fill(~key_padding_mask.any(dim=1)[:, None, None, None], 0.0)


@torch.library.custom_op("stdit::flash_attention_fwd", mutates_args=())
def _flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    from stdit.kernels.attention import flash_attention_forward

    return flash_attention_forward(q, k, v, key_padding_mask, scale)


@_flash_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    b, sq, h, d = q.shape
    return q.new_empty(b, sq, h, d), q.new_empty(b, h, sq, dtype=torch.float32)


@torch.library.custom_op("stdit::flash_attention_bwd", mutates_args=())
def _flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from stdit.kernels.attention import flash_attention_backward

    return flash_attention_backward(do, q, k, v, o, lse, key_padding_mask, scale)


@_flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse, key_padding_mask, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
    ctx.scale = scale


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _flash_attention_bwd(do, q, k, v, o, lse, key_padding_mask, ctx.scale)
    return dq, dk, dv, None, None


_flash_attention_fwd.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def triton_attention(q, k, v, key_padding_mask=None, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        # torch.compile and dispatch modes (selective checkpointing's policy, fake tensors) see the kernels as the
        # custom op above: one opaque, named op instead of a graph break or a stream of launches.
        return _flash_attention_fwd(q, k, v, key_padding_mask, scale)[0]
    # Plain eager calls skip the custom op's dispatch and its generated autograd wrapper: the same kernels through
    # an autograd.Function, 629 instead of 847 us of host time per forward+backward of a tiny call on an H200's host
    # (benchmarks/DECISIONS.md).
    from stdit.kernels.attention import FlashAttention

    return FlashAttention.apply(q, k, v, key_padding_mask, scale)


def triton_supports(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the triton backend cannot take these inputs, or None if it can."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not (q.is_cuda or interpret):
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported"
    if k.dtype != q.dtype:
        return f"q and k dtypes differ ({q.dtype}, {k.dtype})"
    try:
        from stdit.kernels import SUPPORTED_HEAD_DIMS
    except ImportError as e:
        return f"the kernels could not be imported ({e})"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} is not one of {sorted(SUPPORTED_HEAD_DIMS)}"
    return None


def fp8_attention(q, k, v, key_padding_mask=None, scale=None):
    from stdit.kernels.attention_fp8 import attention_fp8

    return attention_fp8(q, k, v, key_padding_mask, scale)


def fp8_supports(q: torch.Tensor) -> str | None:
    """Why the fp8 backend cannot take these inputs, or None if it can."""
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} is larger than 256"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        return "FP8 needs compute capability 8.9 or newer"
    return None


_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "triton": triton_attention,
    "sdpa": sdpa_attention,
    "xformers": xformers_attention,
    "eager": eager_attention,
    "fp8": fp8_attention,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Non-causal attention. q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` -> ``[B, Sq, H, D]``.

    ``key_padding_mask`` ``[B, Sk]`` bool marks the keys to attend to (True) — padded text tokens are False; 0/1
    integer and additive float masks are read as :func:`as_keep_mask` says.
    ``backend`` is the caller's preference; the context manager overrides it (see :func:`resolve_backend`).
    """
    name = resolve_backend(backend)
    if name == "auto":
        name = auto_backend(q, k, v, key_padding_mask)  # picks triton only where our kernels take the call
    elif name == "triton":
        reason = triton_supports(q, k)
        if reason is not None:
            _warn_once(f"triton:{reason}", f"stdit: triton attention unavailable ({reason}); falling back to sdpa.")
            name = "sdpa"
    elif name == "fp8":
        reason = fp8_supports(q)
        if reason is not None:
            _warn_once(f"fp8:{reason}", f"stdit: fp8 attention unavailable ({reason}); falling back to sdpa.")
            name = "sdpa"
    if key_padding_mask is not None:
        key_padding_mask = as_keep_mask(key_padding_mask).to(device=q.device)
    return _IMPLS[name](q, k, v, key_padding_mask=key_padding_mask, scale=scale)


# The ops that run an attention core, as a checkpoint policy sees them (below autograd), and where each keeps its
# sequence dim: torch's SDPA kernels take [B, H, S, D], ours [B, S, H, D].
_ATTENTION_OPS = {
    "aten::_scaled_dot_product_cudnn_attention": -2,
    "aten::_scaled_dot_product_flash_attention": -2,
    "aten::_scaled_dot_product_efficient_attention": -2,
    "aten::_scaled_dot_product_flash_attention_for_cpu": -2,
    "stdit::flash_attention_fwd": 1,
}


# Matrix products as the selective-checkpointing policy sees them (nn.Linear dispatches to addmm / mm).
_MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"})


def _op_name(func) -> str:
    return getattr(func, "name", lambda: "")()


def _keeps_self_attention(func, args) -> bool:
    dim = _ATTENTION_OPS.get(_op_name(func))
    return dim is not None and len(args) >= 2 and args[0].shape[dim] == args[1].shape[dim]


def keep_self_attention_policy(ctx, func, *args, **kwargs):
    """Selective activation checkpointing policy: keep the outputs of every self-attention core (query length =
    key length) and recompute everything else. With it, the backward's recompute of a block skips the attention
    forward, the costliest op of a video DiT, for one more saved [B, S, H*D] tensor (and its logsumexp) per block.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if _keeps_self_attention(func, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_and_matmuls_policy(ctx, func, *args, **kwargs):
    """Selective activation checkpointing policy: keep every attention output (self and text cross-attention) and
    every matrix product's output (projections, FFN), recompute only the elementwise ops (norms, modulation, RoPE,
    activations). The recompute then costs almost no time; the saved activations grow by the linear layers' outputs
    (about 13 x [B, S, dim] per block at Wan's FFN ratio), still far below keeping everything.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    name = _op_name(func)
    if name in _MATMUL_OPS or name in _ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


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
    if os.environ.get("STDIT_FUSED_ROPE", "1") == "0" or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
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


@torch.library.custom_op("stdit::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd(
    q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None, weight_k: torch.Tensor | None, eps: float,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    from stdit.kernels.qk_norm_rope import qk_norm_rope_forward

    return qk_norm_rope_forward(q, k, weight_q, weight_k, eps, cos, sin, num_heads)


@_qk_norm_rope_fwd.register_fake
def _(q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    b, s, hd = q.shape
    return q.new_empty(b, s, num_heads, hd // num_heads), k.new_empty(b, s, num_heads, hd // num_heads)


@torch.library.custom_op("stdit::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd(
    gq: torch.Tensor, gk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor | None,
    weight_k: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, d weight_q, d weight_k)``; the weights' grads are empty without weights."""
    from stdit.kernels.qk_norm_rope import qk_norm_rope_backward

    dq, dk, dwq, dwk = qk_norm_rope_backward(gq, gk, q, k, weight_q, weight_k, eps, cos, sin, num_heads)
    return dq, dk, q.new_empty(0) if dwq is None else dwq, k.new_empty(0) if dwk is None else dwk


@_qk_norm_rope_bwd.register_fake
def _(gq, gk, q, k, weight_q, weight_k, eps, cos, sin, num_heads):
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(0) if weight_q is None else weight_q.new_empty(
        weight_q.shape), k.new_empty(0) if weight_k is None else weight_k.new_empty(weight_k.shape))


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, weight_q, weight_k, eps, cos, sin, num_heads = inputs
    ctx.save_for_backward(q, k, weight_q, weight_k, cos, sin)
    ctx.eps, ctx.num_heads = eps, num_heads


def _qk_norm_rope_backward(ctx, gq, gk):
    q, k, weight_q, weight_k, cos, sin = ctx.saved_tensors
    dq, dk, dwq, dwk = _qk_norm_rope_bwd(gq, gk, q, k, weight_q, weight_k, ctx.eps, cos, sin, ctx.num_heads)
    if weight_q is None:
        dwq = dwk = None
    return dq, dk, dwq, dwk, None, None, None, None


_qk_norm_rope_fwd.register_autograd(_qk_norm_rope_backward, setup_context=_qk_norm_rope_setup)


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
    ``STDIT_FUSED_ROPE=0`` turns it off); on the CPU only with the triton backend under ``TRITON_INTERPRET=1``.
    Under ``torch.compile`` the kernel runs as the custom op ``stdit::qk_norm_rope_fwd``.
    """
    from stdit.rope import apply_rope

    if cos is not None and _fused_norm_rope_ok(q, num_heads, resolve_backend(backend)):
        from stdit.kernels import qk_norm_rope as fused  # under torch.compile it calls the custom op above

        return fused(q, k, weight_q, weight_k, eps, cos, sin, num_heads)
    q = rms_norm(q, weight_q, eps).unflatten(-1, (num_heads, -1))
    k = rms_norm(k, weight_k, eps).unflatten(-1, (num_heads, -1))
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k
