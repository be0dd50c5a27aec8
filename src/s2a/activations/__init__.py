"""The "A" of S2A: low-bit storage of what non-parametric operators keep for backward.

``functional`` and ``attention`` hold the autograd operators, ``mlp``, ``gated_mlp`` and
``moe_experts`` the feed-forward blocks run as one operator when their weights are frozen,
``apply`` the in-place model transform (with ``_timm`` / ``_hf`` recognising those blocks),
``codebooks``/``rowquant``/``packing``/``kernels`` the storage formats they share.
"""

from .apply import (
    OP_KINDS,
    UncoveredOperatorsError,
    compress_activations,
    compression_summary,
    restore,
)

__all__ = ["OP_KINDS", "UncoveredOperatorsError", "compress_activations", "compression_summary", "restore"]
