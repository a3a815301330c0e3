"""LoRA finetuning through peft, the trainer's model from a pretrained checkpoint, and ``stdit merge-lora``.

The adapters are peft's LoRA layers, added with diffusers' ``PeftAdapterMixin.add_adapter`` as for diffusers' Wan;
StDiT's fused paths read a module's weights only when it is a plain layer (:func:`stdit.ops.is_plain`), so a
wrapped projection always runs its adapter. The base is frozen (held in bf16 when training in bf16, the modules
``StDiT._keep_in_fp32_modules`` names in fp32, as ``from_pretrained`` leaves them); the adapters train in fp32.

What comes out is diffusers' LoRA format, ``pytorch_lora_weights.safetensors`` as ``WanPipeline.save_lora_weights``
writes it: keys ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and the peft ``LoraConfig`` in the
``lora_adapter_metadata`` header, so ``WanPipeline.load_lora_weights`` and ``StDiT.load_lora_adapter`` (or
diffusers' ``WanTransformer3DModel.load_lora_adapter``) read it as it is. The header also names the base model
(``base_model_name_or_path``), which ``stdit merge-lora`` takes as its default base.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name inside the trainer; saved files carry no name (diffusers' format)
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "transformer"  # WanPipeline's key prefix for its transformer's adapters


# ---- the model to train -----------------------------------------------------------------------------------------
def load_pretrained(name: str, torch_dtype: torch.dtype | None = None, what: str = "model.pretrained"):
    """A StDiT with the weights of ``name``: a StDiT or diffusers Wan directory / Hub repo id (a whole Wan pipeline
    is read from its ``transformer/``), or a checkpoint in the original Wan layout (file, index or shard folder)."""
    from stdit.convert import _is_pipeline_dir, _is_single_file_source, from_wan
    from stdit.hub import check_local_or_repo
    from stdit.model import StDiT

    check_local_or_repo(name, what)
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    local = Path(name).expanduser()
    if local.exists():
        if _is_single_file_source(name):
            return StDiT.from_single_file(name, **kw)
        subfolder = "transformer" if _is_pipeline_dir(local) else None
        config = StDiT.load_config(name, subfolder=subfolder)
    else:
        try:
            subfolder, config = None, StDiT.load_config(name)
        except OSError:  # a pipeline repo such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers has no config.json at its root
            subfolder = "transformer"
            config = StDiT.load_config(name, subfolder=subfolder)
    if config.get("_class_name") == "StDiT":
        return StDiT.from_pretrained(name, subfolder=subfolder, **kw)
    return from_wan(name, subfolder=subfolder, **kw)


def peft_config(settings):
    """peft's ``LoraConfig`` for a ``train.lora`` section (:class:`stdit.train_config.LoraSettings`)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
                      target_modules=list(settings.target_modules), lora_dropout=settings.dropout,
                      init_lora_weights=settings.init_lora_weights, use_rslora=settings.use_rslora)


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target names at least one module (peft matches a name or the end of a dotted path); else one error
    listing the linear layers there are."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({re.sub(r"^blocks\.\d+\.", "", n) for n, m in model.named_modules()
                         if isinstance(m, nn.Linear)})
        raise ValueError(f"train.lora.target_modules: {missing} match no module of this model; its linear layers "
                         f"(per block) are {', '.join(linear)}.")


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The peft adapter weights of ``model`` (lora_A, lora_B, ...), in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for layer_name in m.adapter_layer_names:
                out += list(getattr(m, layer_name).parameters())
    return out


def add_lora(model: nn.Module, settings) -> nn.Module:
    """Freeze ``model`` and add peft LoRA adapters as ``settings`` says; the adapters (only they) train, in fp32."""
    check_targets(model, settings.target_modules)
    model.requires_grad_(False)
    try:
        model.add_adapter(peft_config(settings), adapter_name=ADAPTER)
    except ValueError as e:  # e.g. a target that peft cannot adapt (a norm, an embedding table)
        raise ValueError(f"train.lora.target_modules={settings.target_modules}: {e}") from None
    adapters = adapter_parameters(model)
    ids = {id(p) for p in adapters}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    for p in adapters:  # peft gives them the base layer's dtype; a bf16 adapter would lose small updates
        p.data = p.data.float()
    return model


