"""s2a: fine-tune large pretrained networks in little memory (Structure to Activation).

Public API:

* :func:`compress_activations` / :func:`restore` / :func:`compression_summary` —
  low-bit storage of what non-parametric operators keep for backward;
* :func:`measure` / :class:`MemoryReport` / :func:`compare_table` — where the bytes
  of one training step go.
* :class:`S2AConfig` / :func:`apply` / :func:`trainable_parameters` / :func:`save_tuned` /
  :func:`load_tuned` / :func:`merge` — the tunable modules on a frozen backbone.
"""

from .activations import (
    UncoveredOperatorsError,
    compress_activations,
    compression_summary,
    restore,
)
from .memory import MemoryReport, compare_table, measure
from .tuners import S2AConfig, apply, load_tuned, merge, save_tuned, trainable_parameters

__version__ = "0.1.0"

__all__ = [
    "MemoryReport",
    "S2AConfig",
    "UncoveredOperatorsError",
    "__version__",
    "apply",
    "compare_table",
    "compress_activations",
    "compression_summary",
    "load_tuned",
    "measure",
    "merge",
    "restore",
    "save_tuned",
    "trainable_parameters",
]
