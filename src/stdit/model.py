"""StDiT: a spatiotemporal Diffusion Transformer for video (and video latents).

``[B, C, T, H, W]`` -> Conv3d patchify -> tokens in (t, h, w) row-major order -> blocks of adaLN-modulated
3D-RoPE self-attention, text cross-attention and FFN -> final adaLN layer -> unpatchify.

Config names and state-dict keys follow diffusers' ``WanTransformer3DModel``, so a Wan-2.1 checkpoint loads
with an identity key map (see :mod:`stdit.convert`). Beyond Wan, chosen by config: class labels or no condition,
image-to-video (condition channels concatenated to the input), and factorized spatial + temporal attention.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from stdit.attention import (attention, attention_backend, check_backend, context_backend,
                             keep_attention_and_matmuls_policy, keep_self_attention_policy, qk_norm_rope)
from stdit.ops import add_norm_modulate, feed_forward, norm_modulate
from stdit.rope import RotaryEmbedding3D, apply_rope, axis_split

ATTENTION_MODES = ("full", "factorized")
QK_NORMS = (None, "rms_norm_across_heads")


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size) -> torch.Tensor:
    """``[B, t*h*w, pt*ph*pw*C]`` tokens (feature order pt, ph, pw, C as in Wan) -> ``[B, C, T, H, W]``."""
    (t, h, w), (pt, ph, pw) = grid, patch_size
    return rearrange(tokens, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def _checkpoint_block(module, *args, policy=None):
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    backend = context_backend()

    def run(*inputs):
        if backend is None:
            return module(*inputs)
        with attention_backend(backend):
            return module(*inputs)

    kwargs = {}
    if policy is not None:  # selective checkpointing: the ops the policy keeps are not recomputed
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    return checkpoint(run, *args, use_reentrant=False, **kwargs)


class StDiTAttention(nn.Module):
    """Multi-head attention on ``[B, S, H*D]`` activations; self-attention (with RoPE) or cross-attention.

    Self-attention takes a ``layout`` ``(mode, grid)``: ``"full"`` attends over all tokens, ``"spatial"`` over the
    tokens of each frame, ``"temporal"`` over the frames at each position. Projections, QK norm and RoPE are
    per-token, so under sequence parallelism they run on the local shard and only the attention core sees the
    whole sequence (Ulysses all-to-all from sequence shards to head shards and back).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, qk_norm: bool = True):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(inner, eps=eps) if qk_norm else None
        self.norm_k = nn.RMSNorm(inner, eps=eps) if qk_norm else None
        self.eps = eps
        self.backend: str | None = None  # runtime choice, set by StDiT.set_attention_backend
        self.sp = None  # runtime: a stdit.parallel.ulysses.SequenceParallel, set by StDiT.enable_sequence_parallel

    def forward(self, x, context=None, rope=None, context_mask=None, layout=None):
        src = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(src), self.to_v(src)
        cos, sin = rope if rope is not None else (None, None)
        if self.norm_q is not None:
            q, k = qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, self.eps, cos, sin, self.heads,
                                self.backend)
        else:
            q, k = q.unflatten(-1, (self.heads, -1)), k.unflatten(-1, (self.heads, -1))
            if cos is not None:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.unflatten(-1, (self.heads, -1))
        if context is not None:  # cross-attention is per query token: no communication under sequence parallelism
            out = attention(q, k, v, key_padding_mask=context_mask, backend=self.backend)
        elif self.sp is not None:
            q, k, v = (self.sp.seq_to_heads(t) for t in (q, k, v))
            out = self.sp.heads_to_seq(self._self_attention(q, k, v, layout, self.sp.seq_len))
        else:
            out = self._self_attention(q, k, v, layout, q.shape[1])
        return self.to_out[0](out.flatten(2).type_as(x))

    def _self_attention(self, q, k, v, layout, seq_len):
        """Attention over the first ``seq_len`` tokens (the rest is sequence-parallel padding, output zero)."""
        mode, (t, h, w) = layout if layout is not None else ("full", (1, 1, q.shape[1]))
        pad = q.shape[1] - seq_len
        if pad:
            q, k, v = q[:, :seq_len], k[:, :seq_len], v[:, :seq_len]
        if mode == "spatial":
            q, k, v = (rearrange(z, "b (t s) n d -> (b t) s n d", t=t) for z in (q, k, v))
        elif mode == "temporal":
            q, k, v = (rearrange(z, "b (t s) n d -> (b s) t n d", t=t) for z in (q, k, v))
        out = attention(q, k, v, backend=self.backend)
        if mode == "spatial":
            out = rearrange(out, "(b t) s n d -> b (t s) n d", t=t)
        elif mode == "temporal":
            out = rearrange(out, "(b s) t n d -> b (t s) n d", s=h * w)
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 0, pad)) if pad else out


