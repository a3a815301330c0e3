"""Per-device facts the kernel launchers need, looked up once per process."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count
