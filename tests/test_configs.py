from pathlib import Path

import pytest
import torch

from stdit import StDiT
from stdit.config import CONFIG_DIR, load_model_config, resolve_config_path

MODEL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if "model" in p.read_text())


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
    x = torch.randn(1, cfg["in_channels"], 4, 32, 32)
    out = m(x, 500.0, class_labels=torch.tensor([1]) if cfg.get("num_classes") else None).sample
    assert out.shape == x.shape


def test_unknown_config_name_lists_known():
    with pytest.raises(FileNotFoundError, match="one of: .*tiny"):
        resolve_config_path("no-such-config")


def test_overrides():
    m = StDiT.from_config_file(Path(CONFIG_DIR / "tiny.yaml"), num_layers=1)
    assert len(m.blocks) == 1
