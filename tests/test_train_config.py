"""The trainer's config: sections, dotted overrides, and clear errors for unknown keys and bad values."""

import pytest

from stdit.cli import main
from stdit.train_config import build_config, load_train_config, parse_overrides

MODEL = {"patch_size": [1, 4, 4], "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 3,
         "out_channels": 3, "text_dim": None, "ffn_dim": 64, "num_layers": 1, "num_classes": 4}


def test_tiny_config_loads_with_every_section():
    cfg = load_train_config("tiny")
    assert cfg.data.kind == "synthetic" and cfg.train.output_dir == "runs/tiny"
    assert cfg.parallel.sp == 1 and cfg.parallel.dp_shard == -1 and cfg.parallel.dp_replicate == 1
    assert cfg.model["num_classes"] == 4


def test_dotted_overrides_are_typed():
    cfg = build_config({"model": MODEL}, ["train.lr=3e-4", "train.steps=7", "data.buckets=[[4,16,16]]",
                                          "diffusion.shift=3", "train.attention_backend=eager",
                                          "sample.formats=[gif]", "model.num_layers=2"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.data.buckets == [[4, 16, 16]] and cfg.diffusion.shift == 3.0
    assert cfg.train.attention_backend == "eager" and cfg.sample.formats == ["gif"] and cfg.model["num_layers"] == 2
    assert parse_overrides(["train.resume=none"]) == [(["train", "resume"], "none")]


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"unknown key\(s\) train.lrr; valid keys in 'train': output_dir, steps, batch_size, .*lr"),
    ("optim.lr=1", r"unknown section\(s\) \['optim'\]; valid sections: model, data, diffusion, train"),
    ("model.depth=3", r"unknown model key\(s\) \['depth'\]; valid keys: patch_size"),
    ("train.lr=-1", r"train.lr: -1.0 is out of range; valid range is \[0.0, inf\]"),
    ("train.ema_decay=1.5", r"train.ema_decay: 1.5 is out of range; valid range is \[0.0, 1.0\]"),
    ("train.steps=abc", r"train.steps: got 'abc' \(str\); expected int"),
    ("train.steps=2.5", r"train.steps: got 2.5 \(float\); expected int"),
    ("train.progress=1", r"train.progress: got 1 \(int\); expected bool"),
    ("parallel.mode=zero", r"parallel.mode: 'zero' is not one of \['auto', 'ddp', 'fsdp', 'none'\]"),
    ("data.kind=video_folder", r"data.kind=video_folder needs data.root"),
    ("sample.formats=[avi]", r"sample.formats has 'avi'; valid formats: mp4, gif"),
    ("data.buckets=[[4,16]]", r"data.buckets entries must be \[frames, height, width\]"),
    ("trainlr=1", r"must look like section.key=value"),
])
def test_bad_keys_and_values_get_one_clear_error(override, message):
    with pytest.raises(ValueError, match=message):
        build_config({"model": MODEL}, [override])


def test_cli_reports_config_errors_without_a_traceback(capsys):
    assert main(["train", "tiny", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "valid keys in 'train'" in err and "Traceback" not in err
    assert main(["train"]) == 2
    assert "give one config" in capsys.readouterr().err


def test_cli_help_and_key_listing(capsys):
    for cmd in ("train", "sample", "encode"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "section.key=value" in out and "--model" in out and "--videos" in out
    assert main(["train", "--list-keys"]) == 0
    assert "parallel.dp_replicate = 1" in capsys.readouterr().out
