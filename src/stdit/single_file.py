"""``StDiT.from_single_file``: Wan transformer checkpoints as the Wan repositories publish them.

Takes, from local paths only (there is no Hub config to fetch, so the config is read off the tensors):
- one ``.safetensors`` file: the original Wan key layout (``self_attn.q``, ``ffn.0``, ``head.modulation``, ...,
  also with ComfyUI's ``model.diffusion_model.`` prefix) or diffusers' ``WanTransformer3DModel`` layout;
- a sharded set: a ``*.safetensors.index.json``, or a directory holding it or the
  ``diffusion_pytorch_model-0000x-of-0000y.safetensors`` shards (a Wan-AI repo as downloaded; its ``config.json``,
  original or diffusers, supplies the head count and eps when present).
Pickle files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are refused and never unpickled: unpickling runs code.

Original keys are renamed by diffusers' own converter (``convert_wan_transformer_to_diffusers``, the one behind
``WanTransformer3DModel.from_single_file``), so the key map has one owner, kept up to date with Wan's variants by
diffusers; StDiT shares diffusers' key names, so what comes out loads into StDiT unchanged. The one key that
converter misses (FLF2V's ``img_emb.emb_pos``, which diffusers' ``scripts/convert_wan_to_diffusers.py`` maps) is
renamed here.

The config comes from tensor shapes: width, channels and patch from ``patch_embedding``, depth from the block
indices, ``ffn_dim``, ``text_dim``, ``freq_dim``, ``cross_attn_norm`` (the cross-attention LayerNorm's weights),
QK-norm, the Wan 2.1 I2V / FLF2V image branch (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``) and
VACE's control blocks (``vace_in_channels``; ``vace_layers``, which no shape holds, from a config.json beside the
weights, else spread evenly from block 0 as in every Wan VACE release: every 2nd of 30 blocks, every 5th of 40).
Wan 2.2 TI2V-5B (48 latent channels) and the A14B experts need nothing beyond Wan 2.1's keys.
The head count is not in any shape (QK RMSNorm spans all heads): every Wan has 128-dim heads (RoPE split 44/42/42),
so it is ``dim // 128`` unless a config.json beside the weights or a keyword argument says otherwise.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from stdit.hub import CheckpointError, _fmt


class UnsupportedCheckpoint(CheckpointError, NotImplementedError):
    """A Wan variant StDiT does not implement (Wan 2.2 Animate). Both a ``NotImplementedError`` and
    a :class:`~stdit.hub.CheckpointError`, so ``stdit convert`` reports it as one line like any bad checkpoint."""


WAN_HEAD_DIM = 128
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_SHARD = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")
# diffusers' Wan single-file converter leaves this FLF2V key as it is (its conversion script renames it).
_EXTRA_RENAMES = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
_PREFIXES = ("model.diffusion_model.",)
_ORIGINAL_MARKERS = ("head.modulation", "time_embedding.0.weight", "blocks.0.self_attn.q.weight")
_DIFFUSERS_MARKERS = ("condition_embedder.time_embedder.linear_1.weight", "blocks.0.attn1.to_q.weight")


# ---- reading the files ---------------------------------------------------------------------------------
def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: a pickle checkpoint ({path.suffix}); stdit loads safetensors only, since unpickling a file can "
            "run arbitrary code. Use the .safetensors release of this checkpoint, or convert a file you trust "
            "(safetensors.torch.save_file(torch.load(f, weights_only=True), 'model.safetensors')).")


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        _refuse_pickle(f)
        if not f.is_file():
            raise CheckpointError(f"{f}: shard not found (an incomplete download?).")
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file, corrupt or truncated ({e}).") from e
        dup = state.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{f}: keys also in another shard: {_fmt(dup)}.")
        state.update(part)
    return state


def _read_index(index: Path) -> tuple[dict[str, torch.Tensor], Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map').") from e
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    state = _read_safetensors(files)
    absent = weight_map.keys() - state.keys()
    if absent:
        raise CheckpointError(f"{index}: keys listed in the index are in no shard: {_fmt(absent)}.")
    return state, index.parent


def _shards_in(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        experts = [d.name for d in directory.iterdir() if d.is_dir() and d.name.endswith("_noise_model")]
        hint = (f" It holds the two experts of a Wan 2.2 A14B checkpoint: pass one of {sorted(experts)} "
                "(WanPipeline's transformer is high_noise_model, transformer_2 low_noise_model)." if experts else "")
        pickles = [f.name for f in directory.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not hint:
            hint = f" Only pickle files ({', '.join(sorted(pickles)[:3])}) are there; stdit loads safetensors only."
        raise CheckpointError(f"{directory}: no .safetensors files.{hint}")
    named = [f for f in files if f.name.startswith("diffusion_pytorch_model")]
    files = named or files
    sharded = [f for f in files if _SHARD.search(f.name)]
    if sharded:
        total = int(_SHARD.search(sharded[0].name).group(2))
        have = {int(_SHARD.search(f.name).group(1)) for f in sharded}
        if have != set(range(1, total + 1)):
            missing = sorted(set(range(1, total + 1)) - have)
            raise CheckpointError(f"{directory}: shards {missing} of {total} are missing (an incomplete download?).")
        return sharded
    if len(files) > 1:
        raise CheckpointError(f"{directory}: several .safetensors files ({', '.join(f.name for f in files[:4])}) "
                              "and no index; pass the transformer's file itself.")
    return files


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a single-file or sharded checkpoint (``path``: file, index JSON or directory), and the
    ``config.json`` that sits beside them (``{}`` if none)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (from_single_file reads local files; download "
                              "the checkpoint first, e.g. with `huggingface-cli download`).")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files ({', '.join(i.name for i in indexes)}); pass one.")
        if indexes:
            state, _ = _read_index(indexes[0])
        else:
            state = _read_safetensors(_shards_in(path))
        return state, _read_config(path)
    _refuse_pickle(path)
    if path.name.endswith(".json"):
        state, directory = _read_index(path)
        return state, _read_config(directory)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch.save zip or a raw pickle under another name
        raise CheckpointError(f"{path}: a pickle/torch.save file; stdit loads safetensors only (unpickling a file "
                              "can run arbitrary code).")
    return _read_safetensors([path]), {}


# ---- key layout ----------------------------------------------------------------------------------------
def to_diffusers_layout(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` with diffusers' ``WanTransformer3DModel`` key names, and the layout it came in
    (``"original"`` or ``"diffusers"``)."""
    state = dict(state)
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    keys = state.keys()
    if any(k.startswith(("motion_encoder.", "face_adapter.", "face_encoder.")) for k in keys):
        raise UnsupportedCheckpoint("This is a Wan 2.2 Animate checkpoint (motion encoder, face adapter): StDiT does "
                                  "not implement it; use diffusers' WanAnimateTransformer3DModel.")
    scaled = [k for k in keys if k == "scaled_fp8" or k.endswith(".scale_weight")]
    if scaled:
        raise CheckpointError(f"scaled-FP8 checkpoint ({_fmt(scaled, 2)}): its weights need per-tensor scales "
                              "that StDiT does not apply; use a bf16/fp16/fp32 release.")
    if any(k in keys for k in _DIFFUSERS_MARKERS):
        return state, "diffusers"
    if not any(k in keys for k in _ORIGINAL_MARKERS):
        raise CheckpointError(f"not a Wan transformer checkpoint: none of {list(_ORIGINAL_MARKERS)} (original "
                              f"layout) or {list(_DIFFUSERS_MARKERS)} (diffusers layout); keys: {_fmt(keys, 5)}.")
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(state)
    for old, new in _EXTRA_RENAMES.items():
        if old in converted:
            converted[new] = converted.pop(old)
    return converted, "original"


