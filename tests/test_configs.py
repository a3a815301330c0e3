import re
from pathlib import Path

import pytest
import torch
import yaml

from stdit import StDiT
from stdit.config import CONFIG_DIR, load_model_config, resolve_config_path

# configs that spell out an architecture (the LoRA recipes name a checkpoint instead: model.pretrained)
MODEL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")
                       if "model" in p.read_text() and "pretrained:" not in p.read_text())


def test_expected_configs_exist():
    for name in ("tiny", "stdit-S", "stdit-B", "stdit-L", "stdit-XL", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        assert name in MODEL_CONFIGS


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_config_builds(name):
    with torch.device("meta"):
        m = StDiT.from_config_file(name)
    n = sum(p.numel() for p in m.parameters())
    print(f"{name}: {n:,} parameters")
    assert n > 0 and m.config.num_layers == len(m.blocks)


def test_tiny_runs_on_cpu():
    m = StDiT.from_config_file("tiny")
    cfg = load_model_config("tiny")
    x = torch.randn(1, cfg["in_channels"], cfg["patch_size"][0], 32, 32)
    out = m(x, 500.0, class_labels=torch.tensor([1]) if cfg.get("num_classes") else None).sample
    assert out.shape == x.shape


def test_unknown_config_name_lists_known():
    with pytest.raises(FileNotFoundError, match="one of: .*tiny"):
        resolve_config_path("no-such-config")


def test_overrides():
    m = StDiT.from_config_file(Path(CONFIG_DIR / "tiny.yaml"), num_layers=1)
    assert len(m.blocks) == 1


# ---- bad YAML: one clear error each (file, line, key, what is valid), never a traceback ----------------------
MODEL_YAML = "model:\n  patch_size: [1, 4, 4]\n  num_attention_heads: 2\n  attention_head_dim: 16\n  num_layers: 1\n"


@pytest.mark.parametrize("text, overrides, message", [
    (MODEL_YAML + "train:\n  steps: 3\nmodel:\n  num_layers: 2\n", [],
     r"c.yaml:8: invalid YAML: duplicate key 'model' \(first written on line 1\)"),
    (MODEL_YAML + "train:\n  lr: 1.0e-4\n  lr: 3.0e-4\n", [],
     r"c.yaml:8: invalid YAML: duplicate key 'lr' \(first written on line 7\)"),
    (MODEL_YAML.replace("num_layers: 1", "num_layers: -1"), [],
     r"c.yaml:5: model.num_layers: got -1; must be an int >= 1"),
    (MODEL_YAML, ["model.num_layers=-1"], r"c.yaml: override model.num_layers: got -1; must be an int >= 1"),
    (MODEL_YAML.replace("[1, 4, 4]", "2"), [],
     r"c.yaml:2: model.patch_size: got 2; must be three ints >= 1, e.g. \[1, 2, 2\]"),
    (MODEL_YAML + "  eps: .nan\n", [], r"c.yaml:6: model.eps: got nan; must be a finite number > 0"),
    (MODEL_YAML + "  rope_theta: .inf\n", [], r"c.yaml:6: model.rope_theta: got inf; .*finite"),
    (MODEL_YAML + "train:\n  lr: .nan\n", [],
     r"c.yaml:7: train.lr: nan is not a finite number; valid range is \[0.0, inf\]"),
    (MODEL_YAML + "train:\n  lr: .inf\n", [], r"c.yaml:7: train.lr: inf is not a finite number"),
    (MODEL_YAML, ["diffusion.logit_mean=nan"], r"override diffusion.logit_mean: nan is not a finite number"),
    (MODEL_YAML, ["train.grad_clip=-.inf"], r"override train.grad_clip: -inf is not a finite number"),
    (MODEL_YAML + "train:\n  steps 3\n  lr: 1\n", [],
     r"c.yaml:8: invalid YAML: mapping values are not allowed here .*the line reads 'lr: 1'"),
    (MODEL_YAML + "train:\n\tsteps: 3\n", [], r"c.yaml:7: invalid YAML: found character '\\t'"),
    (MODEL_YAML + "data:\n  buckets: [[4, 16, 16]\n", [],
     r"c.yaml:8: invalid YAML: .*parsing a flow sequence that starts on line 7"),
    (MODEL_YAML, ["train.betas=[0.9,"], r"override 'train.betas=\[0.9,': invalid YAML"),
])
def test_bad_yaml_is_one_clear_error(tmp_path, capsys, text, overrides, message):
    from stdit.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["train", str(path), *overrides, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_model_config_file_errors_name_file_line_and_key(tmp_path):
    from stdit.config import ConfigError

    path = tmp_path / "m.yaml"
    path.write_text("model:\n  num_layers: 2\n  num_layers: 3\n")
    with pytest.raises(ConfigError, match=r"m.yaml:3: invalid YAML: duplicate key 'num_layers'"):
        StDiT.from_config_file(path)
    path.write_text("model:\n  attention_head_dim: 16\n  num_layers: 0\n")
    with pytest.raises(ConfigError, match=r"m.yaml:3: model.num_layers: got 0"):
        StDiT.from_config_file(path)
    path.write_text("model:\n  patch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"m.yaml:2: model.patch_size: got \[1, 2\]"):
        StDiT.from_config_file(path)


def test_valid_yaml_spellings_still_load(tmp_path):
    from stdit.train_config import load_train_config

    path = tmp_path / "ok.yaml"
    path.write_text(MODEL_YAML + "  eps: 1e-6\n  text_dim: null\ntrain:\n  lr: 3e-4\n")  # YAML 1.1 strings
    cfg = load_train_config(path, ["train.steps=5"])
    assert cfg.model["eps"] == 1e-6 and cfg.model["patch_size"] == (1, 4, 4) and cfg.train.lr == 3e-4
    from stdit.config import load_config

    assert yaml.safe_load(yaml.safe_dump(load_config(path))) == yaml.safe_load(path.read_text())
