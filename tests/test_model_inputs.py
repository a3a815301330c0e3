"""Model inputs, configs and model files that used to be accepted and silently wrong (issue 36, sections 3-4)."""

import json
import math
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import rel_err, tiny_model
from stdit import CheckpointError, StDiT
from stdit.attention import as_keep_mask, attention
from stdit.rope import axis_split

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _batch(L=7, real=4):
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, L, 24, generator=g)
    keep = torch.zeros(2, L, dtype=torch.bool)
    keep[:, :real] = True
    return x, torch.tensor([10.0, 500.0]), text, keep


# ---- key padding masks --------------------------------------------------------------------------------
def test_additive_float_mask_means_what_it_says(model):
    x, t, text, keep = _batch()
    ref = model(x, t, text[:, :4]).sample  # the real tokens only
    additive = torch.zeros(2, 7).masked_fill(~keep, float("-inf"))
    finfo_min = torch.zeros(2, 7).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        for mask in (keep, additive, finfo_min, keep.long()):
            assert rel_err(model(x, t, text, encoder_attention_mask=mask).sample, ref) < 1e-5, mask.dtype


def test_float_mask_that_is_not_additive_is_refused(model):
    x, t, text, keep = _batch()
    with pytest.raises(ValueError, match=r"encoder_attention_mask is a float mask, read as additive .* holds 1"):
        model(x, t, text, encoder_attention_mask=keep.float())


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_attention_reads_additive_masks(backend):
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    additive = torch.zeros(2, 6).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive, backend=backend), attention(q, k, v, keep, backend=backend))
    assert as_keep_mask(additive).equal(keep) and as_keep_mask(keep.int()).equal(keep)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_in_a_padded_text_token_cannot_leak(model, poison):
    x, t, text, keep = _batch()
    clean = model(x, t, text, encoder_attention_mask=keep).sample
    text = text.clone()
    text[:, 5] = poison
    out = model(x, t, text, encoder_attention_mask=keep).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean)


# ---- timesteps, unused inputs, dtypes -----------------------------------------------------------------
@pytest.mark.parametrize("timestep", [-1.0, 1000.5, 1e4, float("nan"), float("inf")])
def test_timestep_off_the_schedule_is_refused(model, timestep):
    x, _, text, _ = _batch()
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\]"):
        model(x, torch.tensor([timestep, 10.0]), text)


def test_timesteps_as_diffusers_passes_them(model):
    x, _, text, _ = _batch()
    with torch.no_grad():
        as_float = model(x, torch.tensor([0.0, 1000.0]), text).sample
        for t in (torch.tensor([0, 1000]), torch.tensor([0, 1000], dtype=torch.float64), [0, 1000]):
            torch.testing.assert_close(model(x, torch.as_tensor(t), text).sample, as_float)
        model(x, 999, text)  # a Python int, as UniPC's int64 timesteps give after .item()


def test_bool_timestep_is_refused(model):
    x, _, text, _ = _batch()
    with pytest.raises(ValueError, match="timestep must be a real number"):
        model(x, torch.tensor([True, False]), text)


def test_inputs_a_model_would_ignore_are_refused():
    x = torch.randn(1, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="encoder_hidden_states was passed, but this model has no text"):
        tiny_model(text_dim=None)(x, 10.0, torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="class_labels were passed, but this model has no classes"):
        tiny_model()(x, 10.0, torch.randn(1, 3, 24), class_labels=torch.tensor([1]))
    with pytest.raises(ValueError, match="encoder_attention_mask was passed without encoder_hidden_states"):
        tiny_model(text_dim=None)(x, 10.0, encoder_attention_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"condition was passed, but this model takes no condition channels"):
        tiny_model()(x, 10.0, torch.randn(1, 3, 24), condition=torch.randn(1, 5, 2, 4, 4))


def test_integer_inputs_are_refused_and_float64_is_cast(model):
    x, t, text, keep = _batch()
    with pytest.raises(ValueError, match="hidden_states must be a floating-point tensor; got torch.int64"):
        model(x.long(), t, text)
    with pytest.raises(ValueError, match="encoder_hidden_states must be a floating-point tensor; got torch.int32"):
        model(x, t, text.int())
    with torch.no_grad():
        out = model(x.double(), t.double(), text.double(), encoder_attention_mask=keep).sample
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, model(x, t, text, encoder_attention_mask=keep).sample)


