"""stdit's fused kernels in diffusers' own ``WanTransformer3DModel``, for users who keep diffusers' model.

    from stdit.integrations import apply_to_diffusers, remove_from_diffusers

    pipe = apply_to_diffusers(WanPipeline.from_pretrained(...))   # or a WanTransformer3DModel
    remove_from_diffusers(pipe)                                     # diffusers' processors again

:class:`StDiTWanAttnProcessor` computes what diffusers' ``WanAttnProcessor`` computes (self-attention with RoPE,
text cross-attention, the I2V image branch) through stdit's path: the fused QK RMSNorm + RoPE kernel
(:func:`stdit.ops.qk_norm_rope`) and stdit's attention dispatch (:func:`stdit.attention.attention`, ``auto``:
our Triton kernels on Hopper, torch SDPA elsewhere). Projections run as modules, so peft LoRA layers and hooks on
them still run; the norms' weights are read directly only from plain hook-free ``nn.RMSNorm`` s. Each
``WanTransformerBlock`` also gets :class:`WanBlockHook`, a diffusers hook that runs the block's LayerNorms,
modulation, gated residuals and FFN activation through stdit's fused kernels (the math of diffusers' block, fewer
passes over the activations), again only where those modules are plain and hook-free.

Not taken over from diffusers' processor: its own attention-backend choice (``set_attention_backend`` /
``attention_backend``: stdit's ``backend`` decides here) and context parallelism (``enable_parallelism``), which
raises a clear error instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTransformerBlock
from torch import nn

from stdit.attention import as_keep_mask, attention, check_backend
from stdit.ops import qk_norm_rope, rms_norm
from stdit.ops import add_norm_modulate, feed_forward, hookless, is_plain, norm_modulate
from stdit.rope import apply_rope

# diffusers' Wan I2V attention takes the context as [image tokens, text tokens] and splits it by this text length
# (WanPipeline pads every prompt to it); the processor must split where diffusers does.
WAN_TEXT_LEN = 512


def rope_tables(rotary_emb: Any, seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' Wan rotary tables as stdit's: ``(freqs_cos, freqs_sin)`` ``[1, S, 1, D]``, each frequency
    repeated twice (columns 2i and 2i+1 equal) -> ``(cos, sin)`` ``[S, D/2]`` fp32, contiguous.

    Takes the columns diffusers' ``apply_rotary_emb`` reads (cos ``0::2``, sin ``1::2``); both rotate interleaved
    pairs ``(x[2i], x[2i+1])`` the same way, so the tables carry over as they are.
    """
    if isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2:
        fc, fs = rotary_emb
        want = (1, seq_len, 1, head_dim)
        if isinstance(fc, torch.Tensor) and isinstance(fs, torch.Tensor) and tuple(fc.shape) == tuple(fs.shape) == want:
            return fc[0, :, 0, 0::2].float().contiguous(), fs[0, :, 0, 1::2].float().contiguous()
    got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in rotary_emb] \
        if isinstance(rotary_emb, (tuple, list)) else type(rotary_emb).__name__
    raise ValueError(f"rotary_emb must be diffusers' Wan tables (freqs_cos, freqs_sin), each [1, {seq_len}, 1, "
                     f"{head_dim}] (WanRotaryPosEmbed's output); got {got}.")


class _RopeTables:
    """:func:`rope_tables`, converted once per forward: diffusers' Wan computes the rotary tables once and hands the
    very same tensors to every self-attention, so the processors of one model share this cache. The converted
    tables are dropped as soon as diffusers' tensors are freed."""

    def __init__(self):
        self._src: tuple[weakref.ref, weakref.ref] | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, rotary_emb, seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Traced, the conversion is two fused slices in the graph; a weakref cache would only add guards.
            return rope_tables(rotary_emb, seq_len, head_dim)
        src = self._src
        if (src is not None and isinstance(rotary_emb, (tuple, list)) and len(rotary_emb) == 2
                and src[0]() is rotary_emb[0] and src[1]() is rotary_emb[1]):
            return self._tables
        tables = rope_tables(rotary_emb, seq_len, head_dim)
        self._src = (weakref.ref(rotary_emb[0], self._drop), weakref.ref(rotary_emb[1], self._drop))
        self._tables = tables
        return tables

    def _drop(self, ref: weakref.ref) -> None:
        if self._src is not None and any(ref is r for r in self._src):
            self._src = self._tables = None


