"""TrainConfig validation and the ``s2a train`` argument checks (no model is built here)."""

from __future__ import annotations

import json
import re

import pytest

from s2a.train import TrainConfig, TrainError
from s2a.train.config import default_lr

BASE = ["--model", "test_vit", "--data", "rotten-tomatoes"]


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--lr", "0", "lr (--lr) must be a number > 0 (at most 3.4e37"),
        ("--lr", "-1e-3", "lr (--lr) must be a number > 0 (at most 3.4e37"),
        ("--lr", "nan", "lr (--lr) must be a number > 0 (at most 3.4e37"),
        ("--lr", "1e39", "lr (--lr) must be a number > 0 (at most 3.4e37"),
        ("--seed", str(2**44), "seed (--seed) must be an integer in [0, 2**32)"),
        ("--weight-decay", "1e39", "weight_decay (--weight-decay) must be a number >= 0 (at most 3.4e37)"),
        ("--epochs", "0", "epochs (--epochs) must be an integer >= 1"),
        ("--batch-size", "0", "batch_size (--batch-size) must be an integer >= 1"),
        ("--batch-size", "-4", "batch_size (--batch-size) must be an integer >= 1"),
        ("--train-size", "0", "train_size (--train-size) must be an integer >= 1"),
        ("--label-smoothing", "1.0", "label_smoothing (--label-smoothing) must be in [0, 1)"),
        ("--label-smoothing", "-0.1", "label_smoothing (--label-smoothing) must be in [0, 1)"),
        ("--dropout", "1.0", "dropout (--dropout) must be in [0, 1)"),
        ("--dropout", "-0.1", "dropout (--dropout) must be in [0, 1)"),
        ("--grad-accum", "0", "grad_accum (--grad-accum) must be an integer >= 1"),
        ("--warmup-ratio", "1", "warmup_ratio (--warmup-ratio) must be in [0, 1)"),
        ("--max-grad-norm", "-1", "max_grad_norm (--max-grad-norm) must be a number >= 0"),
        ("--weight-decay", "-0.5", "weight_decay (--weight-decay) must be a number >= 0"),
        ("--max-length", "0", "max_length (--max-length) must be an integer >= 1"),
        ("--img-size", "4", "img_size (--img-size) must be an integer >= 8"),
        ("--prompt-rank", "0", "prompt_rank (--prompt-rank) must be an integer >= 1"),
        ("--modules", "bias,bais", "modules (--modules) must be names from ['bias', 'norm', 'prompt', 'side'] (unknown: ['bais'])"),
        ("--modules", "bias,bias", "modules (--modules) must be each module once (got bias,bias)"),
        ("--act-bits", "5", "act_bits (--act-bits) must be one of the bit widths [2, 3, 4, 8], or 0 (off; 'none' on the command line)"),
        ("--act-bits", "-4", "act_bits (--act-bits) must be one of the bit widths"),
        ("--eval-batch-size", "0", "eval_batch_size (--eval-batch-size) must be an integer >= 1"),
        ("--val-size", "0", "val_size (--val-size) must be an integer >= 1"),
        ("--test-size", "0", "test_size (--test-size) must be an integer >= 1"),
        ("--num-workers", "-1", "num_workers (--num-workers) must be an integer >= 0"),
        ("--save-every", "-1", "save_every (--save-every) must be an integer >= 0"),
        ("--stop-after", "-2", "stop_after (--stop-after) must be an integer >= 0"),
    ],
)
def test_out_of_range_hyper_parameters_are_clear_cli_errors(run_cli, tmp_path, flag, value, needle):
    with pytest.raises(SystemExit) as info:
        run_cli(*BASE, f"{flag}={value}", "--out", str(tmp_path / "run"))
    assert needle in str(info.value.code)
    assert not (tmp_path / "run").exists()  # nothing written for a rejected command


