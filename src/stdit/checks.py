"""One clear error for each bad model config value or model call input, instead of a traceback deep inside (or a
silently different model / output).

:func:`check_config` is what ``StDiT.__init__`` (and so ``from_config`` / ``from_pretrained``) runs on its
arguments; :func:`check_call` is what ``StDiT.forward`` runs on what a caller passes.
"""

from __future__ import annotations

import math
import operator

import torch

# The timestep scale of diffusers' flow-matching schedulers (``num_train_timesteps``) and of stdit's training.
NUM_TRAIN_TIMESTEPS = 1000

# What each model config value may hold: (kind, lowest value, null allowed). One table for StDiT.__init__ (through
# check_config) and for the YAML loader (stdit.config, which adds the file, line and key). The choices of
# attention_mode / qk_norm / prediction_type, the RoPE split and the VACE layers are checked where they are used.
MODEL_VALUES: dict[str, tuple[str, float | None, bool]] = {
    "patch_size": ("int3", 1, False),
    "num_attention_heads": ("int", 1, False),
    "attention_head_dim": ("int", 1, False),
    "in_channels": ("int", 1, False),
    # 0 has always meant "off" for out_channels (= in_channels) and num_classes
    "out_channels": ("int", 0, True),
    "text_dim": ("int", 1, True),
    "freq_dim": ("int", 1, False),
    "ffn_dim": ("int", 1, False),
    "num_layers": ("int", 1, False),
    "cross_attn_norm": ("bool", None, False),
    "qk_norm": ("str", None, True),
    "eps": ("float", 0, False),
    "rope_theta": ("float", 0, False),
    "rope_axes_dim": ("int3", 0, True),
    "num_classes": ("int", 0, True),
    "condition_channels": ("int", 0, False),
    "attention_mode": ("str", None, False),
    "prediction_type": ("str", None, False),
    "image_dim": ("int", 1, True),
    "added_kv_proj_dim": ("int", 1, True),
    "pos_embed_seq_len": ("int", 1, True),
    "vace_in_channels": ("int", 1, True),
}


def model_value_problem(key: str, value) -> str | None:
    """What ``value`` must be for model config key ``key`` (``"an int >= 1"``...), or None if it is fine (or
    ``key`` has no rule in :data:`MODEL_VALUES`)."""
    if key not in MODEL_VALUES:
        return None
    kind, lo, nullable = MODEL_VALUES[key]
    if value is None:
        return None if nullable else "set (null is not allowed here)"
    null = "null or " if nullable else ""
    if kind == "int3":
        if isinstance(value, (list, tuple)) and len(value) == 3 and all(
                (v := as_int(x)) is not None and v >= lo for x in value):
            return None
        example = "[1, 2, 2] (pt, ph, pw)" if key == "patch_size" else \
            "[44, 42, 42] (t, h, w; even, summing to attention_head_dim)"
        return f"{null}three ints >= {lo}, e.g. {example}"
    if kind == "int":
        return None if (v := as_int(value)) is not None and v >= lo else f"{null}an int >= {lo}"
    if kind == "float":
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > lo
        return None if ok else f"a finite number > {lo}"
    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    return None if isinstance(value, str) else f"{null}a string"


def as_int(value) -> int | None:
    """``value`` as an int if it is one (numpy and torch ints included; bool is not), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_block_indices(owner: str, layers, num_blocks: int) -> None:
    """``owner.layers`` (a runtime setting such as ``TileAttention.layers``) must name blocks of the model."""
    bad = [i for i in layers or () if not 0 <= i < num_blocks]
    if bad:
        raise ValueError(f"{owner}.layers {bad} are not block indices of this {num_blocks}-block model.")


def _bad(name: str, value, want: str) -> ValueError:
    return ValueError(f"{name}={value!r} ({type(value).__name__}): {want}.")


def check_config(config: dict) -> None:
    """Raise one ValueError naming the first config value of the wrong type or out of range."""
    for name, value in config.items():
        if (want := model_value_problem(name, value)) is not None:
            raise _bad(name, value, f"must be {want}")
    _check_vace(config)


def _check_vace(config: dict) -> None:
    """Wan VACE's ``vace_layers`` (the main blocks that get a control hint) and ``vace_in_channels``."""
    layers, channels = config.get("vace_layers"), config.get("vace_in_channels")
    if layers is None and channels is None:
        return
    if layers is None or channels is None:
        raise ValueError(f"vace_layers={layers!r} and vace_in_channels={channels!r} come together (Wan VACE's "
                         "control blocks and their input channels); set both or neither.")
    num_layers = as_int(config.get("num_layers", 30))
    ints = [as_int(i) for i in layers] if isinstance(layers, (list, tuple)) else [None]
    if not ints or None in ints or len(set(ints)) != len(ints) or 0 not in ints or (
            num_layers is not None and not all(0 <= i < num_layers for i in ints)):
        raise _bad("vace_layers", layers, f"must be distinct block indices in [0, num_layers={num_layers}) "
                   "including 0 (the first control block takes the video tokens), e.g. [0, 5, 10]")


def _floating(name: str, x: torch.Tensor | None) -> None:
    if x is not None and not (x.is_floating_point() and not x.is_complex()):
        raise ValueError(f"{name} must be a floating-point tensor; got {x.dtype}.")


