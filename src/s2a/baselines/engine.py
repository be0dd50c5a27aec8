"""Mesa-style and Few-bit / Approx-BP-style storage: configurations of OUR activation engine.

Neither is a port of the original code; both are full fine-tuning with
:func:`s2a.compress_activations` set the way the relative stores its activations, so that the
comparison isolates the storage rule (same kernels, same coverage):

* ``mesa8`` imitates Mesa (Pan et al., 2022; 8-bit activations for ViTs): every operator kind
  the engine covers at 8 bits (GELU/SiLU... as 8-bit derivative codebooks, LayerNorm input,
  softmax probabilities, Q/K/V of attention with the probabilities stored too
  (``attention_mode="probs"``), BatchNorm, dropout regenerated from its seed). Difference: Mesa
  also stores the inputs of trainable Linear / matmul layers at 8 bits, which our engine leaves
  to PyTorch (fp32), so ``mesa8`` here saves LESS than Mesa would; and Mesa quantises the
  activation values (with learned ranges) where we store 8-bit derivative levels.
* ``fewbit2`` imitates Few-bit Backward (Novikov et al., 2023) and Approx-BP's
  ReGELU2 / ReSiLU2 (2 bits per element): every pointwise nonlinearity keeps a 2-bit index
  into its optimal piecewise-constant derivative (ReLU-type functions 1 bit, exact); all other
  operators (norms, softmax / attention, dropout) keep their native storage.
"""

from __future__ import annotations

from torch import nn

from .registry import MethodContext, MethodResult

MESA_BITS = 8
FEWBIT_BITS = 2


def fewbit_ops() -> dict[str, int]:
    """``{pointwise kind: 2}`` for every pointwise operator kind of the engine."""
    from s2a.activations.apply import POINTWISE_KINDS

    return dict.fromkeys(POINTWISE_KINDS, FEWBIT_BITS)


def apply_mesa8(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from s2a import compress_activations

    for p in model.parameters():
        p.requires_grad_(True)
    compress_activations(model, bits=MESA_BITS, attention_mode="probs")
    return MethodResult(model, [
        "mesa8: full fine-tuning, every operator our engine covers stored at 8 bits "
        "(a configuration of s2a.compress_activations imitating Mesa, not Mesa itself: "
        "inputs of trainable Linear layers stay fp32)"
    ])


def apply_fewbit2(model: nn.Module, ctx: MethodContext) -> MethodResult:
    from s2a import compress_activations

    for p in model.parameters():
        p.requires_grad_(True)
    compress_activations(model, bits=FEWBIT_BITS, ops=fewbit_ops())
    return MethodResult(model, [
        "fewbit2: full fine-tuning, pointwise nonlinearities stored as 2-bit derivative codes, "
        "other operators native (Few-bit Backward / Approx-BP style, with our engine's codebooks)"
    ])
