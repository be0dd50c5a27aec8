"""Piecewise-constant derivative codebooks for pointwise nonlinearities.

For y = f(x) the backward pass needs only f'(x). We replace f' by a function q
with ``2**bits`` values (levels) and store, per element, the index of its level.

The class of q. Inputs are binned on a fixed uniform grid of ``GRID_CELLS`` cells
on [GRID_LO, GRID_HI) (inputs outside fall in the outer cells, where every
supported f' is flat to < 1e-3); q is any function constant on cells and taking at
most K values. At run time a code is one table look-up, ``lut[cell(x)]``: cheap
and identical for every function and bit width, which is what keeps the forward
pass within budget (see ``kernels.py``).

Optimality. Under an input density p, E[(f'(X) - q(X))^2] splits into the
within-cell variance of f' (fixed by the grid) plus sum_c w_c (m_c - q_c)^2 with w_c
the mass and m_c the mean of f' in cell c. The second term is a weighted 1-D
K-means of the cell means, whose optimal clusters are contiguous in sorted value,
so dynamic programming over the sorted means finds the global optimum
(``fit_levels``; checked against exhaustive search in the tests).

Input distribution (documented choice): the equal mixture 0.5*N(0, 1) + 0.5*N(0, 2^2).
It covers both unit-scale inputs after a norm layer and the wider
pre-activations of transformer MLPs (std 1.5-2.5 in BERT/ViT checkpoints).

For bits >= 2 the top code is reserved for NaN inputs, so that a NaN input gets
a NaN gradient as with the exact derivative; 2**bits - 1 levels are fitted. At 1
bit there is no spare code and NaN inputs are treated as 0.

The codebooks are fitted once (``python -m s2a.activations.codebooks``) and
shipped as data in ``codebooks.json``; nothing is fitted at training time.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .packing import check_bits

CODEBOOK_FILE = Path(__file__).with_name("codebooks.json")
CODEBOOK_BITS = (1, 2, 3, 4, 8)
GRID_LO, GRID_HI, GRID_CELLS = -8.0, 8.0, 4096
GRID_SCALE = GRID_CELLS / (GRID_HI - GRID_LO)
SUBSAMPLES = 8  # points per cell used to integrate the mass and mean of f'
MIXTURE = ((0.5, 1.0), (0.5, 2.0))  # (weight, std) of the zero-mean Gaussian mixture

# Smooth pointwise functions whose derivative is approximated by a codebook.
# (ReLU, ReLU6, LeakyReLU and Hardtanh get exact 1-bit codes instead.)
SMOOTH_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "softplus": F.softplus,
}


def derivative(name: str, x: np.ndarray) -> np.ndarray:
    """f'(x) in float64, from PyTorch's own autograd so it matches the native op."""
    with torch.enable_grad():
        t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(SMOOTH_FUNCTIONS[name](t).sum(), t)
    return g.numpy()


def mixture_pdf(x: np.ndarray) -> np.ndarray:
    return sum(w * np.exp(-0.5 * (x / s) ** 2) / (s * math.sqrt(2 * math.pi)) for w, s in MIXTURE)


def mixture_cdf(x: float) -> float:
    return sum(w * 0.5 * (1 + math.erf(x / (s * math.sqrt(2)))) for w, s in MIXTURE)


def fit_levels(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Globally optimal weighted 1-D k-means by dynamic programming.

    Returns (levels ascending, cluster index of every input value, minimal weighted
    squared error). Clusters of the optimum are contiguous in sorted order.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    uniq, inverse = np.unique(values, return_inverse=True)
    v, w = uniq, np.bincount(inverse, weights=weights)
    m = v.size
    k = max(1, min(k, m))
    cw = np.concatenate([[0.0], np.cumsum(w)])
    c1 = np.concatenate([[0.0], np.cumsum(w * v)])
    c2 = np.concatenate([[0.0], np.cumsum(w * v * v)])
    i_idx = np.arange(m + 1)[:, None]
    j_idx = np.arange(m + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        sw = cw[j_idx] - cw[i_idx]
        s1 = c1[j_idx] - c1[i_idx]
        cost = (c2[j_idx] - c2[i_idx]) - np.where(sw > 0, s1 * s1 / sw, 0.0)
    # cost[i, j]: error of one cluster holding sorted items i..j-1.
    cost = np.where(j_idx > i_idx, np.maximum(cost, 0.0), np.inf)
    best = cost[0].copy()
    back = np.zeros((k, m + 1), dtype=np.int64)
    cols = np.arange(m + 1)
    for c in range(1, k):
        total = best[:, None] + cost
        back[c] = np.argmin(total, axis=0)
        best = total[back[c], cols]
    cuts = [m]
    for c in range(k - 1, 0, -1):
        cuts.append(int(back[c, cuts[-1]]))
    cuts.append(0)
    cuts = [c for c in cuts[::-1]]
    levels, assign_sorted = [], np.zeros(m, dtype=np.int64)
    for a, b in itertools.pairwise(cuts):
        if b > a:
            assign_sorted[a:b] = len(levels)
            levels.append((c1[b] - c1[a]) / (cw[b] - cw[a]) if cw[b] > cw[a] else v[a])
    return np.array(levels), assign_sorted[inverse], float(best[m])


def cell_statistics(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mass, mean f') of every grid cell under the input mixture; outer cells take the tails."""
    step = 1.0 / GRID_SCALE
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES * step
    xs = GRID_LO + np.arange(GRID_CELLS)[:, None] * step + offsets[None, :]
    pdf = mixture_pdf(xs)
    d = derivative(name, xs.ravel()).reshape(xs.shape)
    mass = pdf.sum(1) * step / SUBSAMPLES
    mean = (pdf * d).sum(1) / pdf.sum(1)
    mass[0] += mixture_cdf(GRID_LO)
    mass[-1] += 1.0 - mixture_cdf(GRID_HI)
    return mass, mean