def build_model(cfg, precision: str):
    """The model ``cfg`` trains: ``model:``'s architecture initialized for training from scratch (from the global
    RNG), or ``model.pretrained``'s weights; with ``train.lora`` the frozen base plus the adapters."""
    from stdit.model import StDiT

    pretrained = cfg.model.get("pretrained")
    if pretrained is None:
        model = StDiT(**cfg.model)
        model.initialize_weights()
        return model
    # A frozen base can be held in the compute dtype; trained weights stay fp32 (FSDP casts them for compute).
    dtype = torch.bfloat16 if cfg.train.lora is not None and precision == "bf16" else torch.float32
    model = load_pretrained(pretrained, torch_dtype=dtype)
    return add_lora(model, cfg.train.lora) if cfg.train.lora is not None else model


def model_config(model) -> dict:
    """The StDiT arguments of ``model`` (its config without diffusers' bookkeeping keys)."""
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def inference_model(cfg, config: dict, weights: dict[str, torch.Tensor]):
    """The trained model as one plain fp32 module for sampling: ``weights`` are every weight, or with ``train.lora``
    the adapters' (the base is loaded again from ``model.pretrained``)."""
    from stdit.model import StDiT

    if cfg.train.lora is None:
        model = StDiT(**config)
        model.load_state_dict(weights)
        return model.eval()
    with torch.random.fork_rng(devices=[]):  # the adapters' init draws must not move the training RNG
        model = load_pretrained(cfg.model["pretrained"], torch_dtype=torch.float32)
        model.add_adapter(peft_config(cfg.train.lora), adapter_name=ADAPTER)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    absent = [k for k in missing if ".lora_" in k]
    if unexpected or absent:
        raise RuntimeError(f"adapter weights do not fit the model: unexpected {unexpected[:3]}, missing {absent[:3]}")
    return model.eval()


# ---- adapters out ---------------------------------------------------------------------------------------------
def save_adapter(directory: str | Path, model, weights: dict[str, torch.Tensor], base: str | None = None) -> Path:
    """Write the adapter ``weights`` (the trainer's names, ``...lora_A.default.weight``) of ``model``'s peft adapter
    to ``directory/pytorch_lora_weights.safetensors`` in diffusers' LoRA format; returns the file."""
    from diffusers.loaders import WanLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(model, state_dict=weights, adapter_name=ADAPTER)
    metadata = model.peft_config[ADAPTER].to_dict()
    metadata["base_model_name_or_path"] = base
    WanLoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=metadata, weight_name=WEIGHT_NAME)
    return Path(directory) / WEIGHT_NAME


def _lora_file(path: Path) -> tuple[Path, str | None]:
    """``(folder, weight file name)`` of a LoRA given as its file or a folder holding one ``.safetensors``."""
    if path.is_file():
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA {path}: no such file or directory.")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if WEIGHT_NAME in files:
        return path, WEIGHT_NAME
    if len(files) != 1:
        raise FileNotFoundError(f"LoRA {path}: expected {WEIGHT_NAME} or one .safetensors file, found "
                                f"{files or 'none'}; pass the file itself.")
    return path, files[0]


