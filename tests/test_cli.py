import json
import subprocess
import sys

import pytest
import torch

from helpers import rel_err
from stdit import StDiT
from stdit.cli import COMMANDS, main


def test_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in ("train", "sample", "encode", "convert", "push"):
        assert name in out


@pytest.mark.parametrize("cmd", ["convert", "push"])
def test_subcommand_help(cmd):
    r = subprocess.run([sys.executable, "-m", "stdit", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: stdit " + cmd in r.stdout, r.stderr


def test_convert_cli_round_trip(tmp_path, capsys):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    wan = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                                text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2).eval()
    wan.save_pretrained(tmp_path / "wan")
    assert main(["convert", str(tmp_path / "wan"), str(tmp_path / "ours")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["class"] == "StDiT"
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to", "wan"]) == 0
    back = WanTransformer3DModel.from_pretrained(tmp_path / "back").eval()
    ours = StDiT.from_pretrained(tmp_path / "ours").eval()
    x, t, text = torch.randn(1, 4, 2, 4, 4), torch.tensor([300.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref = wan(x, t, text).sample
        assert rel_err(ours(x, t, text).sample, ref) <= 1e-5
        assert rel_err(back(x, t, text).sample, ref) <= 1e-5


def test_every_command_is_registered():
    assert set(COMMANDS) >= {"train", "sample", "encode", "convert", "push"}
