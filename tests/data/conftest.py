from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("blue", "green", "red")


def write_images(directory: Path, n: int, channel: int, seed: int, mode: str = "RGB", size: int = 12) -> list[Path]:
    """``n`` real PNG files whose colour says the class (``channel`` is bright)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        a = rng.integers(0, 80, (size, size, 3))
        a[..., channel] += 150
        img = Image.fromarray(a.astype(np.uint8))
        if mode != "RGB":
            img = img.convert(mode)
        p = directory / f"img_{i:03d}.png"
        img.save(p)
        out.append(p)
    return out


@pytest.fixture
def write_pngs():
    return write_images


@pytest.fixture
def image_tree(tmp_path):
    """``make(splits={"train": 6, ...}, root_classes=False)`` -> root of a generated image folder."""

    def make(splits: dict[str, int], *, flat: bool = False, name: str = "imgs") -> Path:
        root = tmp_path / name
        for s, (split, n) in enumerate(splits.items()):
            for ci, c in enumerate(CLASSES):
                d = root / c if flat else root / split / c
                write_images(d, n, ci, seed=100 * s + ci)
        return root

    return make
