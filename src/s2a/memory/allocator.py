"""Allocator-level memory probes, independent of autograd's saved-tensor hooks.

Two probes, chosen by the device the model lives on:

* ``CudaProbe``: the CUDA caching allocator's own counters, ``torch.cuda.memory_allocated`` and
  ``torch.cuda.max_memory_allocated`` (bytes handed out to tensors, exact, peak included);
* ``HostProbe``: glibc's ``mallinfo2()`` read through :mod:`ctypes`. PyTorch's CPU allocator
  takes tensor memory from ``malloc`` (``posix_memalign``), so the bytes currently handed out,
  ``uordblks`` (in use in the arenas, all arenas summed) + ``hblkhd`` (in use in mmap'ed chunks),
  rise and fall with tensor allocations. They also count every other ``malloc`` user of the
  process (Python extensions, oneDNN scratch, autograd nodes...), so only *differences* taken
  close together are meaningful. glibc keeps no high-water mark, so the peak is *sampled*: it is
  the maximum over the moments :meth:`HostProbe.sample` was called, and misses transient peaks
  inside a kernel between two samples.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Protocol

import torch

__all__ = [
    "AllocatorProbe",
    "CudaProbe",
    "HostProbe",
    "host_live_bytes",
    "probe_for",
]


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class _MallInfo(ctypes.Structure):  # pre-2.33 glibc: int counters that wrap past 2 GiB
    _fields_ = [(name, ctypes.c_int) for name, _ in _MallInfo2._fields_]


def _load_mallinfo():
    if not sys.platform.startswith("linux"):
        return None, None
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - static or odd interpreters
        return None, None
    fn = getattr(libc, "mallinfo2", None)
    if fn is not None:
        fn.restype = _MallInfo2
        fn.argtypes = []
        return fn, "glibc mallinfo2"
    fn = getattr(libc, "mallinfo", None)  # pragma: no cover - old glibc only
    if fn is not None:  # pragma: no cover
        fn.restype = _MallInfo
        fn.argtypes = []
        return fn, "glibc mallinfo (32-bit counters)"
    return None, None  # pragma: no cover


_MALLINFO, _MALLINFO_NAME = _load_mallinfo()


def host_live_bytes() -> int | None:
    """Bytes currently handed out by the C heap (``uordblks + hblkhd``), or None if unknown."""
    if _MALLINFO is None:
        return None
    info = _MALLINFO()
    live = int(info.uordblks) + int(info.hblkhd)
    # another allocator (jemalloc, tcmalloc) preloaded: glibc's counters stay at zero
    return live if live > 0 else None


class AllocatorProbe(Protocol):
    method: str
    exact_peak: bool

    def live(self) -> int: ...

    def start(self) -> int:
        """Begin a measurement: forget earlier peaks and return the live bytes now."""
        ...

    def sample(self) -> None: ...

    def peak(self) -> int:
        """Highest live bytes seen since :meth:`start` (exact or sampled)."""
        ...


class HostProbe:
    """glibc heap counters; the peak is the max over explicit :meth:`sample` calls."""

    exact_peak = False

    def __init__(self) -> None:
        if host_live_bytes() is None:
            raise RuntimeError("glibc mallinfo2() is not available in this process")
        self.method = f"{_MALLINFO_NAME} (sampled peak)"
        self._peak = 0

    def live(self) -> int:
        value = host_live_bytes()
        assert value is not None
        return value

    def start(self) -> int:
        self._peak = self.live()
        return self._peak

    def sample(self) -> None:
        value = self.live()
        if value > self._peak:
            self._peak = value

    def peak(self) -> int:
        self.sample()
        return self._peak


class CudaProbe:
    """CUDA caching-allocator counters (exact peak)."""

    exact_peak = True
    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def live(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self.live()

    def sample(self) -> None:  # the allocator tracks its own high-water mark
        pass

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))


def probe_for(device: torch.device | str) -> AllocatorProbe | None:
    """The probe for ``device``, or None when no allocator statistics are available there."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaProbe(device)
    if device.type == "cpu" and host_live_bytes() is not None:
        return HostProbe()
    return None