class StDiTBlock(nn.Module):
    """Wan block: ``x += g·SelfAttn(LN(x)(1+s)+b)``; ``x += CrossAttn(norm2(x), text)``; ``x += g'·FFN(...)``.

    In factorized mode the self-attention is spatial (per frame, RoPE on h, w) and is followed by a temporal
    attention (per position, RoPE on t) with its own modulation, Latte/STDiT style.
    """

    def __init__(self, dim, ffn_dim, heads, cross_attn_norm, eps, has_text, qk_norm, factorized):
        super().__init__()
        head_dim = dim // heads
        self.eps = eps
        self.factorized = factorized
        self.attn1 = StDiTAttention(dim, heads, head_dim, eps, qk_norm)
        if factorized:
            self.attn_temporal = StDiTAttention(dim, heads, head_dim, eps, qk_norm)
        self.attn2 = StDiTAttention(dim, heads, head_dim, eps, qk_norm) if has_text else None
        self.norm2 = nn.LayerNorm(dim, eps) if (has_text and cross_attn_norm) else None
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 9 if factorized else 6, dim) / dim**0.5)

    def forward(self, x, temb, rope, grid, context=None, context_mask=None):
        mods = (self.scale_shift_table + temb.float()).chunk(self.scale_shift_table.shape[1], dim=1)
        shift, scale, gate, c_shift, c_scale, c_gate = mods[:6]
        n = norm_modulate(x, shift, scale, eps=self.eps)
        if self.factorized:
            spatial = self.attn1(n, rope=rope["spatial"], layout=("spatial", grid))
            x, n = add_norm_modulate(x, spatial, gate, mods[6], mods[7], eps=self.eps)
            y, g = self.attn_temporal(n, rope=rope["temporal"], layout=("temporal", grid)), mods[8]
        else:
            y, g = self.attn1(n, rope=rope["full"], layout=("full", grid)), gate
        if self.attn2 is not None:
            w_, b_ = (self.norm2.weight, self.norm2.bias) if self.norm2 is not None else (None, None)
            x, n = add_norm_modulate(x, y, g, weight=w_, bias=b_, eps=self.eps, norm=self.norm2 is not None)
            n = x if self.norm2 is None else n
            y, g = self.attn2(n, context=context, context_mask=context_mask), None
        x, n = add_norm_modulate(x, y, g, c_shift, c_scale, eps=self.eps)
        x, _ = add_norm_modulate(x, feed_forward(self.ffn, n), c_gate, norm=False)
        return x


class ConditionEmbedder(nn.Module):
    """Timestep (+ class label) -> ``temb`` and the per-block modulation ``timestep_proj``; text -> tokens."""

    def __init__(self, dim, freq_dim, num_mod, text_dim, num_classes):
        super().__init__()
        self.timesteps_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * num_mod)
        self.text_embedder = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh") if text_dim else None
        # index num_classes is the null class, used for classifier-free guidance
        self.class_embedder = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, timestep, dtype, text=None, class_labels=None):
        t = self.timesteps_proj(timestep).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t).to(dtype)
        if self.class_embedder is not None:
            temb = temb + self.class_embedder(class_labels).to(dtype)
        timestep_proj = self.time_proj(self.act_fn(temb))
        if self.text_embedder is not None and text is not None:
            text = self.text_embedder(text)
        return temb, timestep_proj, text


