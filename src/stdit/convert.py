"""Wan (diffusers ``WanTransformer3DModel`` / ``WanVACETransformer3DModel`` layout) <-> StDiT.

Config names and state-dict keys are shared, so conversion is a config translation plus an identity key map:
Wan-only keys (``rope_max_seq_len`` etc.) are dropped on the way in and restored on the way out, and StDiT
features that Wan has no equivalent for (class labels, image conditioning, factorized attention, a custom RoPE)
refuse to export instead of exporting something that computes differently. Checkpoints in the original Wan key
layout (as the Wan-AI repositories publish them) load through :mod:`stdit.single_file`.
"""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

import torch

from stdit.cli import format_size
from stdit.hub import check_local_or_repo
from stdit.model import StDiT

# Wan-only config key: the RoPE table size (StDiT builds tables for any grid).
_WAN_ONLY = {"rope_max_seq_len": 1024}
# StDiT-only config keys and the values under which a StDiT computes exactly what Wan does.
_STDIT_ONLY = {"rope_theta": 10000.0, "rope_axes_dim": None, "num_classes": None, "condition_channels": 0,
               "attention_mode": "full", "prediction_type": "flow"}
_STDIT_KEYS = set(_STDIT_ONLY) | {
    "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
    "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim", "added_kv_proj_dim",
    "pos_embed_seq_len", "vace_layers", "vace_in_channels"}
# Wan VACE's config keys: a StDiT with them set exports to WanVACETransformer3DModel.
_VACE_KEYS = ("vace_layers", "vace_in_channels")
WAN_CLASSES = ("WanTransformer3DModel", "WanVACETransformer3DModel")


def wan_config_to_stdit(wan_config: dict) -> dict:
    """StDiT kwargs for a ``WanTransformer3DModel`` config (Wan 2.1 / 2.2 text-to-video, image-to-video, FLF2V,
    TI2V; the config says nothing of Wan 2.2's per-token timesteps, which need none) or a
    ``WanVACETransformer3DModel`` config (VACE's ``vace_layers``, ``vace_in_channels``)."""
    config = {k: (tuple(v) if k == "patch_size" else v) for k, v in wan_config.items() if k in _STDIT_KEYS}
    if config.get("vace_layers") is not None:
        config["vace_layers"] = list(config["vace_layers"])
    return config


