"""StDiT's attention layer: :class:`StDiTAttention` (module names and ``fuse_projections`` as in diffusers'
``WanAttention``, so Wan checkpoints, LoRAs and hooks address it the same way) and the diffusers attention processor
that computes it (:class:`StDiTAttnProcessor`) on :func:`stdit.attention.attention`'s backends."""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionModuleMixin
from einops import rearrange
from torch import nn

from stdit.attention import REGISTRY, attention, resolve_backend
from stdit.ops import is_plain, qk_norm_rope
from stdit.rope import apply_rope
from stdit.sparse import tile_self_attention


class StDiTAttnProcessor:
    """What :class:`StDiTAttention` computes, as a diffusers attention processor: projections (called as modules, so
    LoRA layers and hooks on them run), QK RMSNorm + 3D RoPE, the attention core through :func:`stdit.attention.
    attention`, the output projection. Being a processor lets diffusers' ``attn_processors``, ``set_attn_processor``
    and its attention hooks (layer skip, caches) treat StDiT's attentions as they treat Wan's."""

    def __call__(self, attn: "StDiTAttention", hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None, layout=None,
                 encoder_hidden_states_image: torch.Tensor | None = None) -> torch.Tensor:
        x, context = hidden_states, encoder_hidden_states
        q, k, v = attn.project(x, context)
        if context is None and attn.fuses_fp8(q, k, v, layout):
            out = attn.fp8_self_attention(q, k, v, rotary_emb)
            return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(x)))
        q, k = attn.norm_rope(q, k, rotary_emb)
        v = v.unflatten(-1, (attn.heads, -1))
        if context is not None:  # cross-attention is per query token: no communication under sequence parallelism
            backend = attn.active_backend()
            out = attention(q, k, v, key_padding_mask=attention_mask, backend=backend)
            if encoder_hidden_states_image is not None:  # Wan I2V: the CLIP image tokens, attended to apart
                k_img, v_img = attn.project_image(encoder_hidden_states_image)
                out = out + attention(q, k_img, v_img, backend=backend)
        elif attn.sp is not None:
            q, k, v = (attn.sp.seq_to_heads(t) for t in (q, k, v))
            out = attn.sp.heads_to_seq(attn.self_attention(q, k, v, layout, attn.sp.seq_len))
        else:
            out = attn.self_attention(q, k, v, layout, q.shape[1])
        return attn.to_out[1](attn.to_out[0](out.flatten(2).type_as(x)))


class StDiTAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention on ``[B, S, H*D]`` activations; self-attention (with RoPE) or cross-attention.

    Self-attention takes a ``layout`` ``(mode, grid)``: ``"full"`` attends over all tokens, ``"spatial"`` over the
    tokens of each frame, ``"temporal"`` over the frames at each position. Projections, QK norm and RoPE are
    per-token, so under sequence parallelism they run on the local shard and only the attention core sees the
    whole sequence (Ulysses all-to-all from sequence shards to head shards and back). Module names and
    ``fuse_projections`` follow diffusers' ``WanAttention``.
    """

    _default_processor_cls = StDiTAttnProcessor
    _available_processors = [StDiTAttnProcessor]

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, qk_norm: bool = True,
                 is_cross_attention: bool = False, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.is_cross_attention = is_cross_attention
        self.added_kv_proj_dim = added_kv_proj_dim
        self.fused_projections = False
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(inner, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(inner, eps=eps) if qk_norm else None
        self.add_k_proj = self.add_v_proj = None
        if added_kv_proj_dim is not None:  # Wan I2V's image key/value projections
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner)
            self.norm_added_k = nn.RMSNorm(inner, eps=eps)
        self.eps = eps
        self.backend: str | None = None  # runtime choice, set by StDiT.set_attention_backend
        self.sp = None  # runtime: a stdit.parallel.ulysses.SequenceParallel, set by StDiT.enable_sequence_parallel
        self.tile_switch = None  # runtime: a stdit.sparse.TileSwitch, set by StDiT.set_tile_attention
        self.fp8_switch = None  # runtime: a stdit.fp8.FP8Switch, set by StDiT.set_fp8_attention
        self.set_processor(StDiTAttnProcessor())

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, layout=None,
                encoder_hidden_states_image=None):
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, layout,
                              encoder_hidden_states_image)

    def project(self, x, context=None):
        """q, k, v ``[B, S, H*D]``: k and v from ``context`` in cross-attention."""
        if self.fused_projections:
            if context is None:
                return self.to_qkv(x).chunk(3, dim=-1)
            return (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        src = x if context is None else context
        return self.to_q(x), self.to_k(src), self.to_v(src)

    def active_backend(self) -> str | None:
        """The backend of this call: ``"fp8"`` where the model's 8-bit attention covers it now, else the layer's."""
        switch = self.fp8_switch
        return "fp8" if switch is not None and switch.active else self.backend

    def project_image(self, image_tokens):
        """Image keys (RMS-normed) and values ``[B, L_img, H, D]`` for Wan I2V's image cross-attention."""
        if self.fused_projections:
            k, v = self.to_added_kv(image_tokens).chunk(2, dim=-1)
        else:
            k, v = self.add_k_proj(image_tokens), self.add_v_proj(image_tokens)
        return self.norm_added_k(k).unflatten(-1, (self.heads, -1)), v.unflatten(-1, (self.heads, -1))

    def norm_rope(self, q, k, rotary_emb=None):
        """QK RMSNorm and RoPE: ``[B, S, H*D]`` -> ``[B, S, H, D]``. The fused kernel reads the norms' weights, so it
        runs only on plain hook-free ``nn.RMSNorm`` s; a hooked norm (offloading, ``device_map``, casting) runs as its
        module, where its hook loads the weight."""
        cos, sin = rotary_emb if rotary_emb is not None else (None, None)
        if self.norm_q is not None and is_plain(self.norm_q, nn.RMSNorm) and is_plain(self.norm_k, nn.RMSNorm):
            return qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, self.eps, cos, sin, self.heads,
                                self.backend)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k = q.unflatten(-1, (self.heads, -1)), k.unflatten(-1, (self.heads, -1))
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    # The fused 8-bit path saves memory traffic (by the bytes it does not move, about a fifth of a millisecond a
    # layer at 32,760 tokens against 6-7 ms of attention; not yet timed there), but at 4,096 tokens, where the host
    # sets the pace, it measured slower on an H100 (benchmarks/DECISIONS.md): short sequences keep the unfused path.
    fp8_fused_min_tokens = 16384

    def fuses_fp8(self, q, k, v, layout) -> bool:
        """Whether this self-attention call runs :meth:`fp8_self_attention`: where the unfused path would run the
        8-bit kernel (the fp8 backend resolves for this call and takes it) on the whole sequence ("full" layout, no
        sequence parallelism, no tile attention) of at least :attr:`fp8_fused_min_tokens` tokens, the norms are
        plain hook-free ``nn.RMSNorm`` s (their weights are read directly, as :meth:`norm_rope`'s fused kernel reads
        them) and no gradient is asked for (the unfused path refuses that with its error)."""
        # Runs on every self-attention call: the checks that fail for most calls come first.
        if q.shape[1] < self.fp8_fused_min_tokens or resolve_backend(self.active_backend()) != "fp8":
            return False
        tiles = self.tile_switch
        if (self.sp is not None or (layout is not None and layout[0] != "full")
                or (tiles is not None and tiles.active and layout is not None)):
            return False
        if not (self.norm_q is not None and is_plain(self.norm_q, nn.RMSNorm) and is_plain(self.norm_k, nn.RMSNorm)
                and (self.norm_q.weight is None) == (self.norm_k.weight is None)):
            return False
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return False
        if (q.shape[-1] // self.heads) % 2:
            return False
        return REGISTRY["fp8"].why_not(q.unflatten(-1, (self.heads, -1)), k.unflatten(-1, (self.heads, -1))) is None

    def fp8_self_attention(self, q, k, v, rotary_emb=None):
        """QK RMSNorm, RoPE and the 8-bit quantization of Q and K in one kernel, then the 8-bit attention: q, k, v
        ``[B, S, H*D]`` -> ``[B, S, H, D]``. It saves the unfused path's write and re-read of the normed Q and K
        and its pass over K for the smoothing mean (K is centered on a sampled mean instead, which softmax does not
        see: see :mod:`stdit.kernels.qk_norm_rope_quant`)."""
        from stdit.kernels.qk_norm_rope_quant import qk_norm_rope_attention_fp8

        cos, sin = rotary_emb if rotary_emb is not None else (None, None)
        return qk_norm_rope_attention_fp8(q, k, v, self.norm_q.weight, self.norm_k.weight, self.eps, cos, sin,
                                          self.heads)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One matmul for q, k, v (self-attention) or k, v (cross-attention), as diffusers' ``WanAttention`` does."""
        if self.fused_projections:
            return
        groups = {"to_kv": ("to_k", "to_v")} if self.is_cross_attention else {"to_qkv": ("to_q", "to_k", "to_v")}
        if self.add_k_proj is not None:
            groups["to_added_kv"] = ("add_k_proj", "add_v_proj")
        for fused_name, names in groups.items():
            parts = [getattr(self, n) for n in names]
            if not all(is_plain(p, nn.Linear) for p in parts):  # a copy of .weight would drop the adapter / hook
                raise ValueError(f"fuse_projections would bypass the LoRA adapters or hooks on {', '.join(names)}; "
                                 "merge them first (fuse_lora) or leave the projections unfused.")
        for fused_name, names in groups.items():
            parts = [getattr(self, n) for n in names]
            w = parts[0].weight
            fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), device=w.device, dtype=w.dtype)
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
            setattr(self, fused_name, fused)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self) -> None:
        for name in ("to_qkv", "to_kv", "to_added_kv"):
            if hasattr(self, name):
                delattr(self, name)
        self.fused_projections = False

    def self_attention(self, q, k, v, layout, seq_len):
        """Attention over the first ``seq_len`` tokens (the rest is sequence-parallel padding, output zero)."""
        mode, (t, h, w) = layout if layout is not None else ("full", (1, 1, q.shape[1]))
        pad = q.shape[1] - seq_len
        if pad:
            q, k, v = q[:, :seq_len], k[:, :seq_len], v[:, :seq_len]
        if mode == "spatial":
            q, k, v = (rearrange(z, "b (t s) n d -> (b t) s n d", t=t) for z in (q, k, v))
        elif mode == "temporal":
            q, k, v = (rearrange(z, "b (t s) n d -> (b s) t n d", t=t) for z in (q, k, v))
        switch = self.tile_switch
        if mode == "full" and switch is not None and switch.active and layout is not None:
            out = tile_self_attention(q, k, v, (t, h, w), switch.config)
        else:
            out = attention(q, k, v, backend=self.active_backend())
        if mode == "spatial":
            out = rearrange(out, "(b t) s n d -> b (t s) n d", t=t)
        elif mode == "temporal":
            out = rearrange(out, "(b s) t n d -> b (t s) n d", s=h * w)
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad)) if pad else out
