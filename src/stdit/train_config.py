"""The trainer's config: YAML sections, dotted command-line overrides, and validation with clear errors.

A config file has the sections ``model`` (StDiT arguments, see :mod:`stdit.config`), ``data``, ``diffusion``,
``train``, ``sample`` and ``parallel``; any section or key may be left out to take its default. Overrides
such as ``train.lr=3e-4`` or ``data.buckets=[[8,32,32]]`` are parsed as YAML values and checked like the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stdit.config import locate, parse_yaml


def _f(default, help: str = "", min=None, max=None, choices=None):
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    kind: str = _f("synthetic", "synthetic (embedded moving objects), video_folder, or latents (stdit encode)",
                   choices=("synthetic", "video_folder", "latents"))
    root: str | None = _f(None, "folder of videos (video_folder) or of latent shards (latents)")
    num_frames: int = _f(8, "frames per clip", min=1)
    height: int = _f(32, "clip height in pixels", min=8)
    width: int = _f(32, "clip width in pixels", min=8)
    frame_stride: int = _f(1, "take every n-th frame of a real video", min=1)
    buckets: list | None = _f(None, "list of [frames, height, width] buckets for video_folder (None: one bucket)")
    num_videos: int = _f(10_000, "synthetic: dataset size", min=1)
    seed: int = _f(0, "synthetic: dataset seed")
    class_by: str = _f("shape", "synthetic: class label from the shape or the direction of motion",
                       choices=("shape", "direction", "none"))
    background: float = _f(-1.0, "synthetic: background value in [-1, 1]", min=-1.0, max=1.0)
    num_workers: int = _f(0, "DataLoader worker processes", min=0)
    allow_missing_captions: bool = _f(False, "video_folder: give videos without a <stem>.txt caption an empty caption "
                                      "(with one warning counting them) instead of an error")


@dataclass
class DiffusionConfig:
    logit_mean: float = _f(0.0, "mean of the logit-normal timestep density")
    logit_std: float = _f(1.0, "std of the logit-normal timestep density", min=1e-3)
    shift: float | None = _f(None, "fixed timestep shift; None derives it from the token count", min=1e-3)
    base_seq_len: int = _f(1024, "token count at which the derived shift equals base_shift", min=1)
    base_shift: float = _f(1.0, "shift at base_seq_len tokens", min=1e-3)
    weight_t_min: float = _f(0.0, "below this t, a sample's loss weight is scaled by (t / weight_t_min)^2, so the "
                             "clean-sample error it carries stops growing as 1 / t^2 (0: plain flow MSE)",
                             min=0.0, max=1.0)


# The projections Wan LoRAs adapt (diffusers' names): q, k, v and output of every self- and cross-attention, and both
# FFN linears. peft matches a name against the end of each module path, so "to_q" is attn1.to_q and attn2.to_q.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
# peft initializations that leave the base weights alone and make the adapter a no-op at step 0 (False: random A
# and B, a debugging aid). PiSSA, OLoRA, CorDA, LoftQ, EVA, MiCA and LoRA-GA rewrite the base weights or need
# calibration data, so an adapter trained from them would not apply to the published base model.
LORA_INITS = (True, False, "gaussian", "orthogonal")


@dataclass
class LoraSettings:
    rank: int = _f(32, "LoRA rank r", min=1)
    alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha / rank (null: alpha = rank, scale 1)",
                             min=0.0)
    target_modules: list = _f(LORA_TARGETS, "module names (or name endings) to adapt; default: every attention "
                              "q/k/v/out and FFN projection, as Wan LoRAs do")
    dropout: float = _f(0.0, "dropout on the adapters' input", min=0.0, max=1.0)
    init_lora_weights: bool | str = _f(True, "peft's init: true (A kaiming, B zero), gaussian, orthogonal (both no-op "
                                       "at start), false (random, for debugging)")
    use_rslora: bool = _f(False, "rank-stabilized scaling alpha / sqrt(rank) instead of alpha / rank")


@dataclass
class TileAttentionSettings:
    tile: list = _f([4, 4, 4], "tokens per tile along (t, h, w) after patchify; their product a power of two >= 16")
    window: list = _f([3, 3, 3], "key tiles each query tile attends to along (t, h, w)")
    dense_steps: int = _f(0, "train with dense attention for this many steps first, then sparse (a curriculum)",
                          min=0)


@dataclass
class TrainConfig:
    output_dir: str = _f("runs/run", "where logs, checkpoints, samples and the final model go")
    steps: int = _f(1000, "optimizer steps", min=1)
    batch_size: int = _f(8, "clips per rank per micro-batch", min=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", min=1)
    lr: float = _f(1e-4, "peak learning rate", min=0.0)
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of lr (cosine decay)", min=0.0, max=1.0)
    warmup_steps: int = _f(100, "linear warmup steps", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    betas: list = _f([0.9, 0.999], "AdamW betas")
    grad_clip: float = _f(1.0, "max gradient norm (0 disables clipping)", min=0.0)
    cond_dropout: float = _f(0.1, "probability of dropping the class/text condition (for guidance)", min=0.0,
                             max=1.0)
    first_frame_prob: float = _f(0.0, "probability that a sample trains image-to-video as Wan 2.2 TI2V does: its "
                                 "first latent frame stays clean, its tokens get timestep 0 and no loss (a model "
                                 "with temporal patch 1; TI2V-5B trains with text-only and first-frame samples mixed)",
                                 min=0.0, max=1.0)
    seed: int = _f(0, "seed for model init, noise and timesteps")
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32"))
    ema_decay: float = _f(0.999, "EMA decay (0 disables EMA)", min=0.0, max=1.0)
    ema_warmup: bool = _f(True, "ramp the EMA decay up as (1 + step) / (10 + step) early in training")
    activation_checkpointing: bool = _f(False, "recompute block activations in the backward pass")
    checkpoint_keep_attention: bool = _f(True, "with activation_checkpointing: keep each self-attention's output "
                                         "instead of recomputing it (one more [S, dim] activation per block; the "
                                         "recompute skips the attention forward)")
    checkpoint_keep_matmuls: bool = _f(False, "with activation_checkpointing: also keep every matmul output, so "
                                       "only elementwise ops are recomputed (fastest; about 13 more [S, dim] "
                                       "activations per block)")
    compile: bool = _f(False, "torch.compile each block")
    fp8_linears: str | None = _f(None, "train the blocks' linears in FP8 through torchao float8 (stdit.fp8."
                                 "convert_fp8_training; needs pip install 'stdit[fp8]' and, for speed, train.compile)",
                                 choices=(None, "rowwise", "tensorwise"))
    attention_backend: str | None = _f(None, "attention backend (None: default for the device)",
                                       choices=(None, "auto", "triton", "sdpa", "xformers", "eager"))
    log_every: int = _f(1, "steps between log lines", min=1)
    gc_every: int = _f(50, "Python's automatic garbage collection is off while training and runs every this many "
                       "steps instead, at the same step on every rank (0: leave it automatic)", min=0)
    ckpt_every: int = _f(0, "steps between checkpoints (0: only at the end)", min=0)
    keep_ckpts: int = _f(2, "checkpoints kept on disk", min=1)
    sample_every: int = _f(0, "steps between sample videos (0: only at the end)", min=0)
    resume: str = _f("auto", "auto (latest good checkpoint in output_dir), none, or a checkpoint path")
    progress: bool = _f(True, "show a progress bar on rank 0")
    tracker: str | None = _f(None, "also send each log.jsonl record to a tracker on rank 0: tensorboard (torch's "
                             "SummaryWriter into output_dir/tensorboard; pip install tensorboard) or wandb (project "
                             "stdit; pip install wandb); null: log.jsonl only",
                             choices=(None, "tensorboard", "wandb"))
    export: bool = _f(True, "save_pretrained the (EMA) model to output_dir/model at the end (with lora: the "
                      "adapter, in the diffusers LoRA format)")
    lora: LoraSettings | None = _f(None, "LoRA finetuning of model.pretrained through peft (null: train every weight); "
                                 "e.g. train.lora.rank=32")
    tile_attention: TileAttentionSettings | None = _f(None, "sliding-tile self-attention (stdit.sparse.TileAttention) "
                                                      "while training and sampling (null: dense); e.g. "
                                                      "train.tile_attention.window=[3,3,3]")


@dataclass
class SampleConfig:
    enabled: bool = _f(True, "write sample videos during/after training")
    num_inference_steps: int = _f(30, "sampling steps", min=1)
    guidance_scale: float = _f(1.0, "classifier-free guidance scale (1: no guidance)", min=0.0)
    scheduler: str = _f("euler", "euler (FlowMatchEulerDiscrete) or unipc (UniPCMultistep)",
                        choices=("euler", "unipc"))
    videos_per_class: int = _f(2, "videos per class (or in all, for an unconditional model)", min=1)
    fps: int = _f(8, "frames per second of the written videos", min=1)
    scale: int = _f(4, "pixel repeat factor of the written videos", min=1)
    formats: list = _f(["mp4", "gif"], "video formats to write (mp4, gif)")
    seed: int = _f(0, "sampling seed")
    vae: str | None = _f(None, "diffusers VAE directory to decode latent samples (latent models)")
    compare: bool = _f(False, "synthetic data with shape classes: also write <tag>_vs_data.png (sampled frames beside "
                       "data clips, per class) and <tag>_metrics.json (stdit.data.synthetic.shape_metrics)")


@dataclass
class ParallelConfig:
    mode: str = _f("auto", "auto (ddp when distributed), ddp, fsdp or none", choices=("auto", "ddp", "fsdp", "none"))
    sp: int = _f(1, "sequence-parallel degree (1: off)", min=1)
    dp_shard: int = _f(-1, "FSDP shard degree (-1: world_size / (sp * dp_replicate))", min=-1)
    dp_replicate: int = _f(1, "HSDP replicate degree", min=1)
    reshard_after_forward: bool = _f(True, "FSDP2: free gathered parameters after forward")
    backend: str = _f("auto", "process-group backend: auto (nccl on GPU, gloo on CPU), nccl or gloo",
                      choices=("auto", "nccl", "gloo"))


SECTIONS: dict[str, type] = {"data": DataConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
                             "sample": SampleConfig, "parallel": ParallelConfig}


@dataclass
class Config:
    model: dict[str, Any]
    data: DataConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    parallel: ParallelConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": dict(self.model), **{name: asdict(getattr(self, name)) for name in SECTIONS}}


def _allowed_types(tp) -> tuple[type, ...]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(tp) for t in _allowed_types(arg))
    if tp is type(None) or tp is None:
        return (type(None),)
    return (origin or tp,)


def _coerce(where: str, value, f: dataclasses.Field, tp):
    allowed = _allowed_types(tp)
    if value is None:
        if type(None) in allowed:
            return None
        raise ValueError(f"{where}: null is not allowed; expected {_type_names(allowed)}.")
    if float in allowed and isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in allowed:
        raise ValueError(f"{where}: got {value!r}; expected {_type_names(allowed)}.")
    if not isinstance(value, tuple(t for t in allowed if t is not type(None))):
        if list in allowed and isinstance(value, tuple):
            value = list(value)
        else:
            raise ValueError(f"{where}: got {value!r} ({type(value).__name__}); expected {_type_names(allowed)}.")
    meta = f.metadata
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ValueError(f"{where}: {value!r} is not one of {list(meta['choices'])}.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = meta.get("min"), meta.get("max")
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison
            raise ValueError(f"{where}: {value!r} is not a finite number; valid range is {rng} (finite numbers only).")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{where}: {value!r} is out of range; valid range is {rng}.")
    return value


def _type_names(types_: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types_)


def _build_section(name: str, cls: type, values: dict[str, Any], source: str, lines: dict | None = None):
    if not isinstance(values, dict):
        raise ValueError(f"{source}: section {name!r} must be a mapping; got {type(values).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; valid keys in "
                         f"'{name}': {', '.join(fields)}.")
    out = {}
    for k, v in values.items():
        nested = _nested_section(hints[k])
        if nested is not None and isinstance(v, dict):  # a sub-section such as train.lora
            sub_lines = {**(lines or {}), **{(f"{name}.{k}", kk): line for kk, line in getattr(v, "lines", {}).items()}}
            out[k] = _build_section(f"{name}.{k}", nested, v, source, sub_lines)
        elif nested is not None and v is not None:
            raise ValueError(f"{locate(source, lines, name, k)}: got {v!r}; expected a mapping of "
                             f"{', '.join(f.name for f in dataclasses.fields(nested))} (or null for off).")
        else:
            out[k] = _coerce(locate(source, lines, name, k), v, fields[k], hints[k])
    return cls(**out)


def _nested_section(tp) -> type | None:
    """The dataclass a field of type ``X | None`` holds, if X is one (a sub-section), else None."""
    return next((t for t in _allowed_types(tp) if dataclasses.is_dataclass(t)), None)


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any]]:
    """``["train.lr=3e-4", ...]`` -> ``[(["train", "lr"], 3e-4), ...]`` (values parsed as YAML)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. train.lr=3e-4).")
        value = parse_yaml(raw, f"override {item!r}", with_line=False) if raw.strip() else None
        parsed.append((key.strip().split("."), value))
    return parsed


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> Config:
    """Validate a raw config mapping (plus dotted overrides) into a :class:`Config`."""
    from stdit.config import key_lines

    lines = key_lines(raw or {})  # where each key of the file was written, for the error messages
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for path, value in parse_overrides(overrides or []):
        section, *rest = path
        sub_section = (len(rest) == 2 and section in SECTIONS
                       and _nested_section(typing.get_type_hints(SECTIONS[section]).get(rest[0], int)) is not None)
        if len(rest) != 1 and not sub_section:
            raise ValueError(f"override {'.'.join(path)!r}: expected exactly section.key (or a sub-section's key, "
                             "such as train.lora.rank).")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"{source}: section {section!r} must be a mapping.")
        if len(rest) == 2:  # train.lora.rank=16: sets one key of the sub-section, creating it (turned on) if absent
            sub = raw[section].get(rest[0])
            lines.update({(f"{section}.{rest[0]}", k): line for k, line in getattr(sub, "lines", {}).items()})
            sub = dict(sub) if isinstance(sub, dict) else {}
            sub[rest[1]] = value
            raw[section][rest[0]] = sub
            lines[(f"{section}.{rest[0]}", rest[1])] = "override"
        else:
            raw[section][rest[0]] = value
            lines[(section, rest[0])] = "override"
    valid = ["model", *SECTIONS]
    unknown = sorted(set(raw) - set(valid))
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; valid sections: {', '.join(valid)}.")
    if not isinstance(raw.get("model"), dict) or not raw["model"]:
        raise ValueError(f"{source}: a 'model:' section with StDiT arguments (or model.pretrained) is required.")
    cfg = Config(model=_model_section(raw["model"], source, lines),
                 **{name: _build_section(name, cls, raw.get(name) or {}, source, lines)
                    for name, cls in SECTIONS.items()})
    _check_consistency(cfg, source)
    return cfg


