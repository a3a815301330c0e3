"""The README's first screen: install and test commands, and a usage snippet that runs exactly as written."""

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
CI = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_first_block_has_install_and_test_commands():
    first = _blocks("bash")[0]
    assert "pip install -e ." in first and "pytest" in first
    test_cmd = next(line.split("#")[0].strip() for line in first.splitlines() if "pytest" in line)
    assert test_cmd in CI.read_text()  # CI runs the README's test command verbatim


def test_quick_start_snippet_runs(tmp_path, capsys):
    snippet = _blocks("python")[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    shape, diff = capsys.readouterr().out.strip().rsplit(" ", 1)
    assert shape == "torch.Size([1, 4, 5, 8, 12])" and float(diff) < 1e-4
    assert (tmp_path / "stdit-demo" / "config.json").exists()
