"""Data containers shared by every loader: :class:`Split`, :class:`DataBundle`, seeded splits.

A split holds raw *items* (a sentence, an image file path, a PIL image or a uint8 array) and
integer labels; turning items into model inputs is the job of the model's preprocessing
(:mod:`s2a.zoo`). Every random choice (splits carved from a larger set, few-shot subsets) is a
pure function of an explicit seed, made with Python's ``random.Random`` (stable across Python,
NumPy and PyTorch versions).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "DataBundle",
    "DataError",
    "FileContent",
    "Split",
    "carve",
    "classes_missing_note",
    "content_keys",
    "float_pixel_scale",
    "item_keys",
    "labels_to_ids",
    "same_examples",
    "seeded_order",
    "shared_items_note",
    "split_fractions",
    "texts_of",
    "unread_splits_note",
]

KINDS = ("text", "image")


class DataError(ValueError):
    """A dataset that cannot be found, read or understood; the message says what to do."""


def float_pixel_scale(low: float, high: float) -> float | None:
    """The factor that takes float pixels spanning ``[low, high]`` to 8-bit: 255 for [0, 1] images,
    1 for [0, 255] ones, None for neither (normalised or HDR values). A resize's overshoot
    (1.01, 256.3) is within either range. Shared by the image preprocessor and the Hugging Face
    loader, which decides it once for a whole dataset."""
    if low < -0.05 or high > 300:
        return None
    return 255.0 if high <= 1.05 else 1.0


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

    def strings(self) -> list[str] | None:
        """The items as strings (texts, or image file paths), or None when they are not
        (pixel arrays, lazy items)."""
        items = self.items
        if isinstance(items, (list, tuple)) and all(isinstance(v, (str, os.PathLike)) for v in items):
            return [os.fspath(v) for v in items]
        return None

    def fingerprint(self) -> str:
        """sha256 of the labels, in order, and of the items held in memory: texts, image file
        paths and pixel arrays. Lazy items (a Hugging Face image column) count by their labels
        only: hashing them would read every image."""
        h = hashlib.sha256(np.asarray(self.labels, dtype=np.int64).tobytes())
        items, strings = self.items, self.strings()
        if isinstance(items, np.ndarray):
            h.update(str((items.dtype, items.shape)).encode())
            h.update(np.ascontiguousarray(items).tobytes())
        elif strings is not None:
            for v in strings:
                h.update(v.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def file_sizes_fingerprint(self, skip: Collection[str] = ()) -> str | None:
        """sha256 of the byte size of each item, read as a file path (-1: missing; ``skip``:
        paths whose size does not count), or None when the items are not strings or paths
        (call it on image splits: text items are texts). :meth:`fingerprint` hashes the paths
        only, so an image replaced under the same name would go unnoticed; its size rarely
        stays the same. Sizes, not contents or times: reading every image is slow, and a
        copied dataset gets new modification times but is the same data."""
        paths = self.strings()
        if paths is None:
            return None
        h = hashlib.sha256()
        for v in paths:
            if v in skip:
                h.update(b"?\0")
                continue
            try:
                size = os.stat(v).st_size
            except OSError:
                size = -1
            h.update(f"{size}\0".encode())
        return h.hexdigest()

    def class_counts(self, num_classes: int) -> list[int]:
        counts = [0] * num_classes
        for v in self.labels:
            counts[v] += 1
        return counts


def carve(split: Split, n_out: int, seed: int) -> tuple[Split, Split]:
    """``(rest, carved)``: ``n_out`` examples taken out of ``split`` (seeded), the rest kept."""
    if not 0 < n_out < len(split):
        raise DataError(
            f"cannot hold out {n_out} example(s) for validation or test from a training split of "
            f"{len(split)}: the data is too small; give it at least a few examples per class, or its "
            "own val / test split")
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
# What a table writer leaves in an empty cell; "none" and "null" are class names (an intent
# or toxicity task's "none" class), a JSON null is None.
_MISSING = ("", "nan", "<na>")
MAX_CLASS_ID = 100_000


def _parse_label(v: Any) -> int | str:
    """A class id (int) or a text label (str, possibly "3" to be read as an id later);
    ValueError says why ``v`` is neither."""
    if v is None or type(v).__name__ in ("NAType", "NaTType") or (isinstance(v, str) and v.strip().lower() in _MISSING):
        raise ValueError("is missing: give that row a label or drop it")
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            raise ValueError("is missing: give that row a label or drop it")
        if not math.isfinite(v) or not float(v).is_integer():
            raise ValueError("is not a class: labels must be class ids (integers) or class names")
        return int(v)
    if isinstance(v, str):
        return v.strip()
    raise ValueError(f"is a {type(v).__name__}: labels must be class ids (integers) or class names")


def _row_name(split: str, row: int) -> str:
    return f"row {row}" if split == "all" else f"{split} row {row}"  # "all": one file, not yet split


def texts_of(values: Iterable[Any], *, where: str, split: str) -> list[str]:
    """A split's texts as ``str``; a missing one (None, NaN, blank) is refused, naming its row,
    as :func:`labels_to_ids` refuses a missing label: trained on as ``""`` or ``"None"``, it
    would be an example with nothing to learn from, and only the user knows whether to fill
    or drop it."""
    out = []
    for row, v in enumerate(values, 1):
        if v is None or (isinstance(v, (float, np.floating)) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            raise DataError(f"{where}: {_row_name(split, row)}: text {v!r} is missing: give that row a text or drop it")
        if not isinstance(v, (str, int, float, np.integer, np.floating)):  # str() would train on a repr
            shown = str(v) if len(str(v)) <= 60 else str(v)[:60] + "..."
            raise DataError(
                f"{where}: {_row_name(split, row)}: text is a {type(v).__name__} ({shown}), not a "
                "string: join the tokens into one string per row, or pick another text column (--text-column)")
        out.append(str(v))
    return out


def labels_to_ids(raw: Mapping[str, Sequence[Any]], *, where: str) -> tuple[dict[str, list[int]], list[str]]:
    """Map each split's raw labels to class ids; returns ``({split: ids}, class_names)``.

    Integer labels (numbers, or text that is all integers: ``"3"`` and ``"3.0"`` alike) are
    the class ids themselves, classes ``0..max`` over all splits; other text labels are names,
    ids in sorted order. Refused: empty, missing (NaN) or fractional numbers, negative or huge
    ids, and numbers mixed with names. Text that is mostly integers with some names is names
    (a real "other" class, or a stray "n/a"): :class:`DataBundle`'s notes say so. Which classes training holds is checked by
    :class:`DataBundle`, on the final splits.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise TypeError("labels_to_ids takes a non-empty mapping {split name: labels}")
    parsed: dict[str, list[int | str]] = {}
    for split, values in raw.items():
        out = parsed[split] = []
        for row, v in enumerate(values, 1):
            try:
                out.append(_parse_label(v))
            except ValueError as exc:
                raise DataError(f"{where}: {_row_name(split, row)}: label {v!r} {exc}") from None
    _refuse_ids_beside_names(parsed, where)
    flat = [v for vs in parsed.values() for v in vs]
    texts = [v for v in flat if isinstance(v, str)]
    if texts and all(_INTEGER.fullmatch(v) for v in texts):  # a CSV column of ids
        parsed = {k: [int(v.split(".")[0]) if isinstance(v, str) else v for v in vs] for k, vs in parsed.items()}
    elif texts and len(texts) < len(flat):
        a = next(v for v in flat if isinstance(v, int))
        b = next(v for v in texts if not _INTEGER.fullmatch(v))
        raise DataError(
            f"{where}: the labels mix numbers (e.g. {a}) with names (e.g. {b!r}); "
            "use class ids or class names throughout"
        )
    flat = [v for vs in parsed.values() for v in vs]  # all ids or all names from here on
    if isinstance(flat[0], int):
        if min(flat) < 0:
            raise DataError(f"{where}: integer labels are class ids and must be >= 0, found {min(flat)}")
        if max(flat) > MAX_CLASS_ID:
            raise DataError(f"{where}: integer label {max(flat)} is implausibly large for a class id")
        classes: list[int | str] = list(range(max(flat) + 1))
    else:
        classes = sorted({str(v) for v in flat})
    index = {c: i for i, c in enumerate(classes)}
    return {k: [index[v] for v in vs] for k, vs in parsed.items()}, [str(c) for c in classes]


