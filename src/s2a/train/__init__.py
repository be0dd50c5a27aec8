"""Fine-tuning end to end: ``Trainer`` (AdamW, warm-up + cosine, accumulation, clipping,
label smoothing, autocast, per-epoch evaluation, atomic best/last checkpoints, bit-exact
resume, torchrun data parallelism) and the ``s2a train`` command line.

>>> from s2a.train import TrainConfig, Trainer
>>> cfg = TrainConfig(model="minilm", data="rotten-tomatoes", method="full",
...                   train_size=200, epochs=1, out="runs/rt")           # doctest: +SKIP
>>> report = Trainer(cfg).fit()                                         # doctest: +SKIP
>>> report["accuracy"], report["trainable_percent"]                      # doctest: +SKIP
"""

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .config import METHODS, PRECISIONS, TrainConfig, TrainError, default_lr
from .methods import apply_method
from .report import REQUIRED_KEYS, read_metrics, write_report
from .trainer import Trainer, TrainInterrupted, epoch_order, seed_everything, train

__all__ = [
    "METHODS",
    "PRECISIONS",
    "REQUIRED_KEYS",
    "CheckpointError",
    "TrainConfig",
    "TrainError",
    "TrainInterrupted",
    "Trainer",
    "apply_method",
    "atomic_save",
    "default_lr",
    "epoch_order",
    "load_checkpoint",
    "read_metrics",
    "seed_everything",
    "train",
    "write_report",
]
