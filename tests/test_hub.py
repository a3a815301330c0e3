"""save_pretrained / from_pretrained (local dir, sharded, Hub cache layout) and push_to_hub, offline."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny_model
from stdit import StDiT


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([3.0, 500.0]), torch.randn(2, 5, 24, generator=g)


def _same_outputs(a, b):
    x, t, text = _inputs()
    with torch.no_grad():
        assert torch.equal(a(x, t, text).sample, b(x, t, text).sample)


def test_local_round_trip_is_bitwise(tmp_path):
    m = tiny_model(attention_mode="factorized", num_classes=3)
    m.set_attention_backend("eager")
    m.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attention_mode"] == "factorized" and config["_class_name"] == "StDiT"
    assert not any("backend" in k for k in config)  # runtime choices are never stored in the config
    loaded = StDiT.from_pretrained(tmp_path).eval()
    assert all(mod.backend is None for mod in loaded.modules() if hasattr(mod, "backend"))
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    m.set_attention_backend(None)
    _same_outputs(m, loaded)


def test_sharded_round_trip(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    _same_outputs(m, StDiT.from_pretrained(tmp_path).eval())


def test_bf16_load_keeps_fp32_modules(tmp_path):
    m = tiny_model()
    m.save_pretrained(tmp_path)
    low = StDiT.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert low.proj_out.weight.dtype == torch.bfloat16
    assert low.blocks[0].scale_shift_table.dtype == torch.float32  # kept in fp32 like Wan
    assert low.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32


def _fake_upload_to_cache(cache: Path):
    """Stand-in for the Hub upload: writes what a download would leave in the Hub cache."""
    def upload_folder(repo_id, folder_path, **kwargs):
        commit = "0123456789abcdef0123456789abcdef01234567"
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snap = repo / "snapshots" / commit
        shutil.copytree(folder_path, snap, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return f"https://hub.invalid/{repo_id}/commit/{commit}"
    return upload_folder


class _Repo:
    def __init__(self, repo_id):
        self.repo_id = repo_id


def test_push_to_hub_then_load_repo_id_offline(monkeypatch, hub_cache):
    import diffusers.models.modeling_utils as mu
    import diffusers.utils.hub_utils as hu

    monkeypatch.setattr(mu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "upload_folder", _fake_upload_to_cache(Path(hub_cache)))
    m = tiny_model()
    m.push_to_hub("stdit-test/tiny-push")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    _same_outputs(m, StDiT.from_pretrained("stdit-test/tiny-push").eval())


def test_cli_push_uploads_a_saved_dir(monkeypatch, hub_cache, tmp_path):
    import diffusers.models.modeling_utils as mu
    import diffusers.utils.hub_utils as hu

    from stdit.cli import main

    monkeypatch.setattr(mu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "create_repo", lambda repo_id, **kw: _Repo(repo_id))
    monkeypatch.setattr(hu, "upload_folder", _fake_upload_to_cache(Path(hub_cache)))
    m = tiny_model()
    m.save_pretrained(tmp_path / "m")
    assert main(["push", str(tmp_path / "m"), "stdit-test/cli-push", "--token", "hf_test"]) == 0
    _same_outputs(m, StDiT.from_pretrained("stdit-test/cli-push").eval())


def test_missing_repo_offline_is_a_clear_error():
    with pytest.raises(OSError):
        StDiT.from_pretrained("stdit-test/does-not-exist")


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))


def _refuse_upload(monkeypatch):
    import diffusers.models.modeling_utils as mu
    import diffusers.utils.hub_utils as hu

    def refuse(*args, **kwargs):
        raise AssertionError("push reached the Hub")

    for mod in (mu, hu):
        monkeypatch.setattr(mod, "create_repo", refuse)
    monkeypatch.setattr(hu, "upload_folder", refuse)


def test_cli_push_checks_for_a_token_first(monkeypatch, capsys, tmp_path, no_token):
    from stdit.cli import main

    _refuse_upload(monkeypatch)
    tiny_model().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(StDiT, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model before the token"))
    assert main(["push", str(tmp_path / "m"), "stdit-test/no-token"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token: log in with `hf auth login`") and err.count("\n") == 1, err


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "stdit-test/x", "--token", "hf_test"],
     r"missing is not a saved model directory \(no config.json\)"),
    (["{tmp}/m", "not a/valid/repo", "--token", "hf_test"], r"Repo id must"),
])
def test_cli_push_user_errors_are_one_line(monkeypatch, capsys, tmp_path, args, message):
    import re

    from stdit.cli import main

    _refuse_upload(monkeypatch)
    tiny_model().save_pretrained(tmp_path / "m")
    assert main(["push", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


@pytest.mark.parametrize("path", ["{tmp}/no-such-model", "./no-such-model", "~/no-such-stdit-model", "no-such-model",
                                  "{tmp}/no-such.safetensors"])
def test_from_pretrained_missing_local_path_says_so(tmp_path, monkeypatch, path):
    """Not diffusers' "couldn't connect to huggingface.co" after Hub retries: the path is named as missing."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    path = path.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such local file or directory") as e:
        StDiT.from_pretrained(path)
    assert path in str(e.value) and "connect" not in str(e.value)


def test_from_pretrained_dir_without_config_says_so(tmp_path):
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(FileNotFoundError, match=r"weights-only: no config.json, so not a model directory"):
        StDiT.from_pretrained(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match=r"transformer: no config.json"):
        StDiT.from_pretrained(tmp_path, subfolder="transformer")
