"""Hugging Face ``datasets``: a directory written by ``save_to_disk`` or ``hf:NAME[:CONFIG]``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from .core import (
    DataBundle,
    DataError,
    Split,
    complete_splits,
    float_pixel_scale,
    labels_to_ids,
    shared_items_note,
    split_fractions,
    texts_of,
    unread_splits_note,
)
from .text import LABEL_COLUMN_GUESSES, TEXT_COLUMN_GUESSES, refuse_same_column

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
    """A lazy view of one column of a ``datasets.Dataset`` (decodes images on access).

    It also gives the content of its items without decoding them (:meth:`content_keys`, for
    :func:`~s2a.data.core.content_keys`): an image's encoded bytes (or its path, when the
    dataset holds paths only) read from the Arrow table."""

    def __init__(
        self, ds: Any, column: str, *, base: Any = None, rows: list[int] | None = None, pixel_scale: float | None = None
    ) -> None:
        self.ds = ds
        self.column = column
        self._base = ds if base is None else base  # the split as loaded; ``rows`` index it
        self._rows = rows
        # float pixel arrays -> uint8 by one factor for the whole dataset (:func:`_float_pixel_scale`)
        self.pixel_scale = pixel_scale

    @property
    def content_stages(self) -> int:
        """2 for an Image column (its encoded bytes are compared), 0 for pixel arrays (Array3D:
        hashing them would read and convert every image; no duplicate check)."""
        return 2 if _is_image_struct(self._base.data.column(self.column).type) else 0

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> Any:
        try:
            value = self.ds[int(i)][self.column]
        except (OSError, ValueError) as exc:  # an Image column decodes here: a missing or bad file
            raise DataError(f"cannot read row {self._row(i)} of column {self.column!r}: {exc}") from None
        if self.pixel_scale is None or value is None:
            return value
        return np.rint(np.asarray(value, dtype=np.float32) * self.pixel_scale).clip(0, 255).astype(np.uint8)

    def take(self, indices: list[int]) -> _HFColumn:
        rows = [self._row(i) for i in indices]
        return _HFColumn(self.ds.select(indices), self.column, base=self._base, rows=rows, pixel_scale=self.pixel_scale)

    def _row(self, i: int) -> int:
        return int(i) if self._rows is None else self._rows[int(i)]

    def _arrow(self, rows: list[int]) -> Any:
        """The column's Arrow values at ``rows`` of the loaded split (copies only those)."""
        import pyarrow as pa

        if getattr(self._base, "_indices", None) is None:  # no indices mapping: the table's rows
            return self._base.data.column(self.column).take(pa.array(rows, type=pa.int64()))
        return self._base.with_format("arrow")[rows].column(self.column)

    def content_keys(self, stage: int, indices: list[int] | None) -> list[str]:
        """Stage 0: for every item, the byte size of an encoded image (or its path); stage 1,
        for ``indices``: a hash of the image bytes. Image columns only (:attr:`content_stages`)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if stage == 0:
            rows = [self._row(i) for i in range(len(self))]
            if not rows:
                return []
            if getattr(self._base, "_indices", None) is None:  # offsets only: no image is read
                col = self._base.data.column(self.column)
            else:
                parts = [self._arrow(rows[a : a + 1000]) for a in range(0, len(rows), 1000)]
                col = pa.chunked_array([c for part in parts for c in part.chunks], type=parts[0].type)
                rows = list(range(len(rows)))
            sizes = pc.binary_length(pc.struct_field(col, "bytes")).to_pylist()
            paths = pc.struct_field(col, "path").to_pylist()
            return [f"b{sizes[r]}" if sizes[r] is not None else f"p{paths[r]}" for r in rows]
        out = []
        idx = list(indices or ())
        for a in range(0, len(idx), 1000):
            values = self._arrow([self._row(i) for i in idx[a : a + 1000]])
            for v in values.to_pylist():  # {"bytes": ..., "path": ...}, or None for a missing image
                if v is not None and v["bytes"] is not None:
                    out.append(hashlib.blake2b(v["bytes"], digest_size=16).hexdigest())
                else:
                    out.append(f"path:{None if v is None else v['path']}")
        return out


def _float_pixel_scale(parts: dict[str, Any], column: str, where: str) -> float | None:
    """For a column of float pixel arrays, the factor to 8-bit pixels, decided once for the whole
    dataset: 255 when every value is within [0, 1], 1 when they reach past it ([0, 255]).
    Decided image by image, a near-black [0, 255] image (all values <= 1) would be read as a
    [0, 1] one and brightened 255 times. None for other columns (Image, integer arrays)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    low = high = None
    for ds in parts.values():
        for chunk in ds.data.column(column).chunks:
            values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
                values = values.flatten()
            if not pa.types.is_floating(values.type):
                return None
            if pa.types.is_float16(values.type):  # pyarrow's min_max has no half-float kernel
                values = pc.cast(values, pa.float32())
            if pc.any(pc.invert(pc.is_finite(values))).as_py():  # min_max skips NaN
                raise DataError(f"{where}: image column {column!r} holds NaN or infinite values: "
                                "fix or drop those rows (Dataset.filter) and save the dataset again")
            lo, hi = pc.min_max(values).values()
            if lo.is_valid:
                low = lo.as_py() if low is None else min(low, lo.as_py())
                high = hi.as_py() if high is None else max(high, hi.as_py())
    if low is None:
        return None
    scale = float_pixel_scale(low, high)
    if scale is None:
        raise DataError(
            f"{where}: image column {column!r} holds values in [{low:g}, {high:g}]: pass unnormalised "
            "pixels ([0, 1] floats or [0, 255]); the preprocessor normalises them")
    return scale


