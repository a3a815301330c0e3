"""Wan compatibility: random diffusers Wan models convert to StDiT with the same outputs, and back."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from helpers import rel_err
from stdit import StDiT
from stdit.convert import from_wan, stdit_config_to_wan, to_wan

CONFIGS = [
    # (head_dim, heads, layers, patch, (T, H, W), cross_attn_norm)
    (12, 2, 2, (1, 2, 2), (3, 6, 10), True),
    (64, 2, 2, (1, 2, 2), (5, 6, 4), True),
    (64, 1, 1, (1, 2, 2), (1, 2, 2), False),
    (12, 3, 2, (2, 2, 2), (4, 6, 2), True),
]


def random_wan(head_dim, heads, layers, patch, cross_attn_norm, seed=0):
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(patch_size=patch, num_attention_heads=heads, attention_head_dim=head_dim,
                                in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=48,
                                num_layers=layers, cross_attn_norm=cross_attn_norm)
    with torch.no_grad():  # perturb the zero-initialized tensors too, so every weight matters
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return wan.eval()


def inputs(thw, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, *thw, generator=g)
    return x, torch.tensor([13.0, 871.0]), torch.randn(2, 7, 32, generator=g)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"d{c[0]}h{c[1]}L{c[2]}p{''.join(map(str, c[3]))}")
def test_from_wan_matches_outputs(cfg):
    head_dim, heads, layers, patch, thw, can = cfg
    wan = random_wan(head_dim, heads, layers, patch, can)
    ours = StDiT.from_wan(wan).eval()
    x, t, text = inputs(thw)
    with torch.no_grad():
        ref, out = wan(x, t, text).sample, ours(x, t, text).sample
    err = rel_err(out, ref)
    print(f"parity {cfg}: rel err {err:.2e}")
    assert err <= 1e-5
    for backend in ("eager", "sdpa"):
        ours.set_attention_backend(backend)
        with torch.no_grad():
            assert rel_err(ours(x, t, text).sample, ref) <= 1e-5


def test_reverse_export_loads_into_diffusers_strictly(tmp_path):
    torch.manual_seed(3)
    ours = StDiT(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                 text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2).eval()
    wan = to_wan(ours).eval()
    x, t, text = inputs((3, 4, 6))
    with torch.no_grad():
        assert rel_err(wan(x, t, text).sample, ours(x, t, text).sample) <= 1e-5
    wan.save_pretrained(tmp_path / "wan")
    loaded, info = WanTransformer3DModel.from_pretrained(tmp_path / "wan", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert json.loads((tmp_path / "wan" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"


def test_from_wan_directory_and_pipeline_layout(tmp_path):
    wan = random_wan(12, 2, 2, (1, 2, 2), True)
    wan.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    x, t, text = inputs((2, 4, 4))
    with torch.no_grad():
        ref = wan(x, t, text).sample
        for src in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
            assert rel_err(from_wan(str(src)).eval()(x, t, text).sample, ref) <= 1e-5


@pytest.mark.parametrize("flf2v", [False, True], ids=["i2v", "flf2v"])
def test_wan_image_to_video_branch_converts_with_the_same_outputs(flf2v, tmp_path):
    """Wan 2.1 I2V (CLIP image tokens through image key/value projections) and FLF2V (first and last frame, with a
    position embedding over both frames' tokens) convert both ways with diffusers' outputs."""
    torch.manual_seed(0)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=12, out_channels=4,
                                text_dim=32, freq_dim=32, ffn_dim=16, num_layers=2, image_dim=20,
                                added_kv_proj_dim=24, pos_embed_seq_len=8 if flf2v else None).eval()
    with torch.no_grad():
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = StDiT.from_wan(wan).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 12, 3, 8, 8, generator=g)
    text = torch.randn(1, 512, 32, generator=g)  # diffusers' Wan I2V splits off the image tokens as "all but 512"
    image = torch.randn(2 if flf2v else 1, 4, 20, generator=g)
    t = torch.tensor([400.0])
    with torch.no_grad():
        ref = wan(x, t, text, encoder_hidden_states_image=image).sample
        got = model(x, t, text, encoder_hidden_states_image=image).sample
        assert rel_err(got, ref) <= 1e-5
        model.fuse_qkv_projections()
        assert rel_err(model(x, t, text, encoder_hidden_states_image=image).sample, ref) <= 1e-5
        model.unfuse_qkv_projections()
        back = to_wan(model).eval()
        assert rel_err(back(x, t, text, encoder_hidden_states_image=image).sample, ref) <= 1e-5
    with pytest.raises(ValueError, match="image-to-video model: pass encoder_hidden_states_image"):
        model(x, t, text)
    plain = StDiT.from_wan(WanTransformer3DModel(num_attention_heads=1, attention_head_dim=12, in_channels=4,
                                                 out_channels=4, text_dim=32, freq_dim=32, ffn_dim=16, num_layers=1))
    with pytest.raises(ValueError, match="no image branch"):
        plain(torch.randn(1, 4, 1, 4, 4), t, text, encoder_hidden_states_image=image)


def test_export_refuses_what_wan_cannot_compute():
    m = StDiT(num_attention_heads=1, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=None,
              freq_dim=32, ffn_dim=16, num_layers=1, num_classes=3)
    with pytest.raises(ValueError, match="cannot be exported to Wan.*num_classes"):
        to_wan(m)


@pytest.mark.parametrize("name, expected", [("wan2.1-t2v-1.3b", 1_418_996_800), ("wan2.1-t2v-14b", None),
                                            ("wan2.2-ti2v-5b", 4_999_787_712), ("wan2.2-t2v-a14b", 14_288_491_584),
                                            ("wan2.2-i2v-a14b", 14_288_901_184), ("wan2.1-i2v-14b", 16_394_878_784),
                                            ("wan2.1-flf2v-14b", 16_395_536_704)])
def test_wan_config_parameter_counts(name, expected):
    with torch.device("meta"):
        ours = StDiT.from_config_file(name)
        wan = WanTransformer3DModel(**stdit_config_to_wan(dict(ours.config)))
    n_ours, n_wan = (sum(p.numel() for p in m.parameters()) for m in (ours, wan))
    print(f"{name}: {n_ours:,} parameters (diffusers {n_wan:,})")
    assert n_ours == n_wan
    if expected is not None:
        assert n_ours == expected