def stdit_config_to_wan(config: dict) -> dict:
    """``WanTransformer3DModel`` kwargs for a StDiT config that Wan can represent exactly."""
    from stdit.rope import axis_split

    defaults = {n: p.default for n, p in inspect.signature(StDiT.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    config = {**defaults, **config}
    differs = {k: config.get(k, v) for k, v in _STDIT_ONLY.items() if config.get(k, v) != v}
    axes = differs.pop("rope_axes_dim", None)
    if axes is not None and tuple(axes) == axis_split(config["attention_head_dim"]):
        axes = None
    if axes is not None:
        differs["rope_axes_dim"] = axes
    if config.get("text_dim") is None:
        differs["text_dim"] = None
    if differs:
        raise ValueError(f"This StDiT cannot be exported to Wan: {differs} have no Wan equivalent "
                         f"(Wan needs {{text_dim: int, **{_STDIT_ONLY}}}).")
    wan = {k: config[k] for k in _STDIT_KEYS - set(_STDIT_ONLY) if k in config}
    wan["patch_size"] = tuple(wan["patch_size"])
    if wan.get("vace_layers") is None:  # WanTransformer3DModel has no VACE arguments
        for k in _VACE_KEYS:
            wan.pop(k, None)
    return {**wan, **_WAN_ONLY}


def _is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() and (path / "transformer").is_dir()


def from_wan(model_or_path, subfolder: str | None = None, share_weights: bool = False, **kwargs) -> StDiT:
    """A StDiT with the weights of a Wan transformer: a ``WanTransformer3DModel`` or ``WanVACETransformer3DModel``
    object, or a local directory or Hub repo id in diffusers layout (a whole Wan pipeline directory/repo is read
    from its ``transformer/``).
    ``kwargs`` (``torch_dtype``, ``cache_dir``, ...) go to :meth:`StDiT.from_pretrained`.

    From a model object the weights are copied, so training the StDiT leaves the Wan model as it was;
    ``share_weights=True`` reuses the Wan model's tensors instead (no second copy in memory: for inference, when
    the Wan model is dropped after the conversion)."""
    if isinstance(model_or_path, torch.nn.Module):
        config = wan_config_to_stdit(dict(model_or_path.config))
        with torch.device("meta"):
            model = StDiT(**config)
        state = model_or_path.state_dict()
        if not share_weights:
            state = {k: v.detach().clone() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        dtype = kwargs.get("torch_dtype")
        return model.to(dtype) if dtype is not None else model
    path = model_or_path
    if subfolder is None and Path(path).is_dir() and _is_pipeline_dir(Path(path)):
        subfolder = "transformer"
    config = StDiT.load_config(path, subfolder=subfolder, **{k: v for k, v in kwargs.items()
                                                             if k in ("cache_dir", "revision", "token")})
    config = wan_config_to_stdit({k: v for k, v in config.items() if not k.startswith("_")})
    return StDiT.from_pretrained(path, subfolder=subfolder, **config, **kwargs)


def to_wan(model: StDiT):
    """A diffusers ``WanTransformer3DModel`` (``WanVACETransformer3DModel`` for a VACE model) holding ``model``'s
    weights (strict: no missing/unexpected keys)."""
    from diffusers import WanTransformer3DModel, WanVACETransformer3DModel

    config = stdit_config_to_wan(dict(model.config))
    cls = WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel
    with torch.device("meta"):
        wan = cls(**config)
    wan.load_state_dict(model.state_dict(), strict=True, assign=True)
    # Wan keeps its RoPE tables in non-persistent buffers, which the meta-device build left empty.
    wan.rope = type(wan.rope)(config["attention_head_dim"], config["patch_size"], config["rope_max_seq_len"])
    return wan.to(next(model.parameters()).device)


# ---- `stdit convert` -----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Wan transformer: diffusers layout (local dir or Hub repo id), or the original Wan "
                               "layout (a .safetensors file, an index .json, or a directory of shards); or a StDiT "
                               "directory with --to wan")
    p.add_argument("dst", help="output directory (written with save_pretrained, safetensors)")
    p.add_argument("--to", choices=("stdit", "wan"), default="stdit", help="direction (default: Wan -> stdit)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights (default: keep the checkpoint's dtype)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def _is_single_file_source(path: str) -> bool:
    """A local checkpoint that is not a ``save_pretrained`` directory: a file, or a directory of weights without a
    diffusers ``config.json`` (a Wan-AI repo as downloaded, whose config.json is the original ``WanModel``'s)."""
    p = Path(path)
    if p.is_file():
        return True
    if not p.is_dir() or _is_pipeline_dir(p):
        return False
    try:
        config = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    except ValueError:
        config = {}
    return config.get("_class_name") not in (*WAN_CLASSES, "StDiT")


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    kw = {"torch_dtype": dtype} if dtype else {}
    # user errors (a bad checkpoint: CheckpointError; a missing path: OSError) become one line in stdit.cli
    check_local_or_repo(args.src, "source")  # a missing local path fails here, not after Hub retries
    if _is_single_file_source(args.src):
        model = StDiT.from_single_file(args.src, **kw)
        if args.to == "wan":
            model = to_wan(model)
    elif args.to == "stdit":
        model = from_wan(args.src, **kw)
    else:
        model = to_wan(StDiT.from_pretrained(args.src, **kw))
    model.save_pretrained(args.dst, safe_serialization=True, max_shard_size=args.max_shard_size)
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in Path(args.dst).rglob("*") if f.is_file())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(f"wrote {args.dst} ({type(model).__name__}, {n:,} params, {format_size(size)}, {dtype})")
    print(json.dumps({"saved": str(args.dst), "class": type(model).__name__, "parameters": n}))
    return 0
