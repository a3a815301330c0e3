"""The import structure the design promises: ``stdit.kernels`` stands alone (the package imports it, never the
other way round), so the kernels can be vendored or tested without the model code."""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "src" / "stdit" / "kernels"


def test_kernels_never_import_stdit():
    offenders = []
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] == "stdit"]
    assert not offenders, offenders
