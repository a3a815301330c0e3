import json
import re
import subprocess
import sys
import time

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


@pytest.mark.parametrize("cmd, option", [("convert", "--to"), ("push", "--private"), ("train", "--print-config")])
def test_subcommand_help(cmd, option):
    r = subprocess.run([sys.executable, "-m", "stdit", cmd, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage: stdit " + cmd in r.stdout and option in r.stdout, r.stderr


HEAVY = ("torch", "diffusers", "transformers", "peft", "huggingface_hub")


def _modules_after(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("\n")[-2].split()


def test_top_level_help_imports_no_subcommand_dependency():
    """`stdit --help` and the top-level parser come from COMMANDS alone (it took 5-8 s when it imported them all)."""
    loaded = _modules_after("import contextlib, io\nfrom stdit.cli import main\n"
                            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
                            "    main(['--help'])\n"
                            "assert all(c in out.getvalue() for c in ('train', 'sample', 'convert', 'bench'))")
    assert not [m for m in HEAVY if m in loaded]
    assert not [m for m in COMMANDS.values() if m[0] in loaded and m[0] != "stdit.cli"]


def test_import_stdit_is_light_and_its_names_load_on_use():
    assert not [m for m in HEAVY if m in _modules_after("import stdit")]
    # importing the submodule stdit.attention first leaves stdit.attention the function, as an eager import did
    code = ("import stdit.model, stdit\nfrom stdit import attention, StDiT, BACKENDS\nimport stdit.attention as a\n"
            "assert callable(attention) and a is attention is stdit.attention\n"
            "assert 'StDiT' in dir(stdit) and stdit.StDiTPipeline.__name__ == 'StDiTPipeline'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


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


# ---- user errors: one `error:` line from every subcommand, never a traceback ---------------------------------
def _one_error_line(capsys, pattern):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub lookup fails the test: local-path errors must come before (and instead of) Hub retries."""
    import diffusers.configuration_utils as cu
    import huggingface_hub

    def hub(*args, **kwargs):
        raise AssertionError(f"the Hub was asked for {args or kwargs}")

    for mod in (huggingface_hub, cu):
        for name in ("hf_hub_download", "snapshot_download"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, hub)


@pytest.mark.parametrize("src", ["{tmp}/no-such-wan", "./no-such-wan", "no-such-wan", "{tmp}/no-such.safetensors",
                                 "local/missing"])
def test_convert_missing_local_path_fails_at_once(tmp_path, monkeypatch, capsys, no_hub, src):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()  # `local/missing`: its first part is a local folder, so it is a local path
    src = src.format(tmp=tmp_path)
    t0 = time.perf_counter()
    assert main(["convert", src, str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 5
    _one_error_line(capsys, rf"error: source '{re.escape(src)}': no such local file or directory")
    assert not (tmp_path / "out").exists()


def test_convert_user_errors_are_one_line(tmp_path, capsys):
    from helpers import tiny_model

    tiny_model(text_dim=None, num_classes=3).save_pretrained(tmp_path / "cls")
    assert main(["convert", str(tmp_path / "cls"), str(tmp_path / "out"), "--to", "wan"]) == 2
    _one_error_line(capsys, r"cannot be exported to Wan")


def test_a_subcommand_error_outside_its_own_handling_is_one_line(tmp_path, capsys, monkeypatch):
    from helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["sample", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s.gif")]) == 2
    _one_error_line(capsys, r"corrupt or truncated")
    monkeypatch.setenv("STDIT_TRACEBACK", "1")  # for a bug report: the full traceback instead
    with pytest.raises(ValueError, match="corrupt or truncated"):
        main(["sample", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s.gif")])


def test_error_line_joins_multiline_messages():
    from stdit.cli import error_line

    assert error_line(OSError("not a folder\n\n  and not a repo id")) == "not a folder and not a repo id"
    assert error_line(ValueError()) == "ValueError"
