"""Test setup: offline Hub in a private cache, Triton's CPU interpreter when there is no GPU, fixed threads."""

import atexit
import os
import shutil
import tempfile

# Read by huggingface_hub / diffusers at import time, so set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
_HUB_CACHE = tempfile.mkdtemp(prefix="stdit-test-hub-")
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
atexit.register(shutil.rmtree, _HUB_CACHE, ignore_errors=True)  # one private cache per run, removed at exit
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("STDIT_ATTENTION", None)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter (read when kernels are launched).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hub_cache():
    """The Hub cache directory the tests use (offline)."""
    return os.environ["HF_HUB_CACHE"]
