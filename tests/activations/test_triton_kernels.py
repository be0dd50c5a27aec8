"""Triton kernels against the eager references of ``kernels.py``, bit for bit.

On CPU the checks run under the Triton interpreter (``TRITON_INTERPRET=1``) in a
subprocess: triton picks the interpreter when a kernel is decorated, and setting
the variable in this process would also switch every other Triton user of the test
session (inductor) to the interpreter. On a CUDA machine the same checks also run
natively, in process. "Bit for bit" means equal bits everywhere except NaN
payloads (NaN must meet NaN).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

SRC = Path(__file__).resolve().parents[2] / "src"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (0, 1, 7, 8, 1001)
NAN, INF = math.nan, math.inf
SPECIALS = [NAN, INF, -INF, NAN, -8.0, 8.0, -0.0, 0.0, 1e30, -1e30, 1e-40, -8.0 + 1 / 256,
            8.0 - 1 / 256, 7.9999, -7.9999, 1.0, 1.0 + 2**-7, 1.0 + 2**-10, 1.0 - 2**-9]  # fmt: skip
# (lo, hi, inclusive): ReLU, LeakyReLU, Hardtanh, ReLU6, Hardsigmoid, and thresholds that round
# differently per dtype (or overflow float32).
MASKS = [(0.0, None, True), (0.0, None, False), (-1.0, 1.0, True), (0.0, 6.0, True), (-3.0, 3.0, False),
         (-1.0, 1.0, False), (1 / 3, None, False), (1 + 2**-8 + 2**-30, 1 + 2**-7, True),
         (1 + 2**-11 + 2**-40, None, False), (-1e39, 1e39, True), (0.0, INF, True)]  # fmt: skip
# (low, high) of decode_mask: ReLU, LeakyReLU, and multipliers that round in bf16/fp16.
MASK_LEVELS = [(0.0, 1.0), (0.01, 1.0), (0.1, 0.7), (-0.3, 1 / 3), (1.0, 0.0)]


# --- checks (run in the interpreter subprocess, or natively on CUDA) -------------------


def _x(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Normal(0, 6) (a good share outside [-8, 8]), grid-cell edges and special values."""
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 6
    edges = -8.0 + torch.randint(0, 4097, (n,), generator=gen) / 256
    pick = torch.rand(n, generator=gen) < 0.2
    x = torch.where(pick, edges.double(), x)
    k = min(n, len(SPECIALS))
    x[torch.randperm(n, generator=gen)[:k]] = torch.tensor(SPECIALS[:k], dtype=torch.float64)
    return x.to(dtype)


def _codebooks(bits: int):
    """(nan_code, lut, levels) of real codebooks."""
    from s2a.activations.codebooks import get_codebook

    for name in ("gelu", "sigmoid") if bits == 4 else ("gelu",):
        cb = get_codebook(name, bits)
        lut, levels = cb.tensors(torch.device("cpu"))
        yield cb.nan_code, lut, levels