@pytest.mark.parametrize("head_dim", [5, 7, 1])
def test_head_dim_wan_rope_cannot_split(head_dim):
    with pytest.raises(ValueError, match=f"attention_head_dim={head_dim} cannot be split into three even"):
        axis_split(head_dim)
    with pytest.raises(ValueError, match=f"attention_head_dim={head_dim} cannot be split"):
        tiny_model(attention_head_dim=head_dim)


@pytest.mark.parametrize("key, value, msg", [
    ("num_layers", "2", r"num_layers='2' \(str\): must be an int >= 1"),
    ("num_layers", -1, r"num_layers=-1 \(int\): must be an int >= 1"),
    ("attention_head_dim", 16.0, r"attention_head_dim=16.0 \(float\): must be an int"),
    ("eps", float("nan"), r"eps=nan \(float\): must be a finite number > 0"),
    ("patch_size", 2, r"patch_size=2 \(int\): must be three ints >= 1"),
    ("text_dim", "24", r"text_dim='24' \(str\): must be null or an int >= 1"),
    ("cross_attn_norm", "yes", r"cross_attn_norm='yes' \(str\): must be true or false"),
])
def test_config_values_of_the_wrong_type(key, value, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_model(**{key: value})


# ---- model files ----------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path, model):
    d = tmp_path / "m"
    model.save_pretrained(d)
    return d


def _flip_byte_in(path, tensor: str):
    with safe_open(str(path), "pt") as f:
        assert tensor in f.keys()
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + n])[tensor]["data_offsets"]
    raw[8 + n + (start + end) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


def test_save_pretrained_stores_tensor_checksums_in_a_plain_safetensors_file(saved, model):
    assert sorted(os.listdir(saved)) == ["config.json", WEIGHTS]
    with safe_open(str(saved / WEIGHTS), "pt") as f:
        crcs = json.loads(f.metadata()["stdit.crc32"])
        assert f.metadata()["format"] == "pt"
    assert set(crcs) == set(model.state_dict())
    sd = load_file(saved / WEIGHTS)  # still a plain safetensors file
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_byte_flipped_tensor_is_detected(saved):
    _flip_byte_in(saved / WEIGHTS, "proj_out.weight")
    with pytest.raises(CheckpointError, match=r"do not match the CRC-32 .*: proj_out.weight\. Re-download"):
        StDiT.from_pretrained(saved)
    StDiT.from_pretrained(saved, verify_checksums=False)  # asked for: loads the corrupt weights


def test_byte_flip_in_a_shard_is_detected(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = index["weight_map"]["blocks.1.ffn.net.0.proj.weight"]
    _flip_byte_in(tmp_path / shard, "blocks.1.ffn.net.0.proj.weight")
    with pytest.raises(CheckpointError, match=rf"{shard}: blocks.1.ffn.net.0.proj.weight"):
        StDiT.from_pretrained(tmp_path)


def test_unstamped_files_still_load(saved):
    """What is not detected: a file without stored checksums (written by diffusers' Wan or another tool)."""
    sd = load_file(saved / WEIGHTS)
    save_file(sd, saved / WEIGHTS, metadata={"format": "pt"})
    assert StDiT.from_pretrained(saved) is not None


def test_int_tensor_in_a_float_slot_is_an_error(saved):
    sd = load_file(saved / WEIGHTS)
    sd["proj_out.weight"] = torch.full_like(sd["proj_out.weight"], 3, dtype=torch.int32)
    save_file(sd, saved / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"integer or bool tensors where the model has float parameters: "
                                              r".*proj_out.weight \(I32\)"):
        StDiT.from_pretrained(saved)


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["STDIT_TEST_PWNED"],))


def test_pickle_weights_are_refused_and_never_loaded(tmp_path, monkeypatch, model):
    d = tmp_path / "m"
    model.save_pretrained(d, safe_serialization=False)
    assert (d / "diffusion_pytorch_model.bin").exists()
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("STDIT_TEST_PWNED", str(pwned))
    (d / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match=r"holds only pickle weights \(diffusion_pytorch_model.bin\)\. "
                                              r"StDiT loads safetensors only"):
        StDiT.from_pretrained(d)
    with pytest.raises(CheckpointError, match="safetensors weights only"):
        StDiT.from_pretrained(d, use_safetensors=False)
    assert not pwned.exists()