def _refuse_ids_beside_names(parsed: Mapping[str, Sequence[int | str]], where: str) -> None:
    """One split labelled by class ids, another by names ("0"/"1" beside "neg"/"pos"): taken
    together they would be four classes, and no test example could be predicted right. (A
    split holding both kinds shows they are one class set: "0", "1" and "other".)"""
    def is_id(v: int | str) -> bool:
        return isinstance(v, int) or bool(_INTEGER.fullmatch(v))

    kinds = {k: {is_id(v) for v in vs} for k, vs in parsed.items() if vs}
    if any(len(both) == 2 for both in kinds.values()):
        return
    ids = {k: next(iter(vs)) for k, vs in parsed.items() if kinds.get(k) == {True}}
    names = {k: next(iter(vs)) for k, vs in parsed.items() if kinds.get(k) == {False}}
    if ids and names:
        (a, x), (b, y) = next(iter(ids.items())), next(iter(names.items()))
        raise DataError(
            f"{where}: the {a} labels are class ids (e.g. {x!r}) and the {b} labels are class names "
            f"(e.g. {y!r}): label every split the same way (all ids or all names)")


def _case_hint(absent: Sequence[Any], present: Collection[Any]) -> str:
    folded = {str(c).strip().casefold(): c for c in present}
    pairs = [(c, folded[str(c).strip().casefold()]) for c in absent if str(c).strip().casefold() in folded]
    if not pairs:
        return ""
    return f" ({pairs[0][0]!r} differs from the train class {pairs[0][1]!r} in case or spaces only)"


