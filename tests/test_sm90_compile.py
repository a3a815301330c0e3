"""The Hopper (Gluon) attention kernels built for sm_90 on the CPU. Gluon has no interpreter, so this is the only
place a CPU run sees them: every forward config and backward variant the host code launches must compile, keep its
matrix products asynchronous (ptxas serializes ``wgmma`` when it runs out of registers) and spill little. Three
consumer warpgroups at head dims 72-96 spilled 656-1,000 bytes and serialized; that is why those dims take two."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stdit.kernels import attention_sm90 as fwd
from stdit.kernels import attention_sm90_bwd as bwd

MAX_SPILL_BYTES = 256  # Triton 3.9 builds of the shipped configs spill 0-68 bytes


@pytest.fixture(scope="module")
def report():
    if not fwd.HAVE_GLUON:
        pytest.skip("needs a Triton with Gluon")
    try:
        from triton.experimental.gluon._runtime import GluonASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this Triton cannot build Gluon kernels without a GPU")
    # A fresh process: the CPU tests run Triton's interpreter, which cannot compile for a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "stdit.kernels.sm90_report", "--json"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_hopper_kernel_builds_for_sm90(report):
    names = set(report)
    for d in fwd._CONFIGS:
        assert any(n.startswith(f"fwd d{d} ") for n in names), d
    for d in bwd.HEAD_DIMS:
        assert {f"bwd d{d} STAGES={bwd.default_stages(d)} SPLIT={s} TMA_GRADS={t}"
                for s, t in ((False, False), (False, True), (True, False))} <= names, d
    if not all(r["ptxas"] for r in report.values()):
        pytest.skip("no bundled ptxas reads this Triton's PTX: built, but registers not checked")
    for name, r in report.items():
        assert not r["serialized"], f"{name}: ptxas serialized the wgmma products"
        assert r["spill_bytes"] is not None and r["spill_bytes"] <= MAX_SPILL_BYTES, (name, r)
        assert r["shared_bytes"] <= 227 * 1024, (name, r)  # sm_90's shared memory per block
        d = int(name.split()[1][1:])
        two_chunks = d not in (64, 128) or name.startswith("bwd d128")
        if name.startswith("fwd"):  # per key block: S and P V, each per column chunk
            assert r["wgmma"] >= 2 * (1 + two_chunks), (name, r)
        else:  # five products per tile pair, dQ added with the TMA bulk reduce
            assert r["wgmma"] >= 5 and r["bulk_reduce"], (name, r)