# ---- config from shapes --------------------------------------------------------------------------------
def infer_config(state: Mapping[str, torch.Tensor], known: Mapping | None = None) -> dict:
    """StDiT config of a diffusers-layout Wan state dict. ``known``: a config.json beside the weights (original
    Wan names ``num_heads``/``dim``, or diffusers names), read for what shapes cannot tell (heads, eps)."""
    known = dict(known or {})

    def need(key):
        if key not in state:
            raise CheckpointError(f"not a complete Wan transformer checkpoint: no {key!r}.")
        return state[key].shape

    dim, in_channels, *patch = need("patch_embedding.weight")
    patch_size = tuple(int(p) for p in patch)
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError("not a complete Wan transformer checkpoint: no transformer blocks.")
    heads = known.get("num_attention_heads", known.get("num_heads"))
    if heads is None and known.get("attention_head_dim"):
        heads = dim // int(known["attention_head_dim"])
    if heads is None:
        if dim % WAN_HEAD_DIM:
            raise CheckpointError(f"width {dim} is not a multiple of Wan's head dim {WAN_HEAD_DIM}: pass "
                                  "num_attention_heads= (the head count is not stored in the weights).")
        heads = dim // WAN_HEAD_DIM
    if dim % int(heads):
        raise CheckpointError(f"width {dim} does not split into {heads} heads.")
    config = {
        "patch_size": patch_size,
        "num_attention_heads": int(heads),
        "attention_head_dim": dim // int(heads),
        "in_channels": int(in_channels),
        "out_channels": need("proj_out.weight")[0] // math.prod(patch_size),
        "text_dim": int(need("condition_embedder.text_embedder.linear_1.weight")[1]),
        "freq_dim": int(need("condition_embedder.time_embedder.linear_1.weight")[1]),
        "ffn_dim": int(need("blocks.0.ffn.net.0.proj.weight")[0]),
        "num_layers": max(blocks) + 1,
        "cross_attn_norm": "blocks.0.norm2.weight" in state,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in state else None,
        "eps": float(known.get("eps", 1e-6)),
        "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None,
    }
    if "condition_embedder.image_embedder.norm1.weight" in state:
        config["image_dim"] = int(state["condition_embedder.image_embedder.norm1.weight"].shape[0])
        config["added_kv_proj_dim"] = int(need("blocks.0.attn2.add_k_proj.weight")[1])
    if "condition_embedder.image_embedder.pos_embed" in state:
        config["pos_embed_seq_len"] = int(state["condition_embedder.image_embedder.pos_embed"].shape[1])
    config["vace_layers"], config["vace_in_channels"] = _vace_config(state, known, config["num_layers"])
    return config