def classes_missing_note(classes: Sequence[Any], present: Collection[Any], lacking: str) -> str | None:
    """A note naming the classes outside ``present`` (e.g. with no training example), or None."""
    absent = [c for c in classes if c not in present]
    if not absent:
        return None
    shown = f"{absent[:10]}{'...' if len(absent) > 10 else ''}"
    return (f"{len(absent)} of {len(classes)} classes have {lacking} ({shown}){_case_hint(absent, present)}: "
            "the model cannot learn them")


class FileContent:
    """The content of image files, for :func:`content_keys`: stage 0 is the byte size, 1 a
    hash of the first 16 KiB, 2 a hash of the whole file (files over 16 KiB only)."""

    content_stages = 3
    HEAD = 16 * 1024

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self._sizes: list[int] = []

    def content_keys(self, stage: int, indices: Sequence[int] | None) -> list[str]:
        if stage == 0:
            self._sizes = []
            for p in self.paths:
                try:
                    self._sizes.append(os.stat(p).st_size)
                except OSError:
                    self._sizes.append(-1)
            return [f"{n}" if n >= 0 else f"missing:{p}" for n, p in zip(self._sizes, self.paths, strict=True)]
        out = []
        for i in indices or ():
            if stage == 2 and self._sizes[i] <= self.HEAD:  # the head was the whole file
                out.append("")
                continue
            h = hashlib.blake2b(digest_size=16)
            try:
                with open(self.paths[i], "rb") as fh:
                    if stage == 1:
                        h.update(fh.read(self.HEAD))
                    else:
                        for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                            h.update(block)
            except OSError:
                out.append(f"unreadable:{self.paths[i]}")
                continue
            out.append(h.hexdigest())
        return out


# items hashed at most for the duplicate notes: sizes collide often in large image sets
# (ImageNet: ~20% of train shares a byte size with a val image), and each one is a file read
MAX_CONTENT_READS = 20_000


class TooManyReads(Exception):
    """:func:`content_keys` would read more items than it was allowed."""


def content_keys(sources: Sequence[Any], max_reads: int | None = None) -> list[list[str]]:
    """One key per item of each source, equal for items of equal content, computed in stages
    (``source.content_keys(stage, indices)``; ``source.content_stages`` of them): stage 0 for
    every item (cheap: a byte size), each later stage only for the items whose key so far is
    shared with another source. Linear, and most items are never read: only what may be a
    duplicate across the sources (splits) is hashed; more than ``max_reads`` such items raise
    :class:`TooManyReads` before any is read."""
    keys = [list(src.content_keys(0, None)) for src in sources]
    for stage in range(1, min(src.content_stages for src in sources)):
        owners: dict[str, int] = {}
        for k, ks in enumerate(keys):
            for key in set(ks):
                owners[key] = -1 if owners.get(key, k) != k else k
        shared = {key for key, k in owners.items() if k < 0}
        if not shared:
            break
        todos = [[i for i, key in enumerate(ks) if key in shared] for ks in keys]
        if max_reads is not None and sum(map(len, todos)) > max_reads:
            raise TooManyReads(sum(map(len, todos)))
        for src, ks, todo in zip(sources, keys, todos, strict=True):
            if todo:
                for i, more in zip(todo, src.content_keys(stage, todo), strict=True):
                    ks[i] = f"{ks[i]}/{more}"
    return keys


