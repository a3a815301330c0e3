"""Triton kernels for stdit; each file holds its kernels, launcher, custom op (what torch.compile sees), autograd
Function (the eager path, over the same forward and backward) and functional API. Nothing here imports stdit."""

from .adaln import fused_add_norm_modulate, fused_norm_modulate
from .attention import SUPPORTED_HEAD_DIMS, flash_attention
from .qk_norm_rope import qk_norm_rope

__all__ = ["SUPPORTED_HEAD_DIMS", "flash_attention", "fused_add_norm_modulate", "fused_norm_modulate", "qk_norm_rope"]
