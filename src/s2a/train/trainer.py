"""The training loop of ``s2a train``.

One run = one directory::

    DIR/config.json          the options as given and as resolved, data and model summaries
    DIR/metrics.jsonl        one JSON object per optimizer step ("train"), per epoch ("val",
                             "epoch") and at the end ("test")
    DIR/checkpoints/last.pt  everything needed to continue (written atomically)
    DIR/checkpoints/best.pt  the trainable tensors of the epoch with the best val accuracy
                             (a new one waits in best-next.pt until last.pt records it)
    DIR/report.json|md       accuracy, trainable parameters, memory, speed
    DIR/*.png                memory by operator; loss and accuracy curves

Determinism: the data order of epoch ``e`` is a permutation seeded by ``(seed, e)``; model
construction, dropout and everything else draw from RNGs seeded by ``seed`` and saved in
``last.pt``. On the CPU two runs with the same options give bit-identical tensors, and a run
interrupted (Ctrl-C / SIGTERM: the current optimizer step finishes, ``last.pt`` is written)
and resumed gives the tensors of the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from s2a.data import DataBundle, DataError, Split, load_data, resolve_kind
from s2a.zoo import ZooError, ZooModel, call_model, load_model, model_kind

from .checkpoint import (
    FORMAT,
    VERSION,
    CheckpointError,
    atomic_save,
    capture_rng,
    frozen_checksum,
    load_checkpoint,
    load_model_tensors,
    model_tensors,
    restore_rng,
    same_frozen,
)
from .config import TrainConfig, TrainError
from .distributed import (
    DistInfo,
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    broadcast_module,
    init_distributed,
)
from .methods import apply_method
from .report import read_metrics, train_loss_label, write_report

__all__ = ["RUN_FILES", "TrainInterrupted", "Trainer", "seed_everything", "train"]

RUN_FILES = ("config.json", "metrics.jsonl", "report.json", "report.md", "memory_by_operator.png", "curves.png")
CKPT_DIR = "checkpoints"
BEST_PENDING = "best-next.pt"  # a new best.pt until last.pt records it (Trainer._save_best)
TUNED_DIR = "tuned"  # s2a runs: the best checkpoint as an s2a.save_tuned directory


class TrainInterrupted(TrainError):
    """The run stopped on request after writing ``last.pt``; ``--resume`` continues it.
    ``planned`` is True for ``stop_after``, False for a signal or :meth:`Trainer.request_stop`."""

    def __init__(self, message: str, planned: bool = False) -> None:
        super().__init__(message)
        self.planned = planned


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_statistics_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The BatchNorm layers a training forward normalises with the batch's statistics (not
    those s2a.apply froze on their running statistics)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.training and not any(getattr(h, "keeps_running_stats", False) for h in m._forward_pre_hooks.values())]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch ``epoch``: depends only on ``(n, seed, epoch)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


# float attributes holding a dropout rate applied functionally: timm's head dropout, the
# attention dropout of HF decoders (Llama, Mistral, Qwen2: no nn.Dropout module there)
_DROPOUT_RATE_ATTRS = ("drop_rate", "attention_dropout")


def set_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the rate of every dropout layer of ``model`` to ``p``; returns how many were set.

    Dropout modules (``nn.Dropout`` and its variants, whose ``p`` HF and timm blocks read at
    call time, fused attention included) and the float rates of :data:`_DROPOUT_RATE_ATTRS`.
    Stochastic depth (timm's ``DropPath``) is not dropout and keeps its rate. A model with no
    dropout is left as it is for ``p == 0`` and refused (``ValueError``) for ``p > 0``."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = p
            n += 1
        for attr in _DROPOUT_RATE_ATTRS:
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)
                n += 1
    if not n and p > 0:
        raise ValueError(f"{type(model).__name__} has no dropout layer to set to {p}")
    return n


def rate_kind(model: torch.nn.Module, kind: str) -> str:
    """The model kind whose default learning rates apply (:func:`s2a.train.config.default_lr`):
    "cnn" for an image model holding most of its weights in convolutions, which fine-tune at
    other rates than image transformers (a ViT's patch embedding is its only convolution)."""
    if kind != "image":
        return kind
    conv = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)
               for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return "cnn" if 2 * conv > total else kind


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _fmt_mem(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


class _Batches(torch.utils.data.Dataset):
    """Index -> (item, label); the collate function runs the model's preprocessing."""

    def __init__(self, split: Split, preprocess: Callable[[Any], Any]) -> None:
        self.split = split
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.split.items[i], self.split.labels[i]

    def collate(self, rows: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        items = [r[0] for r in rows]
        if items and all(isinstance(x, np.ndarray) and x.ndim == 2 for x in items) and len({x.shape for x in items}) == 1:
            items = np.stack(items)  # grey images of one size: one batched resize
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return self.preprocess(items), labels


def _input_shape(inputs: Any) -> list[int] | None:
    """Shape of the batch's main tensor (token ids or pixels), for the report."""
    if isinstance(inputs, torch.Tensor):
        return list(inputs.shape)
    if isinstance(inputs, dict):
        for key in ("input_ids", "pixel_values", "input_values", "inputs_embeds"):
            if isinstance(inputs.get(key), torch.Tensor):
                return list(inputs[key].shape)
    return None


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class Trainer:
    """Fine-tune a model on a dataset (see the module docstring for the run directory).

    ``Trainer(config, resume=False, overwrite=False, callbacks=())``; :meth:`fit` runs and
    returns the report dict. A callback ``fn(trainer, event, info)`` is called with event
    ``"step"`` after every optimizer step and ``"epoch"`` after every evaluation; it may call
    :meth:`request_stop` (as Ctrl-C does).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[Callable[[Trainer, str, dict[str, Any]], None]] = (),
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer expects a TrainConfig, got {type(config).__name__}")
        config.validate()
        if resume and overwrite:
            raise TrainError("--resume and --overwrite exclude each other")
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.callbacks = list(callbacks)
        self.run_dir = Path(config.out)
        self._stop = False
        self._planned_stop = False
        self._steps_this_run = 0
        self._last_saved_step: int | None = None
        self.dist: DistInfo | None = None

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        """Stop after the current optimizer step, writing ``last.pt`` (resume continues)."""
        self._stop = True

    def fit(self) -> dict[str, Any]:
        self.dist = init_distributed(self.config.device)
        try:
            with self._signals():
                return self._fit()
        finally:
            if self.dist.created_group:
                import torch.distributed as tdist

                if tdist.is_initialized():
                    tdist.destroy_process_group()

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        owner = os.getpid()

        def handler(signum, frame):
            if os.getpid() != owner:
                # a forked DataLoader worker inherits the handler and, from a terminal's Ctrl-C or a
                # scheduler's signal to the process group, the signal: the main process handles it
                return
            if self._stop:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop = True
            if self.dist is None or self.dist.is_main:
                print(
                    f"\ns2a train: {signal.Signals(signum).name} received; finishing the current step "
                    "and writing the last checkpoint (send it again to stop at once)",
                    file=sys.stderr,
                )

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ run directory
    def _check_run_dir(self) -> dict[str, Any] | None:
        """Validate the run directory against --resume/--overwrite (every process, read only).
        Returns the saved config.json when resuming."""
        d = self.run_dir
        exists = d.exists()
        if exists and not d.is_dir():
            raise TrainError(f"--out {d} exists and is not a directory")
        entries = sorted(p.name for p in d.iterdir()) if exists else []
        data = Path(self.config.data).expanduser()
        # Refused, not skipped when listing class folders: images are found at any depth under
        # a class folder, so a run anywhere inside (root/cat/run/curves.png) would lend a class
        # its plots, and no rule about where a run sits would catch them all.
        if data.is_dir() and resolve_kind(str(data)) == "image-folder" and d.resolve().is_relative_to(data.resolve()):
            raise TrainError(
                f"--out {d} is inside the image folder --data {data}: the next run would read this run's "
                "files (curves.png, ...) as training images. Choose an --out outside the dataset."
            )
        is_run = (d / "config.json").is_file()
        if self.resume:
            if not is_run:
                raise TrainError(f"nothing to resume: {d} holds no s2a run (no config.json); drop --resume to start one")
            try:
                saved = json.loads((d / "config.json").read_text(encoding="utf-8"))
                saved_cfg = TrainConfig.from_dict(saved["config"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TrainError(f"{d}/config.json is unreadable ({exc}); start again with --overwrite") from None
            diffs = self.config.fingerprint_changes(saved_cfg.fingerprint())
            if diffs:
                raise TrainError(
                    f"--resume: the options differ from those {d} was started with: "
                    + ", ".join(f"--{k.replace('_', '-')} {old!r} (run) vs {new!r} (now)" for k, (old, new) in diffs.items())
                    + ". Resume with the run's options, or start over with --overwrite."
                )
            return saved
        if entries:
            if not self.overwrite:
                # --resume and --overwrite both refuse a directory that is not a run: not offered
                todo = ("Pass --resume to continue it or --overwrite to replace it, or choose another --out."
                        if is_run else "It is not an s2a run (no config.json): choose another --out, or empty it.")
                raise TrainError(
                    f"run directory {d} already exists and holds {'an s2a run' if is_run else 'files'} "
                    f"({', '.join(entries[:6])}{' ...' if len(entries) > 6 else ''}). {todo}"
                )
            if not is_run:
                raise TrainError(
                    f"--overwrite: {d} is not empty and is not an s2a run (no config.json); "
                    "refusing to delete it. Choose another --out."
                )
        return None

    def _prepare_run_dir(self) -> None:
        d = self.run_dir
        if self.overwrite and d.exists():
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    (d / name).unlink()
            for sub in (CKPT_DIR, TUNED_DIR):
                if (d / sub).is_dir():
                    shutil.rmtree(d / sub)
        (d / CKPT_DIR).mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ setup
    def _check_same_data(self, then: dict[str, Any]) -> None:
        """A resumed run must see the data it started on: the same options can read other data
        when files were added, removed, renamed or relabelled in between. Run directories made
        before a key was recorded are checked on the keys they have."""
        now = _data_record(self.data, then.get("replaceable_files") or ())
        changed = []
        for key in ("num_classes", "classes", "classes_sha256", "train", "val", "test", "sha256",
                    "file_sizes_sha256"):
            if key not in then or then[key] == now.get(key):
                continue
            if key == "sha256":  # same counts (checked first), other examples, labels or order
                split = next(k for k in now[key] if then[key].get(k) != now[key][k])
                changed.append(f"other {split} examples or labels, same count")
            elif key == "file_sizes_sha256":  # same paths and labels, other bytes
                split = next(k for k in then[key] if then[key][k] != (now.get(key) or {}).get(k))
                changed.append(f"a {split} image file was replaced or edited in place: its size changed")
            elif key == "classes":
                i = next((i for i, (a, b) in enumerate(zip(then[key], now[key], strict=False)) if a != b), None)
                if i is not None:  # the lists are the same length here: num_classes agreed
                    changed.append(f"class {i} {then[key][i]!r} then, {now[key][i]!r} now")
            elif key == "classes_sha256":
                changed.append("other class names")
            else:
                changed.append(f"{key} {then[key]} then, {now[key]} now")
        if changed:
            raise TrainError(
                f"--resume: the dataset {self.config.data!r} changed since {self.run_dir} started "
                f"({changed[0]}); resume with the same data, or start over with --overwrite"
            )

    def _check_relative_paths(self, started_in: str | None) -> None:
        """config.json keeps --data, --model and --weights as given; a relative one names
        another file when the run is resumed from another directory."""
        if not started_in or Path(started_in) == Path.cwd():
            return
        for option in ("data", "model", "weights"):
            value = getattr(self.config, option)
            if not value or Path(value).is_absolute() or Path(value).exists():
                continue
            if (Path(started_in) / value).exists():
                raise TrainError(
                    f"--resume: --{option} {value!r} is a path relative to {started_in}, where {self.run_dir} "
                    f"started; resume from there (cd {started_in})"
                )

    def _log(self, msg: str) -> None:
        if self.dist is None or self.dist.is_main:
            print(f"s2a train: {msg}", file=sys.stderr, flush=True)

    def _setup(self) -> None:
        cfg = self.config
        info = self.dist
        assert info is not None
        saved = self._check_run_dir()
        if saved is not None:
            self._check_relative_paths(saved.get("cwd"))
        try:
            mkind = model_kind(cfg.model)
        except ZooError as exc:
            raise TrainError(str(exc)) from None
        seed_everything(cfg.seed)
        data = load_data(
            cfg.data,
            train_size=cfg.train_size,
            val_size=cfg.val_size,
            test_size=cfg.test_size,
            seed=cfg.seed,
            split_seed=cfg.split_seed,
            text_column=cfg.text_column,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
        )
        if data.kind != mkind:
            raise TrainError(f"model {cfg.model!r} takes {mkind} but dataset {cfg.data!r} holds {data.kind} examples")
        for option, value, kind in (("--max-length", cfg.max_length, "text"), ("--img-size", cfg.img_size, "image")):
            if value is not None and mkind != kind:
                raise TrainError(f"{option} applies to {kind} models; {cfg.model!r} takes {mkind}: drop {option}")
        self.data: DataBundle = data
        if saved is not None:
            self._check_same_data(saved.get("data") or {})
        if cfg.batch_size < info.world_size:
            raise TrainError(f"--batch-size {cfg.batch_size} is smaller than the {info.world_size} processes")
        seed_everything(cfg.seed)
        try:
            zm: ZooModel = load_model(cfg.model, data.num_classes, weights=cfg.weights, max_length=cfg.max_length, img_size=cfg.img_size)
        except ZooError as exc:
            raise TrainError(str(exc)) from None
        self.zoo = zm
        rc = cfg.resolved(rate_kind(zm.model, data.kind))
        self.rc = rc
        if cfg.dropout is not None:
            try:
                set_dropout(zm.model, cfg.dropout)
            except ValueError as exc:
                raise TrainError(f"--dropout {cfg.dropout}: {exc}; drop --dropout for model {cfg.model!r}") from None
        example = None
        if cfg.method not in ("full", "linear"):  # one real batch for the dry run that finds the blocks
            first = _Batches(data.train, zm.preprocess)
            example, _ = first.collate([first[i] for i in range(min(2, len(data.train)))])
        res = apply_method(
            zm.model, cfg.method, head_names=zm.head_names, modules=cfg.modules,
            prompt_rank=cfg.prompt_rank, act_bits=rc.compression_bits, example_input=example,
            max_length=getattr(zm.preprocess, "max_length", None), dropout=cfg.dropout,
        )  # fmt: skip
        self.model = res.model.to(info.device)
        self.model.train()
        self.method_notes = res.notes
        self.s2a_config = res.s2a_config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainError(f"method {cfg.method!r} left no trainable parameter")
        broadcast_module(self.model, info)
        if info.world_size > 1:
            # Each process its own dropout masks (with one seed, every share drew the first
            # share's).
            seed_everything(cfg.seed + 1_000_003 * info.rank)
            batch_stats = batch_statistics_layers(self.model)
            if batch_stats:
                self.method_notes = [*self.method_notes, (
                    f"{len(batch_stats)} BatchNorm layer(s) normalise with batch statistics: each of the "
                    f"{info.world_size} processes normalises its own share of a micro-batch (no SyncBatchNorm), "
                    "so this run differs from one process's with the same global batch")]
        self.trainable_params = sum(p.numel() for p in self.params)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self.frozen_sum = frozen_checksum(self.model)

        # optimizer: no weight decay on 1-D tensors (biases, norms)
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [g for g in ({"params": decay, "weight_decay": rc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=rc.lr)
        n_train = len(data.train)
        self.micro_per_epoch = math.ceil(n_train / rc.batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / rc.grad_accum)
        self.total_steps = self.steps_per_epoch * rc.epochs
        self.warmup_steps = round(rc.warmup_ratio * self.total_steps)
        warm, total = self.warmup_steps, self.total_steps

        def lr_lambda(step: int) -> float:
            if warm > 0 and step < warm:
                return (step + 1) / warm
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        dev = info.device
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[rc.precision]
        self.scaler = torch.amp.GradScaler(dev.type) if rc.precision == "fp16" else None
        self.train_ds = _Batches(data.train, zm.preprocess)

        # state
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.measured_input_shape: list[int] | None = None  # of the batch memory is measured on
        self.best: dict[str, Any] = {}
        self.epoch_stats = [0.0, 0.0, 0.0]  # loss sum, correct, seen
        self.step_times: list[float] = []  # whole optimizer steps, data loading included
        self.step_data_times: list[float] = []  # of which fetching and preparing the batches
        self.step_samples: list[int] = []
        # index in step_times of each process start's first step (allocator and compiler
        # warm-up): left out of the report's timing, for a resumed run as for a fresh one
        self.timing_warmup: list[int] = []
        self.train_time = 0.0

        last = self.run_dir / CKPT_DIR / "last.pt"
        if saved is not None and last.is_file():
            self._restore(load_checkpoint(last, kind="last"), str(last))
            self._settle_pending_best()
            self._last_saved_step = self.global_step
            if self.epoch >= rc.epochs:
                self._log(
                    f"{self.run_dir} already finished its {rc.epochs} epochs: testing its best checkpoint again "
                    "and rewriting the report"
                )
            else:
                self._log(
                    f"resumed {self.run_dir} at epoch {self.epoch + 1}, step {self.global_step}/{self.total_steps}"
                )
        elif saved is not None:
            self._log(f"{self.run_dir} has no last checkpoint yet: starting from the beginning")
        barrier(info)
        if info.is_main:
            self._prepare_run_dir()
            if saved is None:
                self._write_config()
            self._rewrite_metrics()
        barrier(info)

    def _write_config(self) -> None:
        info = self.dist
        assert info is not None
        doc = {
            "config": self.config.to_dict(),
            "resolved": self.rc.to_dict(),
            "data": _data_record(self.data),
            "model": self.zoo.describe(),
            "method_notes": self.method_notes,
            "s2a_config": self.s2a_config,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "world_size": info.world_size,
            "device": str(info.device),
            "cwd": os.getcwd(),  # relative --data / --model / --weights paths start here
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
        path = self.run_dir / "config.json"
        tmp = path.with_name(".config.json.tmp")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    # ------------------------------------------------------------------ metrics
    def _emit(self, record: dict[str, Any]) -> None:
        if not self.dist or not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def _rewrite_metrics(self) -> None:
        """Keep what the checkpoint vouches for: step records up to its step, its eval history."""
        path = self.run_dir / "metrics.jsonl"
        old = read_metrics(path)
        keep = [m for m in old if m.get("event") == "train" and m.get("global_step", 0) <= self.global_step]
        for h in self.history:
            keep.append({"event": "val", **{k: v for k, v in h.items() if k not in ("train_loss", "train_acc")}})
            keep.append({"event": "epoch", "epoch": h["epoch"], "global_step": h["global_step"],
                         "train_loss": h.get("train_loss"), "train_acc": h.get("train_acc")})  # fmt: skip
        order = {"train": 0, "val": 1, "epoch": 2}
        keep.sort(key=lambda m: (m.get("global_step", 0), order.get(m["event"], 3)))
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in keep), encoding="utf-8")
        os.replace(tmp, path)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_common(self, kind: str) -> dict[str, Any]:
        trainable, buffers = model_tensors(self.model)
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "fingerprint": json.dumps(self.config.fingerprint(), sort_keys=True),
            "frozen_checksum": list(self.frozen_sum),
            "trainable": trainable,
            "buffers": buffers,
            "epoch": self.epoch,
            "global_step": self.global_step,
        }

    def _save_last(self) -> None:
        """Every process calls this at the same points (their RNG states are gathered)."""
        assert self.dist is not None
        # the loss was finite before the update; the update itself may have broken the weights
        # (every process holds the same ones, so all of them stop here)
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            self._diverged(float("nan"), self.optimizer.param_groups[0]["lr"], weights=True)
        rng = capture_rng(self.dist.device)
        per_rank = [rng]
        if self.dist.enabled:  # dropout draws depend on each process's share of the batch
            import torch.distributed as tdist

            per_rank = [None] * self.dist.world_size
            tdist.all_gather_object(per_rank, rng)
        self._last_saved_step = self.global_step  # every process: each one words its own errors
        if not self.dist.is_main:
            return
        ckpt = self._ckpt_common("last")
        ckpt.update(
            step_in_epoch=self.step_in_epoch,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=rng,
            rng_per_rank=per_rank,
            history=self.history,
            best=self.best,
            epoch_stats=list(self.epoch_stats),
            train_time=self.train_time,
            # the report's step time and throughput cover every step, across resumes
            step_times=list(self.step_times),
            step_samples=list(self.step_samples),
            step_data_times=list(self.step_data_times),
            warmup_steps=list(self.timing_warmup),
        )
        atomic_save(ckpt, self.run_dir / CKPT_DIR / "last.pt")

    def _save_best(self) -> None:
        """Written beside best.pt, which it replaces once last.pt records it (:meth:`_commit_best`):
        a run killed between the two writes resumes from the older last.pt, whose replay of the
        epoch may not improve again (GPU kernels, another number of processes), and must then
        still find the earlier best epoch's tensors in best.pt."""
        if not self.dist or not self.dist.is_main:
            return
        ckpt = self._ckpt_common("best")
        ckpt.update(best=self.best)
        atomic_save(ckpt, self.run_dir / CKPT_DIR / BEST_PENDING)

    def _commit_best(self) -> None:
        if self.dist is not None and self.dist.is_main:
            os.replace(self.run_dir / CKPT_DIR / BEST_PENDING, self.run_dir / CKPT_DIR / "best.pt")

    def _settle_pending_best(self) -> None:
        """On resume: a pending best checkpoint that last.pt records is committed, one written by
        an epoch that last.pt does not hold (lost with the kill, to be replayed) is dropped."""
        pending = self.run_dir / CKPT_DIR / BEST_PENDING
        if not pending.is_file() or not (self.dist is None or self.dist.is_main):
            return
        try:
            step = load_checkpoint(pending, kind="best").get("best", {}).get("global_step")
        except CheckpointError:  # unreadable (atomic writes aside, a damaged disk): dropped as stale
            step = None
        if step is not None and step == self.best.get("global_step"):
            self._commit_best()
        else:
            pending.unlink()

    def _check_ckpt(self, ckpt: dict[str, Any], where: str) -> None:
        try:
            theirs = json.loads(ckpt.get("fingerprint") or "{}")
        except (TypeError, ValueError):
            theirs = None
        diffs = self.config.fingerprint_changes(theirs) if isinstance(theirs, dict) and theirs else None
        if diffs is None or diffs:
            raise CheckpointError(
                f"{where} was written by a run with other options ({', '.join(diffs or ()) or 'unknown'}); "
                "it cannot continue this one. Use --overwrite to start over."
            )
        load_model_tensors(self.model, ckpt, where)
        if not same_frozen(ckpt.get("frozen_checksum", 0.0), self.frozen_sum):
            raise CheckpointError(
                f"{where}: the frozen backbone differs from the one this checkpoint was trained on "
                "(other pretrained weights or another random initialisation)"
            )

    def _restore(self, ckpt: dict[str, Any], where: str) -> None:
        self._check_ckpt(ckpt, where)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch = int(ckpt["epoch"])
            self.step_in_epoch = int(ckpt["step_in_epoch"])
            self.global_step = int(ckpt["global_step"])
            self.history = list(ckpt["history"])
            self.best = dict(ckpt["best"])
            self.epoch_stats = [float(v) for v in ckpt["epoch_stats"]]
            self.train_time = float(ckpt.get("train_time", 0.0))
            self.step_times = [float(v) for v in ckpt.get("step_times", [])]
            self.step_samples = [int(v) for v in ckpt.get("step_samples", [])]
            # checkpoints from before data loading was timed apart: counted as compute
            self.step_data_times = [float(v) for v in ckpt.get("step_data_times", [0.0] * len(self.step_times))]
            self.timing_warmup = [int(v) for v in ckpt.get("warmup_steps", [0])]
            info = self.dist
            assert info is not None
            per_rank = ckpt.get("rng_per_rank") or []
            if len(per_rank) == info.world_size:
                restore_rng(per_rank[info.rank], info.device)
            else:  # resumed with another number of processes: same data, other dropout draws
                restore_rng(ckpt["rng"], info.device)
                if len(per_rank) > 1 or info.world_size > 1:
                    self._log(
                        f"resuming with {info.world_size} process(es) a run saved by {len(per_rank)}: "
                        "the continuation is not bit-identical"
                    )
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{where} is incomplete or does not fit this run: {type(exc).__name__}: {exc}") from None
        if self.global_step != self.epoch * self.steps_per_epoch + self.step_in_epoch:
            raise CheckpointError(f"{where}: step {self.global_step} does not fit epoch {self.epoch}, step {self.step_in_epoch}")

    # ------------------------------------------------------------------ batches
    def _plan(self, epoch: int, start_step: int) -> list[list[tuple[list[int], int]]]:
        """Per optimizer step from ``start_step``: ``(local indices, global micro-batch size)``
        for each micro-batch. An empty local share gets one index with weight 0."""
        info = self.dist
        assert info is not None
        rc = self.rc
        order = epoch_order(len(self.data.train), rc.seed, epoch)
        micro = [order[i : i + rc.batch_size] for i in range(0, len(order), rc.batch_size)]
        steps = [micro[i : i + rc.grad_accum] for i in range(0, len(micro), rc.grad_accum)]
        plan = []
        for group in steps[start_step:]:
            entries = []
            for mb in group:
                share = [c.tolist() for c in torch.tensor(mb).tensor_split(info.world_size)][info.rank]
                entries.append((share, len(mb)))
            plan.append(entries)
        return plan

    def _loader(self, ds: _Batches, batches: list[list[int]]) -> Iterator[tuple[Any, torch.Tensor]]:
        real = [b if b else [0] for b in batches]
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=real, collate_fn=ds.collate, num_workers=self.rc.num_workers,
            # its own generator: creating an iterator must not draw from the global RNG
            # (that would shift dropout masks between a resumed and an uninterrupted run)
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return self._readable(iter(loader))

    def _readable(self, batches: Iterator[tuple[Any, torch.Tensor]]) -> Iterator[tuple[Any, torch.Tensor]]:
        """The batches, with an unreadable file (found only when its batch is built) turned into
        an error that names it and says how to go on; a DataLoader worker wraps the original in
        its traceback, of which the last line is the message."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (ZooError, DataError) as exc:
                text = re.sub(r"^[\w.]+Error: ", "", str(exc).strip().splitlines()[-1])
                since = f" from step {self._last_saved_step}" if self._last_saved_step else ""
                fix = "Fix that example"
                if text.startswith("cannot read image "):
                    fix = "Replace the file with a readable one"
                    self._allow_replacing(text)
                raise TrainError(
                    f"{text}. {fix} and continue{since} with: s2a train --out {self.run_dir} --resume; "
                    "or remove it and start over with --overwrite"
                ) from None
            yield batch

    def _allow_replacing(self, message: str) -> None:
        """Record in config.json that the image named by ``message`` ("cannot read image PATH:
        ...") may change before ``--resume``: the error tells the user to replace it."""
        # Any process: under torchrun the one that read the file may not be the main one.
        if self.dist is None or self.data.kind != "image":
            return
        splits = (self.data.train, self.data.val, self.data.test)
        paths = {v for s in splits for v in (s.strings() or ())}
        bad = next((p for p in paths if message.startswith(f"cannot read image {p}: ")), None)
        path = self.run_dir / "config.json"
        if bad is None or not path.is_file():
            return
        doc = json.loads(path.read_text(encoding="utf-8"))
        allowed = {*(doc["data"].get("replaceable_files") or ()), bad}
        doc["data"] = _data_record(self.data, sorted(allowed))
        tmp = path.with_name(f".config.json.{os.getpid()}.tmp")  # processes may write at once
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        assert self.dist is not None
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: Split) -> dict[str, float]:
        info = self.dist
        assert info is not None
        ds = _Batches(split, self.zoo.preprocess)
        idx = torch.arange(len(split)).tensor_split(info.world_size)[info.rank].tolist()
        bs = self.rc.eval_batch_size or self.rc.batch_size
        batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
        was_training = self.model.training
        self.model.eval()
        loss_sum = correct = 0.0
        try:
            for inputs, labels in self._loader(ds, batches) if batches else []:
                inputs, labels = _to_device(inputs, info.device), labels.to(info.device)
                with self._autocast():
                    logits = call_model(self.model, inputs)
                logits = logits.float()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += float((logits.argmax(-1) == labels).sum())
        finally:
            self.model.train(was_training)
        loss_sum, correct, n = all_reduce_sum([loss_sum, correct, float(len(idx))], info)
        return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "n": int(n)}

    # ------------------------------------------------------------------ training
    def _train_step(self, entries: list[tuple[list[int], int]], loader: Iterator) -> tuple[float, float, float, float]:
        """One optimizer step over its micro-batches; returns (loss sum, correct, seen) here and
        the seconds spent fetching and moving the batches (apart from the step's compute)."""
        info = self.dist
        assert info is not None
        loss_sum = correct = seen = data_s = 0.0
        # The mean over every example of the step, however its micro-batches are sized (the
        # last step of an epoch may end with a short one); times world_size, which
        # all_reduce_grads divides by.
        weight_per_example = info.world_size / sum(n_global for _, n_global in entries)
        for share, n_global in entries:
            t0 = time.perf_counter()
            inputs, labels = next(loader)
            inputs, labels = _to_device(inputs, info.device), labels.to(info.device)
            data_s += time.perf_counter() - t0
            with self._autocast():
                try:
                    logits = call_model(self.model, inputs)
                except ValueError as exc:
                    if "more than 1 value per channel" not in str(exc):
                        raise
                    share_of = (f" (this process's share of a micro-batch of {n_global}, split over "
                                f"{info.world_size} processes)" if info.world_size > 1 else "")
                    raise TrainError(
                        f"a micro-batch of {len(labels)} example(s){share_of} reached a BatchNorm layer that "
                        f"normalises with the batch's statistics, which one value per channel cannot give ({exc}). "
                        f"Pick a --batch-size (now {self.rc.batch_size}) that leaves no such last micro-batch "
                        f"of the {len(self.data.train)} training examples, or another --train-size; then start "
                        "over with --overwrite") from None
            per = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.rc.label_smoothing)
            loss = per.sum() * (weight_per_example if share else 0.0)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if share:
                loss_sum += float(per.detach().sum())
                correct += float((logits.detach().argmax(-1) == labels).sum())
                seen += len(share)
        all_reduce_grads(self.params, info)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.rc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.rc.max_grad_norm)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # update() lowers the scale after inf / NaN gradients, when step() skipped the
            # update: the schedule waits too (early fp16 steps would otherwise eat the warm-up)
            stepped = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if info.device.type == "cuda":  # else the next step's batch copy waits for this step's kernels
            torch.cuda.synchronize(info.device)
        return loss_sum, correct, seen, data_s

    def _memory_now(self) -> int | None:
        dev = self.dist.device if self.dist else torch.device("cpu")
        if dev.type == "cuda":
            return int(torch.cuda.memory_allocated(dev))
        return _rss_bytes()

    def _stop_agreed(self) -> bool:
        assert self.dist is not None
        if not self.dist.enabled:
            return self._stop
        return all_reduce_sum([1.0 if self._stop else 0.0], self.dist)[0] > 0

    def _interrupt(self) -> None:
        self._save_last()
        barrier(self.dist)  # type: ignore[arg-type]
        what = f"stopped after {self._steps_this_run} steps (--stop-after)" if self._planned_stop else "interrupted"
        raise TrainInterrupted(
            f"{what} at step {self.global_step}/{self.total_steps} (epoch {self.epoch + 1}); "
            f"{self.run_dir}/{CKPT_DIR}/last.pt written. Continue with: s2a train --out {self.run_dir} --resume",
            planned=self._planned_stop,
        )

    def _diverged(self, loss: float, lr: float, validation: bool = False, weights: bool = False) -> None:
        """Stop before a non-finite step reaches a checkpoint, the metrics or a report: what the
        run directory holds stays the last good state. Resuming would replay the same step, so
        the advice is to start over with other options."""
        rc = self.rc
        last = self.run_dir / CKPT_DIR / "last.pt"
        if self._last_saved_step is None:
            kept = "no checkpoint was written this run"
        elif validation and self._last_saved_step == self.global_step:
            # --save-every wrote the step whose update broke the weights
            kept = f"{last} (step {self._last_saved_step}) holds the weights that step broke"
        else:
            kept = f"{last} (step {self._last_saved_step}) is untouched"
        hints = [f"lower --lr (this step ran at {lr:.3g})"]
        if rc.precision == "fp16":
            hints.append("use --precision bf16 or fp32 (fp16 overflows more easily)")
        if rc.max_grad_norm <= 0:
            hints.append("clip gradients with --max-grad-norm 1.0")
        hints.append("check the inputs for NaN or infinite values")
        # a training loss belongs to the step being taken, a validation loss to the last one taken
        what = (f"the update of step {self.global_step}/{self.total_steps} left non-finite weights" if weights
                else f"the {'validation' if validation else 'training'} loss became {loss} at step "
                     f"{self.global_step + (not validation)}/{self.total_steps}")
        raise TrainError(
            f"{what} "
            f"(epoch {self.epoch + 1}): training diverged; {kept}. Start over (--overwrite) after one of: "
            f"{'; '.join(hints)}."
        )

    def _fit(self) -> dict[str, Any]:
        self._setup()
        info = self.dist
        assert info is not None
        rc = self.rc
        from tqdm.auto import tqdm

        if self.global_step == 0 and not self.history:
            self._log(
                f"{rc.model} on {rc.data} [{rc.method}]: {len(self.data.train)} train / {len(self.data.val)} val / "
                f"{len(self.data.test)} test, {self.trainable_params:,} of {self.total_params:,} parameters train, "
                f"{self.total_steps} steps, {info.world_size} process(es) on {info.device}"
            )
        while self.epoch < rc.epochs:
            epoch = self.epoch
            if self.step_in_epoch < self.steps_per_epoch:
                plan = self._plan(epoch, self.step_in_epoch)
                loader = self._loader(self.train_ds, [share for entries in plan for share, _ in entries])
                bar = tqdm(
                    total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{rc.epochs}",
                    disable=not (rc.progress and info.is_main), dynamic_ncols=True, file=sys.stderr, leave=True,
                )  # fmt: skip
                try:
                    for entries in plan:
                        t0 = time.perf_counter()
                        lr = self.optimizer.param_groups[0]["lr"]
                        loss_sum, correct, seen, data_s = self._train_step(entries, loader)
                        loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], info)
                        if not math.isfinite(loss_sum):  # the sum is global: every process stops here
                            bar.close()
                            self._diverged(loss_sum, lr)
                        dt = time.perf_counter() - t0
                        self.train_time += dt
                        if self._steps_this_run == 0:
                            self.timing_warmup.append(len(self.step_times))
                        self.step_times.append(dt)
                        self.step_data_times.append(data_s)
                        self.step_samples.append(int(seen))
                        self.step_in_epoch += 1
                        self.global_step += 1
                        es = self.epoch_stats
                        es[0] += loss_sum
                        es[1] += correct
                        es[2] += seen
                        rec = {
                            "event": "train", "epoch": epoch + 1, "global_step": self.global_step,
                            "loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1),
                            "lr": lr, "step_time_s": dt - data_s, "data_time_s": data_s,
                        }  # fmt: skip
                        if self.global_step % rc.log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                            self._emit(rec)
                        bar.update(1)
                        bar.set_postfix(
                            loss=f"{es[0] / max(es[2], 1):.4f}", acc=f"{es[1] / max(es[2], 1):.3f}",
                            mem=_fmt_mem(self._memory_now()), ex_s=f"{seen / dt:.1f}",
                        )  # fmt: skip
                        for cb in self.callbacks:
                            cb(self, "step", rec)
                        if rc.save_every and self.global_step % rc.save_every == 0:
                            self._save_last()
                        self._steps_this_run += 1
                        if rc.stop_after and self._steps_this_run >= rc.stop_after and self.global_step < self.total_steps:
                            self._stop = self._planned_stop = True
                        if self._stop_agreed():
                            bar.close()
                            self._interrupt()
                finally:
                    bar.close()
            # evaluation at the end of the epoch
            if info.enabled:
                broadcast_module(self.model, info, params=False, buffers=True)
            val = self.evaluate(self.data.val)
            if not math.isfinite(val["loss"]):  # the epoch's last update broke the weights: argmax of
                # NaN logits is class 0, an accuracy that means nothing, so nothing is saved
                self._diverged(val["loss"], self.optimizer.param_groups[0]["lr"], validation=True)
            es = self.epoch_stats
            entry = {
                "epoch": epoch + 1, "global_step": self.global_step, "loss": val["loss"], "acc": val["acc"],
                "n": val["n"], "train_loss": es[0] / max(es[2], 1), "train_acc": es[1] / max(es[2], 1),
            }  # fmt: skip
            self.history.append(entry)
            self._emit({"event": "val", **{k: v for k, v in entry.items() if not k.startswith("train_")}})
            self._emit({"event": "epoch", "epoch": epoch + 1, "global_step": self.global_step,
                        "train_loss": entry["train_loss"], "train_acc": entry["train_acc"]})  # fmt: skip
            self._log(
                f"epoch {epoch + 1}/{rc.epochs}: {train_loss_label(rc.label_smoothing)} {entry['train_loss']:.4f} acc {entry['train_acc']:.4f} | "
                f"val loss {val['loss']:.4f} acc {val['acc']:.4f}"
            )
            improved = not self.best or val["acc"] > self.best["val_acc"]
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_stats = [0.0, 0.0, 0.0]
            if improved:
                self.best = {"val_acc": val["acc"], "val_loss": val["loss"], "epoch": epoch + 1, "global_step": self.global_step}
                self._save_best()
            self._save_last()
            if improved:
                self._commit_best()
            barrier(info)
            for cb in self.callbacks:
                cb(self, "epoch", entry)
            if self.epoch < rc.epochs and self._stop_agreed():
                self._interrupt()
        return self._finish()

    # ------------------------------------------------------------------ final report
    def _measure(self) -> tuple[Any, list[str]]:
        notes: list[str] = []
        info = self.dist
        assert info is not None
        from s2a.memory import measure

        n = min(len(self.data.train), math.ceil(self.rc.batch_size / info.world_size))
        inputs, labels = self.train_ds.collate([self.train_ds[i] for i in range(n)])
        self.measured_input_shape = _input_shape(inputs)
        inputs, labels = _to_device(inputs, info.device), labels.to(info.device)
        ls = self.rc.label_smoothing

        def loss_fn(out: Any, _batch: Any) -> torch.Tensor:
            from s2a.zoo import logits_of

            return F.cross_entropy(logits_of(out).float(), labels, label_smoothing=ls)

        from s2a.zoo import without_kv_cache

        # as the training step (zoo.call_model) runs it
        batch = without_kv_cache(self.model, inputs) if isinstance(inputs, dict) else (inputs,)
        accumulating = self.rc.grad_accum > 1
        try:
            with self._autocast():
                # AdamW's state, alive through every step after the first, belongs in the peak,
                # and so do the gradients of earlier micro-batches under gradient accumulation
                report = measure(
                    self.model, batch, loss_fn, optimizer_step=True, accumulating=accumulating,
                    name=f"{self.rc.model} [{self.rc.method}]",
                )
        except Exception as exc:  # the report must not be lost to a measurement problem
            return None, [f"memory not measured: {type(exc).__name__}: {exc}"]
        shape = self.measured_input_shape
        notes.append(f"memory measured by s2a.measure on one training micro-batch of {n} examples per process"
                     + (f" (input {' x '.join(map(str, shape))})" if shape else "")
                     + (", with the gradients of the earlier micro-batches alive" if accumulating else ""))
        return report, notes

    def _timing(self) -> dict[str, float | None]:
        """The report's timing, over the steps after each process start's first (warm-up):

        * ``step_time_s``: median compute time of an optimizer step (forward, backward,
          optimizer; data loading excluded, so that methods compare on what they cost);
        * ``throughput``: median of the steps' examples per second of that compute time (a
          full step's is batch / step_time_s; one slow step moves neither);
        * ``data_time_s``: median time a step waited for its batches;
        * ``wall_throughput``: examples / wall time of those steps, data loading included
          (what the run achieved);
        * ``timed_steps``: how many steps those figures are based on (few: see
          :data:`s2a.train.report.FEW_TIMED_STEPS`)."""
        warm = set(self.timing_warmup)
        steady = [i for i in range(len(self.step_times)) if i not in warm] or list(range(len(self.step_times)))
        compute = [max(self.step_times[i] - self.step_data_times[i], 1e-9) for i in steady]
        wall = sum(self.step_times[i] for i in steady)
        samples = [self.step_samples[i] for i in steady]
        if not steady:
            return {"step_time_s": None, "throughput": None, "data_time_s": None, "wall_throughput": None,
                    "timed_steps": 0}
        return {
            # steps past each start's first: 0 when the figures fall back to first steps only
            "timed_steps": sum(i not in warm for i in range(len(self.step_times))),
            "step_time_s": statistics.median(compute),
            "throughput": statistics.median(n / t for n, t in zip(samples, compute, strict=True)),
            "data_time_s": statistics.median(self.step_data_times[i] for i in steady),
            "wall_throughput": sum(samples) / wall if wall > 0 else None,
        }

    def _earlier_timing(self) -> dict[str, float | None]:
        try:
            old = json.loads((self.run_dir / "report.json").read_text(encoding="utf-8"))
            return {k: old.get(k) for k in ("step_time_s", "throughput", "data_time_s", "wall_throughput",
                                            "timed_steps")}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save_tuned(self) -> str:
        """The best checkpoint's tuned tensors as an ``s2a.save_tuned`` directory (``tuned/``),
        what ``s2a.load_tuned`` puts on a freshly built model; returns its name in the run."""
        from s2a.tuners import save_tuned

        try:
            save_tuned(self.model, self.run_dir / TUNED_DIR)
        except OSError as exc:
            raise TrainError(f"cannot write {self.run_dir / TUNED_DIR} ({exc}); the checkpoints are intact: "
                             "free space, then --resume rewrites it and the report") from None
        return TUNED_DIR

    def _load_hint(self, tuned_dir: str) -> str:
        rc = self.config
        weights = os.path.abspath(rc.weights) if rc.weights is not None else None
        model = os.path.abspath(rc.model) if os.path.isdir(rc.model) else rc.model
        kw = [str(self.data.num_classes)]
        kw += [f"{k}={v!r}" for k, v in (("weights", weights), ("max_length", rc.max_length),
                                         ("img_size", rc.img_size)) if v is not None]
        autocast = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}.get(rc.precision)
        # the model is built after seeding, so that a randomly initialised backbone is the same
        return (f"the best checkpoint's tuned tensors are in {tuned_dir}/; to use them: "
                f"import s2a, s2a.train, s2a.zoo; s2a.train.seed_everything({rc.seed}); "
                f"zm = s2a.zoo.load_model({model!r}, {', '.join(kw)}); "
                f"s2a.load_tuned(zm.model, {os.path.abspath(self.run_dir / tuned_dir)!r}); zm.model.eval() "
                "(zm.preprocess makes its inputs"
                + (f"; it was evaluated under torch.autocast(device_type, {autocast})" if autocast else "") + ")")

    def _finish(self) -> dict[str, Any]:
        info = self.dist
        assert info is not None
        rc = self.rc
        best_path = self.run_dir / CKPT_DIR / "best.pt"
        barrier(info)
        best = load_checkpoint(best_path, kind="best")
        self._check_ckpt(best, str(best_path))
        test = self.evaluate(self.data.test)
        self._emit({"event": "test", "global_step": self.global_step, "epoch": best["epoch"], **test})
        dev = info.device
        # measure() resets CUDA's peak counter to read the step's own peak: the run's is read first
        run_peak = int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else 0
        mem, mem_notes = (self._measure() if info.is_main else (None, []))
        timing = self._timing()
        if timing["step_time_s"] is None:  # a finished run resumed from a checkpoint older than saved step times
            timing.update(self._earlier_timing())
        last = self.history[-1] if self.history else {}
        # the schedule advances only on the steps that updated the weights (see _train_step)
        skipped = self.global_step - self.scheduler.last_epoch
        skip_notes = [f"fp16: the gradient scaler skipped {skipped} of {self.global_step} optimizer steps "
                      "(inf / NaN gradients at its scale; the schedule waited for them)"] if skipped else []
        report: dict[str, Any] = {
            "accuracy": test["acc"],
            "test_loss": test["loss"],
            "val_accuracy": self.best.get("val_acc"),
            "best_epoch": self.best.get("epoch"),
            "final_val_accuracy": last.get("acc"),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_percent": 100.0 * self.trainable_params / max(self.total_params, 1),
            "saved_activation_bytes": mem.saved_bytes if mem is not None else None,
            "saved_by_kind": dict(mem.by_kind) if mem is not None else {},
            "peak_memory_bytes": mem.peak_bytes if mem is not None else None,
            "peak_memory_method": mem.peak_method if mem is not None else None,
            "grad_bytes": mem.grad_bytes if mem is not None else None,
            # allocator growth after the forward / what the saved-tensor hooks predict (1.0: they agree)
            "memory_cross_check_ratio": mem.cross_check_ratio if mem is not None else None,
            # memory grows with the input: a text batch is padded to its longest sentence
            "measured_input_shape": self.measured_input_shape if mem is not None else None,
            "process_peak_memory_bytes": (max(run_peak, int(torch.cuda.max_memory_allocated(dev)))
                                          if dev.type == "cuda" else _peak_rss_bytes()),
            **timing,
            "throughput_unit": "training examples per second (all processes)",
            "train_time_s": self.train_time,
            "steps": self.global_step,
            "skipped_steps": skipped,
            "epochs": rc.epochs,
            "num_train": len(self.data.train),
            "num_val": len(self.data.val),
            "num_test": test["n"],
            "model": rc.model,
            "data": rc.data,
            "method": rc.method,
            "modules": list(rc.modules) if rc.method == "s2a" else None,
            "act_bits": rc.compression_bits,
            "lr": rc.lr,
            "batch_size": rc.batch_size,
            "grad_accum": rc.grad_accum,
            "weight_decay": rc.weight_decay,
            "label_smoothing": rc.label_smoothing,
            "dropout": rc.dropout,
            "precision": rc.precision,
            "seed": rc.seed,
            "world_size": info.world_size,
            "device": str(dev),
            "history": self.history,
            "s2a_config": self.s2a_config,
            "notes": [*self.zoo.notes, *self.method_notes, *self.data.notes, *skip_notes, *mem_notes,
                      *(mem.notes if mem is not None else ())],
            "torch_version": torch.__version__,
        }
        if mem is not None and mem.by_module:
            top = sorted(mem.by_module.items(), key=lambda kv: -kv[1])[:20]
            report["saved_by_module_top"] = dict(top)
        if info.is_main and rc.method == "s2a":
            report["tuned_dir"] = self._save_tuned()
            report["notes"].append(self._load_hint(report["tuned_dir"]))
        if info.is_main:
            write_report(self.run_dir, report, read_metrics(self.run_dir / "metrics.jsonl"))
            self._log(
                f"test accuracy {test['acc']:.4f} ({test['n']} examples, best epoch {self.best.get('epoch')})"
            )  # the report's path: s2a train prints it (once) with its summary
        barrier(info)
        return report


def _data_record(data: DataBundle, replaceable: Sequence[str] = ()) -> dict[str, Any]:
    """The dataset as config.json records it: a long class list cut to its first 100 names,
    with a hash of all of them, and a hash of each split, so that a resume can tell whether
    they changed. ``replaceable``: image files a stopped run could not read, which the user
    was told to replace (their sizes do not count)."""
    record = data.summary()
    names = record["classes"]
    record["classes_sha256"] = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()
    record["sha256"] = {k: getattr(data, k).fingerprint() for k in ("train", "val", "test")}
    if data.kind == "image":  # text items are the texts themselves, not paths
        skip = set(replaceable)
        sizes = {k: getattr(data, k).file_sizes_fingerprint(skip) for k in ("train", "val", "test")}
        if any(v is not None for v in sizes.values()):
            record["file_sizes_sha256"] = sizes
            if replaceable:
                record["replaceable_files"] = sorted(skip)
    if len(names) > 100:
        record["classes"] = [*names[:100], "..."]
    return record


def train(config: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """``Trainer(config, resume=..., overwrite=...).fit()``."""
    return Trainer(config, resume=resume, overwrite=overwrite).fit()

