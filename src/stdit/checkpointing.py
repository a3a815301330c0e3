"""Selective activation-checkpointing policies for StDiT's blocks (``StDiT.enable_gradient_checkpointing``): which
op outputs the recompute keeps. They name ops as a policy sees them, below autograd: torch's SDPA kernels, our
attention custom op, and the matmuls ``nn.Linear`` dispatches to."""

from __future__ import annotations

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


