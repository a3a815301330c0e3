"""Triton kernels for stdit; each file holds its kernels, launcher, autograd Function and functional API."""

from .attention import SUPPORTED_HEAD_DIMS, flash_attention
from .qk_norm_rope import qk_norm_rope

__all__ = ["SUPPORTED_HEAD_DIMS", "flash_attention", "qk_norm_rope"]