def _adapter_base(file: Path) -> str | None:
    """The base model a LoRA file names in its ``lora_adapter_metadata`` header (None if it names none)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    return header.get(f"{PREFIX}.base_model_name_or_path")


def _card(repo_id: str, base: str | None) -> str:
    """A Hub model card for an adapter: what it is, its base, and how diffusers and stdit load it."""
    base_line = f"base_model: {base}\n" if base and not Path(base).exists() else ""
    return (f"---\nlibrary_name: diffusers\n{base_line}tags:\n- lora\n- wan\n- stdit\n---\n\n"
            f"# {repo_id}\n\nA LoRA adapter for {base or 'a Wan / StDiT transformer'}, trained with stdit, in "
            f"diffusers' LoRA format (`{WEIGHT_NAME}`).\n\n```python\n"
            f"pipe.load_lora_weights(\"{repo_id}\")               # a diffusers WanPipeline\n"
            f"model.load_lora_adapter(\"{repo_id}\", weight_name=\"{WEIGHT_NAME}\")  # a StDiT\n```\n")


def push_adapter(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                 message: str = "Upload LoRA adapter") -> str:
    """Upload a trainer's adapter folder (``pytorch_lora_weights.safetensors``, its ``scheduler_config.json`` and
    ``README.md`` if present, else a generated model card) to the Hub repo ``repo_id``; returns the commit URL.
    The file is read as diffusers reads a LoRA first, so a damaged or foreign file is refused before uploading."""
    import tempfile

    import huggingface_hub as hf
    from diffusers.loaders import WanLoraLoaderMixin

    folder, weight_name = _lora_file(Path(folder))
    try:
        state = WanLoraLoaderMixin.lora_state_dict(str(folder), weight_name=weight_name, use_safetensors=True)
        base = _adapter_base(folder / weight_name)
    except Exception as e:
        raise ValueError(f"{folder / weight_name} is not a readable LoRA file ({e}); nothing was uploaded.") from None
    if not any(".lora_" in k or ".lora." in k for k in state):
        raise ValueError(f"{folder / weight_name} holds no LoRA weights; nothing was uploaded.")
    with tempfile.TemporaryDirectory() as stage:
        stage = Path(stage)
        shutil.copy2(folder / weight_name, stage / weight_name)
        for name in ("scheduler_config.json", "README.md"):
            if (folder / name).is_file():
                shutil.copy2(folder / name, stage / name)
        if not (stage / "README.md").exists():
            (stage / "README.md").write_text(_card(repo_id, base))
        hf.create_repo(repo_id, private=private, token=token, exist_ok=True)
        return str(hf.upload_folder(repo_id=repo_id, folder_path=str(stage), token=token, commit_message=message))


def merge_lora(base: str | None, lora: str | Path, scale: float = 1.0):
    """``base`` (default: the base the adapter file names) with the LoRA ``lora`` added into its weights: a plain
    StDiT (no peft layers left). Takes diffusers' LoRA format and the Wan formats diffusers converts."""
    from diffusers.loaders import WanLoraLoaderMixin

    folder, weight_name = _lora_file(Path(lora))
    base = base or _adapter_base(folder / weight_name)
    if not base:
        raise ValueError(f"LoRA {lora} does not name its base model; pass --base (a directory or Hub repo id).")
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(folder), weight_name=weight_name, use_safetensors=True,
                                                         return_lora_metadata=True)
    model = load_pretrained(base, what="base model")
    dtype = model.proj_out.weight.dtype
    model.float()  # merged in fp32, then written in the base's dtype
    # WanPipeline's files (and the trainer's) keep the transformer's keys under "transformer."; a model's own
    # save_lora_adapter writes them bare
    prefix = PREFIX if any(k.startswith(PREFIX + ".") for k in state) else None
    model.load_lora_adapter(state, prefix=prefix, adapter_name="merge", metadata=metadata)
    if not adapter_parameters(model):
        raise ValueError(f"LoRA {lora}: none of its keys name a layer of the model {base}.")
    model.fuse_lora(lora_scale=scale, adapter_names=["merge"])
    model.unload_lora()
    keep = model._keep_in_fp32_modules or []
    for name, p in model.named_parameters():
        if not any(m in name.split(".") for m in keep):
            p.data = p.data.to(dtype)
    return model.eval(), base


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Merge a LoRA adapter into its base model and write the full model (save_pretrained, "
                     "safetensors); the output directory must not exist yet, so no input is ever overwritten.")
    p.add_argument("lora", help="the adapter: a training run's model/ folder, a folder with one .safetensors file, "
                                "or the file (diffusers' LoRA format, or a Wan format diffusers converts)")
    p.add_argument("out", help="new directory for the merged model (StDiT.from_pretrained loads it)")
    p.add_argument("--base", default=None, help="the base model (directory, checkpoint or Hub repo id); default: the "
                                                "base named in the adapter file")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1.0)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def run(args: argparse.Namespace) -> int:
    from stdit.cli import format_size

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; merge-lora writes a new directory and never overwrites one.")
    model, base = merge_lora(args.base, args.lora, args.scale)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # written beside the target and renamed into place: a killed merge leaves no half-written model
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=args.max_shard_size)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {base} + {args.lora} (scale {args.scale:g}), {format_size(size)}")
    return 0