def item_keys(splits: Sequence[Split], *, files: bool = False, max_reads: int | None = None) -> list[list[str]] | None:
    """Per split, a key per item that is equal for the same example: the stripped text, the
    content of an image file (``files``: the items are paths) or of a lazy item that gives
    :func:`content_keys` (a Hugging Face image column); None when the items have none (pixel
    arrays). ``max_reads``: see :func:`content_keys`."""
    if files:
        paths = [s.strings() for s in splits]
        if any(p is None for p in paths):
            return None
        return content_keys([FileContent(p) for p in paths], max_reads)  # type: ignore[arg-type]
    if all(getattr(s.items, "content_stages", 0) > 0 for s in splits):
        return content_keys([s.items for s in splits], max_reads)
    strings = [s.strings() for s in splits]
    if any(t is None for t in strings):
        return None
    return [[t.strip() for t in ts] for ts in strings]  # type: ignore[union-attr]


def shared_items_note(train: Split, val: Split, test: Split, what: str = "texts", *, files: bool = False) -> str | None:
    """A note counting val/test items (texts, images) that also appear in train (a table with
    duplicates, split by row; a list repeating a line; an image copied into two folders), and
    val items that are test items, or None: their accuracy is optimistic, or the choice of the
    best epoch saw test examples. ``files``: the items are image file paths, compared by
    content (:class:`FileContent`)."""
    try:
        keys = item_keys([train, val, test], files=files, max_reads=MAX_CONTENT_READS)
    except TooManyReads as many:
        return (f"{what} were not compared across the splits for duplicates: {many.args[0]} of them share a byte "
                f"size with another split's, more than the {MAX_CONTENT_READS} this check reads")
    if keys is None:
        return None
    train_keys, val_keys, test_keys = keys
    seen = set(train_keys)
    hits = {name: sum(k in seen for k in ks) for name, ks in (("test", test_keys), ("val", val_keys))}
    in_test = set(test_keys)
    val_in_test = sum(k in in_test for k in val_keys)
    why = "duplicate rows" if what == "texts" else "the same image content"
    notes = []
    if any(hits.values()):
        notes.append(f"{hits['test']} of {len(test)} test and {hits['val']} of {len(val)} val {what} also appear "
                     f"in train ({why}): their accuracy is optimistic; deduplicate the data to avoid it")
    if val_in_test:
        notes.append(f"{val_in_test} of {len(val)} val {what} also appear in test: the best epoch was chosen "
                     "partly on test examples; make the splits disjoint to avoid it")
    return "; ".join(notes) or None


def unread_splits_note(unread: Sequence[str], what: str, names: Mapping[str, Sequence[str]], suffix: str = "") -> str | None:
    """A note naming the splits found under a name no split takes (``eval.csv``, MNLI's
    ``validation_matched``), or None: they are not read, and a missing val / test split is
    carved from train instead without a word about them."""
    if not unread:
        return None
    named = "; ".join(f"{split}: {', '.join(n + suffix for n in ns)}" for split, ns in names.items())
    return f"{what} {', '.join(unread)} not read: the {what} read are named ({named}); rename one to use it"


def same_examples(a: Split, b: Split, *, files: bool = False) -> bool:
    """Whether ``a`` and ``b`` hold the same examples (item content and label), in any order."""
    if len(a) != len(b) or sorted(a.labels) != sorted(b.labels):
        return False
    keys = item_keys([a, b], files=files)
    return (keys is not None
            and sorted(zip(keys[0], a.labels, strict=True)) == sorted(zip(keys[1], b.labels, strict=True)))


