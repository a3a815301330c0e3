"""StDiT.from_single_file and `stdit convert` on Wan checkpoints in the original (Wan-AI repository) key layout.

diffusers ships only the original -> diffusers key conversion, so the original-layout files here are written with
the inverse of its rename table (ORIGINAL below); every test checks that diffusers' converter maps them back.
"""

import json
import pickle
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from helpers import rel_err
from stdit import StDiT
from stdit.cli import main
from stdit.hub import CheckpointError

# diffusers name -> original Wan name, the inverse of diffusers' TRANSFORMER_KEYS_RENAME_DICT (applied in order).
ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".add_k_proj.", ".k_img."), (".add_v_proj.", ".v_img."), (".norm_added_k.", ".norm_k_img."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    (".norm2.", ".norm3."),  # Wan names its norms norm1 (self-attn), norm3 (cross-attn), norm2 (FFN)
    (".scale_shift_table", ".modulation"),
]
TOP = {"scale_shift_table": "head.modulation", "proj_out.weight": "head.head.weight",
       "proj_out.bias": "head.head.bias"}


def original_layout(diffusers_state):
    out = {}
    for k, v in diffusers_state.items():
        new = TOP.get(k, k)
        for a, b in ORIGINAL:
            new = new.replace(a, b)
        out[new] = v.detach().clone().contiguous()
    return out


VARIANTS = {  # (heads, head dim, extra config)
    "t2v": (2, 12, {"in_channels": 4}),
    "i2v": (2, 12, {"in_channels": 12, "image_dim": 20, "added_kv_proj_dim": 24}),
    "flf2v": (2, 12, {"in_channels": 12, "image_dim": 20, "added_kv_proj_dim": 24, "pos_embed_seq_len": 8}),
}


def random_wan(variant, seed=0, cross_attn_norm=True, head_dim=None):
    heads, d, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    wan = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim or d, out_channels=4,
                                text_dim=32, freq_dim=32, ffn_dim=16, num_layers=2, cross_attn_norm=cross_attn_norm,
                                **extra)
    with torch.no_grad():  # perturb the zero-initialized tensors too, so every weight matters
        for p in wan.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return wan.eval()


def forward_pair(wan, model, variant):
    g = torch.Generator().manual_seed(2)
    c = wan.config.in_channels
    x = torch.randn(1, c, 3, 4, 6, generator=g)
    t = torch.tensor([400.0])
    if variant == "t2v":
        text, kw = torch.randn(1, 7, 32, generator=g), {}
    else:  # diffusers' Wan I2V takes "all but the last 512 tokens" as image tokens
        text = torch.randn(1, 512, 32, generator=g)
        kw = {"encoder_hidden_states_image": torch.randn(2 if variant == "flf2v" else 1, 4, 20, generator=g)}
    with torch.no_grad():
        return wan(x, t, text, **kw).sample, model(x, t, text, **kw).sample


def expected_config(wan):
    keys = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
            "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "qk_norm", "eps", "image_dim",
            "added_kv_proj_dim", "pos_embed_seq_len")
    return {k: tuple(wan.config[k]) if k == "patch_size" else wan.config[k] for k in keys}


def got_config(model):
    return {k: tuple(v) if k == "patch_size" else v for k, v in model.config.items() if k in expected_config_keys}


expected_config_keys = set(expected_config(random_wan("t2v")))


def write_sharded(state, directory: Path, n=2, config=None):
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    index = directory / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return index


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_layout_single_file_matches_diffusers(variant, tmp_path):
    wan = random_wan(variant)
    original = original_layout(wan.state_dict())
    assert not any("attn1" in k or "condition_embedder" in k for k in original)
    # the inverse map is right: diffusers' converter (plus the FLF2V key it leaves alone) gives the keys back
    back = convert_wan_transformer_to_diffusers(dict(original))
    back = {("condition_embedder.image_embedder.pos_embed" if k == "img_emb.emb_pos" else k) for k in back}
    assert back == set(wan.state_dict())
    save_file(original, str(tmp_path / "wan.safetensors"))
    model = StDiT.from_single_file(tmp_path / "wan.safetensors", num_attention_heads=2)
    assert got_config(model) == expected_config(wan)
    ref, got = forward_pair(wan, model, variant)
    assert rel_err(got, ref) <= 1e-5


def test_head_count_inferred_from_wan_head_dim_and_comfy_prefix(tmp_path):
    wan = random_wan("t2v", cross_attn_norm=False, head_dim=128)  # dim 256: 2 heads of Wan's 128
    original = {"model.diffusion_model." + k: v for k, v in original_layout(wan.state_dict()).items()}
    save_file(original, str(tmp_path / "wan.safetensors"))
    model = StDiT.from_single_file(str(tmp_path / "wan.safetensors"))
    assert got_config(model) == expected_config(wan)
    ref, got = forward_pair(wan, model, "t2v")
    assert rel_err(got, ref) <= 1e-5
    save_file(original_layout(random_wan("t2v").state_dict()), str(tmp_path / "w24.safetensors"))  # width 24
    with pytest.raises(CheckpointError, match="multiple of Wan's head dim 128: pass num_attention_heads"):
        StDiT.from_single_file(tmp_path / "w24.safetensors")
    assert StDiT.from_single_file(tmp_path / "w24.safetensors", attention_head_dim=12).config.num_attention_heads == 2