def _check_timestep(cfg, x, timestep) -> None:
    b = x.shape[0]
    if timestep.ndim <= 1 and timestep.numel() in (1, b):
        return
    tokens = math.prod(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
    if timestep.ndim == 2 and timestep.shape[0] in (1, b) and timestep.shape[1] == tokens:
        return
    raise ValueError(f"timestep must be a scalar or shape [B]=[{b}]; got shape {tuple(timestep.shape)}. Per token "
                     f"(Wan 2.2 TI2V) it is [B, S]=[{b}, {tokens}], S = (T/pt)(H/ph)(W/pw) the token count.")


def _check_control(cfg, x, control, control_scale) -> None:
    """A VACE model's control latents and hint scales."""
    if cfg.vace_layers is None:
        if control is not None or control_scale is not None:
            raise ValueError("control_hidden_states was passed, but this model has no VACE control blocks "
                             "(vace_layers is None); it would be ignored.")
        return
    b, _, t, h, w = x.shape
    if control is None:
        raise ValueError(f"This is a Wan VACE model: pass control_hidden_states [B, vace_in_channels="
                         f"{cfg.vace_in_channels}, T, H, W] (the control latents).")
    c_shape = tuple(control.shape)
    if control.ndim != 5 or c_shape[:2] != (b, cfg.vace_in_channels) or c_shape[3:] != (h, w) or not (
            0 < c_shape[2] <= t) or c_shape[2] % cfg.patch_size[0]:
        raise ValueError(f"control_hidden_states must be [B={b}, vace_in_channels={cfg.vace_in_channels}, T', "
                         f"H={h}, W={w}] with T' <= T={t} a multiple of the patch's {cfg.patch_size[0]} (missing "
                         f"frames at the end get no control); got shape {c_shape}.")
    n = len(cfg.vace_layers)
    if control_scale is not None and tuple(control_scale.shape) != (n,):
        raise ValueError(f"control_hidden_states_scale must hold one scale per VACE layer, shape [{n}]; "
                         f"got shape {tuple(control_scale.shape)}.")


def _check_shapes(cfg, x, timestep, text, text_mask, class_labels, condition, image) -> None:
    """Shapes and the inputs each kind of model needs (text, classes, image features, condition channels)."""
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
    _check_timestep(cfg, x, timestep)
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
    if cfg.image_dim is not None:
        if image is None:
            raise ValueError("This is a Wan image-to-video model: pass encoder_hidden_states_image "
                             f"[B, L_img, image_dim={cfg.image_dim}] (the CLIP image features).")
        if image.ndim != 3 or image.shape[-1] != cfg.image_dim:
            raise ValueError(f"encoder_hidden_states_image must be [B, L_img, image_dim={cfg.image_dim}]; "
                             f"got shape {tuple(image.shape)}.")
    elif image is not None:
        raise ValueError("encoder_hidden_states_image was passed, but this model has no image branch "
                         "(image_dim is None); it would be ignored.")
    if cfg.condition_channels:
        want = (b, cfg.condition_channels, *x.shape[2:])
        if condition is None or tuple(condition.shape) != want:
            got = None if condition is None else tuple(condition.shape)
            raise ValueError(f"This model is image-conditioned: pass condition of shape {want} "
                             f"(see StDiT.i2v_condition); got {got}.")


def check_call(cfg, x, timestep, text, text_mask, class_labels, condition, image, control=None,
               control_scale=None) -> None:
    """What ``StDiT.forward`` takes: shapes, the inputs the model needs, inputs it would ignore, tensors of a dtype
    no layer takes, and timesteps off the schedule's scale. One ValueError saying what is wrong and what is valid."""
    _check_shapes(cfg, x, timestep, text, text_mask, class_labels, condition, image)
    _check_control(cfg, x, control, control_scale)
    if text is not None and cfg.text_dim is None:
        raise ValueError("encoder_hidden_states was passed, but this model has no text cross-attention "
                         "(text_dim is None); it would be ignored.")
    if text_mask is not None and text is None:
        raise ValueError("encoder_attention_mask was passed without encoder_hidden_states.")
    if class_labels is not None and not cfg.num_classes:
        raise ValueError("class_labels were passed, but this model has no classes (num_classes is not set); "
                         "they would be ignored.")
    if condition is not None and not cfg.condition_channels:
        raise ValueError("condition was passed, but this model takes no condition channels "
                         "(condition_channels=0); it would be ignored.")
    for name, t in (("hidden_states", x), ("encoder_hidden_states", text), ("condition", condition),
                    ("encoder_hidden_states_image", image), ("control_hidden_states", control),
                    ("control_hidden_states_scale", control_scale)):
        _floating(name, t)
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise ValueError(f"timestep must be a real number (int or float, 0..{NUM_TRAIN_TIMESTEPS}); "
                         f"got {timestep.dtype}.")
    if torch.compiler.is_compiling():  # a data-dependent branch would break the graph: checked in eager calls only
        return
    t = timestep.detach().float()  # float32 holds 0..1000 exactly (float64 is missing on some devices, e.g. MPS)
    if t.numel() and not bool(((t >= 0) & (t <= NUM_TRAIN_TIMESTEPS)).all()):  # one device sync; NaN fails too
        raise ValueError(
            f"timestep must be in [0, {NUM_TRAIN_TIMESTEPS}] (the scale of diffusers' flow-matching schedulers; "
            f"for t in [0, 1] pass t * {NUM_TRAIN_TIMESTEPS}); got {t.min().item():g}..{t.max().item():g}.")
