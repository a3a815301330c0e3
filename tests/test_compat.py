"""``stdit.kernels._compat``: each private Triton/torch internal it wraps still does what the kernels need, on the
installed versions, and one test per supported Triton release checks the names that release spells its own way (the
CPU suite runs Triton 3.9, the device image 3.6). The launch path's use of them (compiled-kernel relaunch, hooks,
parameter order) is tested in tests/test_launch.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import TorchDispatchMode

from stdit.kernels import _compat

SUPPORTED = ((3, 6), (3, 7), (3, 8), (3, 9))


def test_version_parses_release_and_dev_strings():
    assert _compat.parse_version("3.6.0") == (3, 6)
    assert _compat.parse_version("3.10.0+git1a2b3c") == (3, 10)  # two-digit minors compare as numbers
    assert _compat.parse_version("3.7.0rc1") == (3, 7) > (3, 6)
    assert _compat.TRITON_VERSION == _compat.parse_version(triton.__version__)


def test_jit_params_in_order_with_defaults():
    def kernel(X, n, BLOCK: tl.constexpr, NEG: tl.constexpr = False):
        pass

    # Decorated by hand: under TRITON_INTERPRET=1 (the CPU suite) @triton.jit makes an interpreter function.
    params = _compat.jit_params(triton.runtime.JITFunction(kernel))
    assert [(name, has_default) for name, has_default, _ in params] == [("X", False), ("n", False),
                                                                          ("BLOCK", False), ("NEG", True)]
    assert params[-1][2] is False


@pytest.mark.skipif(not _compat.HAS_LAUNCH_KNOBS, reason="Triton before 3.4 has no launch knobs")
def test_launch_hooks_seen():
    runtime = triton.knobs.runtime
    assert not _compat.launch_hooks_installed()

    def hook(*args, **kwargs):
        pass

    chain = runtime.launch_enter_hook
    if hasattr(chain, "add"):  # 3.6 and later: a chain of hooks
        chain.add(hook)
        try:
            assert _compat.launch_hooks_installed()
        finally:
            chain.remove(hook)
    else:
        runtime.launch_enter_hook = hook
        try:
            assert _compat.launch_hooks_installed()
        finally:
            runtime.launch_enter_hook = chain
    assert not _compat.launch_hooks_installed()


def test_dispatch_mode_seen():
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not _compat.in_dispatch_mode()
    with Passthrough():
        assert _compat.in_dispatch_mode()
    assert not _compat.in_dispatch_mode()


def test_current_device_is_callable():
    assert callable(_compat.current_device)
    if torch.cuda.is_available():
        assert _compat.current_device() == torch.cuda.current_device()


def test_interpreter_detection():
    # A fresh process each way: Triton decorates its own language functions for the interpreter at import.
    code = "import triton.language; from stdit.kernels import _compat; print(_compat.interpreter_wraps_language())"
    seen = {}
    for interpret in ("1", None):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = interpret
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        seen[interpret] = out.stdout.strip().splitlines()[-1]
    assert seen == {"1": "True", None: "False"}


def test_gluon_hopper_names_resolve():
    if _compat.TRITON_VERSION < (3, 6):
        assert not _compat.HAVE_GLUON
        pytest.skip("Gluon's Hopper API as the kernels use it needs Triton 3.6")
    assert _compat.HAVE_GLUON
    assert _compat.HAS_TENSOR_DESCRIPTORS
    for name in ("tma_load", "tma_store", "cta_barrier", "tma_reduce_add", "mbarrier", "warpgroup_mma",
                 "warpgroup_mma_wait", "fence_async_shared"):
        assert getattr(_compat, name) is not None, name


def test_bundled_ptxas_found():
    exes = _compat.bundled_ptxas()
    assert exes and all(os.access(p, os.X_OK) for p in exes)


def _only(version):
    return pytest.mark.skipif(_compat.TRITON_VERSION != version,
                              reason=f"Triton {triton.__version__} installed, not {version[0]}.{version[1]}")


@_only((3, 6))
def test_triton_3_6():
    # The release the device image has: TMA copies and the CTA barrier under their first names, and no Python
    # wrapper for the bulk reduce-add (our builtin over the IR builder's op).
    from triton.experimental.gluon.language.nvidia.hopper import tma

    assert _compat.tma_load is tma.async_copy_global_to_shared
    assert _compat.tma_store is tma.async_copy_shared_to_global
    assert not hasattr(tma, "async_atomic_add") and _compat.tma_reduce_add.__module__ == _compat.__name__
    from triton._C.libtriton import ir

    assert hasattr(ir.DESCRIPTOR_REDUCE_KIND, "ADD")


@pytest.mark.parametrize("version", [v for v in SUPPORTED if v > (3, 6)], ids=lambda v: f"{v[0]}.{v[1]}")
def test_triton_after_3_6(version):
    if _compat.TRITON_VERSION != version:
        pytest.skip(f"Triton {triton.__version__} installed")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import tma

    assert _compat.tma_load is tma.async_load and _compat.tma_store is tma.async_store
    assert _compat.cta_barrier is gl.barrier
    assert _compat.tma_reduce_add is tma.async_atomic_add