def _vace_config(state: Mapping[str, torch.Tensor], known: Mapping, num_layers: int):
    """``(vace_layers, vace_in_channels)`` of a VACE checkpoint, ``(None, None)`` for any other."""
    vace = {int(m.group(1)) for k in state if (m := re.match(r"vace_blocks\.(\d+)\.", k))}
    if not vace:
        return None, None
    if "vace_patch_embedding.weight" not in state:
        raise CheckpointError("not a complete Wan VACE checkpoint: vace_blocks but no 'vace_patch_embedding.weight'.")
    channels = int(state["vace_patch_embedding.weight"].shape[1])
    n, layers = max(vace) + 1, known.get("vace_layers")
    if layers is None:
        if num_layers % n:
            raise CheckpointError(f"a VACE checkpoint with {n} control blocks for {num_layers} blocks: which blocks "
                                  "take their hints is not stored in the weights; pass vace_layers=[...].")
        layers = list(range(0, num_layers, num_layers // n))
    if len(layers) != n:
        raise CheckpointError(f"vace_layers={list(layers)} names {len(layers)} blocks, but the checkpoint has {n} "
                              "VACE control blocks.")
    return [int(i) for i in layers], channels


# ---- loading -------------------------------------------------------------------------------------------
def load_single_file(cls, path_or_state_dict, torch_dtype: torch.dtype | None = None, **config_overrides):
    """A ``cls`` (StDiT) from a Wan checkpoint in the original or diffusers layout; see the module docstring.

    ``config_overrides`` replace inferred config values (e.g. ``num_attention_heads`` for a non-Wan head dim).
    ``torch_dtype`` casts the weights, keeping ``cls._keep_in_fp32_modules`` in fp32 as ``from_pretrained`` does;
    without it the checkpoint's dtypes are kept. Loading is strict: missing or unexpected keys raise
    :class:`~stdit.hub.CheckpointError` naming them."""
    if isinstance(path_or_state_dict, Mapping):
        state, known, name = dict(path_or_state_dict), {}, "state dict"
    else:
        (state, known), name = read_checkpoint(path_or_state_dict), str(path_or_state_dict)
    unknown = set(config_overrides) - set(inspect.signature(cls.__init__).parameters)
    if unknown:
        raise TypeError(f"from_single_file got unknown arguments {sorted(unknown)}")
    state, _ = to_diffusers_layout(state)
    config = {**infer_config(state, {**known, **config_overrides}), **config_overrides}
    if torch_dtype is not None:
        keep = cls._keep_in_fp32_modules or []
        for k, v in state.items():  # one tensor at a time: the peak stays near one copy of the weights
            if v.is_floating_point():
                state[k] = v.to(torch.float32 if any(m in k.split(".") for m in keep) else torch_dtype)
    with torch.device("meta"):
        model = cls(**config)
    ignore = [re.compile(p) for p in (cls._keys_to_ignore_on_load_unexpected or [])]
    state = {k: v for k, v in state.items() if not any(p.search(k) for p in ignore)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        shapes = "; ".join(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise CheckpointError(f"{name}: weights do not fit the inferred config {config}: {shapes or e}") from e
    problems = [f"{what} keys: {_fmt(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                if keys]
    if problems:
        raise CheckpointError(f"{name}: the weights do not match the Wan transformer their shapes describe "
                              f"({'; '.join(problems)}).")
    return model.eval()