def test_push_from_save_pretrained_uploads_stamped_files(monkeypatch, tmp_path, model):
    import diffusers.models.modeling_utils as mu
    import diffusers.utils.hub_utils as hu

    uploaded = {}

    class _Repo:
        repo_id = "stdit-test/stamped"

    def upload_folder(repo_id, folder_path, **kwargs):
        with safe_open(os.path.join(folder_path, WEIGHTS), "pt") as f:
            uploaded["metadata"] = f.metadata()

    monkeypatch.setattr(mu, "create_repo", lambda repo_id, **kw: _Repo())
    monkeypatch.setattr(hu, "create_repo", lambda repo_id, **kw: _Repo())
    monkeypatch.setattr(hu, "upload_folder", upload_folder)
    monkeypatch.setattr(mu, "load_or_create_model_card", lambda *a, **k: hu.ModelCard(""), raising=False)
    monkeypatch.setattr(mu, "populate_model_card", lambda card, *a, **k: card, raising=False)
    model.save_pretrained(str(tmp_path / "m"), push_to_hub=True, repo_id="stdit-test/stamped")
    assert "stdit.crc32" in uploaded["metadata"]


# ---- config.json ------------------------------------------------------------------------------------------
def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("field", ["num_layers", "rope_theta", "eps", "attention_mode"])
def test_config_missing_a_field_is_refused(saved, field):
    _edit_config(saved, lambda c: c.pop(field))
    with pytest.raises(CheckpointError, match=rf"config.json: missing {field} \(StDiT's defaults"):
        StDiT.from_pretrained(saved)


def test_config_missing_a_field_loads_with_strict_false(saved, model):
    _edit_config(saved, lambda c: c.pop("rope_theta"))
    with pytest.warns(UserWarning, match="missing rope_theta"):
        loaded = StDiT.from_pretrained(saved, strict=False)
    assert loaded.config.rope_theta == 10000.0


def test_config_with_an_unknown_field_is_refused(saved):
    _edit_config(saved, lambda c: c.update(num_layer=4))
    with pytest.raises(CheckpointError, match=r"unknown field 'num_layer' \(did you mean 'num_layers'\?\)"):
        StDiT.from_pretrained(saved)


def test_config_with_a_string_for_an_int_names_the_file(saved):
    _edit_config(saved, lambda c: c.update(num_attention_heads="2"))
    with pytest.raises(CheckpointError, match=r"config.json: num_attention_heads='2' \(str\): must be an int >= 1"):
        StDiT.from_pretrained(saved)


def test_config_saved_before_the_image_branch_still_loads(saved, model):
    _edit_config(saved, lambda c: [c.pop(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")])
    loaded = StDiT.from_pretrained(saved)
    assert loaded.config.image_dim is None
    x, t, text, _ = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text).sample, model(x, t, text).sample)


def test_fields_passed_to_from_pretrained_count_as_present(saved):
    _edit_config(saved, lambda c: c.pop("rope_theta"))
    assert math.isclose(StDiT.from_pretrained(saved, rope_theta=10000.0).config.rope_theta, 1e4)


def test_byte_flip_in_the_hub_cache_is_detected(monkeypatch, hub_cache, model):
    from pathlib import Path

    import diffusers.models.modeling_utils as mu
    import diffusers.utils.hub_utils as hu
    from test_hub import _fake_upload_to_cache, _Repo

    monkeypatch.setattr(mu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "upload_folder", _fake_upload_to_cache(Path(hub_cache)))
    model.push_to_hub("stdit-test/flipped")
    StDiT.from_pretrained("stdit-test/flipped")
    cached = next(Path(hub_cache, "models--stdit-test--flipped", "snapshots").glob(f"*/{WEIGHTS}"))
    _flip_byte_in(cached, "scale_shift_table")
    with pytest.raises(CheckpointError, match=r"CRC-32 .*: scale_shift_table\."):
        StDiT.from_pretrained("stdit-test/flipped")


def test_config_of_a_model_converted_from_wan_loads(saved):
    _edit_config(saved, lambda c: c.update(rope_max_seq_len=1024))  # kept by from_wan; StDiT ignores it
    assert StDiT.from_pretrained(saved) is not None
