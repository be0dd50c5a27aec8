"""Checkpoints of a training run: written atomically, read defensively.

A checkpoint holds only what the run cannot rebuild: the trainable tensors, the model's
buffers (BatchNorm statistics move in full fine-tuning), and for ``last.pt`` the optimizer,
scheduler and gradient-scaler states, every RNG state, the position in the data and the
metrics so far. The frozen backbone is rebuilt from the model name and seed; a checksum of it
is stored so that a different backbone is caught instead of silently trained on.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from s2a._files import atomic_write

from .config import TrainError

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "atomic_save",
    "capture_rng",
    "frozen_checksum",
    "load_checkpoint",
    "load_model_tensors",
    "model_tensors",
    "restore_rng",
    "same_frozen",
]

FORMAT = "s2a-train-checkpoint"
VERSION = 1


class CheckpointError(TrainError):
    """A checkpoint that is corrupt, foreign, or does not match the run."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: str | os.PathLike, *, kind: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by :class:`s2a.train.Trainer` (``weights_only`` unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}). "
            "Start the run again with --overwrite."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by s2a train (format {FORMAT!r} expected)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r}, this s2a reads version {VERSION}")
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: a {ckpt.get('kind')!r} checkpoint where a {kind!r} one was expected")
    return ckpt


# ---------------------------------------------------------------------------- model tensors
def model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(trainable, buffers)``: clones of the parameters that require grad and of the buffers."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return trainable, buffers


def frozen_checksum(model: nn.Module) -> tuple[float, float]:
    """``(checksum, magnitude)`` of the frozen parameters: a weighted float64 sum of their
    values and the sum of their absolute values ((0.0, 0.0) when everything trains)."""
    total = magnitude = 0.0
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            if not p.requires_grad:
                values = p.detach().double()
                total += float(values.sum()) * (1.0 + 1e-3 * (i % 97))
                magnitude += float(values.abs().sum())
    return total, magnitude


def same_frozen(saved: Any, current: tuple[float, float]) -> bool:
    """Whether a checkpoint's :func:`frozen_checksum` is the current backbone's. The sums are
    compared to 1e-10 of the magnitude: a GPU sums in another order than the CPU (a run resumed
    on another device), while other weights or another initialisation change them by far more."""
    if isinstance(saved, (int, float)):  # checkpoints before the magnitude was kept
        return float(saved) == current[0]
    try:
        checksum, magnitude = (float(v) for v in saved)
    except (TypeError, ValueError):
        return False
    return math.isclose(checksum, current[0], rel_tol=0, abs_tol=1e-10 * max(magnitude, current[1]))


def load_model_tensors(model: nn.Module, ckpt: dict[str, Any], where: str) -> None:
    """Copy the checkpoint's trainable tensors and buffers into ``model``, checking that the
    names and shapes are exactly those of the model's trainable parameters and buffers."""
    trainable = ckpt.get("trainable")
    buffers = ckpt.get("buffers", {})
    if not isinstance(trainable, dict) or not isinstance(buffers, dict):
        raise CheckpointError(f"{where}: no trainable tensors in the checkpoint")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bufs = dict(model.named_buffers())
    problems = []
    missing = sorted(set(params) - set(trainable))
    unexpected = sorted(set(trainable) - set(params))
    if missing:
        problems.append(f"missing trainable tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, t in trainable.items():
        if name in params and tuple(t.shape) != tuple(params[name].shape):
            problems.append(f"{name}: shape {tuple(t.shape)} in the checkpoint, {tuple(params[name].shape)} in the model")
    for name, t in buffers.items():
        if name in bufs and tuple(t.shape) != tuple(bufs[name].shape):
            problems.append(f"buffer {name}: shape {tuple(t.shape)} vs {tuple(bufs[name].shape)}")
    if problems:
        raise CheckpointError(
            f"{where} does not match this model and method: " + "; ".join(problems[:6])
            + ". It was written for another --model/--method/--modules; use a matching run or --overwrite."
        )
    with torch.no_grad():
        for name, t in trainable.items():
            params[name].copy_(t)
        for name, t in buffers.items():
            if name in bufs:
                bufs[name].copy_(t)


# ---------------------------------------------------------------------------- RNG
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """Every RNG state a training step may draw from (Python, NumPy, torch CPU and CUDA)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
    }
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)), *np_state[2:]]
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    npst = state.get("numpy")
    if npst is not None:
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
