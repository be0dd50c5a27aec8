"""Data containers shared by every loader: :class:`Split`, :class:`DataBundle`, seeded splits.

A split holds raw *items* (a sentence, an image file path, a PIL image or a uint8 array) and
integer labels; turning items into model inputs is the job of the model's preprocessing
(:mod:`s2a.zoo`). Every random choice (splits carved from a larger set, few-shot subsets) is a
pure function of an explicit seed, made with Python's ``random.Random`` (stable across Python,
NumPy and PyTorch versions).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DataBundle",
    "DataError",
    "Split",
    "carve",
    "labels_to_ids",
    "seeded_order",
    "split_fractions",
]

KINDS = ("text", "image")


class DataError(ValueError):
    """A dataset that cannot be found, read or understood; the message says what to do."""


def seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``(n, seed)``."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _take(items: Any, indices: Sequence[int]) -> Any:
    if isinstance(items, np.ndarray):
        return items[np.asarray(indices, dtype=np.int64)]
    take = getattr(items, "take", None)
    if callable(take) and not isinstance(items, (list, tuple)):
        return take(list(indices))
    return [items[i] for i in indices]


@dataclass
class Split:
    """Items and their integer labels (``0 <= label < num_classes``)."""

    items: Any  # list[str] | np.ndarray (N, H, W[, C]) uint8 | a lazy sequence with .take()
    labels: list[int]

    def __post_init__(self) -> None:
        self.labels = [int(v) for v in self.labels]
        if len(self.items) != len(self.labels):
            raise DataError(f"split has {len(self.items)} items but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> Split:
        return Split(_take(self.items, indices), [self.labels[i] for i in indices])

    def sample(self, n: int, seed: int) -> Split:
        """``n`` examples drawn without replacement, in a seeded order."""
        if n >= len(self):
            return self.subset(seeded_order(len(self), seed))
        return self.subset(seeded_order(len(self), seed)[:n])

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for v in self.labels:
            counts[v] += 1
        return counts


def carve(split: Split, n_out: int, seed: int) -> tuple[Split, Split]:
    """``(rest, carved)``: ``n_out`` examples taken out of ``split`` (seeded), the rest kept."""
    if not 0 < n_out < len(split):
        raise DataError(f"cannot carve {n_out} examples out of a split of {len(split)}")
    order = seeded_order(len(split), seed)
    return split.subset(sorted(order[n_out:])), split.subset(sorted(order[:n_out]))


def split_fractions(split: Split, fractions: tuple[float, float, float], seed: int) -> tuple[Split, Split, Split]:
    """Seeded train/val/test split of one pool by ``fractions`` (val and test at least 1 each)."""
    n = len(split)
    if n < 3:
        raise DataError(f"need at least 3 examples to make train/val/test splits, got {n}")
    n_val = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    if n_val + n_test >= n:
        raise DataError(f"{n} examples are too few for a {fractions} train/val/test split")
    order = seeded_order(n, seed)
    test = split.subset(sorted(order[:n_test]))
    val = split.subset(sorted(order[n_test : n_test + n_val]))
    train = split.subset(sorted(order[n_test + n_val :]))
    return train, val, test


_INTEGER = re.compile(r"[+-]?\d+(?:\.0*)?")  # "3", "-1", "3.0" (CSV writers turn int columns into floats)
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _parse_label(v: Any) -> int | str:
    """A class id (int) or a class name (str); ValueError says why ``v`` is neither."""
    if v is None or (isinstance(v, str) and not v.strip()):
        raise ValueError("is empty")
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            raise ValueError(f"is {v} (a missing value?)")
        if not float(v).is_integer():
            raise ValueError("is a fractional number; labels must be class ids (integers) or class names")
        return int(v)
    if isinstance(v, str):
        text = v.strip()
        if _INTEGER.fullmatch(text):
            return int(float(text))
        if _NUMBER.fullmatch(text) or text.lower() in ("nan", "inf", "-inf"):
            raise ValueError("is not an integer; labels must be class ids (integers) or class names")
        return text
    raise ValueError(f"is a {type(v).__name__}; labels must be class ids (integers) or class names")


def labels_to_ids(raw: Mapping[str, Sequence[Any]], *, where: str) -> tuple[dict[str, list[int]], list[str]]:
    """Map each split's raw labels to class ids; returns ``({split: ids}, class_names)``.

    The first split is the training split: the classes are the sorted distinct labels found
    there (integers in numeric order, named ``"0"``, ``"1"``..., so integer ids 0..k-1 are kept
    as they are), and every other split may use only those. Labels are all integers (``3`` and
    ``"3.0"`` are the same class) or all names; a mix of the two, an empty or fractional label,
    or fewer than two classes in training is an error, not a silent extra class.
    """
    if not raw:
        raise DataError(f"{where}: no labels")
    parsed: dict[str, list[int | str]] = {}
    for split, values in raw.items():
        out = parsed[split] = []
        for row, v in enumerate(values, 1):
            try:
                out.append(_parse_label(v))
            except ValueError as exc:
                raise DataError(f"{where}: {split} row {row}: label {v!r} {exc}") from None
    if len({type(v) for vs in parsed.values() for v in vs}) > 1:
        a = next(v for vs in parsed.values() for v in vs if isinstance(v, int))
        b = next(v for vs in parsed.values() for v in vs if isinstance(v, str))
        raise DataError(
            f"{where}: the labels mix integers (e.g. {a}) with names (e.g. {b!r}); "
            "use class ids or class names throughout"
        )
    train_split = next(iter(parsed))
    classes = sorted(set(parsed[train_split]))  # type: ignore[type-var]
    if len(classes) < 2:
        raise DataError(
            f"{where}: the {train_split} split holds {len(classes)} class ({classes}); a classifier "
            "needs at least 2. Is --label-column the right column?"
        )
    index = {c: i for i, c in enumerate(classes)}
    for split, values in parsed.items():
        unseen = sorted({v for v in values if v not in index}, key=str)
        if unseen:
            raise DataError(
                f"{where}: {split} labels {unseen[:5]} never occur in the {train_split} split, so no "
                f"model could learn them (its classes: {classes[:20]}); fix the labels or the splits"
            )
    return {split: [index[v] for v in values] for split, values in parsed.items()}, [str(c) for c in classes]


def complete_splits(
    train: Split, val: Split | None, test: Split | None, split_seed: int, notes: list[str]
) -> tuple[Split, Split, Split]:
    """Fill in missing validation / test splits from ``train`` (seeded, 10% each).

    A validation split without a labelled test split becomes the test split, so that the test
    examples are never the ones used for model selection.
    """
    if test is None and val is not None:
        test, val = val, None
        notes.append("no test split: the validation split is the test split")
    if test is None:
        train, test = carve(train, max(1, len(train) // 10), split_seed + 1)
        notes.append("no test split: 10% of train held out as test")
    if val is None:
        train, val = carve(train, max(1, len(train) // 10), split_seed)
        notes.append("no validation split: 10% of train held out as val")
    return train, val, test

@dataclass
class DataBundle:
    """A dataset ready for training: train / val / test splits and the class names.

    ``test`` is only ever used for the final evaluation; model selection uses ``val``.
    """

    name: str
    kind: str  # "text" | "image"
    classes: list[str]
    train: Split
    val: Split
    test: Split
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DataError(f"dataset kind must be one of {KINDS}, got {self.kind!r}")
        k = len(self.classes)
        if k < 2:
            raise DataError(f"{self.name}: a classification dataset needs at least 2 classes, found {k}")
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            if len(split) == 0:
                raise DataError(f"{self.name}: the {split_name} split is empty")
            bad = [v for v in split.labels if not 0 <= v < k]
            if bad:
                raise DataError(f"{self.name}: {split_name} label {bad[0]} is outside 0..{k - 1}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "train": len(self.train),
            "val": len(self.val),
            "test": len(self.test),
            "source": self.source,
            "notes": list(self.notes),
        }
