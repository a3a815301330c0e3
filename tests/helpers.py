"""Small builders shared by the tests."""

import torch

from stdit import StDiT


def tiny_model(**overrides) -> StDiT:
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
               text_dim=24, freq_dim=32, ffn_dim=48, num_layers=2)
    cfg.update(overrides)
    torch.manual_seed(0)
    return StDiT(**cfg).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