# PyTorch's derivative at a NaN input, where it is not NaN (tests check it against autograd).
# A table, not autograd: nan_code is first read inside a user's forward, where an autograd
# call would go through their saved-tensor hooks (checkpointing, save_on_cpu) and s2a's mode.
DERIVATIVE_AT_NAN = {"hardswish": 1.0}


@dataclass(frozen=True, eq=False)
class Codebook:
    """Derivative codebook of one function at one bit width.

    ``runs`` lists (first cell, code) pairs: cells from a run's first cell up to the
    next run's share its code. ``levels[code]`` is the derivative used in backward
    (NaN for the NaN code).
    """

    name: str
    bits: int
    runs: tuple[tuple[int, int], ...]
    levels: tuple[float, ...]
    mse: float

    @cached_property
    def nan_code(self) -> int | None:
        """Code given to NaN inputs: the reserved NaN code where PyTorch's own
        derivative at NaN is NaN, else the level nearest to it (hardswish passes
        the gradient through at NaN); None at 1 bit."""
        if self.bits < 2:
            return None
        at_nan = DERIVATIVE_AT_NAN.get(self.name, math.nan)
        if math.isnan(at_nan):
            return (1 << self.bits) - 1
        fitted = [v for v in self.levels if not math.isnan(v)]
        return int(np.argmin([abs(v - at_nan) for v in fitted]))

    def lut(self) -> np.ndarray:
        table = np.zeros(GRID_CELLS, dtype=np.uint8)
        starts = [r[0] for r in self.runs] + [GRID_CELLS]
        for (start, code), end in zip(self.runs, starts[1:], strict=True):
            table[start:end] = code
        return table

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(lut uint8[GRID_CELLS], levels float32[2**bits]) on ``device``, cached.

        The CPU pair is made when the codebook is loaded. Under ``torch.compile`` a missing
        entry is the CPU pair moved in the graph, not cached: a traced autograd Function may
        not mutate module state (and a table built from Python numbers would cost a guard
        per entry)."""
        key = (self.name, self.bits, str(device))
        cached = _TENSORS.get(key)
        if cached is not None:
            return cached
        if torch.compiler.is_compiling():
            lut, levels = _TENSORS[(self.name, self.bits, "cpu")]
            return lut.to(device), levels.to(device)
        _TENSORS[key] = (
            torch.from_numpy(self.lut()).to(device),
            torch.tensor(self.levels, dtype=torch.float32, device=device),
        )
        return _TENSORS[key]


_TENSORS: dict = {}


def fit_codebook(name: str, bits: int) -> Codebook:
    """Fit the optimal codebook of ``name`` at ``bits`` (slow at 8 bits: run offline)."""
    check_bits(bits, CODEBOOK_BITS)
    if name not in SMOOTH_FUNCTIONS:
        raise ValueError(f"no codebook for {name!r}; known: {sorted(SMOOTH_FUNCTIONS)}")
    mass, mean = cell_statistics(name)
    n_levels = (1 << bits) - (1 if bits >= 2 else 0)
    levels, assign, mse = fit_levels(mean, mass, n_levels)
    runs = [(0, int(assign[0]))]
    for cell in range(1, GRID_CELLS):
        if assign[cell] != assign[cell - 1]:
            runs.append((cell, int(assign[cell])))
    stored = [float(v) for v in levels] + [math.nan] * ((1 << bits) - len(levels))
    return Codebook(name, bits, tuple(runs), tuple(stored), mse)


# Every shipped codebook, read once at import: ``get_codebook`` is called inside the
# forward and backward of autograd Functions, where ``torch.compile`` cannot trace a file
# read (nor ``functools.cache``, whose wrapped body it traces on every call), but reads a
# module-level dict as constants.
_CODEBOOKS: dict[tuple[str, int], Codebook] = {}


def _load_all() -> dict:
    if not CODEBOOK_FILE.exists():
        raise FileNotFoundError(
            f"{CODEBOOK_FILE} is missing; regenerate it with `python -m s2a.activations.codebooks`"
        )
    data = json.loads(CODEBOOK_FILE.read_text())
    for name, per_bits in data.items():
        if name.startswith("_"):
            continue
        for bits, entry in per_bits.items():
            levels = tuple(math.nan if v is None else v for v in entry["levels"])
            runs = tuple((int(a), int(b)) for a, b in entry["runs"])
            cb = Codebook(name, int(bits), runs, levels, entry["mse"])
            cb.nan_code  # noqa: B018  (cached now, read as a constant when traced)
            cb.tensors(torch.device("cpu"))
            _CODEBOOKS[(name, int(bits))] = cb
    return data


if CODEBOOK_FILE.exists():  # (missing while `python -m s2a.activations.codebooks` rebuilds it)
    _load_all()


def get_codebook(name: str, bits: int) -> Codebook:
    """The shipped codebook for ``name`` at ``bits``."""
    check_bits(bits, CODEBOOK_BITS, what=f"bits for {name}")
    cb = _CODEBOOKS.get((name, bits))
    if cb is not None:
        return cb
    data = _load_all()
    if name not in data:
        known = sorted(k for k in data if not k.startswith("_"))
        raise ValueError(f"no codebook for {name!r}; known: {known}")
    return _CODEBOOKS[(name, bits)]


def write_codebooks(path: Path = CODEBOOK_FILE) -> dict:
    out: dict = {
        "_about": "Optimal piecewise-constant derivative codebooks; see s2a/activations/codebooks.py",
        "_grid": {"lo": GRID_LO, "hi": GRID_HI, "cells": GRID_CELLS},
        "_distribution": {"mixture_weight_std": [list(m) for m in MIXTURE]},
    }
    for name in SMOOTH_FUNCTIONS:
        out[name] = {}
        for bits in CODEBOOK_BITS:
            cb = fit_codebook(name, bits)
            out[name][str(bits)] = {
                "runs": [list(r) for r in cb.runs],
                "levels": [None if math.isnan(v) else v for v in cb.levels],
                "mse": cb.mse,
            }
            print(f"{name:11s} {bits} bits: {len(cb.runs):4d} runs, mse {cb.mse:.3e}", flush=True)
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    return out


if __name__ == "__main__":
    write_codebooks()