def _random_packed(n: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    from s2a.activations.packing import packed_nbytes

    return torch.randint(0, 256, (packed_nbytes(n, bits),), generator=gen, dtype=torch.uint8)


@contextlib.contextmanager
def _torch_path():
    """kernels.py without Triton and without torch.compile: its eager reference code."""
    saved = {k: os.environ.get(k) for k in ("S2A_TRITON", "S2A_COMPILE")}
    os.environ.update(S2A_TRITON="0", S2A_COMPILE="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _same(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got, ref = got.cpu(), ref.cpu()
    assert got.dtype == ref.dtype and got.shape == ref.shape, (
        f"{what}: {got.dtype}{tuple(got.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    )
    if got.is_floating_point():
        nan = ref.isnan()
        assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        bad = (got.view(as_int) != ref.view(as_int)) & ~nan
    else:
        bad = got != ref
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {ref.numel()} differ, first at "
        f"{bad.nonzero()[0].tolist()}: {got[bad][:4].tolist()} vs {ref[bad][:4].tolist()}"
    )


def _check(fn_name: str, device: str, *args) -> torch.Tensor:
    """``triton_kernels.<fn_name>`` against the eager ``kernels.<fn_name>``, on ``device``.

    Tensor arguments are made on the CPU and moved (a CPU view stays a view).
    Returns the (CPU) result.
    """
    from s2a.activations import kernels as K
    from s2a.activations import triton_kernels as T

    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    got = getattr(T, fn_name)(*args)
    with _torch_path():
        ref = getattr(K, fn_name)(*args)
    shown = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
    _same(got, ref, f"{fn_name}{shown}")
    return got.cpu()


def check_encode_lut(bits: int, dtype: torch.dtype, device: str) -> None:
    from s2a.activations.codebooks import GRID_CELLS

    gen = torch.Generator().manual_seed(bits)
    # Real codebooks, and a random table whose codes change from cell to cell.
    tables = [(nan_code, lut) for nan_code, lut, _ in _codebooks(bits)]
    tables.append((0, torch.randint(0, 1 << bits, (GRID_CELLS,), generator=gen, dtype=torch.uint8)))
    for nan_code, lut in tables:
        for n in (*SIZES, 4099):
            x = _x(n, dtype, gen)
            for nc in dict.fromkeys((nan_code, None)):
                _check("encode_lut", device, x, lut, bits, nc)


def check_decode_lut(bits: int, dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(10 + bits)
    for nan_code, lut, levels in _codebooks(bits):
        for n in SIZES:
            g = _x(n, dtype, gen)
            encoded = _check("encode_lut", device, _x(n, dtype, gen), lut, bits, nan_code)
            for packed in (encoded, _random_packed(n, bits, gen)):  # random: NaN codes too
                _check("decode_lut", device, packed, g, levels, bits)


def check_encode_mask(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(20)
    for n in SIZES:
        x = _x(n, dtype, gen)
        for lo, hi, inclusive in MASKS:
            _check("encode_mask", device, x, lo, hi, inclusive)


def check_decode_mask(dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(30)
    for n in SIZES:
        g = _x(n, dtype, gen)
        packed = _random_packed(n, 1, gen)
        for low, high in MASK_LEVELS:
            _check("decode_mask", device, packed, g, low, high)


def check_shapes_and_strides(device: str) -> None:
    """Any shape and stride in, eager's layout out; outputs shaped like g, contiguous."""
    gen = torch.Generator().manual_seed(40)
    nan_code, lut, levels = next(_codebooks(4))
    x = _x(3 * 5 * 7, torch.float32, gen).view(3, 5, 7).to(device)
    views = (x, x.transpose(0, 2), x.reshape(-1)[::2], x[:, 1:4, ::3])
    for v in views:
        _check("encode_lut", device, v, lut, 4, nan_code)
        _check("encode_mask", device, v, -1.0, 1.0, True)
        got = _check("decode_lut", device, _random_packed(v.numel(), 4, gen), v, levels, 4)
        assert got.is_contiguous()
        got = _check("decode_mask", device, _random_packed(v.numel(), 1, gen), v, 0.01, 1.0)
        assert got.is_contiguous()


def _all_bits_small(device: str) -> None:
    gen = torch.Generator().manual_seed(50)
    for n in (1001, 77):
        x, g = _x(n, torch.bfloat16, gen), _x(n, torch.float16, gen)
        for bits in (1, 2, 4, 8):
            nan_code, lut, levels = next(_codebooks(bits))
            packed = _check("encode_lut", device, x, lut, bits, nan_code)
            _check("decode_lut", device, packed, g, levels, bits)
        packed = _check("encode_mask", device, x, 0.0, 6.0, True)
        _check("decode_mask", device, packed, g, 0.1, 1.0)


def check_many_programs(device: str) -> None:
    """Small blocks: many programs, partial last block, planes straddling blocks."""
    from s2a.activations import triton_kernels as T

    saved = T.BLOCK
    T.BLOCK = 16
    try:
        _all_bits_small(device)
    finally:
        T.BLOCK = saved


def check_int64_indexing(device: str) -> None:
    """The int64 index path (taken from 2**31 elements) on small inputs."""
    from s2a.activations import triton_kernels as T

    saved = T.BLOCK, T.INT64_FROM
    T.BLOCK, T.INT64_FROM = 32, 0
    try:
        _all_bits_small(device)
    finally:
        T.BLOCK, T.INT64_FROM = saved


def check_fallbacks(device: str) -> None:
    """3 bits and float64 take the torch path and still match the eager code."""
    gen = torch.Generator().manual_seed(60)
    x, g = _x(1001, torch.float32, gen), _x(1001, torch.float64, gen)
    nan_code, lut, levels = next(_codebooks(3))
    packed = _check("encode_lut", device, x, lut, 3, nan_code)
    _check("decode_lut", device, packed, g, levels, 3)
    nan_code, lut, levels = next(_codebooks(4))
    packed = _check("encode_lut", device, g, lut, 4, nan_code)
    _check("decode_lut", device, packed, g, levels, 4)
    packed = _check("encode_mask", device, g, 1 / 3, 1.0, False)
    _check("decode_mask", device, packed, g, 0.1, 0.7)


def check_bad_packed(device: str) -> None:
    from s2a.activations import triton_kernels as T

    g = torch.zeros(10, device=device)
    levels = next(_codebooks(4))[2].to(device)
    for bad in (torch.zeros(4, dtype=torch.uint8), torch.zeros(6, dtype=torch.uint8)):
        with pytest.raises(ValueError, match="packed buffer"):
            T.decode_lut(bad.to(device), g, levels, 4)
    with pytest.raises(ValueError, match="packed buffer"):
        T.decode_mask(torch.zeros(1, dtype=torch.uint8, device=device), g, 0.0, 1.0)


CHECKS = {
    **{
        f"encode_lut-{b}-{d}": (check_encode_lut, (b, DTYPES[d]))
        for b in (1, 2, 4, 8)
        for d in DTYPES
    },
    **{
        f"decode_lut-{b}-{d}": (check_decode_lut, (b, DTYPES[d]))
        for b in (1, 2, 4, 8)
        for d in DTYPES
    },
    **{f"encode_mask-{d}": (check_encode_mask, (DTYPES[d],)) for d in DTYPES},
    **{f"decode_mask-{d}": (check_decode_mask, (DTYPES[d],)) for d in DTYPES},
    "shapes_and_strides": (check_shapes_and_strides, ()),
    "many_programs": (check_many_programs, ()),
    "int64_indexing": (check_int64_indexing, ()),
    "fallbacks": (check_fallbacks, ()),
    "bad_packed": (check_bad_packed, ()),
}


def run_checks(device: str) -> dict[str, str | None]:
    """Every check; None where it passed, else the failure."""
    results = {}
    for name, (fn, args) in CHECKS.items():
        try:
            fn(*args, device)
            results[name] = None
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


# --- tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str | None]:
    env = dict(os.environ, TRITON_INTERPRET="1", S2A_COMPILE="0", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_interpreted_matches_eager(interpreted, name):
    assert interpreted[name] is None, interpreted[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CHECKS))
def test_cuda_matches_eager(monkeypatch, name):
    monkeypatch.setenv("S2A_COMPILE", "0")  # fallbacks: eager, not a compile per case
    fn, args = CHECKS[name]
    fn(*args, "cuda")


def test_triton_available(monkeypatch):
    from s2a.activations import triton_kernels as T

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert T.triton_available()
    monkeypatch.setenv("S2A_TRITON", "0")
    assert not T.triton_available()
    monkeypatch.delenv("S2A_TRITON")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert T.triton_available() == torch.cuda.is_available()


def test_supported_cases():
    """``supported`` (the wrappers' fallback test) and ``use_triton`` (kernels.py's dispatch
    test) must agree, or a fallback would dispatch straight back to the wrapper."""
    from s2a.activations import triton_kernels as T

    x, lut, levels = torch.zeros(3), torch.zeros(4096, dtype=torch.uint8), torch.zeros(16)
    assert all(T.supported(x.to(d), b, lut=lut) for d in DTYPES.values() for b in (1, 2, 4, 8))
    assert T.supported(x, 4, levels=levels) and T.supported(x)
    assert not T.supported(x, 3, lut=lut)
    assert not T.supported(x.double(), 4, lut=lut) and not T.supported(x.double())
    assert not T.supported(x, 4, lut=lut.long()) and not T.supported(x, 4, levels=levels.half())
    assert not T.use_triton(x)  # CPU tensors never dispatch


def test_cpu_tensors_stay_on_torch_path(monkeypatch):
    from s2a.activations import kernels as K
    from s2a.activations import triton_kernels as T

    def boom(*args):
        raise AssertionError("CPU tensors must not reach the triton kernels")

    for name in ("encode_lut", "decode_lut", "encode_mask", "decode_mask"):
        monkeypatch.setattr(T, name, boom)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("S2A_COMPILE", "0")
    nan_code, lut, levels = next(_codebooks(4))
    x = torch.randn(33)
    K.decode_lut(K.encode_lut(x, lut, 4, nan_code), x, levels, 4)
    K.decode_mask(K.encode_mask(x, 0.0, None, True), x, 0.0, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_dispatch_to_triton(monkeypatch):
    from s2a.activations import kernels as K
    from s2a.activations import triton_kernels as T

    calls = []
    for name in ("encode_lut", "decode_lut", "encode_mask", "decode_mask"):
        real = getattr(T, name)
        monkeypatch.setattr(T, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    nan_code, lut, levels = next(_codebooks(4))
    x = torch.randn(33, device="cuda")
    K.decode_lut(K.encode_lut(x, lut.cuda(), 4, nan_code), x, levels.cuda(), 4)
    K.decode_mask(K.encode_mask(x, 0.0, None, True), x, 0.0, 1.0)
    assert calls == ["encode_lut", "decode_lut", "encode_mask", "decode_mask"]
    calls.clear()
    nan_code, lut, levels = next(_codebooks(3))  # not covered: torch path, no recursion
    K.decode_lut(K.encode_lut(x, lut.cuda(), 3, nan_code), x, levels.cuda(), 3)
    assert calls == []


if __name__ == "__main__":  # the interpreter subprocess of ``interpreted``
    print(json.dumps(run_checks("cpu")))