class StDiT(ModelMixin, ConfigMixin):
    """Spatiotemporal DiT. See the module docstring; config names follow ``WanTransformer3DModel``.

    Args beyond Wan's:
        rope_theta, rope_axes_dim: RoPE base and the (t, h, w) split of the head dim (None: Wan's rule).
        num_classes: class-conditional model (index ``num_classes`` is the null class); no text needed.
        condition_channels: image-to-video channels concatenated to the input (see :meth:`i2v_condition`).
        attention_mode: ``"full"`` 3D attention or ``"factorized"`` spatial + temporal attention.
    ``text_dim=None`` builds a model without text cross-attention (class-conditional or unconditional).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["StDiTBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm1", "norm2", "norm3"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 12,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int | None = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 8960,
        num_layers: int = 30,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        rope_theta: float = 10000.0,
        rope_axes_dim: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        condition_channels: int = 0,
        attention_mode: str = "full",
    ):
        super().__init__()
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode={attention_mode!r}; choose one of {ATTENTION_MODES}.")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}; choose one of {QK_NORMS}.")
        if len(tuple(patch_size)) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size={patch_size!r} must be three positive ints (pt, ph, pw).")
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        factorized = attention_mode == "factorized"
        self.rope = RotaryEmbedding3D(attention_head_dim, axis_split(attention_head_dim, rope_axes_dim), rope_theta)
        self.patch_embedding = nn.Conv3d(in_channels + condition_channels, dim, kernel_size=patch_size,
                                         stride=patch_size)
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, 9 if factorized else 6, text_dim, num_classes)
        self.blocks = nn.ModuleList(
            StDiTBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, text_dim is not None,
                       qk_norm is not None, factorized)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False
        self._compile_kwargs: dict | None = None  # set by compile_blocks

    # ---- runtime choices (never stored in the config) -------------------------------------------------
    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None, keep_attention: bool = False,
                                      keep_matmuls: bool = False) -> None:
        """Recompute each block's activations in the backward (activation checkpointing, non-reentrant).

        The recompute runs under the attention backend the forward ran with, also when that came from an
        :func:`~stdit.attention.attention_backend` block that the backward is outside of. With ``keep_attention=True``
        the self-attention outputs are kept instead of recomputed (torch's selective checkpointing with
        :func:`stdit.attention.keep_self_attention_policy`): the recompute skips the attention forward, at the cost
        of one more saved [B, S, dim] activation per block. ``keep_matmuls=True`` (implies ``keep_attention``) also
        keeps every matrix product's output (:func:`stdit.attention.keep_attention_and_matmuls_policy`): only the
        elementwise ops are recomputed, for about 13 more [B, S, dim] activations per block.
        """
        policy = (keep_attention_and_matmuls_policy if keep_matmuls
                  else keep_self_attention_policy if keep_attention else None)
        if gradient_checkpointing_func is None:
            gradient_checkpointing_func = functools.partial(_checkpoint_block, policy=policy)
        elif policy is not None:
            raise ValueError("pass either gradient_checkpointing_func or keep_attention/keep_matmuls, not both")
        super().enable_gradient_checkpointing(gradient_checkpointing_func)
        if self._compile_kwargs is not None:
            self._compile_checkpointing()

    def compile_blocks(self, **compile_kwargs) -> None:
        """Regional ``torch.compile`` (``compile_kwargs`` go to it): each transformer block, and while activation
        checkpointing is on (now or enabled later), the checkpointed call of a block as well. The blocks share one
        code object, so Dynamo compiles it once for all of them.

        Compiling the checkpointed call puts the selective-checkpointing policy inside the compiled region, where
        Dynamo applies it to the traced graph. A compiled block inside an eager checkpoint would hide its matrix
        products from the policy (inductor calls them as its own kernels): ``keep_matmuls`` would then recompute
        them, as slow as ``keep_attention``.
        """
        self._compile_kwargs = dict(compile_kwargs)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        if self.gradient_checkpointing:
            self._compile_checkpointing()

    def _compile_checkpointing(self) -> None:
        func = self._gradient_checkpointing_func
        func = getattr(func, "_torchdynamo_orig_callable", func)  # compile_blocks again: wrap the eager function once
        self._gradient_checkpointing_func = torch.compile(func, **self._compile_kwargs)

    def set_attention_backend(self, backend: str | None) -> None:
        """Pick the attention backend for every attention of this model (None: ``STDIT_ATTENTION`` / default)."""
        if backend is not None:
            check_backend(backend)
        for m in self.modules():
            if isinstance(m, StDiTAttention):
                m.backend = backend

    def enable_sequence_parallel(self, group=None) -> None:
        """Shard the tokens over the ranks of ``group`` (default: the whole world), Ulysses style. Every rank must
        call the model with the same full inputs; each returns the same full output. Runtime only, not config."""
        from stdit.parallel.ulysses import SequenceParallel, check_sp_size

        sp = SequenceParallel(group)
        check_sp_size(sp.size, self.config.num_attention_heads)
        self._set_sp(sp if sp.size > 1 else None)

    def disable_sequence_parallel(self) -> None:
        self._set_sp(None)

    def _set_sp(self, sp) -> None:
        self._sp = sp
        for m in self.modules():
            if isinstance(m, StDiTAttention):
                m.sp = sp

    def initialize_weights(self) -> None:
        """DiT-style init for training from scratch: xavier linears, zeroed modulation and output projections,
        so every block starts as the identity and the model predicts zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.condition_embedder.time_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.condition_embedder.time_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(self.condition_embedder.time_proj.weight)
        nn.init.zeros_(self.proj_out.weight)
        if self.condition_embedder.class_embedder is not None:
            nn.init.normal_(self.condition_embedder.class_embedder.weight, std=0.02)

    # ---- inputs ----------------------------------------------------------------------------------------
    @staticmethod
    def i2v_condition(first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Condition for image-to-video: ``[B, C+1, T, H, W]`` = first-frame latents at t=0 (zeros after) and a
        mask channel that is 1 on the known frame. Pass it as ``condition=``; needs ``condition_channels=C+1``."""
        if first_frame.ndim == 4:
            first_frame = first_frame.unsqueeze(2)
        b, c, _, h, w = first_frame.shape
        cond = first_frame.new_zeros(b, c + 1, num_frames, h, w)
        cond[:, :c, :1] = first_frame[:, :, :1]
        cond[:, c, 0] = 1
        return cond

    def _check_inputs(self, x, timestep, text, text_mask, class_labels, condition):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, T, H, W] (5 dims); got shape {tuple(x.shape)}.")
        b, c = x.shape[:2]
        if c != cfg.in_channels:
            raise ValueError(f"hidden_states has {c} channels; this model takes in_channels={cfg.in_channels}.")
        for name, n, p in zip(("T (frames)", "H (height)", "W (width)"), x.shape[2:], cfg.patch_size):
            if n % p:
                lo = n // p * p
                near = f"{lo} or {lo + p}" if lo else f"{p}"
                raise ValueError(f"{name}={n} is not divisible by the patch size {p}; nearest valid sizes: {near}.")
        if timestep.ndim > 1 or timestep.numel() not in (1, b):
            raise ValueError(f"timestep must be a scalar or shape [B]=[{b}]; got shape {tuple(timestep.shape)}.")
        if cfg.text_dim is not None:
            if text is None:
                raise ValueError("This model is text-conditioned: pass encoder_hidden_states [B, L, text_dim].")
            if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_dim:
                raise ValueError(f"encoder_hidden_states must be [B={b}, L, text_dim={cfg.text_dim}]; "
                                 f"got shape {tuple(text.shape)}.")
            if text_mask is not None and tuple(text_mask.shape) != tuple(text.shape[:2]):
                raise ValueError(f"encoder_attention_mask must be [B, L]={tuple(text.shape[:2])}; "
                                 f"got {tuple(text_mask.shape)}.")
        if cfg.num_classes and class_labels is not None:
            if class_labels.shape != (b,) or class_labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"class_labels must be an integer tensor of shape [B]=[{b}]; "
                                 f"got {tuple(class_labels.shape)} {class_labels.dtype}.")
            if class_labels.min() < 0 or class_labels.max() > cfg.num_classes:
                raise ValueError(f"class_labels must be in [0, {cfg.num_classes}] ({cfg.num_classes} = null class).")
        if cfg.condition_channels:
            want = (b, cfg.condition_channels, *x.shape[2:])
            if condition is None or tuple(condition.shape) != want:
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"This model is image-conditioned: pass condition of shape {want} "
                                 f"(see StDiT.i2v_condition); got {got}.")

    def rope_tables(self, grid: tuple[int, int, int], device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-token ``(cos, sin)`` tables ``[t*h*w, D/2]`` in token order, one pair per attention layout.

        Spatial attention rotates by (h, w) only and temporal attention by t only: their tables are the 3D
        tables of position (0, h, w) and (t, 0, 0), repeated over the axis they do not attend along."""
        t, h, w = grid
        if self.config.attention_mode == "factorized":
            sc, ss = self.rope((1, h, w), device)
            tc, ts = self.rope((t, 1, 1), device)
            return {"spatial": (sc.repeat(t, 1), ss.repeat(t, 1)),
                    "temporal": (tc.repeat_interleave(h * w, 0), ts.repeat_interleave(h * w, 0))}
        return {"full": self.rope(grid, device)}

    # ---- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ):
        """Predict the flow (or noise) for ``hidden_states`` ``[B, C, T, H, W]`` at ``timestep`` (0..1000).

        ``encoder_hidden_states`` ``[B, L, text_dim]`` with optional ``encoder_attention_mask`` ``[B, L]`` (True =
        real token); ``class_labels`` ``[B]`` (None = the null class); ``condition`` for image-to-video.
        Returns ``Transformer2DModelOutput(sample=[B, out_channels, T, H, W])`` (or a tuple).
        """
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, class_labels,
                           condition)
        b = hidden_states.shape[0]
        timestep = timestep.reshape(-1).expand(b)
        if self.config.num_classes and class_labels is None:
            class_labels = torch.full((b,), self.config.num_classes, device=hidden_states.device, dtype=torch.long)
        if condition is not None:
            hidden_states = torch.cat([hidden_states, condition.to(hidden_states.dtype)], dim=1)
        pt, ph, pw = self.config.patch_size
        grid = (hidden_states.shape[2] // pt, hidden_states.shape[3] // ph, hidden_states.shape[4] // pw)
        rope = self.rope_tables(grid, hidden_states.device)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
        seq_len, sp = x.shape[1], getattr(self, "_sp", None)
        if sp is not None:
            sp.seq_len = seq_len
            x = sp.shard(x)
            rope = {k: (sp.shard(c, 0), sp.shard(s, 0)) for k, (c, s) in rope.items()}
        ref = encoder_hidden_states if encoder_hidden_states is not None else x
        temb, timestep_proj, text = self.condition_embedder(timestep, ref.dtype, encoder_hidden_states, class_labels)
        timestep_proj = timestep_proj.unflatten(1, (-1, x.shape[-1]))
        if encoder_attention_mask is not None:
            encoder_attention_mask = encoder_attention_mask.bool()

        for block in self.blocks:
            args = (x, timestep_proj, rope, grid, text, encoder_attention_mask)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)

        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(norm_modulate(x, shift, scale, eps=self.config.eps))
        if sp is not None:
            x = sp.gather(x, seq_len)
        out = unpatchify(x, grid, self.config.patch_size)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    # ---- construction helpers --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, strict: bool = True, **kwargs):
        """diffusers' ``from_pretrained`` (local dir or Hub repo id, safetensors, shards), with one clear
        :class:`~stdit.hub.CheckpointError` for corrupt files and missing / unexpected / mis-shaped keys."""
        from stdit.hub import load_pretrained

        return load_pretrained(super().from_pretrained, pretrained_model_name_or_path, strict=strict, **kwargs)

    @classmethod
    def from_config_file(cls, path, **overrides) -> "StDiT":
        """Build a randomly initialized model from the ``model:`` section of a YAML config."""
        from stdit.config import load_model_config

        return cls(**{**load_model_config(path), **overrides})

    @classmethod
    def from_wan(cls, model_or_path, **kwargs) -> "StDiT":
        """A StDiT with the same weights and outputs as a diffusers ``WanTransformer3DModel`` (object or path)."""
        from stdit.convert import from_wan

        return from_wan(model_or_path, **kwargs)

    def to_wan(self):
        """The reverse: a diffusers ``WanTransformer3DModel`` holding this model's weights."""
        from stdit.convert import to_wan

        return to_wan(self)
