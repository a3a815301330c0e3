"""Build diffusers' WanTransformer3DModel and a StDiT that shares its weights (no copy), for the benchmarks."""

from __future__ import annotations

import math

import torch


def random_wan_pair(config: str, device="cuda", dtype=torch.bfloat16, seed: int = 0):
    """(wan, ours): a randomly initialized Wan transformer of a ``configs/`` size and the StDiT holding the very
    same tensors (``StDiT.from_wan`` assigns them, so memory is not doubled and the weights cannot drift)."""
    from diffusers import WanTransformer3DModel

    from stdit import StDiT
    from stdit.config import load_model_config
    from stdit.convert import stdit_config_to_wan

    wcfg = stdit_config_to_wan(load_model_config(config))
    with torch.device("meta"):
        wan = WanTransformer3DModel(**wcfg)
    wan = wan.to(dtype)  # still on meta: cast before allocating, so a 14B model never exists in fp32
    wan.to_empty(device=device)
    wan.requires_grad_(True)
    torch.manual_seed(seed)
    dim = wcfg["num_attention_heads"] * wcfg["attention_head_dim"]
    with torch.no_grad():
        for name, p in wan.named_parameters():
            if "scale_shift_table" in name:
                p.normal_(0, dim**-0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.01)
            elif p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            else:
                p.fill_(1.0)
    # Wan's RoPE tables are non-persistent buffers that the meta build left empty.
    wan.rope = type(wan.rope)(wcfg["attention_head_dim"], wcfg["patch_size"], wcfg["rope_max_seq_len"]).to(device)
    wan = wan.eval()
    for name, param in wan.named_parameters():  # as from_pretrained(torch_dtype=...) leaves them
        if any(k in name.split(".") for k in wan._keep_in_fp32_modules):
            param.data = param.data.float()
    ours = StDiT.from_wan(wan).eval()
    return wan, ours


def model_flops(config: dict, grid: tuple[int, int, int], text_len: int, image_len: int = 0) -> float:
    """Forward FLOPs of one sample (matmuls and attention; elementwise work not counted). ``image_len``: Wan 2.1
    image-to-video's CLIP tokens (their own key/value projections and attention in each block's cross-attention,
    and the image embedder's two-layer MLP)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    s, layers, f = math.prod(grid), config["num_layers"], config["ffn_dim"]
    per_token = 2 * (4 * d * d + 2 * d * d + 2 * d * f)  # self q,k,v,o; cross q,o; FFN
    per_text = 2 * (2 * d * d) * text_len  # cross-attention k, v
    attn = 4 * s * s * d + 4 * s * text_len * d
    patch = math.prod(config["patch_size"])
    io = 2 * s * patch * (config["in_channels"] + config["out_channels"]) * d
    text_embed = 2 * text_len * (config["text_dim"] * d + d * d)
    per_image = 2 * (2 * d * d) * image_len + 4 * s * image_len * d
    image_embed = 2 * image_len * (config["image_dim"] ** 2 + config["image_dim"] * d) if image_len else 0
    return layers * (per_token * s + per_text + attn + per_image) + io + text_embed + image_embed
