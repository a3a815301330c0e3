"""The built wheel holds the whole package: every subpackage, the YAML configs (stdit.configs) and the benchmark
scripts (stdit.benchmarks), and none of the committed benchmark results, so a non-editable install works with no
source checkout (.ci/run also installs the wheel and runs the main job from it)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_package_the_configs_and_the_benchmarks(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=600)
    (wheel,) = tmp_path.glob("stdit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src").rglob("__init__.py")}
    missing = sorted(f"{p}/__init__.py" for p in packages if f"{p}/__init__.py" not in names)
    assert not missing, f"subpackages left out of the wheel (add them to pyproject's packages): {missing}"
    for folder, pattern, pkg in (("configs", "*.yaml", "stdit/configs"), ("benchmarks", "*.py", "stdit/benchmarks")):
        files = sorted(p.name for p in (ROOT / folder).glob(pattern))
        assert files and all(f"{pkg}/{f}" in names for f in files), f"{folder}/{pattern} not all in the wheel"
    assert not any(n.startswith("stdit/benchmarks/results") for n in names)
