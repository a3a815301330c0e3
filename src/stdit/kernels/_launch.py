"""Kernel launches that skip Triton's per-call argument binding once a kernel is compiled.

A ``kernel[grid](*args)`` launch binds and specializes every argument, builds a cache key from them and the
options, and builds launch metadata for (empty) hook chains, every call. Where the GPU work is short (4k tokens and
below) that host time sets the pace. :func:`launch` takes that path once per call signature, keeps the compiled
kernel it returns, and from then on calls the compiled kernel's launcher directly, as torch inductor does.

The signature key holds what Triton specializes on and more: every integer and bool argument's value, every
tensor's dtype and 16-byte alignment, the constexprs, the launch options and the device, so a call that would
compile differently never reuses a kernel. With launch hooks installed (a profiler such as proton), under
``TRITON_INTERPRET=1``, or with ``config.override(fast_launch=False)`` every call takes Triton's own path.
"""

from __future__ import annotations

from . import _compat
from ._compat import JITFunction, current_device, launch_hooks_installed, run_compiled
from .config import CONFIG

_MAX_ENTRIES = 4096  # distinct call signatures kept; one per (kernel, shape, stride, config) seen
_compiled: dict = {}
_current_stream = None  # Triton's own current-stream getter, bound at the first launch (the driver loads lazily)

def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. Host code uses these two rather than ``triton.cdiv`` and
    ``triton.next_power_of_2``, which are constexpr functions: a call from Python unwraps its arguments and costs a
    few microseconds, several times per attention call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` >= 1)."""
    return 1 << (n - 1).bit_length()


def _signature(args: tuple) -> tuple:
    sig = []
    for a in args:
        t = type(a)
        if t is int or a is None:
            sig.append(a)  # by value
        elif t is bool:
            sig.append((bool, a))  # True == 1 as a key, but Triton types it i1
        elif t is float:
            sig.append(float)  # passed as fp32 whatever the value
        else:  # a tensor
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
    return tuple(sig)


def _trailing(fn, n_args: int, constexprs: dict) -> tuple:
    """The arguments after the ``n_args`` positional ones, in the kernel's parameter order (constexprs included:
    the compiled launcher takes every parameter and skips the constant ones)."""
    out = []
    for name, has_default, default in _compat.jit_params(fn)[n_args:]:
        if name in constexprs:
            out.append(constexprs[name])
        elif has_default:
            out.append(default)
        else:
            raise TypeError(f"{fn.__name__}: no value for parameter {name!r}")
    return tuple(out)


# Options every launch takes unless the caller says otherwise. FP fusion (FMA contraction) is on in Triton up to
# 3.9, which warns that 3.10 turns it off by default; the kernels' speed and error bounds were measured with it
# on, so they ask for it (``TRITON_FORCE_DISABLE_FP_FUSION=1`` still turns it off).
DEFAULT_OPTIONS = {"enable_fp_fusion": True}


class Bound:
    """One kernel launch bound to its call signature and grid: ``bound(*args)`` launches the compiled kernel again
    on new positional arguments, skipping even :func:`launch`'s key. The caller guarantees that they have the
    signature the launch was bound with (the same integer values, tensor dtypes and 16-byte alignment: in practice,
    the same shapes and strides); the attention entry points key their plans on exactly that. A profiler's launch
    hooks installed later still see every launch (Triton's own path)."""

    __slots__ = ("fn", "grid", "constexprs", "options", "kernel", "trailing", "device")

    def __init__(self, fn, grid, constexprs, options, kernel, trailing, device):
        self.fn, self.grid, self.constexprs, self.options = fn, grid, constexprs, options
        self.kernel, self.trailing, self.device = kernel, trailing, device

    def __call__(self, *args) -> None:
        if launch_hooks_installed():
            self.fn[self.grid](*args, **self.constexprs, **self.options)
            return
        run_compiled(self.kernel, self.grid, _current_stream(self.device), args, self.trailing)


def launch(fn, grid: tuple, args: tuple, constexprs: dict, **options) -> Bound | None:
    """``fn[grid](*args, **constexprs, **options)`` for a ``@triton.jit`` / ``@gluon.jit`` kernel ``fn``, with the
    positional ``args`` first in its parameter order and every later parameter in ``constexprs`` (or defaulted);
    :data:`DEFAULT_OPTIONS` fill in options the call leaves out. Returns the launch as a :class:`Bound` once the
    kernel is compiled and kept (None where every call takes Triton's own path)."""
    options = {**DEFAULT_OPTIONS, **options}
    # Under TRITON_INTERPRET=1 kernels are interpreter functions, not JIT functions: nothing is compiled to keep.
    if not (_compat.HAS_LAUNCH_KNOBS and CONFIG.fast_launch) or not isinstance(fn, JITFunction) or \
            launch_hooks_installed():
        fn[grid](*args, **constexprs, **options)
        return None
    global _current_stream
    if _current_stream is None:
        _current_stream = _compat.current_stream_getter()
    device = current_device()
    key = (fn, device, _signature(args), tuple(constexprs.items()), tuple(options.items()))
    hit = _compiled.get(key)
    grid = (tuple(grid) + (1, 1))[:3]
    if hit is None:
        kernel = fn[grid](*args, **constexprs, **options)
        if kernel is None:
            return None
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        hit = _compiled[key] = (kernel, _trailing(fn, len(args), constexprs))
    else:
        kernel, trailing = hit
        run_compiled(kernel, grid, _current_stream(device), args, trailing)
    return Bound(fn, grid, constexprs, options, *hit, device)