def _is_image_struct(t: Any) -> bool:
    """An Image feature's storage: struct<bytes: binary, path: string>."""
    import pyarrow as pa

    if not pa.types.is_struct(t) or {t.field(i).name for i in range(t.num_fields)} != {"bytes", "path"}:
        return False
    return pa.types.is_binary(t.field("bytes").type) or pa.types.is_large_binary(t.field("bytes").type)


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
    notes = []
    if isinstance(loaded, datasets.Dataset):
        parts = {"all": loaded}
    else:
        parts = {}
        unread = [repr(k) for k in loaded if not any(k in aliases for aliases in SPLIT_ALIASES.values())]
        notes += filter(None, [unread_splits_note(unread, "splits", SPLIT_ALIASES)])
        for key, aliases in SPLIT_ALIASES.items():
            found = [a for a in aliases if a in loaded]
            if len(found) > 1:  # taking one would silently drop the other
                raise DataError(
                    f"{where}: splits {' and '.join(repr(a) for a in found)} are {'both' if len(found) == 2 else 'all'} "
                    f"{key} splits: keep one of "
                    "them (load it with datasets, drop the others with DatasetDict.pop, and save_to_disk)")
            if found:
                parts[key] = loaded[found[0]]
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
    refuse_same_column(xcol, lcol, columns, where, kind)
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
    scale = _float_pixel_scale(parts, xcol, where) if kind == "image" else None
    splits = {}
    for k, ds in parts.items():
        items = texts_of(ds[xcol], where=where, split=k) if kind == "text" else _HFColumn(ds, xcol, pixel_scale=scale)
        splits[k] = Split(items, ids_by[k])
    if "all" in splits:
        train, val, test = split_fractions(splits["all"], (0.8, 0.1, 0.1), split_seed)
        notes.append(f"single split: seeded 80/10/10 (split_seed={split_seed})")
    else:
        train, val, test = complete_splits(splits["train"], splits.get("val"), splits.get("test"), split_seed, notes)
    notes += filter(None, [shared_items_note(train, val, test, "texts" if kind == "text" else "images")])
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
