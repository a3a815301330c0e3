"""Every private or version-dependent Triton and torch internal the kernels rely on, in one place.

Supported: Triton 3.6 (the oldest release with Gluon's Hopper API as the kernels use it) through 3.9, torch 2.6 and
newer. Older Tritons still run the general Triton kernels: no Gluon (:data:`HAVE_GLUON` False), and before 3.4 no
bound fast launch (:data:`HAS_LAUNCH_KNOBS` False). ``tests/test_compat.py`` checks each entry against the installed
versions, with one test per supported Triton release for what differs between them.

Public APIs (``triton.jit``, ``tl.*``, ``torch.library``) are used directly elsewhere; only what a new release may
rename, move or drop without notice is reached through here, so a new release is adopted by changing this file.
"""

from __future__ import annotations

import os
import re

import torch
import triton
import triton.language as tl
from triton.runtime import JITFunction

__all__ = ["HAS_LAUNCH_KNOBS", "HAS_TENSOR_DESCRIPTORS", "HAVE_GLUON", "JITFunction", "TRITON_VERSION",
           "bundled_ptxas", "cta_barrier", "current_device", "current_stream_getter", "ensure_scratch_allocator",
           "fence_async_shared", "gl", "gluon", "gluon_compile", "in_dispatch_mode", "interpreter_wraps_language",
           "jit_params", "launch_hooks_installed", "mbarrier", "parse_version", "run_compiled", "tma", "tma_load", "tma_reduce_add",
           "tma_store", "warpgroup_mma", "warpgroup_mma_wait"]

def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a release or development version string ("3.6.0", "3.10.0+git1a2b", "3.7.0rc1")."""
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", version).groups())


TRITON_VERSION: tuple[int, int] = parse_version(triton.__version__)

# ---- torch -----------------------------------------------------------------------------------------------------

# torch.cuda.current_device() without its lazy-initialization checks (two Python calls, a few microseconds on these
# hosts): the callers launch on CUDA tensors, so CUDA is initialized.
current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def in_dispatch_mode() -> bool:
    """Whether a ``TorchDispatchMode`` is active (FakeTensor tracing, FlopCounter, activation-checkpoint
    recomputation policies): there the kernels' custom ops must run instead of the eager autograd Functions, whose
    launches such modes cannot see."""
    return torch._C._len_torch_dispatch_stack() > 0


# ---- Triton: launching compiled kernels directly (stdit.kernels._launch) --------------------------------------

# The ``knobs`` module (3.4) holds the launch hooks a profiler installs; before it the bound launch stays off.
HAS_LAUNCH_KNOBS = hasattr(triton, "knobs")
_RUNTIME = triton.knobs.runtime if HAS_LAUNCH_KNOBS else None


def launch_hooks_installed() -> bool:
    """Whether a profiler (proton, ...) installed launch hooks, which only Triton's own launch path calls. Runs
    before every bound launch, so it is written out (a generator over the two hooks took 3 µs a call). Triton 3.6
    and later hold the hooks as (usually empty) chains with ``.calls``; 3.4 and 3.5 as a callable or None."""
    enter, exit_ = _RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(exit_, "calls", exit_))


def current_stream_getter():
    """Triton's own current-stream getter (torch's raw stream handle for a device index)."""
    return triton.runtime.driver.active.get_current_stream


def run_compiled(kernel, grid: tuple, stream, args: tuple, trailing: tuple) -> None:
    """Launch ``kernel`` (the ``CompiledKernel`` a ``fn[grid](...)`` call returned) again: the launcher takes the grid,
    the stream, the CUDA function, the packed metadata, three hook/metadata slots (none) and then every kernel
    parameter, constexprs included (it skips them)."""
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *args,
               *trailing)


def jit_params(fn: JITFunction) -> list[tuple[str, bool, object]]:
    """(name, has a default, default) of each parameter of a ``@triton.jit`` / ``@gluon.jit`` kernel, in order."""
    return [(p.name, p.has_default, p.default) for p in fn.params]


# ---- Triton: tensor descriptors (TMA) ---------------------------------------------------------------------------

# In-kernel tensor descriptors (``tl.make_tensor_descriptor``) and the host allocator they need came in 3.4 (the
# interpreter has them too, but the kernels take them only when compiled).
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def _scratch(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Descriptors built inside a kernel live in a scratch buffer Triton asks the host for. Triton keeps the
    allocator in a context variable, which the autograd engine's backward thread does not inherit: call it per
    launch."""
    triton.set_allocator(_scratch)


# ---- Gluon (Hopper) -----------------------------------------------------------------------------------------------

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait

    # Renamed after 3.6: async_copy_global_to_shared -> async_load, async_copy_shared_to_global -> async_store,
    # thread_barrier -> barrier.
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
    cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except (ImportError, AttributeError):  # pragma: no cover - Triton without Gluon's Hopper API
    HAVE_GLUON = False

if HAVE_GLUON:
    if hasattr(tma, "async_atomic_add"):
        tma_reduce_add = tma.async_atomic_add
    else:  # 3.6: the IR builder has the bulk tensor reduce-add; its Python wrapper came in a later release
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)


def gluon_compile(fn, signature: dict, constexprs: dict, attrs: dict, capability: int, options: dict):
    """Compile a ``@gluon.jit`` kernel ahead of time for ``capability`` (e.g. 90) without a GPU (sm90_report)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    return triton.compile(GluonASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                          options=options)


def bundled_ptxas() -> list[str]:
    """The ptxas executables bundled with Triton's NVIDIA backend, newest first."""
    from triton.backends.nvidia import compiler as nv

    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    return [p for p in (os.path.join(bindir, n) for n in ("ptxas-blackwell", "ptxas")) if os.path.exists(p)]


def interpreter_wraps_language() -> bool:
    """Whether Triton's own jit functions (``tl.sum`` ...) were decorated for the interpreter: false when triton was
    imported before ``TRITON_INTERPRET=1`` was set, and then the interpreter cannot call them."""
    return type(tl.sum).__name__ == "InterpretedFunction"
