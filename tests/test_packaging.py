"""The wheel a user gets from ``pip install`` holds every file the package reads.

``make`` installs in editable mode, which reads from the source tree, so a data file left out of
``[tool.setuptools.package-data]`` only shows up in a real install: this builds the wheel.
"""

from __future__ import annotations

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
    for name in ("pyproject.toml", "README.md"):
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
