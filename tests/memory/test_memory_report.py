from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from s2a.memory import MemoryReport, compare_table, format_bytes, format_count, measure
from s2a.memory.report import fold_module_indices


def _report() -> MemoryReport:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    return measure(model, torch.randn(3, 8), optimizer_step=True)


def test_json_round_trip():
    report = _report()
    text = report.to_json()
    data = json.loads(text)
    assert data["saved_bytes"] == report.saved_bytes
    assert data["trainable_pct"] == report.trainable_pct
    assert "cross_check_ratio" in data
    again = MemoryReport.from_json(text)
    assert again == report
    assert MemoryReport.from_dict(report.to_dict()) == report


def test_str_is_a_readable_table():
    text = str(_report())
    for needle in ("saved for backward", "peak step memory", "operator", "gelu", "linear", "%"):
        assert needle in text
    assert "528 B" in text
    # saved_input_bytes also counts module tensor attributes, not only the batch: said so
    assert "(of which batch and module tensor attributes 96 B)" in text


def test_format_bytes_and_count():
    assert format_bytes(None) == "-"
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(5 * 1024**2) == "5.00 MiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"
    assert format_bytes(-2048) == "-2.00 KiB"
    assert format_count(5_717_416) == "5.72M"
    assert format_count(999) == "999"


def test_fold_module_indices():
    folded = fold_module_indices({"blocks.0.attn": 3, "blocks.1.attn": 4, "head": 1})
    assert folded == {"blocks.*.attn": 7, "head": 1}


def test_compare_table_markdown():
    a = MemoryReport(saved_bytes=4096, by_kind={"gelu": 4096}, trainable_params=10, total_params=10)
    b = MemoryReport(saved_bytes=1024, by_kind={"gelu (s2a)": 1024}, trainable_params=1, total_params=10)
    table = compare_table({"full": a, "full+4-bit": b})
    lines = table.splitlines()
    assert lines[0].startswith("|") and "full" in lines[0] and "full+4-bit" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert all(line.count("|") == 4 for line in lines)
    assert "1.00 KiB (0.25x)" in table
    assert "10.00%" in table
    assert "saved: gelu (s2a)" in table
    assert compare_table({}) == ""
    assert "4.00 KiB (1.00x)" in table  # the reference column says so, not a blank
    # a list of reports is named by their model names; a repeated name is told apart
    a.model_name, b.model_name = "vit", "vit"
    header = compare_table([a, b]).splitlines()[0]
    assert [c.strip() for c in header.split("|")[2:4]] == ["vit", "vit #2"]
    tiny = MemoryReport(saved_bytes=4, trainable_params=1, total_params=10)
    assert "4 B (0.00098x)" in compare_table([a, tiny])
    with pytest.raises(TypeError, match="item 1 is a dict"):
        compare_table([a, {}])


def test_compare_table_column_names_are_unique():
    reports = [MemoryReport(saved_bytes=100, model_name="vit"), MemoryReport(saved_bytes=200, model_name="vit #3"),
               MemoryReport(saved_bytes=300, model_name="vit")]
    table = compare_table(reports)
    header = [c.strip() for c in table.splitlines()[0].split("|")[2:-1]]
    assert header == ["vit", "vit #3", "vit #4"]
    assert "300 B (3.00x)" in table  # no column lost