def key_padding_mask(mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """An ``attention_mask`` as diffusers' SDPA path reads it -> stdit's key padding mask ``[B, Sk]`` bool (True =
    attend). Takes what :func:`stdit.attention.as_keep_mask` takes (bool, 0/1 integer, additive float), shaped
    ``[B, Sk]``, ``[B, 1, Sk]`` or ``[B, 1, 1, Sk]`` (B may be 1); masks that differ per query or head have no
    key-padding form."""
    if mask is None:
        return None
    m = mask
    if m.ndim == 4 and m.shape[1] == 1 and m.shape[2] == 1:
        m = m[:, 0, 0]
    elif m.ndim == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 2 or m.shape[1] != keys or m.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask {tuple(mask.shape)}: stdit's Wan processor takes key padding masks only, "
                         f"shaped [B, Sk], [B, 1, Sk] or [B, 1, 1, Sk] with B in (1, {batch}) and Sk = {keys}.")
    return as_keep_mask(m, "attention_mask").expand(batch, keys).contiguous()


def _norm_weight_readable(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the fused kernel may read ``norm``'s weight instead of calling it: a plain hook-free ``nn.RMSNorm``
    over x's last dim whose weight (if any) already lives where x does, in x's dtype (an offloaded weight on another
    device, or a dtype the module would promote, must go through the module)."""
    if not is_plain(norm, nn.RMSNorm) or tuple(norm.normalized_shape) != (x.shape[-1],):
        return False
    w = norm.weight
    return w is None or (w.device == x.device and w.dtype == x.dtype)


def _eps(norm: nn.RMSNorm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # nn.RMSNorm's default for eps=None


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm ``[B, S, H*D]``: stdit's ``rms_norm`` on a plain norm's weight, else the module itself."""
    if _norm_weight_readable(norm, x):
        return rms_norm(x, norm.weight, _eps(norm, x))
    return norm(x)


def _qkv(attn: WanAttention, x: torch.Tensor, context: torch.Tensor | None):
    """q ``[B, Sq, H*D]``, k, v ``[B, Sk, H*D]`` as diffusers' ``_get_qkv_projections`` computes them."""
    if getattr(attn, "fused_projections", False):
        if not attn.is_cross_attention:
            return attn.to_qkv(x).chunk(3, dim=-1)
        return (attn.to_q(x), *attn.to_kv(x if context is None else context).chunk(2, dim=-1))
    src = x if context is None else context
    return attn.to_q(x), attn.to_k(src), attn.to_v(src)


def _added_kv(attn: WanAttention, context_img: torch.Tensor):
    if getattr(attn, "fused_projections", False):
        return attn.to_added_kv(context_img).chunk(2, dim=-1)
    return attn.add_k_proj(context_img), attn.add_v_proj(context_img)


def _norm_rope(attn: WanAttention, q, k, cos, sin, backend):
    """QK RMSNorm across heads, then RoPE where ``cos`` is given: ``[B, S, H*D]`` -> ``[B, S, H, D]``. One fused
    kernel when both norms are plain, share one eps and both have weights or neither; otherwise the norms run as
    modules (their hooks, e.g. offloading, load or change what they need) and RoPE separately."""
    nq, nk = attn.norm_q, attn.norm_k
    if (_norm_weight_readable(nq, q) and _norm_weight_readable(nk, k) and _eps(nq, q) == _eps(nk, k)
            and (nq.weight is None) == (nk.weight is None)):
        return qk_norm_rope(q, k, nq.weight, nk.weight, _eps(nq, q), cos, sin, attn.heads, backend)
    q, k = nq(q).unflatten(-1, (attn.heads, -1)), nk(k).unflatten(-1, (attn.heads, -1))
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k


class StDiTWanAttnProcessor:
    """diffusers' ``WanAttnProcessor`` on stdit's kernels, for diffusers' ``WanAttention``.

    Self-attention: x ``[B, S, dim]`` and diffusers' rotary tables ``[1, S, 1, D]`` -> ``[B, S, dim]``. Text
    cross-attention: x and the context ``[B, L, dim]`` (I2V models: ``[B, L_img + 512, dim]``, the image tokens
    first, attended through ``add_k_proj``/``add_v_proj``/``norm_added_k`` and summed, as diffusers does).

    ``backend`` is a stdit attention backend (:data:`stdit.attention.BACKENDS`; None: ``STDIT_ATTENTION`` or
    ``auto``); stdit's ``attention_backend`` context manager overrides it. ``previous`` is the processor this one
    replaced, which :func:`remove_from_diffusers` puts back.
    """

    # Read and set by diffusers (set_attention_backend, enable_parallelism) on every attention processor.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, backend: str | None = None, previous: Any = None, rope: _RopeTables | None = None):
        self.backend = None if backend is None else check_backend(backend)
        self.previous = previous
        self._rope = rope if rope is not None else _RopeTables()

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None and self._parallel_config is not None:
            raise NotImplementedError(
                "stdit's Wan processor does not run diffusers' context parallelism (enable_parallelism); call "
                "stdit.integrations.remove_from_diffusers(model) first, or use stdit's StDiT with "
                "enable_sequence_parallel.")
        context, context_img = encoder_hidden_states, None
        if attn.add_k_proj is not None:
            n_img = context.shape[1] - WAN_TEXT_LEN
            if n_img <= 0:
                raise ValueError(f"diffusers' Wan I2V attention expects the context as [image tokens, "
                                 f"{WAN_TEXT_LEN} text tokens]; got {context.shape[1]} tokens.")
            context_img, context = context[:, :n_img], context[:, n_img:]

        q, k, v = _qkv(attn, hidden_states, context)
        cos = sin = None
        if rotary_emb is not None:
            cos, sin = self._rope(rotary_emb, q.shape[1], q.shape[-1] // attn.heads)
        q, k = _norm_rope(attn, q, k, cos, sin, self.backend)
        v = v.unflatten(-1, (attn.heads, -1))
        mask = key_padding_mask(attention_mask, q.shape[0], k.shape[1])
        out = attention(q, k, v, key_padding_mask=mask, backend=self.backend)

        if context_img is not None:
            k_img, v_img = _added_kv(attn, context_img)
            k_img = _norm(attn.norm_added_k, k_img).unflatten(-1, (attn.heads, -1))
            out = out + attention(q, k_img, v_img.unflatten(-1, (attn.heads, -1)), backend=self.backend)

        out = attn.to_out[0](out.flatten(2).type_as(q))
        return attn.to_out[1](out)


BLOCK_HOOK = "stdit_wan_block"


def _plain_ln(norm: nn.Module, affine: bool) -> bool:
    """A hook-free diffusers ``FP32LayerNorm`` with (``affine``) or without weight and bias."""
    return is_plain(norm, FP32LayerNorm) and norm.elementwise_affine == affine and (
        not affine or norm.bias is not None)


class WanBlockHook(ModelHook):
    """diffusers' ``WanTransformerBlock.forward`` on stdit's fused adaLN kernels: ``LN(x)(1 + scale) + shift``, the
    gated residual fused with the next norm, and the FFN's GELU in its first matmul's epilogue where
    :func:`stdit.ops.feed_forward` takes it. The attentions run as modules (their processors and hooks run).

    Falls back to diffusers' own forward where the fused math is not the same computation: per-token modulation
    (Wan 2.2 TI2V's ``temb`` ``[B, S, 6, dim]``), or a norm that is not a plain hook-free ``FP32LayerNorm`` (an
    adapter, an offload or casting hook on it).
    """

    def new_forward(self, block: WanTransformerBlock, hidden_states, encoder_hidden_states, temb, rotary_emb):
        n1, n2, n3 = block.norm1, block.norm2, block.norm3
        cross_norm = not (type(n2) is nn.Identity and hookless(n2))
        if temb.ndim != 3 or not (_plain_ln(n1, False) and _plain_ln(n3, False)
                                  and (not cross_norm or _plain_ln(n2, True))):
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, rotary_emb)
        x = hidden_states
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        y = block.attn1(norm_modulate(x, shift, scale, eps=n1.eps), None, None, rotary_emb)
        if cross_norm:
            x, n = add_norm_modulate(x, y, gate, weight=n2.weight, bias=n2.bias, eps=n2.eps)
        else:
            x = n = add_norm_modulate(x, y, gate, norm=False)[0]
        x, n = add_norm_modulate(x, block.attn2(n, encoder_hidden_states, None, None), None, c_shift, c_scale,
                                 eps=n3.eps)
        return add_norm_modulate(x, feed_forward(block.ffn, n), c_gate, norm=False)[0]


def _hook_blocks(model: nn.Module) -> None:
    """:class:`WanBlockHook` on each block that has no diffusers hooks yet. A block some hook already wraps (a cache
    or offloading applied before) keeps its forward: ours would sit outside that hook and skip it. Hooks applied
    afterwards wrap ours and run as usual."""
    for block in model.modules():
        if not isinstance(block, WanTransformerBlock):
            continue
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and registry.hooks:  # ours already, or someone else's
            continue
        HookRegistry.check_if_exists_or_initialize(block).register_hook(WanBlockHook(), BLOCK_HOOK)


def _unhook_blocks(model: nn.Module) -> None:
    for block in model.modules():
        registry = getattr(block, "_diffusers_hook", None)
        if isinstance(block, WanTransformerBlock) and registry is not None and registry.get_hook(BLOCK_HOOK):
            registry.remove_hook(BLOCK_HOOK, recurse=False)
            registry.invalidate_child_registries_cache()


def _models(obj: Any, caller: str) -> list[nn.Module]:
    """The diffusers Wan models of ``obj``: a pipeline's ``transformer`` and ``transformer_2`` (where not None), or
    ``obj`` itself; each must hold diffusers ``WanAttention`` s."""
    if isinstance(obj, nn.Module):
        named = [(type(obj).__name__, obj)]
    else:
        named = [(f"{type(obj).__name__}.{a}", getattr(obj, a, None)) for a in ("transformer", "transformer_2")]
        named = [(n, m) for n, m in named if m is not None]
    bad = [(n, m) for n, m in named if not isinstance(m, nn.Module)
           or not any(isinstance(s, WanAttention) for s in m.modules())]
    if not named or bad:
        what = ", ".join(f"{n} is a {type(m).__name__} without diffusers WanAttention layers" for n, m in bad) \
            or f"got a {type(obj).__name__} with neither"
        raise ValueError(f"{caller} takes a diffusers WanTransformer3DModel or a pipeline whose .transformer / "
                         f".transformer_2 is one (WanPipeline, WanImageToVideoPipeline, ...): {what}. stdit's own "
                         "StDiT runs these kernels already.")
    return [m for _, m in named]


def _wan_attentions(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, WanAttention)]


