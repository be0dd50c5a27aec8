"""Hugging Face ``datasets``: a directory written by ``save_to_disk`` or ``hf:NAME[:CONFIG]``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .core import (
    DataBundle,
    DataError,
    Split,
    complete_splits,
    labels_to_ids,
    shared_items_note,
    split_fractions,
    texts_of,
)
from .text import LABEL_COLUMN_GUESSES, TEXT_COLUMN_GUESSES

__all__ = ["HF_INSTALL", "is_hf_disk_dir", "load_hf"]

HF_INSTALL = "pip install datasets"
IMAGE_COLUMN_GUESSES = ("image", "img", "picture", "pixel_values")
SPLIT_ALIASES = {
    "train": ("train",),
    "val": ("validation", "val", "valid", "dev"),
    "test": ("test",),
}


def is_hf_disk_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return (d / "dataset_dict.json").is_file() or (
        (d / "state.json").is_file() and (d / "dataset_info.json").is_file()
    )


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"Hugging Face datasets are read with the package 'datasets'; install it with: {HF_INSTALL}") from None
    return datasets


class _HFColumn:
    """A lazy view of one column of a ``datasets.Dataset`` (decodes images on access)."""

    def __init__(self, ds: Any, column: str) -> None:
        self.ds = ds
        self.column = column

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        return self.ds[int(i)][self.column]

    def take(self, indices: list[int]) -> _HFColumn:
        return _HFColumn(self.ds.select(indices), self.column)


def _pick(columns: list[str], wanted: str | None, guesses: tuple[str, ...], role: str, where: str, flag: str) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where}: {role} column {wanted!r} not found; columns found: {columns}. Pass the right one with {flag}.")
        return wanted
    return next((g for g in guesses if g in columns), None)


def _unlabelled(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v < 0)


def _class_label_ids(
    raws: dict[str, list[int]], names_by: dict[str, list[str]], lcol: str, where: str
) -> tuple[dict[str, list[int]], list[str]]:
    """Class ids over one class list, for splits whose ClassLabels may list the same names in
    other orders: each split's ids index its own names, so they are mapped by name (train's
    order first, then names that only other splits list)."""
    plain = [k for k, names in names_by.items() if not names]
    if plain:  # plain integers could follow any split's names: guessing would relabel silently
        raise DataError(
            f"{where}: label column {lcol!r} is a ClassLabel in some splits but not in {plain}, so "
            "their labels cannot be matched by name; cast the column to one ClassLabel in every split "
            "(Dataset.cast_column) and save the dataset again"
        )
    classes = list(dict.fromkeys(n for names in names_by.values() for n in names))
    index = {c: i for i, c in enumerate(classes)}
    ids_by = {}
    for k, values in raws.items():
        names = names_by[k]
        bad = next((v for v in values if not 0 <= v < len(names)), None)
        if bad is not None:
            raise DataError(f"{where}: split {k!r} has label {bad}, outside its ClassLabel's {len(names)} names")
        ids_by[k] = [index[names[v]] for v in values]
    return ids_by, classes


def load_hf(
    spec: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    image_column: str | None = None,
    split_seed: int = 0,
) -> DataBundle:
    """Load ``spec``: a ``save_to_disk`` directory, or ``hf:NAME[:CONFIG]`` from the Hub (online)."""
    datasets = _import_datasets()
    if spec.startswith("hf:"):
        ref = spec[3:]
        name, _, config = ref.partition(":")
        try:
            loaded = datasets.load_dataset(name, config or None)
        except Exception as exc:  # network, offline mode, unknown name: all surface here
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = " (HF_HUB_OFFLINE=1 is set: only datasets already in the local cache load)" if offline else ""
            raise DataError(f"cannot load Hugging Face dataset {ref!r}{hint}: {type(exc).__name__}: {exc}") from None
        where = ref
    else:
        try:
            loaded = datasets.load_from_disk(spec)
        except Exception as exc:
            raise DataError(f"cannot load {spec} with datasets.load_from_disk: {type(exc).__name__}: {exc}") from None
        where = spec
    if isinstance(loaded, datasets.Dataset):
        parts = {"all": loaded}
    else:
        parts = {}
        for key, aliases in SPLIT_ALIASES.items():
            for a in aliases:
                if a in loaded:
                    parts[key] = loaded[a]
                    break
        if "train" not in parts:
            raise DataError(f"{where}: no 'train' split; splits found: {list(loaded)}")
    first = next(iter(parts.values()))
    columns = list(first.column_names)
    lcol = _pick(columns, label_column, LABEL_COLUMN_GUESSES, "label", where, "--label-column")
    if lcol is None:
        raise DataError(f"{where}: no label column (looked for {list(LABEL_COLUMN_GUESSES)}); columns found: {columns}. Name it with --label-column.")
    icol = _pick(columns, image_column, IMAGE_COLUMN_GUESSES, "image", where, "--image-column")
    if image_column is not None and text_column is not None:
        raise DataError(f"{where}: pass --text-column or --image-column, not both")
    if icol is not None and text_column is None:
        kind, xcol = "image", icol
    else:
        xcol = _pick(columns, text_column, TEXT_COLUMN_GUESSES, "text", where, "--text-column")
        if xcol is None:
            raise DataError(f"{where}: no text or image column (looked for {list(TEXT_COLUMN_GUESSES + IMAGE_COLUMN_GUESSES)}); columns found: {columns}. Name it with --text-column or --image-column.")
        kind = "text"
    notes = []
    for k, ds in list(parts.items()):  # the columns were picked from the first split
        lacking = [c for c in (lcol, xcol) if c not in ds.column_names]
        if lacking == [lcol] and k == "test":  # a competition's test split, shipped without labels
            del parts[k]
            notes.append(f"the test split has no {lcol!r} column: not used")
        elif lacking:
            raise DataError(f"{where}: split {k!r} has no column {lacking[0]!r} (its columns: "
                            f"{list(ds.column_names)}): give every split the same columns")
    raws = {k: list(ds[lcol]) for k, ds in parts.items()}
    for k in list(raws):
        unlabelled = sum(_unlabelled(v) for v in raws[k])
        if raws[k] and unlabelled == len(raws[k]) and k == "test":  # e.g. GLUE's test splits: all -1
            del raws[k], parts[k]
            notes.append("the test split is unlabelled (label -1 or None): not used")
        elif unlabelled:
            raise DataError(f"{where}: split {k!r} has {unlabelled} unlabelled row(s) of {len(raws[k])} "
                            "(label -1 or None): drop them (Dataset.filter) and save the dataset again")
    names_by = {k: list(getattr(parts[k].features.get(lcol), "names", None) or []) for k in raws}
    if any(names_by.values()):
        ids_by, classes = _class_label_ids(raws, names_by, lcol, where)
    else:
        ids_by, classes = labels_to_ids(raws, where=where)
    splits = {}
    for k, ds in parts.items():
        items = texts_of(ds[xcol], where=where, split=k) if kind == "text" else _HFColumn(ds, xcol)
        splits[k] = Split(items, ids_by[k])
    if "all" in splits:
        train, val, test = split_fractions(splits["all"], (0.8, 0.1, 0.1), split_seed)
        notes.append(f"single split: seeded 80/10/10 (split_seed={split_seed})")
    else:
        train, val, test = complete_splits(splits["train"], splits.get("val"), splits.get("test"), split_seed, notes)
    if kind == "text":
        notes += filter(None, [shared_items_note(train, val, test)])
    return DataBundle(
        name=Path(where).name if not spec.startswith("hf:") else where,
        kind=kind,
        classes=[str(c) for c in classes],
        train=train,
        val=val,
        test=test,
        source=f"Hugging Face datasets: {where} (columns {xcol!r}, {lcol!r})",
        notes=notes,
    )
