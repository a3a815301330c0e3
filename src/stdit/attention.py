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

Each backend but ``auto`` is a :class:`Backend` in :data:`REGISTRY`: the function that runs it and the one reason
it cannot take a call, if any. The checkpointing policies that keep attention outputs are in
:mod:`stdit.checkpointing`, QK RMSNorm + RoPE with the other fused ops in :mod:`stdit.ops`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "xformers", "eager", "fp8")  # "auto" and the names of REGISTRY (below)
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


def triton_attention(q, k, v, key_padding_mask=None, scale=None):
    if torch.compiler.is_compiling():
        # The kernels' custom op, looked up rather than imported (an import traced by Dynamo breaks the graph); it
        # is registered: choosing this backend (triton_supports, auto_backend) imported stdit.kernels. Outside
        # torch.compile, flash_attention itself takes the op under a dispatch mode.
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return torch.ops.stdit.flash_attention_fwd(q, k, v, key_padding_mask, scale)[0]
    from stdit.kernels.attention import flash_attention

    return flash_attention(q, k, v, key_padding_mask, scale)


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


def fp8_supports(q: torch.Tensor, k: torch.Tensor) -> str | None:
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


@dataclass(frozen=True)
class Backend:
    """One attention backend: ``run(q, k, v, key_padding_mask=, scale=)`` and ``why_not(q, k)``, the one reason it
    cannot take a call (None: it takes every call). A backend chosen by name that cannot take a call hands it to
    ``sdpa``, warning once per reason."""

    run: Callable[..., torch.Tensor]
    why_not: Callable[[torch.Tensor, torch.Tensor], str | None] | None = None


REGISTRY: dict[str, Backend] = {
    "triton": Backend(triton_attention, triton_supports),
    "sdpa": Backend(sdpa_attention),
    "xformers": Backend(xformers_attention),  # not installed: its run says how to install it
    "eager": Backend(eager_attention),
    "fp8": Backend(fp8_attention, fp8_supports),
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
    else:
        why_not = REGISTRY[name].why_not
        reason = why_not(q, k) if why_not is not None else None
        if reason is not None:
            _warn_once(f"{name}:{reason}", f"stdit: {name} attention unavailable ({reason}); falling back to sdpa.")
            name = "sdpa"
    if key_padding_mask is not None:
        key_padding_mask = as_keep_mask(key_padding_mask).to(device=q.device)
    return REGISTRY[name].run(q, k, v, key_padding_mask=key_padding_mask, scale=scale)
