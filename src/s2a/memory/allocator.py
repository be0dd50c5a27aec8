"""Allocator-level memory probes, independent of autograd's saved-tensor hooks.

Three probes, chosen by the device the model lives on:

* ``CudaProbe``: the CUDA caching allocator's own counters, ``torch.cuda.memory_allocated`` and
  ``torch.cuda.max_memory_allocated`` (bytes handed out to tensors, exact, peak included);
* ``ProfilerProbe`` (CPU): the PyTorch profiler's allocation events, one per tensor allocation
  and free, summed in order: the CPU counterpart of the CUDA counters (tensor bytes only, exact,
  peak included, even a buffer one backward node allocates and frees);
* ``HostProbe`` (CPU, when the profiler cannot be used, e.g. the caller is already profiling):
  glibc's ``mallinfo2()`` read through :mod:`ctypes`. PyTorch's CPU allocator
  takes tensor memory from ``malloc`` (``posix_memalign``), so the bytes currently handed out,
  ``uordblks`` (in use in the arenas, all arenas summed) + ``hblkhd`` (in use in mmap'ed chunks),
  rise and fall with tensor allocations. They also count every other ``malloc`` user of the
  process (Python extensions, oneDNN scratch, autograd nodes...), so only *differences* taken
  close together are meaningful. glibc keeps no high-water mark, so the peak is *sampled*: it is
  the maximum over the moments :meth:`HostProbe.sample` was called, and misses transient peaks
  inside a kernel between two samples.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any, Protocol

import torch

__all__ = [
    "AllocatorProbe",
    "CudaProbe",
    "HostProbe",
    "ProfilerProbe",
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

    def close(self) -> None:
        """Release what :meth:`start` acquired (idempotent)."""
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

    def close(self) -> None:
        pass


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

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: Kineto logs every profiler start and stop (and,
    without a GPU, a "gpuGetDeviceCount failed" error) from C++, below Python's ``sys.stderr``."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreter)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class ProfilerProbe:
    """CPU tensor bytes from the profiler's allocation events; exact live bytes and peak.

    Each :meth:`live` reading stops the profiler, adds up its events and starts it again, so no
    event list grows over a whole step. Only allocations through PyTorch's CPU allocator are
    seen (tensors and their kernels' scratch buffers), the counterpart of the CUDA counters;
    C++ objects such as autograd nodes are not. The profiler records the threads PyTorch runs
    the step on (the caller's, and on CPU the backward's, which is the caller's); tensors
    another Python thread allocates meanwhile are not seen. Frees are paired with the
    allocations this probe saw, by address: a block allocated before the probe started and freed
    during the step is not subtracted, so live and peak then read high, never low. (The
    allocator's own size of such a block cannot be trusted: it keeps the size of every block
    allocated under some earlier profiler and freed after it, and reports that size again when
    a later block at the same address is freed.) Uses the private ``torch.autograd`` profiler
    entry points that ``torch.profiler.profile`` wraps (the public object adds a costly
    post-processing of every event); :func:`probe_for` falls back to :class:`HostProbe` when
    they are missing or a profiler is already running.
    """

    exact_peak = True
    method = "torch profiler allocation events (exact peak)"

    def __init__(self) -> None:
        from torch._C._profiler import _ExperimentalConfig
        from torch.autograd import ProfilerActivity, ProfilerConfig, ProfilerState

        self._config = ProfilerConfig(
            ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig()
        )
        self._activities = {ProfilerActivity.CPU}
        self._running = False
        self._live = 0
        self._peak = 0
        self._sizes: dict[int, int] = {}  # address -> bytes of the live blocks this probe saw allocated

    @staticmethod
    def available() -> bool:
        """Whether the profiler can be started here now (it does not nest)."""
        try:
            from torch._C._profiler import _ExperimentalConfig  # noqa: F401
            from torch.autograd import (  # noqa: F401
                _disable_profiler,
                _enable_profiler,
                _prepare_profiler,
                _profiler_enabled,
            )
        except ImportError:
            return False
        return not _profiler_enabled()

    def _begin(self) -> None:
        from torch.autograd import _enable_profiler, _prepare_profiler

        with _quiet_stderr():
            # a block allocated before and freed under the profiler makes the CPU allocator
            # warn ("Memory block of unknown size...") on the first such free of the process and
            # every 1000th after: let the first be this one (a short run then prints none)
            primer = torch.empty(64)
            _prepare_profiler(self._config, self._activities)
            _enable_profiler(self._config, self._activities)
            del primer
        self._running = True

    def _stop(self) -> Any:
        from torch.autograd import _disable_profiler

        with _quiet_stderr():
            result = _disable_profiler()
        self._running = False
        return result

    def _collect(self) -> None:
        """Folds the allocations recorded since the last call into the live / peak counts, then
        records on (the profiler's events are read only once it stops)."""
        if not self._running:
            return
        from torch._C._profiler import _EventType

        result = self._stop()
        allocations: list[tuple[int, int, int]] = []  # (time, address, signed bytes)
        pending = list(reversed(result.experimental_event_tree()))
        while pending:  # depth first, in recorded order
            event = pending.pop()
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                fields = event.extra_fields
                allocations.append((event.start_time_ns, fields.ptr, fields.alloc_size))
            pending.extend(reversed(event.children))
        allocations.sort(key=lambda a: a[0])  # stable: same-instant events keep their order
        live = peak = self._live
        for _, address, nbytes in allocations:
            if nbytes > 0:
                live += nbytes - self._sizes.get(address, 0)  # a free missed between two sessions
                self._sizes[address] = nbytes
            else:
                live -= self._sizes.pop(address, 0)
            if live > peak:
                peak = live
        self._live, self._peak = live, max(self._peak, peak)
        self._begin()

    def live(self) -> int:
        if not self._running:
            raise RuntimeError("ProfilerProbe.live() outside start() ... peak()")
        self._collect()
        return self._live

    def start(self) -> int:
        self.close()
        self._live = self._peak = 0
        self._sizes.clear()
        self._begin()
        return 0

    def sample(self) -> None:  # every allocation is an event
        pass

    def peak(self) -> int:
        self._collect()  # stays on until close(): a reading may follow
        return self._peak

    def close(self) -> None:
        if self._running:
            self._stop()


def probe_for(device: torch.device | str) -> AllocatorProbe | None:
    """The probe for ``device``, or None when no allocator statistics are available there."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return CudaProbe(device)
    if device.type == "cpu":
        if ProfilerProbe.available():
            return ProfilerProbe()
        if host_live_bytes() is not None:
            return HostProbe()
    return None
