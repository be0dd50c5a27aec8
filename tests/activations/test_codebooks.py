import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from s2a.activations.codebooks import (
    CODEBOOK_BITS,
    GRID_CELLS,
    SMOOTH_FUNCTIONS,
    cell_statistics,
    fit_codebook,
    fit_levels,
    get_codebook,
)


def brute_force(values, weights, k):
    """Exhaustive search over every assignment of points to k clusters (no contiguity assumed)."""
    best = math.inf
    for assign in itertools.product(range(k), repeat=len(values)):
        err = 0.0
        for c in range(k):
            idx = [i for i, a in enumerate(assign) if a == c]
            if idx:
                w = weights[idx]
                mu = (w * values[idx]).sum() / w.sum()
                err += (w * (values[idx] - mu) ** 2).sum()
        best = min(best, err)
    return best


@settings(max_examples=25, deadline=None)
@given(
    values=st.lists(st.floats(-2, 2, allow_nan=False), min_size=2, max_size=7),
    seed=st.integers(0, 1000),
    k=st.integers(1, 3),
)
def test_dp_matches_exhaustive_search(values, seed, k):
    v = np.array(values)
    w = np.random.default_rng(seed).uniform(0.1, 1.0, v.size)
    _, _, err = fit_levels(v, w, k)
    assert err == pytest.approx(brute_force(v, w, k), abs=1e-9)


def test_dp_on_a_real_derivative_grid_beats_uniform_levels():
    # Small grid of GELU' values: the DP optimum is exhaustive-search optimal and
    # beats any evenly spaced set of levels.
    mass, mean = cell_statistics("gelu")
    idx = np.linspace(0, GRID_CELLS - 1, 8).astype(int)
    _, _, err = fit_levels(mean[idx], mass[idx], 3)
    assert err == pytest.approx(brute_force(mean[idx], mass[idx], 3), rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("name", sorted(SMOOTH_FUNCTIONS))
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_shipped_codebooks_are_the_fitted_ones(name, bits):
    shipped, refit = get_codebook(name, bits), fit_codebook(name, bits)
    assert shipped.runs == refit.runs
    np.testing.assert_allclose(
        np.nan_to_num(shipped.levels, nan=9.0), np.nan_to_num(refit.levels, nan=9.0), rtol=1e-12
    )


@pytest.mark.parametrize("name", sorted(SMOOTH_FUNCTIONS))
def test_error_falls_with_bits_and_nan_code_is_reserved(name):
    errs = [get_codebook(name, b).mse for b in CODEBOOK_BITS]
    assert all(a >= b for a, b in itertools.pairwise(errs))
    assert errs[3] < 2e-3  # 4 bits: derivative rms error below 0.045
    for b in CODEBOOK_BITS[1:]:
        cb = get_codebook(name, b)
        assert len(cb.levels) == 2**b and math.isnan(cb.levels[-1])
        assert int(cb.lut().max()) < 2**b - 1  # the NaN code is never a cell's code


def test_unknown_function_and_bits():
    with pytest.raises(ValueError, match="no codebook for 'elu'"):
        get_codebook("elu", 4)
    with pytest.raises(ValueError, match="choose one of"):
        get_codebook("gelu", 5)


def test_lut_tensors_are_cached_per_device():
    cb = get_codebook("gelu", 4)
    a = cb.tensors(torch.device("cpu"))
    assert a[0] is cb.tensors(torch.device("cpu"))[0]
    assert a[0].dtype == torch.uint8 and a[0].numel() == GRID_CELLS


@pytest.mark.parametrize("name", sorted(SMOOTH_FUNCTIONS))
def test_derivative_at_nan_table_matches_autograd(name):
    from s2a.activations.codebooks import DERIVATIVE_AT_NAN, derivative

    at_nan = float(derivative(name, np.array([math.nan]))[0])
    expected = DERIVATIVE_AT_NAN.get(name, math.nan)
    assert (math.isnan(at_nan) and math.isnan(expected)) or at_nan == expected


def test_first_use_of_a_codebook_runs_no_autograd_inside_the_forward():
    # the first compressed call of a (function, bits) pair in a process, under a saved-tensor
    # hook: only the op's own codes may be saved (non-reentrant checkpointing counts them)
    from s2a.activations import codebooks
    from s2a.activations import functional as S

    codebooks.get_codebook("silu", 3).__dict__.pop("nan_code", None)  # as in a fresh process
    seen = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.dtype) or t, lambda t: t):
        S.activation(x, "silu", 3)
    assert seen == [torch.uint8]
