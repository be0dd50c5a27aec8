"""Data parallel training: ``torchrun --nproc_per_node 2`` with gloo on the CPU, stopped and
resumed half-way, matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from s2a.train import load_checkpoint

ARGS = ["--model", "test_vit", "--img-size", "32", "--method", "full", "--epochs", "2",
        "--train-size", "45", "--batch-size", "6", "--grad-accum", "2", "--lr", "3e-3",
        "--no-progress"]  # fmt: skip
# 45 examples, micro-batches of 6 (3 per process) and a last one of 3 (2 + 1): uneven shares too


def test_torchrun_two_cpu_processes_match_one(image_folder, tmp_path, run_cli):
    single = tmp_path / "single"
    assert torch.get_num_threads() == 1  # as each torchrun worker (OMP_NUM_THREADS=1); see conftest
    assert run_cli(*ARGS[:-1], "--data", str(image_folder), "--out", str(single)) == 0
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "S2A_COMPILE": "0", "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "s2a.cli", "train"]  # fmt: skip
    # a time-sliced run: 3 steps (mid-epoch 1), then --resume to the end
    proc = subprocess.run([*torchrun, *ARGS, "--data", str(image_folder), "--out", str(ddp), "--stop-after", "3"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "stopped after 3 steps" in proc.stderr and not (ddp / "report.json").exists()
    assert load_checkpoint(ddp / "checkpoints" / "last.pt")["global_step"] == 3
    proc = subprocess.run([*torchrun, "--out", str(ddp), "--resume", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("accuracy") == 1  # rank 0 alone prints the summary

    a = json.loads((single / "report.json").read_text())
    b = json.loads((ddp / "report.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2
    # each process draws its own dropout masks: one seed made every share draw rank 0's
    rng = load_checkpoint(ddp / "checkpoints" / "last.pt")["rng_per_rank"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert a["steps"] == b["steps"] == 8
    ta = load_checkpoint(single / "checkpoints" / "last.pt")["trainable"]
    tb = load_checkpoint(ddp / "checkpoints" / "last.pt")["trainable"]
    assert set(ta) == set(tb)
    # same arithmetic up to float summation order; Adam magnifies that order noise on
    # near-zero gradients (the key bias of attention has none), hence atol at a few % of lr
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-3, atol=1e-4), k
    flat_a = torch.cat([ta[k].flatten() for k in sorted(ta)])
    flat_b = torch.cat([tb[k].flatten() for k in sorted(ta)])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5
    la = [m["loss"] for m in map(json.loads, (single / "metrics.jsonl").read_text().splitlines()) if m["event"] == "train"]
    lb = [m["loss"] for m in map(json.loads, (ddp / "metrics.jsonl").read_text().splitlines()) if m["event"] == "train"]
    assert la == pytest.approx(lb, rel=1e-4)
    assert [h["acc"] for h in a["history"]] == [h["acc"] for h in b["history"]]
    assert a["accuracy"] == b["accuracy"]


def _reduce_grads_on_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from s2a.train.distributed import DistInfo, all_reduce_grads

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        both, one, neither = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
        both.grad = torch.full((3,), float(rank + 1))
        if rank == 1:
            one.grad = torch.full((3,), 4.0)
        all_reduce_grads([both, one, neither], DistInfo(rank, 2, 0, torch.device("cpu")))
        torch.save([p.grad for p in (both, one, neither)], f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_parameter_no_process_has_a_gradient_for_keeps_none(tmp_path):
    # as in one process, where AdamW then skips it; a zero gradient would decay and move it
    torch.multiprocessing.spawn(_reduce_grads_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        both, one, neither = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(both, torch.full((3,), 1.5)) and torch.equal(one, torch.full((3,), 2.0))
        assert neither is None