def test_sharded_index_and_directory_with_original_config(tmp_path):
    wan = random_wan("i2v")
    # a Wan-AI repo's config.json (original names) gives the head count and eps
    index = write_sharded(original_layout(wan.state_dict()), tmp_path / "repo",
                          config={"_class_name": "WanModel", "model_type": "i2v", "dim": 24, "num_heads": 2,
                                  "eps": 1e-6})
    for src in (index, tmp_path / "repo"):
        model = StDiT.from_single_file(src)
        assert got_config(model) == expected_config(wan)
        ref, got = forward_pair(wan, model, "i2v")
        assert rel_err(got, ref) <= 1e-5
    # a directory of shards without an index works too; a missing shard is named
    (tmp_path / "repo" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    assert rel_err(forward_pair(wan, StDiT.from_single_file(tmp_path / "repo"), "i2v")[1], ref) <= 1e-5
    (tmp_path / "repo" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shards \[2\] of 2 are missing"):
        StDiT.from_single_file(tmp_path / "repo")


def test_diffusers_layout_file_and_dtype(tmp_path):
    wan = random_wan("flf2v")
    save_file({k: v.contiguous() for k, v in wan.state_dict().items()}, str(tmp_path / "d.safetensors"))
    model = StDiT.from_single_file(tmp_path / "d.safetensors", num_attention_heads=2)
    assert got_config(model) == expected_config(wan)
    assert rel_err(forward_pair(wan, model, "flf2v")[1], forward_pair(wan, wan, "flf2v")[0]) <= 1e-5
    half = StDiT.from_single_file(tmp_path / "d.safetensors", torch_dtype=torch.bfloat16, num_attention_heads=2)
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert half.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules, as from_pretrained keeps them


def test_pickle_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("model.bin", "model.pth", "model.safetensors"):  # the last: a pickle under a safetensors name
        (tmp_path / name).write_bytes(pickle.dumps(Payload()))
        with pytest.raises(CheckpointError, match="safetensors only"):
            StDiT.from_single_file(tmp_path / name)
    assert not marker.exists()


def test_missing_and_unexpected_keys_named(tmp_path):
    original = original_layout(random_wan("t2v").state_dict())
    del original["blocks.1.ffn.2.bias"]
    original["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(original, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.ffn\.net\.2\.bias; "
                                              r"unexpected keys: blocks\.0\.attn1\.extra\.weight"):
        StDiT.from_single_file(tmp_path / "bad.safetensors", num_attention_heads=2)
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a Wan transformer checkpoint"):
        StDiT.from_single_file(tmp_path / "other.safetensors")


def test_wan22_animate_refused_clearly(tmp_path):
    original = original_layout(random_wan("t2v").state_dict())
    original["motion_encoder.enc.fc.0.weight"] = torch.zeros(2, 2)
    save_file(original, str(tmp_path / "animate.safetensors"))
    with pytest.raises(NotImplementedError, match="Wan 2.2 Animate"):
        StDiT.from_single_file(tmp_path / "animate.safetensors")


def test_convert_cli_takes_original_layout(tmp_path, capsys):
    wan = random_wan("t2v")
    write_sharded(original_layout(wan.state_dict()), tmp_path / "repo", config={"dim": 24, "num_heads": 2})
    assert main(["convert", str(tmp_path / "repo"), str(tmp_path / "ours")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class"] == "StDiT"
    ref, got = forward_pair(wan, StDiT.from_pretrained(tmp_path / "ours"), "t2v")
    assert rel_err(got, ref) <= 1e-5
    assert main(["convert", str(tmp_path / "repo"), str(tmp_path / "back"), "--to", "wan"]) == 0
    back = WanTransformer3DModel.from_pretrained(tmp_path / "back").eval()
    assert rel_err(forward_pair(wan, back, "t2v")[1], ref) <= 1e-5
    capsys.readouterr()
    (tmp_path / "model.bin").write_bytes(b"\x80\x04N.")
    assert main(["convert", str(tmp_path / "model.bin"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "safetensors only" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    animate = original_layout(wan.state_dict())
    animate["motion_encoder.enc.fc.0.weight"] = torch.zeros(2, 2)
    save_file(animate, str(tmp_path / "animate.safetensors"))
    assert main(["convert", str(tmp_path / "animate.safetensors"), str(tmp_path / "y")]) == 2
    assert "Wan 2.2 Animate" in capsys.readouterr().err
