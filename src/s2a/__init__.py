"""s2a: fine-tune large pretrained networks in little memory (Structure to Activation).

Public API:

* :func:`compress_activations` / :func:`restore` / :func:`compression_summary` —
  low-bit storage of what non-parametric operators keep for backward;
* :func:`measure` / :class:`MemoryReport` / :func:`compare_table` — where the bytes
  of one training step go.
"""

from .activations import (
    UncoveredOperatorsError,
    compress_activations,
    compression_summary,
    restore,
)
from .memory import MemoryReport, compare_table, measure

__version__ = "0.1.0"

__all__ = [
    "MemoryReport",
    "UncoveredOperatorsError",
    "__version__",
    "compare_table",
    "compress_activations",
    "compression_summary",
    "measure",
    "restore",
]
