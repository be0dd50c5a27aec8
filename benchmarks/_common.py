"""Shared helpers of the benchmark scripts: machine metadata, result files, timing, tables."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parent.parent
RUNS = Path(__file__).resolve().parent / "runs"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    env = " ".join(
        f"{k}={os.environ[k]}" for k in ("HF_HUB_OFFLINE", "S2A_COMPILE") if k in os.environ
    )
    cmd = " ".join(shlex.quote(a) for a in ["python", script_s, *sys.argv[1:]])
    return f"{env} {cmd}".strip()


def metadata(repeats: Any = None, **extra: Any) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    meta = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "repeats": repeats,
        "load_avg_at_start": load,
    }
    meta.update(extra)
    return meta


def header(title: str, meta: dict[str, Any], notes: Sequence[str] = ()) -> list[str]:
    lines = [
        f"# {title}",
        "",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores ({meta['cpu_capability']}); "
        f"torch {meta['torch']}, {meta['torch_threads']} threads; Python {meta['python']}",
        f"- Date: {meta['date']}",
        f"- Repeats: {meta['repeats']}",
        f"- Command: `{meta['command']}`",
    ]
    if meta.get("runtime_s") is not None:
        lines.append(f"- Total runtime: {meta['runtime_s']:.0f} s")
    if meta.get("load_avg_at_start") is not None:
        la = meta["load_avg_at_start"]
        lines.append(
            f"- Load average at start: {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} (1/5/15 min); "
            "the machine is shared with other jobs"
        )
    lines += [f"- {n}" for n in notes]
    lines.append("")
    return lines


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    jp, mp = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    # written whole, then renamed: a reader (another benchmark merging rows) never sees half a file
    for path, text in ((jp, json.dumps(data, indent=1, default=_jsonable) + "\n"),
                       (mp, markdown if markdown.endswith("\n") else markdown + "\n")):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return jp, mp


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Size):
        return list(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def pass_fail(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def interleaved(
    fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 1
) -> list[dict[str, float]]:
    """Run ``fns`` round-robin ``repeats`` times after ``warmup`` rounds.

    Per function: median wall ms, min wall ms, median process-CPU ms and the raw wall times.
    Process CPU time counts all threads of this process, so it is insensitive to other jobs
    taking the cores but not to the thread count.
    """
    for _ in range(warmup):
        for f in fns:
            f()
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            c0, t0 = time.process_time(), time.perf_counter()
            f()
            t1, c1 = time.perf_counter(), time.process_time()
            wall[i].append((t1 - t0) * 1e3)
            cpu[i].append((c1 - c0) * 1e3)
    return [
        {
            "median_ms": statistics.median(w),
            "min_ms": min(w),
            "cpu_median_ms": statistics.median(c),
            "wall_ms": w,
        }
        for w, c in zip(wall, cpu, strict=True)
    ]


def run_child(script: str, child: Sequence[str], ident: dict[str, Any], extra: Sequence[str] = (),
              timeout: int = 3600) -> dict[str, Any]:
    """Run ``script --child CHILD... --child-out FILE [extra...]`` in its own process (one set-up
    that runs out of memory or hangs does not take the others down; its peak is its own) and
    return the JSON it wrote, with ``elapsed_s`` (unless the child set it); on failure or timeout
    ``{**ident, "error": ...}``, so the caller records it for that set-up and goes on."""
    tag = "_".join(child).replace("+", "_").replace("/", "_")
    out = Path(f"/tmp/s2a_{Path(script).stem}_{os.getpid()}_{tag}.json")
    t0 = time.perf_counter()
    cmd = [sys.executable, script, "--child", *child, "--child-out", str(out), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        out.unlink(missing_ok=True)
        return {**ident, "error": f"timed out after {timeout} s", "elapsed_s": time.perf_counter() - t0}
    if proc.returncode != 0 or not out.exists():
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"rc {proc.returncode}"
        return {**ident, "error": f"{why}: {tail}", "elapsed_s": time.perf_counter() - t0}
    res = json.loads(out.read_text())
    out.unlink()
    res.setdefault("elapsed_s", time.perf_counter() - t0)
    return res


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages saved for backward while ``fn`` runs: a storage saved
    twice (the same tensor, or two views of it) is kept once, so it is counted once."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened, in float64."""
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def paired_ratio(a: dict[str, float], b: dict[str, float]) -> float:
    """Median of the per-round ratios b/a (robust to slow drifts of the machine's load)."""
    return statistics.median(y / x for x, y in zip(a["wall_ms"], b["wall_ms"], strict=True))


# ---------------------------------------------------------------------------- s2a train runs
def train_command(
    out: Path, *, model: str, data: str, method: str, seed: int, lr: float, epochs: int,
    batch: int, val_size: int, train_size: int | None = None, img_size: int | None = None,
    modules: str | None = None, act_bits: str | None = None, extra: tuple[str, ...] = (),
) -> list[str]:
    """The ``s2a train`` command of one cached benchmark run (``--overwrite``: a stale run is redone)."""
    args = [
        sys.executable, "-m", "s2a.cli", "train", "--model", model, "--data", data,
        "--epochs", str(epochs), "--batch-size", str(batch), "--val-size", str(val_size),
        "--seed", str(seed), "--lr", str(lr), "--no-progress", "--overwrite",
        "--out", str(out), "--method", method,
    ]  # fmt: skip
    if train_size:
        args += ["--train-size", str(train_size)]
    if img_size:
        args += ["--img-size", str(img_size)]
    if modules is not None:
        args += ["--modules", modules]
    if act_bits is not None:
        args += ["--act-bits", act_bits]
    return args + list(extra)


def finished_report(out: Path, *, lr: float, epochs: int) -> dict[str, Any] | None:
    """The report of a finished run made with these settings (None: missing or stale)."""
    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    return report if report.get("lr") == lr and report.get("epochs") == epochs else None


def run_train(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
