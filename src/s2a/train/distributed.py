"""Data parallelism across processes (``torchrun``): process group, device, reductions.

Gradients are averaged with one ``all_reduce`` over a flat buffer of all trainable gradients
after the last micro-batch of an optimizer step (the same arithmetic as
``DistributedDataParallel`` without its bucketing, hooks and unused-parameter bookkeeping,
which S2A's frozen backbones and patched forwards would otherwise have to satisfy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import TrainError

__all__ = ["DistInfo", "all_reduce_grads", "all_reduce_sum", "barrier", "broadcast_module", "init_distributed"]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device(f"cuda:{local_rank}")
    else:
        try:
            dev = torch.device(pref)
        except RuntimeError:
            raise TrainError(f"device (--device) must be auto, cpu, cuda or cuda:N, got {pref!r}") from None
        if dev.type == "cpu":
            return dev
        if dev.type != "cuda":
            raise TrainError(f"device (--device) must be auto, cpu, cuda or cuda:N, got {pref!r}")
        if not torch.cuda.is_available():
            raise TrainError(f"--device {pref} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    count = torch.cuda.device_count()
    if dev.index >= count:  # e.g. torchrun with more processes per node than GPUs
        raise TrainError(
            f"--device {pref} (process {local_rank} of this node) needs {dev}, but this machine has "
            f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    return dev


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``
    > 1), with NCCL on CUDA and gloo on the CPU; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(0, 1, 0, device)
    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        created = True
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, created)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all processes (float64)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_grads(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average the gradients of ``params`` over all processes (a gradient missing on some
    counts as 0 there). A parameter no process computed a gradient for keeps none, as in one
    process: AdamW then leaves it alone (a zero gradient would still decay it and move it
    along its running moments)."""
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), has_grad])
    dist.all_reduce(flat)
    flat /= info.world_size
    used = (flat[-len(params):] > 0).tolist()  # one device sync, not one per parameter
    offset = 0
    for p, g, u in zip(params, grads, used, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype).clone() if u else None
        offset += n


def broadcast_module(module: torch.nn.Module, info: DistInfo, *, params: bool = True, buffers: bool = True) -> None:
    """Copy rank 0's parameters and/or buffers to every process."""
    if not info.enabled:
        return
    with torch.no_grad():
        if params:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)
        if buffers:
            for b in module.buffers():
                dist.broadcast(b, src=0)
