"""FP8 inference for StDiT: 8-bit attention in chosen blocks and timesteps, and FP8 linears through torchao.

Both are runtime choices, like the attention backend (never stored in the Hub config), and inference only.

* ``model.set_fp8_attention(FP8Attention(...))``: the blocks' self-attention (and, if asked, the text
  cross-attention) runs the 8-bit kernel of :mod:`stdit.kernels.attention_fp8` (INT8 Q/K with K smoothing, FP8 P/V)
  at the timesteps in ``[min_timestep, max_timestep]``; other calls keep the model's backend. ``"fp8"`` is also an
  attention backend of its own (``set_attention_backend("fp8")``, ``STDIT_ATTENTION=fp8``) for every attention.
* ``model.quantize_fp8()``: the linears of the transformer blocks become torchao's float8 linears (weights stored in
  FP8 e4m3 with one scale per output row, activations quantized per row on the fly, torch's ``_scaled_mm``); the
  patch and condition embeddings, the output projection and the modulation tables stay as they are, since their
  error reaches every token and they hold a small share of the matmuls. With ``device=`` the blocks move to the GPU
  one at a time, quantized as they arrive, so a model whose bf16 weights do not fit the GPU can still run there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stdit.checks import check_block_indices


@dataclass(frozen=True)
class FP8Attention:
    """Where the 8-bit attention runs.

    Args:
        layers: the block indices that use it (None: every block).
        min_timestep, max_timestep: the timesteps (0..1000) that use it, both ends included; calls outside keep the
            model's attention backend (the noisiest steps, where a video's layout is decided, can stay bf16).
        cross_attention: also the text (and image) cross-attention, not only the self-attention.
    """

    layers: tuple[int, ...] | None = None
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    cross_attention: bool = False

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        if not 0 <= float(self.min_timestep) <= float(self.max_timestep) <= 1000:
            raise ValueError(f"FP8Attention needs 0 <= min_timestep <= max_timestep <= 1000; got "
                             f"{self.min_timestep}, {self.max_timestep}.")

    def everywhere(self) -> bool:
        return self.min_timestep <= 0 and self.max_timestep >= 1000


class FP8Switch:
    """Shared by the attention layers of one model: whether the current call runs 8-bit attention (set by
    ``StDiT.forward`` from the call's timestep)."""

    def __init__(self, config: FP8Attention):
        self.config = config
        self.active = True

    def update(self, timestep: torch.Tensor) -> None:
        c = self.config
        # Read only when it can differ (one host sync); a batch is 8-bit only if every row's timestep is in range.
        self.active = c.everywhere() or bool(((timestep >= c.min_timestep) & (timestep <= c.max_timestep)).all())


def set_fp8_attention(model, config: FP8Attention | None) -> None:
    """See :meth:`stdit.model.StDiT.set_fp8_attention`."""
    if config is not None and not isinstance(config, FP8Attention):
        raise TypeError(f"set_fp8_attention takes a stdit.fp8.FP8Attention or None; got {type(config).__name__}.")
    if config is not None:
        check_block_indices("FP8Attention", config.layers, len(model.blocks))
    switch = FP8Switch(config) if config is not None else None
    model._fp8_switch = switch
    for i, block in enumerate(model.blocks):
        on = switch is not None and (config.layers is None or i in config.layers)
        block.attn1.fp8_switch = switch if on else None
        if block.attn2 is not None:
            block.attn2.fp8_switch = switch if on and config.cross_attention else None


# Top-level modules whose linears stay in their dtype: embeddings (patch, time, text, image), the output projection.
_KEEP = ("patch_embedding", "condition_embedder", "proj_out")


def fp8_linear_names(model: nn.Module) -> list[str]:
    """The linears :func:`quantize_fp8` converts: every ``nn.Linear`` inside the transformer blocks (attention
    projections, feed-forward, VACE blocks) whose sizes ``torch._scaled_mm`` takes (multiples of 16)."""
    names = []
    for name, m in model.named_modules():
        top = name.split(".", 1)[0]
        if (type(m) is nn.Linear and top in ("blocks", "vace_blocks") and top not in _KEEP
                and m.in_features % 16 == 0 and m.out_features % 16 == 0):
            names.append(name)
    return names


def _torchao():
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as e:
        raise ImportError("FP8 linears need torchao: pip install 'stdit[fp8]' (or pip install torchao).") from e
    return quantize_, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantize_fp8(model, device: torch.device | str | None = None) -> list[str]:
    """Convert the blocks' linears to torchao float8 (see the module docstring); returns their names.

    ``device``: move the model there, block by block (each quantized as it arrives). The linears must end up on a
    CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell). Refused on a model with LoRA adapters
    (merge them first: ``model.fuse_lora()`` or ``stdit merge-lora``) and on one already quantized."""
    if getattr(model, "_fp8_linears", None):
        raise ValueError("this model's linears are already FP8 (quantize_fp8 ran before).")
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError("quantize_fp8 would bypass the model's LoRA adapters; merge them first (model.fuse_lora() "
                         "or `stdit merge-lora`), then quantize.")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    if target.type != "cuda":
        raise RuntimeError(f"FP8 linears run on a CUDA GPU; the model is on {target}. Pass device='cuda' (the blocks "
                           "move there one at a time) or move the model first.")
    if torch.cuda.get_device_capability(target) < (8, 9):
        raise RuntimeError(f"FP8 linears need compute capability 8.9 or newer (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(target)} has {torch.cuda.get_device_capability(target)}.")
    quantize_, config = _torchao()
    names = set(fp8_linear_names(model))
    if device is not None:
        for name, child in model.named_children():
            if name not in ("blocks", "vace_blocks"):
                child.to(target)
        for p in model._parameters.values():
            if p is not None:
                p.data = p.data.to(target)
    for top in ("blocks", "vace_blocks"):
        blocks = getattr(model, top, None) or []
        for i, block in enumerate(blocks):
            block.to(target)
            prefix = f"{top}.{i}."
            quantize_(block, config, filter_fn=lambda m, fqn, p=prefix: p + fqn in names)
    model._fp8_linears = sorted(names)
    return model._fp8_linears


FP8_TRAINING_RECIPES = ("rowwise", "tensorwise")


def convert_fp8_training(model, recipe: str = "rowwise") -> list[str]:
    """Train the linears :func:`fp8_linear_names` lists in FP8: torchao's ``Float8Linear`` (the master weights stay
    in their dtype; inputs, weights and output gradients are cast to e4m3 per row or per tensor for each matmul).
    Call before sharding (FSDP2) and before ``torch.compile``, which fuses the casts (without it they run as
    separate ops and cost much of the gain). Returns the converted linears' names. The state dict is unchanged, so
    checkpoints and the exported model are the same as without FP8."""
    if recipe not in FP8_TRAINING_RECIPES:
        raise ValueError(f"FP8 training recipe {recipe!r}; choose one of {FP8_TRAINING_RECIPES}.")
    if any(type(m).__module__.startswith("peft.") for m in model.modules()):
        raise ValueError("FP8 training converts the frozen base linears under the LoRA adapters' wrappers; train "
                         "LoRA in bf16 (drop train.fp8_linears).")
    device = next(model.parameters()).device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"FP8 training needs compute capability 8.9 or newer (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}.")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ImportError("FP8 training needs torchao: pip install 'stdit[fp8]' (or pip install torchao).") from e
    names = set(fp8_linear_names(model))
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda m, fqn: fqn in names)
    return sorted(names)