def _model_section(section: dict, source: str, lines: dict) -> dict[str, Any]:
    """StDiT arguments, or ``{"pretrained": name}``: a checkpoint brings its own architecture."""
    from stdit.config import model_kwargs

    if "pretrained" not in section:
        return model_kwargs(section, source=source, lines=lines)
    name = section["pretrained"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{locate(source, lines, 'model', 'pretrained')}: got {name!r}; expected a directory, "
                         "checkpoint file or Hub repo id (diffusers Wan, StDiT or the original Wan layout).")
    others = sorted(set(section) - {"pretrained"}, key=str)
    if others:
        raise ValueError(f"{locate(source, lines, 'model', others[0])}: model.pretrained takes the architecture from "
                         f"the checkpoint; remove {', '.join(f'model.{k}' for k in others)} (or drop "
                         "model.pretrained to train that architecture from scratch).")
    return {"pretrained": name}


def _check_consistency(cfg: Config, source: str) -> None:
    tile = cfg.train.tile_attention
    if tile is not None:
        from stdit.sparse import TileAttention

        try:
            TileAttention(tile=tile.tile, window=tile.window)
        except ValueError as e:
            raise ValueError(f"{source}: train.tile_attention: {e}") from None
        if cfg.model.get("attention_mode", "full") != "full":
            raise ValueError(f"{source}: train.tile_attention replaces full 3D self-attention; model.attention_mode "
                             f"is {cfg.model['attention_mode']!r}.")
    for fmt in cfg.sample.formats:
        if fmt not in ("mp4", "gif"):
            raise ValueError(f"{source}: sample.formats has {fmt!r}; valid formats: mp4, gif.")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ValueError(f"{source}: train.betas must be two numbers in [0, 1); got {cfg.train.betas}.")
    if cfg.data.kind in ("video_folder", "latents") and not cfg.data.root:
        raise ValueError(f"{source}: data.kind={cfg.data.kind} needs data.root (a folder).")
    if cfg.data.buckets is not None:
        for b in cfg.data.buckets:
            if not (isinstance(b, (list, tuple)) and len(b) == 3 and all(isinstance(x, int) and x > 0 for x in b)):
                raise ValueError(f"{source}: data.buckets entries must be [frames, height, width] positive ints; "
                                 f"got {b!r}.")
    if cfg.parallel.dp_shard == 0:
        raise ValueError(f"{source}: parallel.dp_shard must be -1 (fill) or >= 1; got 0.")
    lora = cfg.train.lora
    if lora is not None and cfg.train.fp8_linears:
        raise ValueError(f"{source}: train.fp8_linears does not combine with train.lora (peft's wrappers hold the "
                         "frozen base linears): train LoRA in bf16, or set train.fp8_linears=null.")
    if lora is not None:
        if "pretrained" not in cfg.model:
            raise ValueError(f"{source}: train.lora finetunes a trained model: set model.pretrained to its directory, "
                             "checkpoint file or Hub repo id (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers).")
        targets = lora.target_modules
        if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise ValueError(f"{source}: train.lora.target_modules must be a non-empty list of module names such as "
                             f"{LORA_TARGETS}; got {targets!r}.")
        if len(set(targets)) != len(targets):
            raise ValueError(f"{source}: train.lora.target_modules lists a name twice: {targets!r}.")
        if lora.dropout >= 1:
            raise ValueError(f"{source}: train.lora.dropout must be below 1 (1 drops every input); got {lora.dropout}.")
        if lora.alpha is not None and lora.alpha <= 0:
            raise ValueError(f"{source}: train.lora.alpha must be positive (or null for alpha = rank); got "
                             f"{lora.alpha}.")
        if lora.init_lora_weights not in LORA_INITS:
            raise ValueError(f"{source}: train.lora.init_lora_weights={lora.init_lora_weights!r} is not one of true, "
                             "false, gaussian, orthogonal (peft's PiSSA, OLoRA, CorDA, LoftQ, EVA and similar inits "
                             "rewrite the base weights or need calibration data, so the adapter would not apply to "
                             "the base model).")
        if lora.init_lora_weights == "orthogonal" and lora.rank % 2:
            raise ValueError(f"{source}: train.lora.init_lora_weights=orthogonal needs an even train.lora.rank; "
                             f"got {lora.rank}.")


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (a path or a name in ``configs/``) and apply ``key.sub=value`` overrides."""
    from stdit.config import load_config

    return build_config(load_config(path), overrides, source=str(path))


def describe() -> str:
    """Every section and key with its default and help, for ``--help``."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name} = {default!r}  # {f.metadata.get('help', '')}")
            nested = _nested_section(hints[f.name])
            for g in dataclasses.fields(nested) if nested else ():
                sub = g.default if g.default is not dataclasses.MISSING else g.default_factory()
                lines.append(f"    {name}.{f.name}.{g.name} = {sub!r}  # {g.metadata.get('help', '')}")
    return "\n".join(lines)