def complete_splits(
    train: Split, val: Split | None, test: Split | None, split_seed: int, notes: list[str]
) -> tuple[Split, Split, Split]:
    """Fill in missing validation / test splits from ``train`` (seeded, 10% each).

    A validation split without a labelled test split becomes the test split, so that the test
    examples are never the ones used for model selection; for the same reason a validation
    split that is the test split again (same items and labels) is replaced by one from train.
    """
    if val is not None and test is not None and same_examples(val, test):
        val = None
        notes.append("the validation split is the test split again: not used (the best epoch would be "
                     "chosen on test examples)")
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

    ``test`` is only ever used for the final evaluation; model selection uses ``val``. Built
    from the final splits (after val/test are carved out of train), it checks the classes
    training holds for every loader alike (:meth:`check_train_classes`).
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
        for split_name in ("train", "val", "test"):
            split = getattr(self, split_name)
            if len(split) == 0:
                raise DataError(f"{self.name}: the {split_name} split is empty")
            bad = [v for v in split.labels if not 0 <= v < k]
            if bad:
                raise DataError(f"{self.name}: {split_name} label {bad[0]} is outside 0..{k - 1}")
        note = self.check_train_classes("no train example")
        if note:
            self._refuse_unshared_labels()
            self.notes.append(note + self._unused_ids_hint())
        folded: dict[str, str] = {}
        pairs = []
        for c in self.classes:  # 'pos' beside 'Pos' is two classes, each with part of the examples
            other = folded.setdefault(str(c).strip().casefold(), c)
            if other != c:
                pairs.append(f"{other!r} and {c!r}")
        if pairs:
            self.notes.append(
                f"class names that differ only in case or surrounding spaces are separate classes: "
                f"{', '.join(pairs[:5])}{', ...' if len(pairs) > 5 else ''}; if they are one class, write it "
                "the same way throughout")
        ids = [c for c in self.classes if _INTEGER.fullmatch(str(c))]
        if ids and len(ids) < k:  # "0".."11" and "n/a": names, sorted as text
            names = [c for c in self.classes if not _INTEGER.fullmatch(str(c))]
            self.notes.append(
                f"the labels are integers ({len(ids)} of them, e.g. {ids[0]!r}) and {len(names)} other name(s) "
                f"({names[:5]}): all are taken as class names, ordered as text (a stray row such as 'n/a' "
                "or a repeated header makes a class of its own; fix the data if so)")

    def _unused_ids_hint(self) -> str:
        """Why integer labels leave classes empty: they are the class ids, 0..max, so 1-based
        (or zero-padded '01') and sparse ids make classes that no example has."""
        k = len(self.classes)
        if self.classes != [str(i) for i in range(k)]:
            return ""
        used = set(self.train.labels) | set(self.val.labels) | set(self.test.labels)
        unused = [i for i in range(k) if i not in used]
        if not unused:
            return ""
        look = " and ".join(w for w, hit in (("1-based", 0 in unused), ("sparse", unused != [0])) if hit)
        return (f"; the labels are the class ids 0..{k - 1} and look {look}: ids {unused[:10]}"
                f"{'...' if len(unused) > 10 else ''} appear in no split (outputs that no example has; number "
                "the classes 0, 1, 2, ... to drop them)")

    def check_train_classes(self, lacking: str, what: str = "train split") -> str | None:
        """Refuse a training split of fewer than 2 classes; return a note naming the classes
        it lacks (``lacking`` says how), or None. A class that only val/test hold keeps its
        output rather than being refused (VTAB-1k's SUN397 lacks ~30 of 397 in its 1000
        training images): the note tells why its examples all count as errors."""
        present = sorted(set(self.train.labels))
        if len(present) < 2:
            raise DataError(
                f"{self.name}: the {what} holds {len(present)} class ({[self.classes[i] for i in present]}); "
                "a classifier needs at least 2. Is the label column (--label-column) right, and does "
                "the training data hold more than one class?"
            )
        return classes_missing_note(self.classes, {self.classes[i] for i in present}, lacking)

    def _refuse_unshared_labels(self) -> None:
        """A class only val/test hold is kept (see :meth:`check_train_classes`), but not when
        most val/test examples are of such classes: the splits do not share their labels
        ("Pos" beside "pos", other folder names), and their accuracy would be near zero."""
        held = set(self.train.labels)
        labels = self.val.labels + self.test.labels
        unseen = sum(v not in held for v in labels)
        if unseen * 2 > len(labels):
            present = sorted(self.classes[i] for i in held)
            absent = sorted({self.classes[v] for v in labels if v not in held})
            n_train = len(self.train.labels)
            if n_train >= 10 and len(held) * 2 > n_train:  # labels nearly all distinct: text, ids
                raise DataError(
                    f"{self.name}: the labels take {len(held)} distinct values in {n_train} training examples "
                    f"(e.g. {present[:3]}), and {unseen} of {len(labels)} val/test labels are none of them: "
                    "is the label column a text or id column? Check --label-column / --text-column")
            raise DataError(
                f"{self.name}: {unseen} of {len(labels)} val/test examples belong to classes with no train "
                f"example ({absent[:10]}{'...' if len(absent) > 10 else ''}; train has {present[:10]}): "
                f"the splits do not share their labels{_case_hint(absent, present)}. Use the same class "
                "names or ids in every split")

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
