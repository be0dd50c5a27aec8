"""s2a.data: splits that repeat each other (by content, not by name), and layouts that would
otherwise be misread (generated files in tmp_path)."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from s2a.data import DataError, Split, carve, load_data


def _write_idx(path, array) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def _hf_images(datasets, n: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


# ---------------------------------------------------------------------------- 1. HF image splits
def test_hugging_face_image_splits_are_compared_by_content_without_decoding(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    train, test = _hf_images(datasets, 20, seed=0), _hf_images(datasets, 10, seed=1)
    datasets.DatasetDict(train=train, validation=test, test=test).save_to_disk(str(tmp_path / "valtest"))
    datasets.DatasetDict(train=train, test=train.select(range(6))).save_to_disk(str(tmp_path / "trte"))
    import PIL.Image

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)  # the keys come from the encoded bytes
    d = load_data(str(tmp_path / "valtest"))
    assert d.kind == "image"
    assert "the validation split is the test split again: not used" in " ".join(d.notes)
    assert len(d.val) == 2 and len(d.train) == 18 and len(d.test) == 10  # val carved from train
    assert not any("also appear" in n for n in d.notes)
    t = load_data(str(tmp_path / "trte"))
    assert "6 of 6 test and 0 of 2 val images also appear in train (the same image content)" in " ".join(t.notes)


def test_hugging_face_unreadable_image_names_its_row(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    import io

    from PIL import Image

    from s2a.data.hf import _HFColumn

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
    images = [{"bytes": buf.getvalue(), "path": None}, {"bytes": buf.getvalue()[:-400], "path": None}]
    ds = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    col = _HFColumn(ds, "image")
    assert col[0].size == (32, 32)
    with pytest.raises(DataError, match="cannot read row 1 of column 'image': image file is truncated"):
        col[1]
    with pytest.raises(DataError, match="cannot read row 1 of column 'image'"):
        col.take([0, 1])[1]  # the row of the loaded split, not of the selection


def test_hugging_face_image_column_keys_follow_selected_rows(tmp_path):
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    from s2a.data.core import content_keys
    from s2a.data.hf import _HFColumn

    ds = _hf_images(datasets, 12, seed=2)
    col = _HFColumn(ds, "image")
    picked = col.take([5, 1, 7])
    again = _HFColumn(ds.select([7, 3, 5]), "image")  # a base with an indices mapping
    a, b = content_keys([picked, again])
    assert a[0] == b[2] and a[2] == b[0] and a[1] != b[1]
    assert len(set(a)) == 3


def test_hugging_face_pixel_arrays_are_not_hashed(tmp_path, monkeypatch):
    # an Array3D column would be read and converted row by row: no duplicate check, as before
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    from s2a.data import core
    from s2a.data.hf import _HFColumn

    features = datasets.Features({"pixel_values": datasets.Array3D((4, 4, 3), "uint8"), "label": datasets.Value("int64")})
    rows = {"pixel_values": np.zeros((10, 4, 4, 3), np.uint8).tolist(), "label": [i % 2 for i in range(10)]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    assert _HFColumn(ds, "pixel_values").content_stages == 0
    monkeypatch.setattr(core, "content_keys", lambda *a, **k: pytest.fail("pixel arrays hashed"))
    datasets.DatasetDict(train=ds, test=ds.select(range(4))).save_to_disk(str(tmp_path / "arr"))
    d = load_data(str(tmp_path / "arr"), image_column="pixel_values")
    assert not any("also appear" in n for n in d.notes)


def test_duplicate_check_reads_a_bounded_number_of_files(image_tree, monkeypatch):
    from s2a.data import core

    opened = []
    real = core.FileContent.content_keys

    def count(self, stage, indices):
        opened.extend(indices or ())
        return real(self, stage, indices)

    monkeypatch.setattr(core.FileContent, "content_keys", count)
    monkeypatch.setattr(core, "MAX_CONTENT_READS", 4)
    root = image_tree({"train": 6, "val": 2, "test": 3})  # images of one size: every one may repeat
    notes = " ".join(load_data(str(root)).notes)
    assert "images were not compared across the splits for duplicates" in notes and "more than the 4" in notes
    assert not opened  # refused before any file was read


# ---------------------------------------------------------------------------- 2, 6. IDX
def test_idx_classes_count_the_labels_carved_into_val(tmp_path):
    n = 50
    pos = carve(Split(list(range(n)), [0] * n), n // 5, 0)[1].items[0]  # a row that val takes
    labels = [i % 3 for i in range(n)]
    labels[pos] = 3  # class 3's only example ends up in val
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((n, 4, 4)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((9, 4, 4)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", [i % 3 for i in range(9)])
    d = load_data(str(tmp_path))
    assert d.classes == ["0", "1", "2", "3"] and d.val.labels.count(3) == 1
    assert "1 of 4 classes have no train example (['3'])" in " ".join(d.notes)
    from s2a.data.images import load_idx_dir

    with pytest.raises(DataError, match=r"label 3 found, but tenfold has 3 classes \(labels 0\.\.2\): is this the right data"):
        load_idx_dir(tmp_path, name="tenfold", classes=["x", "y", "z"])


def test_colour_idx_images_are_named_as_such(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((20, 4, 4, 3)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte", [i % 2 for i in range(20)])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((4, 4, 4, 3)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", [0, 1, 0, 1])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: images of shape \(20, 4, 4, 3\) \(colour images\?\); "
                                        r"IDX images must be greyscale, \(N, H, W\)"):
        load_data(str(tmp_path))


# ---------------------------------------------------------------------------- 3, 4, 5. image folders
def test_image_folder_empty_val_or_test_class_folder_is_no_class(image_tree):
    root = image_tree({"train": 4, "val": 2, "test": 2})
    (root / "test" / "purple").mkdir()
    (root / "val" / "yellow" / ".thumbs").mkdir(parents=True)
    d = load_data(str(root))
    assert d.classes == ["blue", "green", "red"]
    assert not any("no train example" in n for n in d.notes)


def test_image_folder_images_outside_class_folders_are_refused(image_tree, write_pngs):
    root = image_tree({"train": 4, "test": 2})
    write_pngs(root / "train", 5, 2, seed=7)  # beside the class folders: no label
    with pytest.raises(DataError, match=r"train: 5 image\(s\) directly in it, not in a class folder "
                                        r"\(img_000\.png, img_001\.png, img_002\.png, \.\.\.\): images must be in class folders"):
        load_data(str(root))
    flat = image_tree({"all": 4}, flat=True, name="flat")
    write_pngs(flat, 1, 0, seed=8)
    with pytest.raises(DataError, match=r"flat: 1 image\(s\) directly in it, not in a class folder \(img_000\.png\)"):
        load_data(str(flat))


def test_two_folders_or_splits_for_validation_are_refused(image_tree, tmp_path):
    root = image_tree({"train": 4, "val": 2, "validation": 2})
    with pytest.raises(DataError, match=r"val/ and validation/ are both val folders: keep one of them"):
        load_data(str(root))
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    train = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]})
    other = datasets.Dataset.from_dict({"text": ["v0", "v1"], "label": [0, 1]})
    datasets.DatasetDict(train=train, validation=other, dev=other).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"splits 'validation' and 'dev' are both val splits: keep one of them"):
        load_data(str(tmp_path / "hf"))


# ---------------------------------------------------------------------------- 7. JSONL columns
def test_jsonl_columns_are_read_from_every_row(tmp_path):
    path = tmp_path / "late.jsonl"
    rows = [{"text": f"t{i}"} for i in range(1000)] + [{"text": f"u{i}", "label": i % 2} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"late.jsonl: row 1 has no value in column 'label' \(1000 of 1010 rows have none\)"):
        load_data(str(path))
    path.write_text("".join(json.dumps({"text": f"t{i}", **({"stars": i % 2} if i > 1000 else {})}) + "\n" for i in range(1005)))
    with pytest.raises(DataError, match=r"row 1 has no value in column 'stars'"):  # not "column 'stars' not found"
        load_data(str(path), label_column="stars")


# ---------------------------------------------------------------------------- 8. image folder duplicates
def test_image_folder_notes_images_in_two_splits_by_content(image_tree):
    root = image_tree({"train": 6, "val": 2, "test": 3})
    for c in ("blue", "green"):  # a copy under another name is the same image
        shutil.copy(root / "train" / c / "img_000.png", root / "test" / c / "copy.png")
    shutil.copy(root / "test" / "red" / "img_001.png", root / "val" / "red" / "also.png")
    d = load_data(str(root))
    notes = " ".join(d.notes)
    assert "2 of 11 test and 0 of 7 val images also appear in train (the same image content)" in notes
    assert "1 of 7 val images also appear in test" in notes
    same = image_tree({"train": 6, "test": 2}, name="same")
    shutil.copytree(same / "test", same / "val")
    s = load_data(str(same))
    assert "val/ holds the same images as test/: not used as val" in " ".join(s.notes)
    assert len(s.val) == 1 and all("/train/" in p for p in s.val.items) and len(s.test) == 6


def test_content_keys_read_only_what_may_repeat(tmp_path):
    from s2a.data.core import FileContent, content_keys

    a, b, c, d = (tmp_path / n for n in "abcd")
    a.write_bytes(b"\0" * 20000 + b"x")
    b.write_bytes(b"\0" * 20000 + b"y")  # same size and first 16 KiB: told apart by the whole file
    c.write_bytes(a.read_bytes())
    d.write_bytes(b"\0" * 5)
    ka, kb = content_keys([FileContent([str(a), str(d)]), FileContent([str(b), str(c), str(tmp_path / "gone")])])
    assert ka[0] == kb[1] and ka[0] != kb[0] and ka[1] == "5"  # d's size is unique: never read
    assert kb[2].startswith("missing:")


def test_flat_class_named_like_a_split_is_explained(tmp_path, write_pngs):
    root = tmp_path / "vehicles"
    for ci, c in enumerate(["bus", "car", "train"]):
        write_pngs(root / c, 4, ci, seed=ci)
    with pytest.raises(DataError, match=r"vehicles is read as the split layout .* because it has train/; if train/ is "
                                        r"a class of the flat layout root/<class>/\*\.jpg beside bus/, car/, rename"):
        load_data(str(root))
    shutil.rmtree(root / "train")
    write_pngs(root / "test", 4, 2, seed=5)
    with pytest.raises(DataError, match=r"has test/ but no train/ folder.*if test/ is a class of the flat layout"):
        load_data(str(root))


def test_hugging_face_float_pixels_are_scaled_by_one_factor_per_dataset(tmp_path):
    # decided image by image, a near-black [0, 255] image (every value <= 1) was read as [0, 1]
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    from s2a.zoo import _to_chw_uint8

    features = datasets.Features({"pixel_values": datasets.Array3D((8, 8, 3), "float32"), "label": datasets.Value("int64")})

    def save(name, pixels):
        rows = {"pixel_values": pixels.tolist(), "label": [i % 2 for i in range(len(pixels))]}
        ds = datasets.Dataset.from_dict(rows, features=features)
        datasets.DatasetDict(train=ds, test=ds.select(range(2))).save_to_disk(str(tmp_path / name))
        return load_data(str(tmp_path / name), image_column="pixel_values")

    pixels = np.random.default_rng(0).uniform(0, 255, (10, 8, 8, 3)).astype(np.float32)
    pixels[1] = 1.0  # near-black, in [0, 255]
    d = save("wide", pixels)
    items = {tuple(_to_chw_uint8(d.train.items[i]).flatten().tolist()) for i in range(len(d.train))}
    items |= {tuple(_to_chw_uint8(d.test.items[i]).flatten().tolist()) for i in range(len(d.test))}
    assert tuple([1] * 192) in items and tuple([255] * 192) not in items
    d = save("unit", pixels / 255.0)  # [0, 1]: scaled to 8-bit
    got = np.stack([np.asarray(d.test.items[i]) for i in range(len(d.test))])
    assert got.dtype == np.uint8 and got.max() > 200
    with pytest.raises(DataError, match=r"image column 'pixel_values' holds values in \[-2.99.*unnormalised"):
        save("normalised", pixels / 64.0 - 3.0)
    half = datasets.Features({"pixel_values": datasets.Array3D((8, 8, 3), "float16"), "label": datasets.Value("int64")})
    rows = {"pixel_values": (pixels[:4] / 255.0).astype(np.float16).tolist(), "label": [0, 1, 0, 1]}
    datasets.DatasetDict(train=datasets.Dataset.from_dict(rows, features=half)).save_to_disk(str(tmp_path / "half"))
    d = load_data(str(tmp_path / "half"), image_column="pixel_values")  # pyarrow's min_max has no float16 kernel
    assert max(int(np.asarray(d.test.items[i]).max()) for i in range(len(d.test))) > 100
    pixels[3, 0, 0, 0] = np.nan  # min / max skip NaN
    with pytest.raises(DataError, match="image column 'pixel_values' holds NaN or infinite values"):
        save("nan", pixels)


# ---------------------------------------------------------------------------- 9. split names
def test_dev_folder_is_val_and_splits_under_other_names_are_noted(image_tree, tmp_path):
    root = image_tree({"train": 6, "dev": 2, "test": 2})  # dev.* is val for text tables too
    d = load_data(str(root))
    assert len(d.val) == 6 and not any("not read" in n or "held out as val" in n for n in d.notes)
    (root / "dev").rename(root / "eval")
    d = load_data(str(root))
    assert ("folders eval/ not read: the folders read are named (train: train/; val: val/, valid/, validation/, "
            "dev/; test: test/); rename one to use it") in d.notes
    table = tmp_path / "table"
    table.mkdir()
    for name, n in (("train.csv", 40), ("eval.csv", 10)):
        (table / name).write_text("text,label\n" + "".join(f"{name} {i},{i % 2}\n" for i in range(n)))
    assert any(n.startswith("files eval.csv not read: ") and "dev.*" in n for n in load_data(str(table)).notes)
    datasets = pytest.importorskip("datasets", reason="pip install datasets")
    ds = datasets.Dataset.from_dict({"text": [f"s{i}" for i in range(40)], "label": [i % 2 for i in range(40)]})
    datasets.DatasetDict(train=ds, validation_matched=ds.select(range(6)), test_matched=ds.select(range(6, 12))
                         ).save_to_disk(str(tmp_path / "mnli"))
    assert any(n.startswith("splits 'validation_matched', 'test_matched' not read: ")
               for n in load_data(str(tmp_path / "mnli")).notes)
