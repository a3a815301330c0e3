"""StDiT: a spatiotemporal Diffusion Transformer for video (and video latents).

``[B, C, T, H, W]`` -> Conv3d patchify -> tokens in (t, h, w) row-major order -> blocks of adaLN-modulated
3D-RoPE self-attention, text cross-attention and FFN -> final adaLN layer -> unpatchify.

Config names and state-dict keys follow diffusers' ``WanTransformer3DModel``, so a Wan-2.1 checkpoint loads
with an identity key map (see :mod:`stdit.convert`). Beyond Wan, chosen by config: class labels or no condition,
image-to-video (condition channels concatenated to the input), and factorized spatial + temporal attention.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanImageEmbedding
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from einops import rearrange
from torch import nn

from stdit.attention import BACKENDS, as_keep_mask, attention_backend, context_backend
from stdit.attention_layer import StDiTAttention, StDiTAttnProcessor
from stdit.checkpointing import keep_attention_and_matmuls_policy, keep_self_attention_policy
from stdit.checks import check_block_indices, check_call, check_config
from stdit.ops import add_norm_modulate, feed_forward, is_plain, norm_modulate
from stdit.rope import RotaryEmbedding3D, axis_split

ATTENTION_MODES = ("full", "factorized")
# diffusers' attention-backend names that mean one of stdit's backends
DIFFUSERS_BACKENDS = {"native": "sdpa", "xformers": "xformers"}
QK_NORMS = (None, "rms_norm_across_heads")
PREDICTION_TYPES = ("flow", "sample")
# prediction_type="sample": the smallest t the implied flow (x_t - x0) / t divides by (JiT's t_eps)
SAMPLE_T_MIN = 0.05


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


@contextlib.contextmanager
def lora_scale(model: nn.Module, attention_kwargs: dict[str, Any] | None):
    """Scale the model's peft LoRA layers by ``attention_kwargs["scale"]`` for one call (diffusers' convention)."""
    scale = (attention_kwargs or {}).get("scale", 1.0)
    if scale == 1.0 or not USE_PEFT_BACKEND:
        yield
        return
    scale_lora_layers(model, scale)
    try:
        yield
    finally:
        unscale_lora_layers(model, scale)


class StDiTBlock(nn.Module):
    """Wan block: ``x += g·SelfAttn(LN(x)(1+s)+b)``; ``x += CrossAttn(norm2(x), text)``; ``x += g'·FFN(...)``.

    In factorized mode the self-attention is spatial (per frame, RoPE on h, w) and is followed by a temporal
    attention (per position, RoPE on t) with its own modulation, Latte/STDiT style. ``temb`` is ``[B, n, dim]`` (one
    modulation per sample) or ``[B, S, n, dim]`` (per token: Wan 2.2 TI2V's per-token timesteps).
    """

    def __init__(self, dim, ffn_dim, heads, cross_attn_norm, eps, has_text, qk_norm, factorized,
                 added_kv_proj_dim=None):
        super().__init__()
        head_dim = dim // heads
        self.eps = eps
        self.factorized = factorized
        self.attn1 = StDiTAttention(dim, heads, head_dim, eps, qk_norm)
        if factorized:
            self.attn_temporal = StDiTAttention(dim, heads, head_dim, eps, qk_norm)
        self.attn2 = (StDiTAttention(dim, heads, head_dim, eps, qk_norm, is_cross_attention=True,
                                     added_kv_proj_dim=added_kv_proj_dim) if has_text else None)
        self.norm2 = FP32LayerNorm(dim, eps) if (has_text and cross_attn_norm) else None
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 9 if factorized else 6, dim) / dim**0.5)

    def forward(self, hidden_states, temb, rope, grid, encoder_hidden_states=None, encoder_attention_mask=None,
                encoder_hidden_states_image=None):
        x = hidden_states
        mods = (self.scale_shift_table + temb.float()).chunk(self.scale_shift_table.shape[1], dim=-2)
        if temb.ndim == 4:  # per token: [B, S, 1, dim] -> [B, S, dim], which broadcasts against x as [B, 1, dim] does
            mods = [m.squeeze(-2) for m in mods]
        shift, scale, gate, c_shift, c_scale, c_gate = mods[:6]
        n = norm_modulate(x, shift, scale, eps=self.eps)
        if self.factorized:
            spatial = self.attn1(n, rotary_emb=rope["spatial"], layout=("spatial", grid))
            x, n = add_norm_modulate(x, spatial, gate, mods[6], mods[7], eps=self.eps)
            y, g = self.attn_temporal(n, rotary_emb=rope["temporal"], layout=("temporal", grid)), mods[8]
        else:
            y, g = self.attn1(n, rotary_emb=rope["full"], layout=("full", grid)), gate
        if self.attn2 is not None:
            if self.norm2 is None:
                x, _ = add_norm_modulate(x, y, g, norm=False)
                n = x
            elif is_plain(self.norm2, FP32LayerNorm):  # the residual add and the affine norm in one fused pass
                x, n = add_norm_modulate(x, y, g, weight=self.norm2.weight, bias=self.norm2.bias, eps=self.eps)
            else:  # a hooked norm (offloading, device_map) runs as its module, where its hook loads the weights
                x, _ = add_norm_modulate(x, y, g, norm=False)
                n = self.norm2(x)
            y, g = self.attn2(n, encoder_hidden_states, attention_mask=encoder_attention_mask,
                              encoder_hidden_states_image=encoder_hidden_states_image), None
        x, n = add_norm_modulate(x, y, g, c_shift, c_scale, eps=self.eps)
        x, _ = add_norm_modulate(x, feed_forward(self.ffn, n), c_gate, norm=False)
        return x


class StDiTVACEBlock(StDiTBlock):
    """A VACE control block (diffusers' ``WanVACETransformerBlock``, same weights): a Wan block run on the control
    video's tokens. It returns ``(hint, control)``: the hint (``proj_out`` of the result) is added to the output of
    one main block, the control tokens go on to the next control block. The first one adds the video tokens to its
    projected input (``proj_in``), so every hint depends on both."""

    def __init__(self, dim, *args, apply_input_projection: bool = False, **kwargs):
        super().__init__(dim, *args, **kwargs)
        self.proj_in = nn.Linear(dim, dim) if apply_input_projection else None
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, control, hidden_states, temb, rope, grid, encoder_hidden_states=None,
                encoder_attention_mask=None, encoder_hidden_states_image=None):
        if self.proj_in is not None:
            control = self.proj_in(control) + hidden_states
        control = super().forward(control, temb, rope, grid, encoder_hidden_states, encoder_attention_mask,
                                  encoder_hidden_states_image)
        return self.proj_out(control), control


class ConditionEmbedder(nn.Module):
    """Timestep (+ class label) -> ``temb`` and the per-block modulation ``timestep_proj``; text -> tokens.

    ``timestep`` ``[B]``, or ``[B, S]`` per token (Wan 2.2 TI2V): ``temb`` is then ``[B, S, dim]`` and
    ``timestep_proj`` ``[B, S, n*dim]``, computed token by token as diffusers' Wan does."""

    def __init__(self, dim, freq_dim, num_mod, text_dim, num_classes, image_dim=None, pos_embed_seq_len=None):
        super().__init__()
        self.timesteps_proj = Timesteps(num_channels=freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(in_channels=freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * num_mod)
        self.text_embedder = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh") if text_dim else None
        # index num_classes is the null class, used for classifier-free guidance
        self.class_embedder = nn.Embedding(num_classes + 1, dim) if num_classes else None
        # Wan I2V: CLIP image features -> image tokens (diffusers' module, so the weights and math are Wan's)
        self.image_embedder = WanImageEmbedding(image_dim, dim, pos_embed_seq_len) if image_dim else None

    def forward(self, timestep, dtype, text=None, class_labels=None, image=None):
        # the sinusoidal embedding takes a flat vector; unflatten restores [B] (a no-op) or [B, S]
        t = self.timesteps_proj(timestep.flatten()).unflatten(0, timestep.shape)
        temb = self.time_embedder(t.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        if self.class_embedder is not None:
            label = self.class_embedder(class_labels).to(dtype)
            temb = temb + (label.unsqueeze(1) if temb.ndim == 3 else label)
        timestep_proj = self.time_proj(self.act_fn(temb))
        if self.text_embedder is not None and text is not None:
            text = self.text_embedder(text)
        if self.image_embedder is not None and image is not None:
            image = self.image_embedder(image)
        return temb, timestep_proj, text, image


class StDiT(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin):
    """Spatiotemporal DiT. See the module docstring; config names follow ``WanTransformer3DModel``.

    Args beyond Wan's:
        rope_theta, rope_axes_dim: RoPE base and the (t, h, w) split of the head dim (None: Wan's rule).
        num_classes: class-conditional model (index ``num_classes`` is the null class); no text needed.
        condition_channels: image-to-video channels concatenated to the input (see :meth:`i2v_condition`).
        attention_mode: ``"full"`` 3D attention or ``"factorized"`` spatial + temporal attention.
        prediction_type: what the network's last layer predicts: ``"flow"`` (Wan: ``noise - x0``) or ``"sample"``
            (the clean ``x0``, for narrow pixel-space models; see :meth:`_flow_from_sample`). Either way the forward
            returns the flow, so training, schedulers and pipelines are the same.
    ``text_dim=None`` builds a model without text cross-attention (class-conditional or unconditional).
    ``vace_layers`` / ``vace_in_channels`` (diffusers' ``WanVACETransformer3DModel`` names): Wan VACE's control
    blocks, one per listed main block, fed by a ``vace_in_channels``-channel control video.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["StDiTBlock", "StDiTVACEBlock"]
    _keep_in_fp32_modules = ["time_embedder", "scale_shift_table", "norm2"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "norm"]
    _repeated_blocks = ["StDiTBlock", "StDiTVACEBlock"]
    _keys_to_ignore_on_load_unexpected = ["norm_added_q"]  # in some Wan I2V checkpoints, unused (as in diffusers)

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
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        pos_embed_seq_len: int | None = None,
        vace_layers: list[int] | None = None,
        vace_in_channels: int | None = None,
        prediction_type: str = "flow",
    ):
        check_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode={attention_mode!r}; choose one of {ATTENTION_MODES}.")
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}; choose one of {QK_NORMS}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        if prediction_type == "sample" and (out_channels or in_channels) > in_channels:
            raise ValueError(f"prediction_type='sample' reads the noisy input's first out_channels channels, so "
                             f"out_channels ({out_channels}) must not exceed in_channels ({in_channels}).")
        if len(tuple(patch_size)) != 3 or any(int(p) < 1 for p in patch_size):
            raise ValueError(f"patch_size={patch_size!r} must be three positive ints (pt, ph, pw).")
        dim = num_attention_heads * attention_head_dim
        out_channels = out_channels or in_channels
        factorized = attention_mode == "factorized"
        self.rope = RotaryEmbedding3D(attention_head_dim, axis_split(attention_head_dim, rope_axes_dim), rope_theta)
        self.patch_embedding = nn.Conv3d(in_channels + condition_channels, dim, kernel_size=patch_size,
                                         stride=patch_size)
        self.vace_patch_embedding = self.vace_blocks = None
        if vace_layers is not None:
            self.vace_patch_embedding = nn.Conv3d(vace_in_channels, dim, kernel_size=patch_size, stride=patch_size)
        if (image_dim is None) != (added_kv_proj_dim is None) or (image_dim is not None and text_dim is None):
            raise ValueError(f"image_dim={image_dim} and added_kv_proj_dim={added_kv_proj_dim} come together (Wan "
                             "I2V's image branch: image tokens attended to beside the text) and need text_dim.")
        self.condition_embedder = ConditionEmbedder(dim, freq_dim, 9 if factorized else 6, text_dim, num_classes,
                                                    image_dim, pos_embed_seq_len)
        self.blocks = nn.ModuleList(
            StDiTBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, text_dim is not None,
                       qk_norm is not None, factorized, added_kv_proj_dim)
            for _ in range(num_layers)
        )
        if vace_layers is not None:
            self.vace_blocks = nn.ModuleList(
                StDiTVACEBlock(dim, ffn_dim, num_attention_heads, cross_attn_norm, eps, text_dim is not None,
                               qk_norm is not None, factorized, added_kv_proj_dim, apply_input_projection=i == 0)
                for i in range(len(vace_layers))
            )
        self.proj_out = nn.Linear(dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        self.gradient_checkpointing = False
        self._tile_switch = None  # runtime: set_tile_attention
        self._fp8_switch = None  # runtime: set_fp8_attention
        self._compile_kwargs: dict | None = None  # set by compile_blocks

    # ---- runtime choices (never stored in the config) -------------------------------------------------
    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None, keep_attention: bool = False,
                                      keep_matmuls: bool = False) -> None:
        """Recompute each block's activations in the backward (activation checkpointing, non-reentrant).

        The recompute runs under the attention backend the forward ran with, also when that came from an
        :func:`~stdit.attention.attention_backend` block that the backward is outside of. With ``keep_attention=True``
        the self-attention outputs are kept instead of recomputed (torch's selective checkpointing with
        :func:`stdit.checkpointing.keep_self_attention_policy`): the recompute skips the attention forward, at the cost
        of one more saved [B, S, dim] activation per block. ``keep_matmuls=True`` (implies ``keep_attention``) also
        keeps every matrix product's output (:func:`stdit.checkpointing.keep_attention_and_matmuls_policy`): only the
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
        for block in [*self.blocks, *(self.vace_blocks or [])]:
            block.compile(**compile_kwargs)
        if self.gradient_checkpointing:
            self._compile_checkpointing()

    def _compile_checkpointing(self) -> None:
        func = self._gradient_checkpointing_func
        func = getattr(func, "_torchdynamo_orig_callable", func)  # compile_blocks again: wrap the eager function once
        self._gradient_checkpointing_func = torch.compile(func, **self._compile_kwargs)

    def set_attention_backend(self, backend: str | None) -> None:
        """Pick the attention backend for every attention of this model (None: ``STDIT_ATTENTION`` / default).

        Takes stdit's backend names (:data:`stdit.attention.BACKENDS`) and the diffusers names that mean one of them
        (``"native"``: torch SDPA, ``"xformers"``); other diffusers backends are not run by StDiT's attention."""
        if backend is not None:
            backend = DIFFUSERS_BACKENDS.get(backend, backend)
            if backend not in BACKENDS:
                raise ValueError(
                    f"Unknown attention backend {backend!r}: StDiT takes {', '.join(BACKENDS)} (stdit's) or "
                    f"{', '.join(DIFFUSERS_BACKENDS)} (diffusers' names for sdpa and xformers).")
        for m in self.modules():
            if isinstance(m, StDiTAttention):
                m.backend = backend

    def reset_attention_backend(self) -> None:
        """Back to the default backend (``STDIT_ATTENTION`` or ``auto``)."""
        self.set_attention_backend(None)

    def enable_cache(self, config) -> None:
        """A diffusers cache config (FirstBlockCache, MagCache, TaylorSeer, ...: ``CacheMixin.enable_cache``) or
        stdit's step cache (a :class:`stdit.cache.StepCacheConfig`: TeaCache / MagCache over the whole block stack),
        one at a time; ``disable_cache()`` turns either off."""
        from stdit.cache import StepCacheConfig, enable_step_cache

        if not isinstance(config, StepCacheConfig):
            return super().enable_cache(config)
        enable_step_cache(self, config)  # refuses a second cache, stdit's or diffusers'

    def disable_cache(self) -> None:
        from stdit.cache import StepCacheConfig, disable_step_cache

        if isinstance(self._cache_config, StepCacheConfig):
            return disable_step_cache(self)
        return super().disable_cache()

    def set_tile_attention(self, config=None) -> None:
        """Sliding-tile self-attention (a :class:`stdit.sparse.TileAttention`) in the blocks it names, at the
        timesteps it names; None turns it off. A runtime choice like the backend, not stored in the config."""
        from stdit.sparse import TileAttention, TileSwitch

        if config is not None:
            if not isinstance(config, TileAttention):
                raise TypeError(f"set_tile_attention takes a stdit.sparse.TileAttention or None; got "
                                f"{type(config).__name__}.")
            if self.config.attention_mode != "full":
                raise ValueError(f"tile attention replaces full 3D self-attention; this model's attention_mode is "
                                 f"{self.config.attention_mode!r}.")
            check_block_indices("TileAttention", config.layers, len(self.blocks))
        switch = TileSwitch(config) if config is not None else None
        self._tile_switch = switch
        for i, block in enumerate(self.blocks):
            on = switch is not None and (config.layers is None or i in config.layers)
            block.attn1.tile_switch = switch if on else None

    def set_fp8_attention(self, config=None) -> None:
        """8-bit attention (a :class:`stdit.fp8.FP8Attention`: which blocks, which timesteps, cross-attention too or
        not) for inference; None turns it off. A runtime choice like the backend, not stored in the config."""
        from stdit.fp8 import set_fp8_attention

        set_fp8_attention(self, config)

    def quantize_fp8(self, device=None) -> list[str]:
        """The transformer blocks' linears to FP8 through torchao, for inference (see :func:`stdit.fp8.
        quantize_fp8`: embeddings, output projection and modulation stay as they are). Returns the converted
        linears' names. Not reversible in place: reload the model for its original weights."""
        from stdit.fp8 import quantize_fp8

        return quantize_fp8(self, device)

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
        for block in self.vace_blocks or []:  # zero hints: a new control branch starts without changing the model
            nn.init.zeros_(block.proj_out.weight)

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
        encoder_hidden_states_image: torch.Tensor | None = None,
        control_hidden_states: torch.Tensor | None = None,
        control_hidden_states_scale: torch.Tensor | None = None,
    ):
        """Predict the flow (or noise) for ``hidden_states`` ``[B, C, T, H, W]`` at ``timestep`` (0..1000).

        ``encoder_hidden_states`` ``[B, L, text_dim]`` with optional ``encoder_attention_mask`` ``[B, L]`` (bool,
        True = real token; 0/1 int; or additive float, 0 = real, -inf = padding; padded tokens are zeroed, so nothing
        in them reaches the output); ``timestep`` in [0, 1000], int or float: a scalar, ``[B]``, or ``[B, S]`` per
        token (S = (T/pt)(H/ph)(W/pw), the token count; Wan 2.2 TI2V, as ``WanPipeline(expand_timesteps=True)`` passes
        it). Float inputs of another precision are cast to the model's; inputs the model does not use are refused.
        ``class_labels`` ``[B]`` (None = the null class); ``condition`` for image-to-video.
        ``encoder_hidden_states_image`` ``[B, L_img, image_dim]``: CLIP image features for a Wan I2V model (as
        diffusers' Wan takes them). ``attention_kwargs={"scale": s}`` scales the LoRA adapters for this call, as in diffusers' Wan.
        ``control_hidden_states`` ``[B, vace_in_channels, T', H, W]`` (T' <= T) and ``control_hidden_states_scale``
        ``[len(vace_layers)]`` (default ones): a VACE model's control latents and the weight of each hint, as
        diffusers' ``WanVACETransformer3DModel`` takes them.
        Returns ``Transformer2DModelOutput(sample=[B, out_channels, T, H, W])`` (or a tuple).
        """
        with lora_scale(self, attention_kwargs):
            return self._forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                 class_labels, condition, return_dict, encoder_hidden_states_image,
                                 control_hidden_states, control_hidden_states_scale)

    def _flow_from_sample(self, sample, noisy, timestep, grid):
        """The flow ``noise - x0`` that a clean-sample prediction ``x0`` implies: with ``x_t = (1 - t) x0 + t noise``
        it is ``(x_t - x0) / t``. Everything downstream (the loss, schedulers, pipelines, caches) keeps seeing a flow.

        Why predict the sample: in pixel space a token holds more values than the model's width (384 per token at the
        tiny config's patch [8, 4, 4], against 256 channels), and a flow carries the noise, which is full-rank
        per pixel; a clean video is not, so a narrow model predicts it far better (Li & He, "Back to Basics: Let
        Denoising Generative Models Denoise", 2025). ``t`` is floored at ``SAMPLE_T_MIN`` so the nearly clean steps do
        not divide the prediction's error by almost zero."""
        t = timestep.float() / 1000
        if t.ndim == 2:  # per token [B, S]: spread each token's t over its pixels
            t = unpatchify(t[..., None].expand(-1, -1, math.prod(self.config.patch_size)), grid,
                           self.config.patch_size)
        else:
            t = t.view(-1, 1, 1, 1, 1)
        return ((noisy.float() - sample.float()) / t.clamp_min(SAMPLE_T_MIN)).to(sample.dtype)

    def _forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, class_labels,
                 condition, return_dict, image, control=None, control_scale=None):
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if control_scale is not None:
            control_scale = torch.as_tensor(control_scale, device=hidden_states.device)
        check_call(self.config, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, class_labels,
                   condition, image, control, control_scale)
        want = getattr(getattr(self.patch_embedding, "weight", None), "dtype", None)
        if want in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # float inputs of another precision
            hidden_states, encoder_hidden_states, condition, image, control = (
                None if t is None else t.to(want)
                for t in (hidden_states, encoder_hidden_states, condition, image, control))
        if encoder_attention_mask is not None:
            encoder_attention_mask = as_keep_mask(encoder_attention_mask, "encoder_attention_mask").to(
                hidden_states.device)
            # Zeroed, a padded token's NaN or inf cannot reach the output (0 attention weight * NaN value = NaN).
            encoder_hidden_states = encoder_hidden_states.masked_fill(~encoder_attention_mask[..., None], 0)
        b = hidden_states.shape[0]
        timestep = timestep.expand(b, -1) if timestep.ndim == 2 else timestep.reshape(-1).expand(b)
        switch = self._tile_switch
        if switch is not None:  # dense above max_timestep: read only when that can differ (one host sync)
            switch.active = switch.config.max_timestep >= 1000 or bool(timestep.max() <= switch.config.max_timestep)
        if self._fp8_switch is not None:
            self._fp8_switch.update(timestep)
        if self.config.num_classes and class_labels is None:
            class_labels = torch.full((b,), self.config.num_classes, device=hidden_states.device, dtype=torch.long)
        noisy = hidden_states[:, :self.config.out_channels or self.config.in_channels]  # x_t, for prediction "sample"
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
        temb, timestep_proj, text, image = self.condition_embedder(timestep, ref.dtype, encoder_hidden_states,
                                                                   class_labels, image)
        timestep_proj = timestep_proj.unflatten(-1, (-1, x.shape[-1]))  # [B, n, dim], per token [B, S, n, dim]
        if sp is not None and temb.ndim == 3:  # per-token modulation goes with its tokens' shard
            temb, timestep_proj = sp.shard(temb), sp.shard(timestep_proj)

        block_args = (timestep_proj, rope, grid, text, encoder_attention_mask, image)
        hints = None if self.vace_blocks is None else self._vace_hints(x, control, control_scale, seq_len, sp,
                                                                         block_args)
        x = self._run_blocks(x, *block_args, hints=hints)

        mod = self.scale_shift_table + temb.unsqueeze(-2)
        # per sample: two [B, 1, dim]; per token ([B, S, 2, dim]): two [B, S, dim]
        shift, scale = mod.chunk(2, dim=-2) if temb.ndim == 2 else mod.unbind(-2)
        x = self.proj_out(norm_modulate(x, shift, scale, eps=self.config.eps))
        if sp is not None:
            x = sp.gather(x, seq_len)
        out = unpatchify(x, grid, self.config.patch_size)
        if self.config.prediction_type == "sample":
            out = self._flow_from_sample(out, noisy, timestep, grid)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _run_blocks(self, x, timestep_proj, rope, grid, text, encoder_attention_mask, image, hints=None):
        """The block stack on the (local shard of the) tokens. A method of its own so that a step cache
        (:mod:`stdit.cache`) can wrap it on one instance and skip it, as diffusers' hooks wrap ``forward``.
        ``hints`` (VACE models only): ``{block index: (hint, scale)}``, added to those blocks' outputs."""
        for i, block in enumerate(self.blocks):
            args = (x, timestep_proj, rope, grid, text, encoder_attention_mask, image)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, *args)
            else:
                x = block(*args)
            if hints is not None and i in hints:
                hint, scale = hints[i]
                x = x + hint * scale
        return x

    def _vace_hints(self, x, control, scales, seq_len, sp, block_args):
        """Wan VACE: the control latents' tokens through the control blocks, each giving one hint. Returns
        ``{main block index: (hint, scale)}``: hint j goes to the j-th smallest of ``vace_layers``, as in diffusers'
        ``WanVACETransformer3DModel``, where a control shorter than the video is padded with zero tokens."""
        c = self.vace_patch_embedding(control).flatten(2).transpose(1, 2)
        c = torch.nn.functional.pad(c, (0, 0, 0, seq_len - c.shape[1]))
        if sp is not None:
            c = sp.shard(c)
        if scales is None:
            scales = c.new_ones(len(self.vace_blocks))
        hints = []
        for block in self.vace_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hint, c = self._gradient_checkpointing_func(block, c, x, *block_args)
            else:
                hint, c = block(c, x, *block_args)
            hints.append(hint)
        return dict(zip(sorted(self.config.vace_layers), zip(hints, scales.unbind())))

    # ---- construction helpers --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, strict: bool = True, **kwargs):
        """diffusers' ``from_pretrained`` (local dir or Hub repo id, safetensors, shards), with one clear
        :class:`~stdit.hub.CheckpointError` for corrupt files and missing / unexpected / mis-shaped keys."""
        from stdit.hub import load_pretrained

        return load_pretrained(super().from_pretrained, pretrained_model_name_or_path, strict=strict, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``; each safetensors file also stores a CRC-32 of every tensor in its metadata,
        which ``from_pretrained`` checks (see :mod:`stdit.model_files`)."""
        if getattr(self, "_fp8_linears", None):
            raise ValueError("this model's linears were quantized to FP8 for inference (quantize_fp8); save the "
                             "model before quantizing, or reload the original checkpoint.")
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            from stdit.model_files import stamp_directory

            stamp_directory(save_directory, kwargs.get("variant"))

    def _upload_folder(self, working_dir, *args, **kwargs):
        # save_pretrained(push_to_hub=True) uploads before save_pretrained above returns: stamp what goes up first
        from stdit.model_files import stamp_directory

        stamp_directory(working_dir, every_file=True)
        return super()._upload_folder(working_dir, *args, **kwargs)

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

    @classmethod
    def from_single_file(cls, path, torch_dtype: torch.dtype | None = None, **kwargs) -> "StDiT":
        """A Wan checkpoint as the Wan repositories publish it (original key names; one ``.safetensors`` file, an
        index JSON or a directory of shards; diffusers layout accepted too), config read off the tensor shapes.
        ``kwargs`` override inferred config values. See :mod:`stdit.single_file`."""
        from stdit.single_file import load_single_file

        return load_single_file(cls, path, torch_dtype=torch_dtype, **kwargs)

    def to_wan(self):
        """The reverse: a diffusers ``WanTransformer3DModel`` holding this model's weights."""
        from stdit.convert import to_wan

        return to_wan(self)


def _register_with_diffusers_hooks() -> None:
    """Tell diffusers' hooks how StDiT's block and processor are called, as diffusers does for its own models: the
    block-level caches (FirstBlockCache, MagCache) read the block's ``hidden_states`` and output through this
    registry, and layer skipping reads the processor's skip function. diffusers offers no public registration
    call, so this uses the registries its own models use."""
    from diffusers.hooks._helpers import (AttentionProcessorMetadata, AttentionProcessorRegistry,
                                          TransformerBlockMetadata, TransformerBlockRegistry)

    TransformerBlockRegistry.register(StDiTBlock, TransformerBlockMetadata(return_hidden_states_index=0,
                                                                           return_encoder_hidden_states_index=None))
    AttentionProcessorRegistry.register(StDiTAttnProcessor, AttentionProcessorMetadata(
        skip_processor_output_fn=lambda proc, attn, hidden_states, *args, **kwargs: hidden_states))


_register_with_diffusers_hooks()