def apply_to_diffusers(obj: Any, backend: str | None = None) -> Any:
    """Run every diffusers ``WanAttention`` of ``obj`` (a ``WanTransformer3DModel``, or a pipeline: its
    ``transformer`` and ``transformer_2``) on :class:`StDiTWanAttnProcessor` with attention backend ``backend``
    (one of :data:`stdit.attention.BACKENDS`; None: ``STDIT_ATTENTION`` or ``auto``). Returns ``obj``.

    Each ``WanTransformerBlock`` without diffusers hooks also gets :class:`WanBlockHook` (stdit's fused adaLN and
    FFN kernels); apply this before ``enable_cache`` / ``enable_group_offload``, whose hooks then wrap it (a block
    hooked before keeps diffusers' forward). Only diffusers' own ``WanAttnProcessor`` is replaced (a custom
    processor someone set stays); applying again changes the backend and keeps the processor to restore. Undo with
    :func:`remove_from_diffusers`.
    """
    backend = None if backend is None else check_backend(backend)
    models = _models(obj, "apply_to_diffusers")
    for model in models:
        if getattr(model, "_parallel_config", None) is not None:
            raise NotImplementedError(f"{type(model).__name__} runs diffusers' context parallelism "
                                      "(enable_parallelism), which stdit's Wan processor does not run.")
    for model in models:
        _hook_blocks(model)
        rope = _RopeTables()
        for attn in _wan_attentions(model):
            proc = attn.processor
            if isinstance(proc, StDiTWanAttnProcessor):
                attn.set_processor(StDiTWanAttnProcessor(backend, proc.previous, rope))
            elif type(proc) is WanAttnProcessor:
                attn.set_processor(StDiTWanAttnProcessor(backend, proc, rope))
    return obj


def remove_from_diffusers(obj: Any) -> Any:
    """Undo :func:`apply_to_diffusers`: every attention of ``obj`` gets back the processor it had before (diffusers'
    ``WanAttnProcessor``, with any attention backend set on it). Returns ``obj``; a no-op where nothing was applied."""
    for model in _models(obj, "remove_from_diffusers"):
        _unhook_blocks(model)
        for attn in _wan_attentions(model):
            if isinstance(attn.processor, StDiTWanAttnProcessor):
                previous = attn.processor.previous
                attn.set_processor(previous if previous is not None else WanAttnProcessor())
    return obj


def _register_with_diffusers_hooks() -> None:
    """diffusers' layer skipping (skip-layer guidance) looks processors up by class to learn what a skipped
    attention returns: register ours as diffusers registers its Wan processor (no public registration call)."""
    from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry

    AttentionProcessorRegistry.register(StDiTWanAttnProcessor, AttentionProcessorMetadata(
        skip_processor_output_fn=lambda proc, attn, hidden_states, *args, **kwargs: hidden_states))


_register_with_diffusers_hooks()