# Keys that say where and how a run is resumed, not what it trains: never reported as a change.
_RESUME_KEYS = {"train.output_dir", "train.resume"}


def _plain(value):
    return json.loads(json.dumps(value, default=list))


def _model_defaults() -> dict[str, Any]:
    import inspect

    from stdit.model import StDiT

    params = inspect.signature(StDiT.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def model_changes(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``model.key: old -> new`` for every StDiT argument that differs (unset keys take StDiT's defaults)."""
    defaults = _plain(_model_defaults())
    a, b = {**defaults, **_plain(saved)}, {**defaults, **_plain(new)}
    return [f"model.{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def settings_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every non-model setting that differs between two ``Config.to_dict()``."""
    out = {}
    for section in SECTIONS:
        a, b = _plain(saved.get(section) or {}), _plain(new.get(section) or {})
        for k in sorted(set(a) | set(b)):
            key = f"{section}.{k}"
            if key not in _RESUME_KEYS and k in b and a.get(k, b[k]) != b[k]:
                out[key] = (a[k], b[k])
    return out


def resume_report(saved: dict[str, Any], new: dict[str, Any], step: int, saved_global_batch: int | None,
                  global_batch: int, saved_world: int | None, world: int) -> tuple[list[str], list[str]]:
    """Compare the config a checkpoint was trained with against this run's: ``(refusals, notes)``.

    Refused: a different model (the checkpoint would load partially or into the wrong shapes), turning the EMA or
    LoRA on or off (its state is in the checkpoint or not), another LoRA rank, scale, target or init (another
    adapter), and ``train.steps`` at or below the checkpoint's step while other settings changed (nothing would run
    with them). Every other difference applies from step ``step + 1`` and gets one
    note saying so; the optimizer's lr, betas and weight decay are reset to the new values, the schedule follows the
    new warmup/steps, and a change of global batch (batch size, accumulation or world size) is flagged because the
    loss curve then differs from an uninterrupted run.
    """
    refusals = model_changes(saved.get("model") or {}, new.get("model") or {})
    changes = settings_changes(saved, new)
    if "train.lora" in changes:
        old, cur = changes["train.lora"]
        if old is None or cur is None:
            held = "every weight" if old is None else "only the adapters"
            refusals.append(f"train.lora: {old!r} -> {cur!r} (turns LoRA {'on' if old is None else 'off'}; the "
                            f"checkpoint holds {held})")
            changes.pop("train.lora")
        else:
            shape = {k: (old.get(k), cur.get(k)) for k in sorted(set(old) | set(cur))
                     if k != "dropout" and old.get(k) != cur.get(k)}
            if shape:  # a new rank, scale, target or init is another adapter, not a continuation of this one
                refusals += [f"train.lora.{k}: {a!r} -> {b!r}" for k, (a, b) in shape.items()]
                changes.pop("train.lora")
    if "train.ema_decay" in changes and (changes["train.ema_decay"][0] == 0) != (changes["train.ema_decay"][1] == 0):
        old, cur = changes.pop("train.ema_decay")
        refusals.append(f"train.ema_decay: {old!r} -> {cur!r} (turns the EMA {'on' if old == 0 else 'off'}; the "
                        "checkpoint's EMA state cannot follow)")
    new_steps = new.get("train", {}).get("steps", step)
    if new_steps < step:
        refusals.append(f"train.steps={new_steps} is below the checkpoint's step {step} (raise train.steps to "
                        "continue, or use the checkpoint's model as it is)")
    notes = [f"{k}: {old!r} -> {cur!r}" for k, (old, cur) in changes.items()]
    if saved_global_batch is not None and saved_global_batch != global_batch:
        notes.append(f"global batch: {saved_global_batch} -> {global_batch} (world size {saved_world} -> {world}): "
                     "each step now averages a different number of samples, so the loss curve will not match an "
                     "uninterrupted run")
    elif saved_world is not None and saved_world != world:
        notes.append(f"world size: {saved_world} -> {world} (same global batch; per-rank RNG states start fresh)")
    return refusals, notes
