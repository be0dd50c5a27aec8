"""Bad input to ``s2a train``: each gives a clear error (exit status 1, message on stderr)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from s2a.train import TrainConfig, Trainer, TrainError, load_checkpoint

VIT = ["--model", "test_vit", "--img-size", "32", "--method", "full", "--epochs", "1", "--batch-size", "8"]


def _error(run_cli, *args) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(*args)
    assert info.value.code not in (0, None)
    return str(info.value.code)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_folder):
    """A finished tiny run, copied by the tests that damage it."""
    from s2a.cli import main

    out = tmp_path_factory.mktemp("runs") / "done"
    assert main(["train", *VIT, "--data", str(image_folder), "--out", str(out), "--no-progress"]) == 0
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_unknown_model_and_dataset_names(run_cli, tmp_path, image_folder):
    msg = _error(run_cli, "--model", "vit_tinyy_patch16_224", "--data", str(image_folder), "--out", str(tmp_path / "r"))
    assert "unknown model 'vit_tinyy_patch16_224'" in msg and "vit_tiny_patch16_224" in msg
    msg = _error(run_cli, *VIT, "--data", "fashion-mnistt", "--out", str(tmp_path / "r"))
    assert "unknown dataset 'fashion-mnistt'" in msg and "Did you mean: fashion-mnist" in msg
    assert not (tmp_path / "r").exists()


def test_missing_label_column_and_kind_mismatch(run_cli, tmp_path):
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"text": f"s{i}", "stars": i % 2}) + "\n" for i in range(20)))
    msg = _error(run_cli, "--model", "minilm", "--data", str(table), "--label-column", "label", "--out", str(tmp_path / "r"))
    assert "label column 'label' not found; columns found: ['text', 'stars']" in msg
    msg = _error(run_cli, *VIT, "--data", str(table), "--label-column", "stars", "--out", str(tmp_path / "r"))
    assert "takes image but dataset" in msg and "holds text" in msg


def test_options_of_the_other_modality_are_refused(run_cli, tmp_path, image_folder):
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--max-length", "64", "--out", str(tmp_path / "r"))
    assert "--max-length applies to text models; 'test_vit' takes image: drop --max-length" in msg
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"text": f"s{i}", "label": i % 2}) + "\n" for i in range(20)))
    msg = _error(run_cli, "--model", "minilm", "--data", str(table), "--img-size", "64", "--out", str(tmp_path / "r"))
    assert "--img-size applies to image models; 'minilm' takes text" in msg
    assert not (tmp_path / "r").exists()


def test_existing_run_directory_is_refused(run_cli, tmp_path, image_folder, finished_run):
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(finished_run))
    assert "already exists" in msg and "--resume" in msg and "--overwrite" in msg
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(other))
    assert "already exists" in msg and "not an s2a run (no config.json): choose another --out, or empty it" in msg
    assert "--resume" not in msg and "--overwrite" not in msg  # both refuse a directory that is not a run
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(other), "--overwrite")
    assert "not an s2a run" in msg and "refusing to delete" in msg
    assert (other / "thesis.tex").read_text() == "precious"
    msg = _error(run_cli, "--out", str(tmp_path / "nothing"), "--resume")
    assert "nothing to resume" in msg


def test_run_directory_inside_the_image_folder_is_refused(run_cli, tmp_path, image_folder):
    data = tmp_path / "imgs"
    shutil.copytree(image_folder, data)
    for out in (data / "train" / "run", data / "train" / "red" / "run"):  # a class, or inside one
        msg = _error(run_cli, *VIT, "--data", str(data), "--out", str(out))
        assert f"--out {out} is inside the image folder --data {data}" in msg and "outside the dataset" in msg
        assert not out.exists()


def test_overwrite_replaces_a_run(run_cli, tmp_path, image_folder, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "metrics.jsonl").write_text('{"event": "train", "global_step": 999, "loss": 1}\n')
    assert run_cli(*VIT, "--data", str(image_folder), "--out", str(run), "--overwrite", "--seed", "3") == 0
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 999 not in steps
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 3


def test_resume_with_other_options_is_refused(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    msg = _error(run_cli, "--out", str(run), "--resume", "--lr", "0.5")
    assert "--resume continues a run with its own options" in msg and "--lr 0.5" in msg
    resolved = json.loads((run / "config.json").read_text())["resolved"]["lr"]
    assert f"(the run has its default, {resolved!r})" in msg  # not "the run has None"
    assert run_cli("--out", str(run), "--resume", "--lr", str(resolved)) == 0  # the rate it ran with
    # a finished run resumes to its report again (nothing left to train)
    assert run_cli("--out", str(run), "--resume") == 0
    cfg = TrainConfig.from_dict({**json.loads((run / "config.json").read_text())["config"], "lr": 0.5})
    with pytest.raises(TrainError, match=r"--resume: the options differ .*--lr"):
        Trainer(cfg, resume=True).fit()


def test_resume_of_an_edited_config_is_named(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    (run / "config.json").write_text(json.dumps({"config": {"model": "test_vit"}}))
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "config.json: the saved options lack ['data']" in msg and "--overwrite" in msg
    for damaged in ({"config": [1, 2]}, {"config": None}, {"config": {}, "resolved": [1]}):  # were tracebacks
        (run / "config.json").write_text(json.dumps(damaged))
        msg = _error(run_cli, "--out", str(run), "--resume")
        assert "config.json is unreadable (its 'config' is not a mapping of options)" in msg and "--overwrite" in msg


def test_corrupt_checkpoint(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # a truncated write (not ours: ours are atomic)
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "corrupt or unreadable" in msg and "--overwrite" in msg
    last.write_text("not a checkpoint")
    assert "corrupt or unreadable" in _error(run_cli, "--out", str(run), "--resume")
    torch.save({"hello": torch.zeros(1)}, last)
    assert "not a checkpoint written by s2a train" in _error(run_cli, "--out", str(run), "--resume")
    run = _copy(finished_run, tmp_path / "b")
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # the finished run re-tests its best checkpoint
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert f"checkpoint {best} is corrupt or unreadable" in msg and "--overwrite" in msg


def test_mismatched_checkpoint(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["trainable"]["head.weight"] = torch.zeros(7, 64)  # another number of classes
    del ckpt["trainable"]["head.bias"]
    torch.save(ckpt, last)
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "does not match this model and method" in msg and "head.weight" in msg and "head.bias" in msg
    # a checkpoint of a run with other options (here: another seed) cannot continue this one
    ckpt = load_checkpoint(finished_run / "checkpoints" / "last.pt")
    fp = json.loads(ckpt["fingerprint"])
    fp["seed"] = 12
    ckpt["fingerprint"] = json.dumps(fp, sort_keys=True)
    torch.save(ckpt, last)
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "written by a run with other options (seed)" in msg


def test_checkpoint_of_another_backbone_is_refused(run_cli, tmp_path, image_folder):
    """The frozen backbone is rebuilt on resume; its sums must be the checkpoint's, up to the
    summation order of another device."""
    run = tmp_path / "linear"
    linear = [a if a != "full" else "linear" for a in VIT]
    assert run_cli(*linear, "--data", str(image_folder), "--out", str(run)) == 0
    ckpts = {p: load_checkpoint(p) for p in (run / "checkpoints").glob("*.pt")}
    checksum, magnitude = ckpts[run / "checkpoints" / "last.pt"]["frozen_checksum"]
    assert magnitude > abs(checksum) > 0

    def write(frozen):
        for path, ckpt in ckpts.items():  # (a finished run tests its best checkpoint again)
            torch.save({**ckpt, "frozen_checksum": frozen}, path)

    write([checksum + 1e-13 * magnitude, magnitude])  # summed in another order (another device)
    assert run_cli("--out", str(run), "--resume") == 0
    # other weights; a float is a checkpoint from before the magnitude was kept, compared exactly
    for changed in ([checksum + 1e-6 * magnitude, magnitude], checksum * (1 + 1e-15)):
        write(changed)
        msg = _error(run_cli, "--out", str(run), "--resume")
        assert "the frozen backbone differs from the one this checkpoint was trained on" in msg
    write(checksum)
    assert run_cli("--out", str(run), "--resume") == 0


def test_checkpoint_from_before_an_option_existed_still_resumes(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(last)
    fp = json.loads(ckpt["fingerprint"])
    del fp["dropout"]  # written before --dropout existed: the model's own rates, today's default
    ckpt["fingerprint"] = json.dumps(fp, sort_keys=True)
    del ckpt["step_times"], ckpt["step_samples"]  # nor did last.pt hold step times
    torch.save(ckpt, last)
    before = json.loads((run / "report.json").read_text())
    assert run_cli("--out", str(run), "--resume") == 0
    after = json.loads((run / "report.json").read_text())
    assert after["steps"] == 6 and after["accuracy"] == before["accuracy"]
    assert after["step_time_s"] == before["step_time_s"] > 0  # kept from the report it rewrites
    fp["dropout"] = 0.0  # the same key with another value is another run
    ckpt["fingerprint"] = json.dumps(fp, sort_keys=True)
    torch.save(ckpt, last)
    (run / "report.json").unlink()
    assert "written by a run with other options (dropout)" in _error(run_cli, "--out", str(run), "--resume")


def test_resume_before_any_checkpoint_starts_over(run_cli, tmp_path, finished_run):
    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "report.json").unlink()
    assert run_cli("--out", str(run), "--resume") == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 6


def test_diverging_loss_stops_before_saving_bad_state(run_cli, tmp_path, image_folder):
    run = tmp_path / "r"
    args = [*VIT, "--data", str(image_folder), "--out", str(run), "--save-every", "1", "--max-grad-norm", "0"]
    msg = _error(run_cli, *args, "--lr", "3e37", "--weight-decay", "0")
    assert re.search(r"the training loss became (nan|inf)", msg) and "training diverged" in msg
    assert "lower --lr (this step ran at 3e+37)" in msg and "--max-grad-norm" in msg
    step = int(msg.split(" at step ")[1].split("/")[0])
    assert step >= 2 and f"last.pt (step {step - 1}) is untouched" in msg
    last = load_checkpoint(run / "checkpoints" / "last.pt", kind="last")
    assert last["global_step"] == step - 1
    assert all(torch.isfinite(t).all() for t in last["trainable"].values())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss") is None or r["loss"] == r["loss"] for r in rows)  # no NaN logged
    assert not (run / "report.json").exists()


def test_update_that_breaks_the_weights_at_an_epochs_end_saves_nothing(run_cli, tmp_path, image_folder):
    # One step per epoch: its loss is finite, its update is not. Argmax over NaN logits is class
    # 0, so without the check the run reported that class's share as its accuracy
    run = tmp_path / "r"
    args = [*VIT, "--data", str(image_folder), "--out", str(run), "--max-grad-norm", "0", "--warmup-ratio", "0"]
    msg = _error(run_cli, *args, "--batch-size", "64", "--lr", "3e37", "--weight-decay", "0")
    assert re.search(r"the validation loss became (nan|inf) at step 1/1", msg) and "training diverged" in msg
    assert "no checkpoint was written this run" in msg
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "report.json").exists()


def test_an_update_that_breaks_the_weights_is_never_saved_over_last(run_cli, tmp_path, image_folder, monkeypatch):
    # a finite loss, then an update that overflows (forced here): --save-every must not write it
    step, calls = torch.optim.AdamW.step, []

    def overflowing(self, *a, **k):
        out = step(self, *a, **k)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    run = tmp_path / "r"
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(run), "--save-every", "1")
    assert "the update of step 2/" in msg and "left non-finite weights" in msg
    assert "last.pt (step 1) is untouched" in msg
    last = load_checkpoint(run / "checkpoints" / "last.pt", kind="last")
    assert last["global_step"] == 1 and all(torch.isfinite(t).all() for t in last["trainable"].values())


def test_single_example_batch_at_a_batchnorm_in_training_is_named(run_cli, tmp_path, image_folder):
    # resnet18 at 32 px ends on 1x1 maps: a last micro-batch of 1 gives BatchNorm one value per channel
    args = ["--model", "resnet18", "--img-size", "32", "--method", "full", "--epochs", "1", "--data", str(image_folder)]
    msg = _error(run_cli, *args, "--train-size", "9", "--batch-size", "4", "--out", str(tmp_path / "r"))
    assert "a micro-batch of 1 example(s) reached a BatchNorm layer" in msg
    assert "Pick a --batch-size (now 4)" in msg and "of the 9 training examples" in msg


def test_file_system_errors_are_named(run_cli, tmp_path, image_folder):
    (tmp_path / "afile").write_text("x")
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(tmp_path / "afile" / "sub"))
    # nothing was written there: nothing to resume
    assert "afile" in msg and "Not a directory" in msg and "Traceback" not in msg
    assert "Choose an --out that can be written" in msg and "--resume" not in msg


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        ("tpu", "device (--device) must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("bogus", "device (--device) must be auto, cpu, cuda or cuda:N, got 'bogus'"),
    ],
)
def test_unusable_device(run_cli, tmp_path, image_folder, device, needle):
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(tmp_path / "r"), "--device", device)
    assert needle in msg
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_cuda_on_a_machine_without_it(run_cli, tmp_path, image_folder):
    msg = _error(run_cli, *VIT, "--data", str(image_folder), "--out", str(tmp_path / "r"), "--device", "cuda")
    assert "--device cuda requested but CUDA is not available" in msg


@pytest.mark.parametrize("device", ["cuda:2", "auto"])
def test_cuda_device_out_of_range(monkeypatch, device):
    from s2a.train.distributed import _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the count is what is tested
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rank = 3 if device == "auto" else 0  # torchrun: 4 processes on a node with 2 GPUs
    with pytest.raises(TrainError, match=r"needs cuda:(2|3), but this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        _pick_device(device, rank)
    assert _pick_device("cuda:1", 0) == torch.device("cuda:1")


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_mid_run_is_named_and_the_run_resumes(run_cli, tmp_path, image_folder, workers):
    data = tmp_path / "imgs"
    shutil.copytree(image_folder, data)
    victim = sorted((data / "train" / "red").iterdir())[5]
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")  # found only when its batch is built
    run = tmp_path / "r"
    args = [*VIT, "--data", str(data), "--out", str(run), "--save-every", "1", "--num-workers", str(workers)]
    msg = _error(run_cli, *args)
    assert msg.startswith(f"s2a: error: cannot read image {victim}: cannot identify image file")
    assert "Traceback" not in msg and f"s2a train --out {run} --resume" in msg
    # as told: another readable image in its place (not the bytes it had when the run started)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(victim, "PNG")
    assert victim.stat().st_size not in (len(good), len(b"not a png"))
    if workers == 0:  # any other file that changed is still caught
        other = sorted((data / "train" / "blue").iterdir())[0]
        kept = other.read_bytes()
        other.write_bytes(kept + b"\0")
        assert "(a train image file was replaced or edited in place" in _error(run_cli, "--out", str(run), "--resume")
        other.write_bytes(kept)
    assert run_cli("--out", str(run), "--resume") == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 6


def test_resume_from_another_directory_names_where_relative_paths_start(run_cli, tmp_path, image_folder, monkeypatch):
    shutil.copytree(image_folder, tmp_path / "imgs")
    run = tmp_path / "r"
    monkeypatch.chdir(tmp_path)
    assert run_cli(*VIT, "--data", "imgs", "--out", str(run), "--stop-after", "2") == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert f"--data 'imgs' is a path relative to {tmp_path}, where {run} started; resume from there" in msg
    monkeypatch.chdir(tmp_path)
    assert run_cli("--out", str(run), "--resume") == 0


def test_resume_on_changed_data_is_refused(run_cli, tmp_path, image_folder):
    data = tmp_path / "imgs"
    shutil.copytree(image_folder, data)
    run = tmp_path / "r"
    args = [*VIT, "--data", str(data), "--out", str(run), "--stop-after", "2"]
    assert run_cli(*args) == 0  # a planned stop, resumable
    removed = sorted((data / "train" / "red").iterdir())[0]
    removed.rename(tmp_path / "aside.png")
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "the dataset" in msg and "changed since" in msg and "train 48 then, 47 now" in msg
    (tmp_path / "aside.png").rename(removed)
    for split in ("train", "val", "test"):  # same counts, another class
        (data / split / "red").rename(data / split / "crimson")
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "(class 1 'green' then, 'crimson' now)" in msg
    for split in ("train", "val", "test"):
        (data / split / "crimson").rename(data / split / "red")
    red, blue = (sorted((data / "train" / c).iterdir())[0] for c in ("red", "blue"))
    red.rename(data / "train" / "blue" / "moved.png")  # one image relabelled each way: same counts
    blue.rename(data / "train" / "red" / "moved.png")
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "(other train examples or labels, same count)" in msg
    (data / "train" / "blue" / "moved.png").rename(red)
    (data / "train" / "red" / "moved.png").rename(blue)
    kept = red.read_bytes()  # same paths and labels, another image under one name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(red)
    assert red.stat().st_size != len(kept)
    msg = _error(run_cli, "--out", str(run), "--resume")
    assert "(a train image file was replaced or edited in place: its size changed)" in msg
    red.write_bytes(kept)
    assert run_cli("--out", str(run), "--resume") == 0  # the same data again


def test_resume_with_more_classes_than_config_json_lists(run_cli, tmp_path):
    """config.json lists the first 100 class names (and a hash of all): a run over 101 classes
    resumes, and a change past the 100th name is still caught."""
    from PIL import Image

    data = tmp_path / "many"
    for c in range(101):
        d = data / "train" / f"class{c:03d}"
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (c, 2 * c % 256, i * 90)).save(d / f"{i}.png")
    run = tmp_path / "r"
    args = ["--model", "test_vit", "--img-size", "32", "--method", "linear", "--epochs", "1", "--batch-size", "32",
            "--data", str(data), "--out", str(run), "--stop-after", "1"]  # fmt: skip
    assert run_cli(*args) == 0
    saved = json.loads((run / "config.json").read_text())["data"]
    assert saved["num_classes"] == 101 and len(saved["classes"]) == 101 and saved["classes"][-1] == "..."
    (data / "train" / "class100").rename(data / "train" / "class999")
    assert "(other class names)" in _error(run_cli, "--out", str(run), "--resume")
    (data / "train" / "class999").rename(data / "train" / "class100")
    assert run_cli("--out", str(run), "--resume") == 0
    assert json.loads((run / "report.json").read_text())["steps"] == 6


def test_prompt_tuning_longer_than_the_positions_is_refused_up_front(run_cli, tmp_path, minilm_ready):
    # MiniLM embeds 512 positions; 20 virtual tokens leave 492 for the text
    msg = _error(run_cli, "--model", "minilm", "--data", "rotten-tomatoes", "--method", "prompt-tuning",
                 "--max-length", "500", "--train-size", "16", "--out", str(tmp_path / "r"))
    assert "--max-length 500 (500 tokens) plus 20 virtual tokens need 520 positions" in msg
    assert "use --max-length 492 or less" in msg
