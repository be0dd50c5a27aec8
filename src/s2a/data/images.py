"""Image datasets: Fashion-MNIST (IDX files), image folders (ImageNet layout), VTAB-1k lists."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .core import (
    DataBundle,
    DataError,
    Split,
    carve,
    labels_to_ids,
    same_examples,
    shared_items_note,
    split_fractions,
    unread_splits_note,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "FMNIST_INSTALL",
    "IMAGE_SUFFIXES",
    "find_idx_files",
    "load_fashion_mnist",
    "load_idx_dir",
    "load_image_folder",
    "load_vtab",
    "read_idx",
]

FMNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_ENV = "S2A_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
VAL_NAMES = ("val", "valid", "validation", "dev")  # as for text tables


# ---------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes: ``(N, ...)`` uint8."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # a damaged gzip stream raises zlib.error
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes; {ndim} dimensions need {header})")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    size = int(np.prod(dims))
    if len(data) - header != size:
        raise DataError(f"{path}: header says {dims} = {size} bytes, file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_files(directory: str | os.PathLike) -> dict[str, Path] | None:
    """The four MNIST-style IDX files in ``directory`` (``.gz`` or not), or None if any is missing."""
    directory = Path(directory)
    found = {}
    for key, stem in IDX_STEMS.items():
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
            if (directory / name).is_file():
                found[key] = directory / name
                break
        else:
            return None
    return found


def load_idx_dir(
    directory: str | os.PathLike,
    *,
    name: str | None = None,
    classes: list[str] | None = None,
    val_size: int = 5000,
    split_seed: int = 0,
) -> DataBundle:
    """MNIST-style IDX files: the official train/test split, ``val_size`` images carved from train."""
    files = find_idx_files(directory)
    if files is None:
        raise DataError(f"{directory}: missing MNIST-style IDX files {list(IDX_STEMS.values())}")
    arrays = {k: read_idx(p) for k, p in files.items()}
    for part in ("train", "test"):
        imgs, labs = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if imgs.ndim != 3:
            colour = " (colour images?)" if imgs.ndim == 4 and imgs.shape[-1] in (3, 4) else ""
            raise DataError(
                f"{files[f'{part}_images']}: images of shape {imgs.shape}{colour}; IDX images must be greyscale, "
                "(N, H, W) like MNIST's: store colour images as files in an image folder "
                "(root/train/<class>/*.png) instead")
        if labs.ndim != 1:
            raise DataError(f"{files[f'{part}_labels']}: labels of shape {labs.shape}; IDX labels must be one "
                            "class id per image, (N,)")
        if len(imgs) != len(labs):
            raise DataError(f"{directory}: {len(imgs)} {part} images but {len(labs)} {part} labels: the "
                            f"{files[f'{part}_images'].name} and {files[f'{part}_labels'].name} files do not belong together")
    train = Split(arrays["train_images"], arrays["train_labels"].tolist())
    test = Split(arrays["test_images"], arrays["test_labels"].tolist())
    top = int(max(max(train.labels, default=0), max(test.labels, default=0)))  # before val is carved out
    if classes is None:
        classes = [str(i) for i in range(top + 1)]
    elif top >= len(classes):
        raise DataError(f"{directory}: label {top} found, but {name or Path(directory).name} has {len(classes)} "
                        f"classes (labels 0..{len(classes) - 1}): is this the right data?")
    train, val = carve(train, min(val_size, len(train) // 5), split_seed)
    return DataBundle(
        name=name or Path(directory).name,
        kind="image",
        classes=classes,
        train=train,
        val=val,
        test=test,
        source=f"{directory} (IDX), official test split, {len(val)} val images carved from train "
        f"(split_seed={split_seed})",
    )


def fashion_mnist_dir() -> Path:
    chosen = os.environ.get(FASHION_MNIST_ENV)
    if chosen:  # the user's explicit choice: used or refused, never silently replaced by the system copy
        if find_idx_files(chosen) is None:
            have = sorted(p.name for p in Path(chosen).iterdir()) if Path(chosen).is_dir() else None
            raise DataError(
                f"{FASHION_MNIST_ENV}={chosen} "
                + ("is not a directory" if have is None else f"lacks some of the four IDX files "
                   f"{', '.join(IDX_STEMS.values())} (.gz or not); it holds {have[:8] or 'nothing'}")
                + f". Point it at a directory holding them, or unset it to use {FASHION_MNIST_DIRS[0]}"
            )
        return Path(chosen)
    candidates = list(FASHION_MNIST_DIRS)
    for c in candidates:
        if find_idx_files(c) is not None:
            return Path(c)
    raise DataError(
        "dataset 'fashion-mnist' not found (looked in "
        + ", ".join(candidates)
        + f"). Install it with: {FMNIST_INSTALL}  (Debian/Ubuntu; run apt-get update first if the "
        f"package is not found), or point {FASHION_MNIST_ENV} at a directory holding the four IDX files."
    )


def load_fashion_mnist(*, split_seed: int = 0, val_size: int = 5000) -> DataBundle:
    """Fashion-MNIST from the Debian package: 60000 train (``val_size`` carved out as val), 10000 test."""
    bundle = load_idx_dir(
        fashion_mnist_dir(),
        name="fashion-mnist",
        classes=list(FASHION_MNIST_CLASSES),
        val_size=val_size,
        split_seed=split_seed,
    )
    return bundle


# ---------------------------------------------------------------------------- folders
def _hidden(name: str) -> bool:
    """Hidden files and folders, and the metadata archivers add (macOS ``__MACOSX`` / ``._x.png``)."""
    return name.startswith(".") or name == "__MACOSX"


def _images_under(directory: Path) -> list[Path]:
    """Image files below ``directory``, following linked folders (Path.rglob does not before
    Python 3.13: a class folder of links to the real folders would look empty), each real
    folder once (a link to a parent would loop), never a folder above ``directory``."""
    found = []
    seen = {str(p) for p in Path(os.path.realpath(directory)).parents}  # a link up would walk siblings
    for top, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [Path(top, f) for f in files
                  if not _hidden(f) and Path(f).suffix.lower() in IMAGE_SUFFIXES and Path(top, f).is_file()]
    return sorted(found)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _hidden(p.name))


def _loose_images(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir()
                  if not _hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _folder_split(directory: Path, *, training: bool, hint: str = "") -> tuple[list[str], list[str], list[str]]:
    """(paths, raw labels (class names), names of the class folders that hold images) of one
    ``class/xxx.jpg`` folder. ``hint`` is added when ``directory`` has no class folders."""
    dirs = _class_dirs(directory)
    loose = _loose_images(directory)
    if loose:  # a label comes from a class folder: these would be dropped
        shown = ", ".join(p.name for p in loose[:3]) + (", ..." if len(loose) > 3 else "")
        raise DataError(
            f"{directory}: {len(loose)} image(s) directly in it, not in a class folder ({shown}): images must be "
            f"in class folders, {directory}/<class>/{loose[0].name}: move each into the folder of its class"
            + ("" if dirs else hint))
    paths, raw, names = [], [], []
    for d in dirs:
        imgs = _images_under(d)
        if not imgs and training:  # a class with no training image could never be predicted
            raise DataError(
                f"{d}: class folder with no images ({', '.join(IMAGE_SUFFIXES)}); add its images or remove it"
            )
        if imgs:  # an empty val/ or test/ class folder is no class
            names.append(d.name)
        paths += [str(p) for p in imgs]
        raw += [d.name] * len(imgs)
    if not paths:
        raise DataError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) under class folders "
                        f"({directory}/<class>/*.jpg)" + ("" if dirs else hint))
    return paths, raw, names


SPLIT_DIR_NAMES = {"train": ("train",), "val": VAL_NAMES, "test": ("test",)}


def _split_dirs(root: Path) -> dict[str, Path]:
    """The train/, val/ (valid/, validation/, dev/) and test/ folders of ``root``, in any case; two
    folders for one split are refused (reading one would silently drop the other)."""
    dirs = _class_dirs(root)
    found = {}
    for split, names in SPLIT_DIR_NAMES.items():
        hits = [d for d in dirs if d.name.lower() in names]
        if len(hits) > 1:
            raise DataError(f"{root}: {' and '.join(d.name + '/' for d in hits)} are {'both' if len(hits) == 2 else 'all'} "
                            f"{split} folders: keep one of them (or move the others out)")
        if hits:
            found[split] = hits[0]
    return found


def _flat_layout_hint(root: Path, split_dirs: dict[str, Path]) -> str:
    """What to do when a split folder is really a class of the flat layout (vehicles:
    bus/, car/, train/)."""
    names = sorted(d.name + "/" for d in split_dirs.values())
    them = names[0] if len(names) == 1 else f"one of {', '.join(names)}"
    others = [d.name + "/" for d in _class_dirs(root) if d not in split_dirs.values()]
    beside = f" beside {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}" if others else ""
    return (f". {root} is read as the split layout (root/train/<class>/*.jpg) because it has {', '.join(names)}; "
            f"if {them} is a class of the flat layout root/<class>/*.jpg{beside}, rename that class folder "
            "(a class folder may not be named train, val, valid, validation, dev or test)")


def load_image_folder(directory: str | os.PathLike, *, split_seed: int = 0) -> DataBundle:
    """An image folder in the ImageNet layout.

    * ``root/train/<class>/*.jpg`` (+ ``root/val/<class>/...``, ``root/test/<class>/...``):
      the splits as given (val/ may be named valid/, validation/ or dev/; other folders are
      named in the notes, not read). Without ``test/``, ``val/`` becomes the test split (ImageNet
      convention, where the public val set is the benchmark) and 10% of train is held out as
      val, so the test split is never used for model selection (also when ``val/`` holds the
      same images as ``test/``). Without ``val/`` either, 10% of train becomes val and 10% test.
    * ``root/<class>/*.jpg`` only: a seeded 80/10/10 split.

    Class ids follow the sorted names of the class folders that hold images (as torchvision's
    ImageFolder does), over all splits. Images that are in more than one split (by content:
    copies count) are noted.
    """
    root = Path(directory)
    split_dirs = _split_dirs(root)
    notes: list[str] = []
    if "train" in split_dirs:
        hint = _flat_layout_hint(root, split_dirs)
        read = {k: _folder_split(d, training=k == "train", hint=hint) for k, d in split_dirs.items()}
        unread = [d.name + "/" for d in _class_dirs(root) if d not in split_dirs.values()]
        notes += filter(None, [unread_splits_note(unread, "folders", SPLIT_DIR_NAMES, "/")])
        # a class that only val/ or test/ hold keeps its output, as in the other layouts (the
        # bundle's check names it in the notes): its images count as errors, not dropped
        classes = sorted({c for _, _, names in read.values() for c in names})
        index = {c: i for i, c in enumerate(classes)}
        splits = {k: Split(paths, [index[c] for c in raw]) for k, (paths, raw, _) in read.items()}
        train, val, test = splits["train"], splits.get("val"), splits.get("test")
        val_name = split_dirs["val"].name if "val" in split_dirs else ""
        if val is not None and test is not None and same_examples(val, test, files=True):
            val = None
            notes.append(f"{val_name}/ holds the same images as {split_dirs['test'].name}/: not used as val (the "
                         "best epoch would be chosen on test examples); 10% of train held out as val")
            train, val = carve(train, max(1, len(train) // 10), split_seed)
        elif test is not None and val is None:
            train, val = carve(train, max(1, len(train) // 10), split_seed)
            notes.append("no val/ folder: 10% of train held out as val")
        elif val is not None and test is None:
            test = val
            train, val = carve(train, max(1, len(train) // 10), split_seed)
            notes.append(f"no test/ folder: {val_name}/ used as the test split, 10% of train held out as val")
        elif val is None:
            train, val, test = split_fractions(train, (0.8, 0.1, 0.1), split_seed)
            notes.append("only train/: seeded 80/10/10 train/val/test split")
    else:
        if split_dirs:
            names = ", ".join(sorted(d.name + "/" for d in split_dirs.values()))
            raise DataError(
                f"{root}: has {names} but no train/ folder; put the training images in root/train/<class>/ "
                "(or use root/<class>/ alone for a seeded split)" + _flat_layout_hint(root, split_dirs)
            )
        if not _class_dirs(root) and not _loose_images(root):
            raise DataError(
                f"{root}: no images found. Expected the ImageNet layout root/train/<class>/*.jpg "
                f"(optionally val/ and test/) or root/<class>/*.jpg, with suffixes {', '.join(IMAGE_SUFFIXES)}"
            )
        paths, raw, classes = _folder_split(root, training=True)
        index = {c: i for i, c in enumerate(classes)}
        train, val, test = split_fractions(Split(paths, [index[c] for c in raw]), (0.8, 0.1, 0.1), split_seed)
        notes.append(f"class folders only: seeded 80/10/10 split (split_seed={split_seed})")
    notes += filter(None, [shared_items_note(train, val, test, "images", files=True)])
    return DataBundle(
        name=root.name,
        kind="image",
        classes=classes,
        train=train,
        val=val,
        test=test,
        source=f"{root} (image folder)",
        notes=notes,
    )


# ---------------------------------------------------------------------------- VTAB-1k
def is_vtab_dir(directory: str | os.PathLike) -> bool:
    """A training list makes it VTAB-1k, with or without test.txt: :func:`load_vtab` then names
    what is missing, where an image-folder reading would train on whatever folders are there."""
    d = Path(directory)
    return (d / "train800val200.txt").is_file() or (d / "train800.txt").is_file()


def _read_list(root: Path, name: str) -> tuple[list[str], list[str]]:
    path = root / name
    paths, raw = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: drops a BOM (Windows editors write one)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
        rel, label = parts
        p = (root / rel) if not os.path.isabs(rel) else Path(rel)
        if not p.is_file():
            raise DataError(f"{path}:{lineno}: image {p} does not exist")
        paths.append(str(p))
        raw.append(label)
    if not paths:
        raise DataError(f"{path}: empty list")
    return paths, raw


def load_vtab(directory: str | os.PathLike, *, split_seed: int = 0) -> DataBundle:
    """The VTAB-1k layout used by VPT / NOAH: list files of ``path label`` lines.

    ``train800.txt`` + ``val200.txt`` are train and val when both exist; otherwise 200
    examples (20% if fewer than 1000) of ``train800val200.txt`` are carved out as val (seeded).
    ``test.txt`` is the test split. Paths are relative to the directory.
    """
    root = Path(directory)
    notes = []
    if not (root / "test.txt").is_file():
        raise DataError(
            f"{root}: VTAB-1k layout needs test.txt (lines 'relative/path label') beside its training "
            "list; add it, or remove the train800*.txt files to read the directory as an image folder"
        )
    if (root / "train800.txt").is_file() and (root / "val200.txt").is_file():
        names = ["train800.txt", "val200.txt", "test.txt"]
    elif (root / "train800val200.txt").is_file():
        names = ["train800val200.txt", "test.txt"]
    else:
        raise DataError(f"{root}: VTAB-1k layout needs train800val200.txt (or train800.txt + val200.txt) and test.txt")
    lists = {n: _read_list(root, n) for n in names}
    ids, classes = labels_to_ids({n: raw for n, (_, raw) in lists.items()}, where=str(root))
    splits = [Split(paths, ids[n]) for n, (paths, _) in lists.items()]
    if len(splits) == 3:
        train, val, test = splits
    else:
        train, test = splits
        n_val = 200 if len(train) >= 1000 else max(1, len(train) // 5)
        train, val = carve(train, n_val, split_seed)
        notes.append(f"val: {n_val} examples of train800val200.txt carved out (split_seed={split_seed})")
    notes += filter(None, [shared_items_note(train, val, test, "image files", files=True)])
    return DataBundle(
        name=root.name,
        kind="image",
        classes=classes,
        train=train,
        val=val,
        test=test,
        source=f"{root} (VTAB-1k lists {', '.join(names)})",
        notes=notes,
    )
