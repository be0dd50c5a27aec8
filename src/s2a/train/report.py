"""Run reports: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg canvas)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from s2a.memory.report import format_bytes, format_ratio

__all__ = ["FEW_TIMED_STEPS", "REQUIRED_KEYS", "compare_runs", "few_timed_steps", "load_report", "plot_curves",
           "plot_memory", "read_metrics", "steps_text", "timing_caveat", "train_loss_label", "write_report"]

REQUIRED_KEYS = (
    "accuracy",
    "trainable_params",
    "trainable_percent",
    "saved_activation_bytes",
    "peak_memory_bytes",
    "step_time_s",
    "throughput",
)


# Fewer timed steps than this and the step time / throughput are flagged as unrepresentative.
# The timing is a median over the steps after each process start's first, but the slow steps
# are not only the first: on text each new padded sentence length recompiles (torch.compile's
# dynamic shapes), so the second and third steps can still be compiling (a 2-step run read
# 1.80 s for a step that settles at 0.6-0.8 s). A median of n steps ignores up to (n - 1) // 2
# slow ones: with 5 it outvotes two such stragglers; below that, one or two decide it.
FEW_TIMED_STEPS = 5


def few_timed_steps(report: Mapping[str, Any]) -> int | None:
    """The number of steps a run's timing is based on when it is too few to trust (below
    :data:`FEW_TIMED_STEPS`), else None (also for a report from before ``timed_steps``)."""
    n = report.get("timed_steps")
    if isinstance(n, bool) or not isinstance(n, int) or not report.get("step_time_s"):
        return None
    return n if n < FEW_TIMED_STEPS else None


def steps_text(n: int) -> str:
    """How many timed steps a figure rests on, in words ("3 timed steps")."""
    if n == 0:  # every step was a process start's first: the median falls back to them
        return "first steps after a start (0 timed steps)"
    return f"{n} timed step{'' if n == 1 else 's'}"


def timing_caveat(n: int) -> str:
    """What a timing from only ``n`` steps means, and what to do about it."""
    return (f"step time and throughput are from only {steps_text(n)} and likely include the first "
            "compilations (torch.compile, each new input shape) and allocator warm-up: train longer "
            f"(at least {FEW_TIMED_STEPS} steps after the first) for a representative figure")


def _fmt_bytes(n: Any) -> str:
    """``format_bytes``, with "n/a" for a value never measured."""
    return "n/a" if n is None else format_bytes(n)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_memory(by_kind: Mapping[str, int], path: str | os.PathLike, title: str) -> None:
    """Horizontal bars: bytes kept for backward by operator kind (one training step)."""
    items = sorted(((k, v) for k, v in by_kind.items() if v), key=lambda kv: kv[1])
    fig = _figure(7, max(2.5, 0.35 * len(items) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    if items:
        names = [k for k, _ in items]
        mib = [v / 2**20 for _, v in items]
        ax.barh(names, mib, color="#4C72B0")
        for y, v in enumerate(mib):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_xlabel("MiB kept for backward (one training step)")
        ax.margins(x=0.15)
    else:
        ax.text(0.5, 0.5, "no memory breakdown available", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))


def train_loss_label(label_smoothing: Any) -> str:
    """Validation loss is plain cross-entropy; training loss is smoothed when asked: said, or
    the gap between the two curves would look like over- or under-fitting."""
    return f"train loss (label smoothing {label_smoothing})" if label_smoothing else "train loss"


def plot_curves(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str,
                label_smoothing: float = 0.0) -> None:
    """Left: training loss per step and validation loss per epoch; right: accuracies."""
    train = [m for m in metrics if m.get("event") == "train"]
    val = [m for m in metrics if m.get("event") == "val"]
    epochs = [m for m in metrics if m.get("event") == "epoch"]
    fig = _figure(10, 3.8)
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    if train:
        ax1.plot([m["global_step"] for m in train], [m["loss"] for m in train], label=f"{train_loss_label(label_smoothing)}, by step", lw=1)
    if val:
        ax1.plot([m["global_step"] for m in val], [m["loss"] for m in val], "o-", label="val loss (epoch)")
        ax2.plot([m["epoch"] for m in val], [m["acc"] for m in val], "o-", label="val accuracy")
    if epochs:
        ax2.plot([m["epoch"] for m in epochs], [m["train_acc"] for m in epochs], "s--", label="train accuracy")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("cross-entropy")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1.02)
    from matplotlib.ticker import MaxNLocator

    # whole epochs: min_n_ticks=1, or an axis around one epoch (0.945 to 1.055, holding a
    # single integer) falls back to fractional ticks
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path))


def _md_table(rows: Sequence[tuple[str, str]]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _shape_text(shape: Any) -> str:
    return " x ".join(map(str, shape)) if isinstance(shape, list) and shape else "n/a"


def _dropout_text(rate: Any) -> str:
    return "the model's own rates" if rate is None else f"{rate} (every dropout layer)"


def write_report(run_dir: str | os.PathLike, report: dict[str, Any], metrics: Sequence[Mapping[str, Any]]) -> None:
    """Write ``report.json``, ``report.md``, ``memory_by_operator.png`` and ``curves.png``."""
    run_dir = Path(run_dir)
    _write_text(run_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    title = f"{report.get('model')} on {report.get('data')} [{report.get('method')}]"
    plots = {}
    try:
        plot_memory(report.get("saved_by_kind") or {}, run_dir / "memory_by_operator.png", title)
        plot_curves(metrics, run_dir / "curves.png", title, report.get("label_smoothing") or 0.0)
        plots = {"memory by operator": "memory_by_operator.png", "loss and accuracy": "curves.png"}
    except Exception as exc:  # plotting must never lose a finished run
        report.setdefault("notes", []).append(f"plots not written: {type(exc).__name__}: {exc}")

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    few = few_timed_steps(report)
    few_text = f" (only {steps_text(few)}: see the notes)" if few is not None else ""

    rows = [
        ("accuracy (test, best-val checkpoint)", pct(report.get("accuracy"))),
        ("val accuracy (best epoch)", f"{pct(report.get('val_accuracy'))} (epoch {report.get('best_epoch')})"),
        ("trainable params", f"{report.get('trainable_params'):,} of {report.get('total_params'):,} "
                             f"({report.get('trainable_percent'):.3f}%)"),
        ("saved activation bytes (one micro-batch)", _fmt_bytes(report.get("saved_activation_bytes"))),
        ("measured micro-batch input", _shape_text(report.get("measured_input_shape"))),
        ("peak memory (one micro-batch step with AdamW state, above weights)",
         _fmt_bytes(report.get("peak_memory_bytes"))),
        ("process peak memory", _fmt_bytes(report.get("process_peak_memory_bytes"))),
        ("step time (median, data loading excluded)",
         f"{report.get('step_time_s'):.4f} s{few_text}" if report.get("step_time_s") else "n/a"),
        ("throughput (median step)",
         f"{report.get('throughput'):.1f} examples/s{few_text}" if report.get("throughput") else "n/a"),
        ("data loading per step (median); wall throughput",
         f"{report['data_time_s']:.4f} s; {report['wall_throughput']:.1f} examples/s"
         if report.get("data_time_s") is not None and report.get("wall_throughput") else "n/a"),
        ("train time", f"{report.get('train_time_s', 0):.1f} s"),
        ("examples train / val / test", f"{report.get('num_train')} / {report.get('num_val')} / {report.get('num_test')}"),
        ("epochs / optimizer steps", f"{report.get('epochs')} / {report.get('steps')}"
                                     + (f" ({report['skipped_steps']} skipped by the fp16 gradient scaler)"
                                        if report.get("skipped_steps") else "")),
        ("batch x accumulation, lr", f"{report.get('batch_size')} x {report.get('grad_accum')}, {report.get('lr')}"),
        ("weight decay, label smoothing, dropout", f"{report.get('weight_decay')}, {report.get('label_smoothing')}, "
                                                   f"{_dropout_text(report.get('dropout'))}"),
        ("precision, device, processes", f"{report.get('precision')}, {report.get('device')}, {report.get('world_size')}"),
    ]  # fmt: skip
    parts = [f"# s2a train: {title}", "", _md_table(rows), ""]
    kinds = report.get("saved_by_kind") or {}
    if kinds:
        total = sum(kinds.values()) or 1
        parts += ["## Bytes kept for backward by operator", "", "| operator | bytes | share |", "|---|---|---|"]
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
            parts.append(f"| {k} | {_fmt_bytes(v)} | {100 * v / total:.1f}% |")
        parts.append("")
    hist = report.get("history") or []
    if hist:
        parts += ["## Epochs", "", f"| epoch | {train_loss_label(report.get('label_smoothing'))} | train acc | "
                  "val loss | val acc |", "|---|---|---|---|---|"]
        for h in hist:
            parts.append(
                f"| {h['epoch']} | {h.get('train_loss', float('nan')):.4f} | {pct(h.get('train_acc'))} | "
                f"{h['loss']:.4f} | {pct(h['acc'])} |"
            )
        parts.append("")
    if plots:
        parts += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    # the caveat goes to report.md only: report.json has timed_steps, and stays as the run wrote it
    notes = [*([timing_caveat(few)] if few is not None else []), *(report.get("notes") or [])]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    _write_text(run_dir / "report.md", "\n".join(parts))
    # report.json again, in case plotting added a note
    _write_text(run_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")


def load_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``report.json`` of a finished run, or a :class:`ValueError` naming what is missing."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        if (Path(run_dir) / "config.json").is_file():  # started, stopped before its report
            raise ValueError(f"{run_dir} holds an unfinished run (no report.json yet); finish it with "
                             f"s2a train --out {run_dir} --resume")
        if not Path(run_dir).exists():
            raise ValueError(f"{run_dir} does not exist: give the --out directory of a finished s2a train run")
        raise ValueError(f"{run_dir} is not an s2a train run directory (no report.json or config.json): give "
                         "the --out directory of a finished run")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); rerun that training with --overwrite") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path} holds a JSON {type(report).__name__}, not a run's report; it was not written by s2a train")
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it was not written by s2a train")
    bad = [k for k in ("accuracy", "trainable_params", "trainable_percent")
           if isinstance(report[k], bool) or not isinstance(report[k], (int, float))]
    if bad:
        raise ValueError(f"{path}: {', '.join(f'{k}={report[k]!r}' for k in bad)} should be numbers; "
                         "it was edited or not written by s2a train (rerun that training with --overwrite)")
    return report


def _run_label(report: Mapping[str, Any]) -> str:
    label = str(report.get("method"))
    if report.get("method") == "s2a":
        bits = report.get("act_bits")
        label += f" ({'+'.join(report.get('modules') or [])}, {f'{bits}-bit' if bits else 'native storage'})"
    elif report.get("act_bits"):
        label += f" ({report['act_bits']}-bit)"
    return label


_COMPARED_SETUP = ("model", "data", "num_train", "num_test", "batch_size", "grad_accum", "measured_input_shape",
                   "world_size", "precision", "device")


def _setup_value(key: str, value: Any) -> str:
    """What must match for a fair ratio: a dataset as named (a trailing slash aside), a device
    by its type (two GPUs of one machine are alike)."""
    if key == "data" and isinstance(value, str):
        return os.path.normpath(value) if value else value
    if key == "device" and isinstance(value, str):
        return value.split(":")[0]
    return json.dumps(value, sort_keys=True)


def _setup_text(key: str, value: Any) -> str:
    return _shape_text(value) if key == "measured_input_shape" else str(value)


def compare_runs(run_dirs: Sequence[str | os.PathLike], plot: str | os.PathLike | None = None) -> str:
    """Side-by-side Markdown table of finished runs; ratios are to the first run.

    With ``plot``, also a PNG: test accuracy and bytes saved for backward per run.
    """
    reports = [load_report(d) for d in run_dirs]
    ref = reports[0]
    labels = [_run_label(r) for r in reports]
    if len(set(labels)) < len(labels):  # two runs of one method: tell them apart by directory
        labels = [f"{lab} [{Path(d).name}]" if labels.count(lab) > 1 else lab
                  for lab, d in zip(labels, run_dirs, strict=True)]
        if len(set(labels)) < len(labels):
            labels = [f"{lab} #{i + 1}" for i, lab in enumerate(labels)]

    def ratio(key: str, r: Mapping[str, Any]) -> str:
        a, b = r.get(key), ref.get(key)
        return "" if a is None or not b or r is ref else f" ({format_ratio(a / b)})"  # 0 bytes: 0.00x

    few = [few_timed_steps(r) for r in reports]

    def few_text(r_few: int | None) -> str:
        return "" if r_few is None else f" [only {steps_text(r_few)}]"

    header = ["", *labels]
    rows = [
        ["test accuracy", *(f"{100 * r['accuracy']:.2f}%" for r in reports)],
        ["trainable params", *(f"{r['trainable_params']:,} ({r['trainable_percent']:.3f}%)" for r in reports)],
        ["saved for backward (micro-batch)", *(_fmt_bytes(r["saved_activation_bytes"]) + ratio("saved_activation_bytes", r) for r in reports)],
        ["step peak memory (above weights)", *(_fmt_bytes(r["peak_memory_bytes"]) + ratio("peak_memory_bytes", r) for r in reports)],
        ["step time", *(f"{r['step_time_s']:.3f} s" + ratio("step_time_s", r) + few_text(n) if r["step_time_s"] else "n/a"
                        for r, n in zip(reports, few, strict=True))],
        ["throughput", *(f"{r['throughput']:.1f} ex/s" + few_text(n) if r["throughput"] else "n/a"
                         for r, n in zip(reports, few, strict=True))],
        ["examples train / test", *(f"{r.get('num_train')} / {r.get('num_test')}" for r in reports)],
        ["measured micro-batch input", *(_shape_text(r.get("measured_input_shape")) for r in reports)],
        ["run", *(str(d) for d in run_dirs)],
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    # Memory is measured on one process's micro-batch: the batch size and the number of
    # processes change it as much as the method does.
    unlike = [f"{k} ({', '.join(_setup_text(k, r.get(k)) for r in reports)})" for k in _COMPARED_SETUP
              if all(k in r for r in reports) and len({_setup_value(k, r[k]) for r in reports}) > 1]
    if unlike:
        lines += ["", f"Note: these runs differ in {'; '.join(unlike)}: the ratios compare unlike set-ups, "
                  "not the methods alone."]
    short = [f"{lab} ({steps_text(n)})" for lab, n in zip(labels, few, strict=True) if n is not None]
    if short:
        lines += ["", f"Note: the step time and throughput of {', '.join(short)} are from fewer than "
                  f"{FEW_TIMED_STEPS} timed steps and likely include the first compilations (torch.compile, "
                  "each new input shape): the speed ratios may mislead; train longer for a representative figure."]
    if plot is not None:
        fig = _figure(9, 3.6)
        ax1, ax2 = fig.subplots(1, 2, sharey=True)
        rows = range(len(reports))
        ax1.barh(rows, [100 * r["accuracy"] for r in reports], color="tab:blue")
        ax1.set_yticks(rows, labels)
        ax1.set_xlabel("test accuracy (%)")
        # a run whose measurement failed gets no bar: a 0-byte bar would read as "saves nothing"
        saved = [(y, r["saved_activation_bytes"]) for y, r in zip(rows, reports, strict=True)]
        measured = [(y, v) for y, v in saved if v is not None]
        ax2.barh([y for y, _ in measured], [v / 2**20 for _, v in measured], color="tab:orange")
        for y, v in saved:
            if v is None:
                ax2.text(0, y, " not measured", va="center", fontsize=8, color="tab:gray")
        ax2.set_xlabel("bytes saved for backward, one step (MiB)")
        ax2.tick_params(labelleft=False)
        ax1.invert_yaxis()  # (shared with ax2) the first run on top, as in the table
        setups = {(r.get("model"), r.get("data")) for r in reports}
        fig.suptitle(f"{ref.get('model')} on {ref.get('data')}" if len(setups) == 1
                     else "runs of different models or data (see the table's note)")
        fig.tight_layout()
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot)
    return "\n".join(lines)