def test_config_defaults_roundtrip_and_resolution():
    cfg = TrainConfig(model="minilm", data="rotten-tomatoes", out="x", method="s2a", modules="bias,prompt")
    assert cfg.modules == ("bias", "prompt")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    r = cfg.resolved("text")
    assert r.lr == 5e-3 and r.compression_bits == 4 and r.eval_batch_size == 64
    assert cfg.resolved("image").lr == 1e-3
    assert r.resolved("text") == r  # idempotent
    off = TrainConfig(model="m", data="d", out="x", method="s2a", act_bits=0).resolved("text")
    assert off.compression_bits is None
    assert TrainConfig(model="m", data="d", out="x", method="full").resolved("image").compression_bits is None
    assert default_lr("full", "text") == 5e-5 and default_lr("full", "image") == 2e-4
    # the rates measured on EfficientNet-Lite0 (benchmarks/accuracy.py) are CNN defaults
    assert cfg.resolved("cnn").lr == 1e-2 and default_lr("full", "cnn") == 1e-3
    assert "out" not in cfg.fingerprint() and "lr" in cfg.fingerprint()
    with pytest.raises(TrainError, match="unknown training option"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    # decay past 1 / lr zeroes or flips the weights every step; with the default lr too
    with pytest.raises(TrainError, match=r"weight_decay \(--weight-decay\) must be below 200 with lr 0.005, the "
                                         r"default for --method s2a on a text model .* got 1000"):
        TrainConfig(model="m", data="d", out="x", method="s2a", weight_decay=1000).resolved("text")
    with pytest.raises(TrainError, match=r"must be below 10 with lr 0.1 \(AdamW"):
        TrainConfig(model="m", data="d", out="x", method="s2a", lr=0.1, weight_decay=10).validate()
    assert TrainConfig(model="m", data="d", out="x", method="s2a", weight_decay=100).resolved("text").lr == 5e-3
    with pytest.raises(TrainError, match="method"):
        TrainConfig(model="m", data="d", out="x", method="dora")
    with pytest.raises(TrainError, match="precision"):
        TrainConfig(model="m", data="d", out="x", precision="fp8")


def test_fingerprint_changes_name_each_option_that_differs():
    cfg = TrainConfig(model="minilm", data="rotten-tomatoes", out="x", seed=3, dropout=0.0)
    saved = cfg.fingerprint()
    assert cfg.fingerprint_changes(saved) == {}
    assert TrainConfig(model="minilm", data="rotten-tomatoes", out="elsewhere", seed=3, dropout=0.0,
                       progress=False).fingerprint_changes(saved) == {}  # fmt: skip  # runtime options
    assert TrainConfig(model="minilm", data="rotten-tomatoes", out="x", seed=4, dropout=0.0,
                       modules="bias").fingerprint_changes(saved) == {
        "modules": (["bias", "prompt"], ["bias"]), "seed": (3, 4)}  # fmt: skip
    # a fingerprint written before an option existed: that run had the option's default
    old = {k: v for k, v in saved.items() if k not in ("dropout", "modules")}
    assert TrainConfig(model="minilm", data="rotten-tomatoes", out="x", seed=3).fingerprint_changes(old) == {}
    assert cfg.fingerprint_changes(old) == {"dropout": (None, 0.0)}
    # an option the saved run had and today's config does not know differs too
    assert cfg.fingerprint_changes({**saved, "retired_option": 1}) == {"retired_option": (1, None)}
    # --save-every only decides when last.pt is written: older runs that fingerprinted it resume
    assert "save_every" not in saved and cfg.fingerprint_changes({**saved, "save_every": 50}) == {}


@pytest.mark.parametrize("method", ["full", "lora", "linear"])
def test_modules_apply_only_to_s2a(method):
    with pytest.raises(TrainError, match=f"--modules side applies only to --method s2a .got --method {method}"):
        TrainConfig(model="m", data="d", out="x", method=method, modules="side")
    assert TrainConfig(model="m", data="d", out="x", method=method).modules == ("bias", "prompt")
    assert TrainConfig(model="m", data="d", out="x", method="s2a", modules="side").modules == ("side",)


@pytest.mark.parametrize(("method", "modules"), [("full", "bias,prompt"), ("lora", "bias,prompt"), ("s2a", "bias,side")])
def test_prompt_rank_needs_the_s2a_prompt_module(method, modules):
    with pytest.raises(TrainError, match="--prompt-rank 8 applies only to --method s2a with the prompt module"):
        TrainConfig(model="m", data="d", out="x", method=method, modules=modules, prompt_rank=8)
    assert TrainConfig(model="m", data="d", out="x", method="s2a", prompt_rank=8).prompt_rank == 8


@pytest.mark.parametrize(("args", "needle"), [
    (["--method", "full", "--modules", "bias,prompt"], "--modules applies only to --method s2a (got --method full"),
    (["--method", "lora", "--prompt-rank", "4"], "--prompt-rank applies only to --method s2a (got --method lora"),
    (["--modules", "side", "--prompt-rank", "4"], "--prompt-rank applies only with the prompt module (got --modules side)"),
])
def test_options_given_at_their_default_are_still_refused_where_they_do_nothing(run_cli, tmp_path, args, needle):
    with pytest.raises(SystemExit, match=re.escape(needle)):
        run_cli(*BASE, *args, "--out", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_default_prompt_rank_is_s2a_configs():
    from s2a import S2AConfig
    from s2a.train.config import DEFAULT_PROMPT_RANK

    assert S2AConfig().prompt_rank == DEFAULT_PROMPT_RANK


def test_cli_needs_model_and_data(run_cli, tmp_path):
    with pytest.raises(SystemExit) as info:
        run_cli("--data", "rotten-tomatoes", "--out", str(tmp_path / "r"))
    assert "needs --model" in str(info.value.code)
    with pytest.raises(SystemExit) as info:  # argparse: --resume and --overwrite exclude each other
        run_cli(*BASE, "--out", str(tmp_path / "r"), "--resume", "--overwrite")
    assert info.value.code == 2


def test_resume_keeps_the_runs_save_every_unless_given(tmp_path):
    from s2a.cli import build_parser
    from s2a.train.cli import config_from_args

    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(model="minilm", data="rotten-tomatoes", out=str(run), save_every=5)
    (run / "config.json").write_text(json.dumps({"config": saved.to_dict()}))
    resume = ["train", "--out", str(run), "--resume"]
    assert config_from_args(build_parser().parse_args(resume)).save_every == 5
    assert config_from_args(build_parser().parse_args([*resume, "--save-every", "2"])).save_every == 2


def test_rate_kind_tells_cnns_from_image_transformers():
    import timm

    from s2a.train.trainer import rate_kind

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5)
    cnn = timm.create_model("resnet18", num_classes=5)
    assert rate_kind(vit, "image") == "image"
    assert rate_kind(cnn, "image") == "cnn"
    assert rate_kind(cnn, "text") == "text"
