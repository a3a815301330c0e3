"""Every bad input gets one clear error that says what was wrong and how to fix it."""

import builtins
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_model
from stdit import CheckpointError, StDiT, attention_backend
from stdit.attention import attention


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_wrong_rank(model):
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\].*got shape \(4, 2, 4, 4\)"):
        model(torch.randn(4, 2, 4, 4), 1.0, torch.randn(1, 3, 24))


def test_wrong_channels(model):
    with pytest.raises(ValueError, match="has 3 channels; this model takes in_channels=4"):
        model(torch.randn(1, 3, 2, 4, 4), 1.0, torch.randn(1, 3, 24))


@pytest.mark.parametrize("shape, msg", [
    ((1, 4, 2, 5, 4), r"H \(height\)=5 is not divisible by the patch size 2; nearest valid sizes: 4 or 6"),
    ((1, 4, 2, 4, 1), r"W \(width\)=1 is not divisible by the patch size 2; nearest valid sizes: 2"),
])
def test_grid_not_divisible_names_nearest_sizes(model, shape, msg):
    with pytest.raises(ValueError, match=msg):
        model(torch.randn(shape), 1.0, torch.randn(1, 3, 24))


def test_frames_not_divisible():
    m = tiny_model(patch_size=(4, 2, 2))
    with pytest.raises(ValueError, match=r"T \(frames\)=6 is not divisible by the patch size 4; nearest valid sizes: 4 or 8"):
        m(torch.randn(1, 4, 6, 4, 4), 1.0, torch.randn(1, 3, 24))


def test_text_features_wrong_width(model):
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \[B=1, L, text_dim=24\]; got shape \(1, 3, 32\)"):
        model(torch.randn(1, 4, 2, 4, 4), 1.0, torch.randn(1, 3, 32))


def test_text_missing(model):
    with pytest.raises(ValueError, match="text-conditioned"):
        model(torch.randn(1, 4, 2, 4, 4), 1.0)


def test_timestep_batch_mismatch(model):
    with pytest.raises(ValueError, match=r"timestep must be a scalar or shape \[B\]=\[2\]; got shape \(3,\)"):
        model(torch.randn(2, 4, 2, 4, 4), torch.ones(3), torch.randn(2, 3, 24))


def test_text_mask_shape(model):
    with pytest.raises(ValueError, match="encoder_attention_mask must be"):
        model(torch.randn(1, 4, 2, 4, 4), 1.0, torch.randn(1, 3, 24), encoder_attention_mask=torch.ones(1, 4))


def test_class_label_out_of_range():
    m = tiny_model(text_dim=None, num_classes=3)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        m(torch.randn(1, 4, 2, 4, 4), 1.0, class_labels=torch.tensor([7]))


def test_missing_condition():
    m = tiny_model(condition_channels=5)
    with pytest.raises(ValueError, match="image-conditioned.*i2v_condition"):
        m(torch.randn(1, 4, 2, 4, 4), 1.0, torch.randn(1, 3, 24))


def test_bad_config_values():
    with pytest.raises(ValueError, match="attention_mode='spatial'"):
        tiny_model(attention_mode="spatial")
    with pytest.raises(ValueError, match=r"rope_axes_dim=\[4, 4, 4\] must be three even numbers summing to the head dim 16"):
        tiny_model(rope_axes_dim=(4, 4, 4))


def test_unknown_attention_backend(model):
    with pytest.raises(ValueError, match=r"Unknown attention backend 'flash3': StDiT takes auto, triton, sdpa, xformers, eager, fp8 \(stdit's\) or native"):
        model.set_attention_backend("flash3")
    with pytest.raises(ValueError, match="Unknown attention backend"):
        with attention_backend("nope"):
            pass


def test_missing_optional_dependency(monkeypatch):
    real_import = builtins.__import__

    def no_xformers(name, *args, **kwargs):
        if name.startswith("xformers"):
            raise ImportError("No module named 'xformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_xformers)
    q = torch.randn(1, 5, 2, 8)
    with pytest.raises(ImportError, match=r"needs xformers: pip install 'stdit\[xformers\]'"):
        attention(q, q, q, backend="xformers")


@pytest.fixture
def saved(tmp_path, model):
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    return d


def _rewrite(d, fn):
    f = d / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_checkpoint_missing_key(saved):
    _rewrite(saved, lambda sd: sd.pop("proj_out.weight"))
    with pytest.raises(CheckpointError, match="missing keys: proj_out.weight"):
        StDiT.from_pretrained(saved)
    assert StDiT.from_pretrained(saved, strict=False) is not None  # partial load is possible when asked for


def test_checkpoint_unexpected_key(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("blocks.9.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.9.extra"):
        StDiT.from_pretrained(saved)


def test_checkpoint_misshaped_key(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("proj_out.weight", torch.zeros(3, 3)))
    with pytest.raises(CheckpointError, match="proj_out.weight expected shape"):
        StDiT.from_pretrained(saved)


def test_config_mismatch_is_misshaped(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["ffn_dim"] = 64
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape"):
        StDiT.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_corrupt_safetensors(saved, damage):
    f = saved / "diffusion_pytorch_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" + data[9:])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        StDiT.from_pretrained(saved)


def test_unknown_model_config_key(tmp_path):
    from stdit.config import load_model_config

    p = tmp_path / "c.yaml"
    p.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ValueError, match=r"unknown model key\(s\) \['num_layer'\]; valid keys: patch_size"):
        load_model_config(p)
    assert os.path.exists(p)
