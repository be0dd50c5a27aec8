"""The result of :func:`s2a.memory.measure`: a JSON-serialisable report and its tables."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MemoryReport",
    "compare_table",
    "fold_module_indices",
    "format_bytes",
    "format_count",
]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary units: ``1536 -> '1.50 KiB'``; None -> ``'-'``."""
    if n is None:
        return "-"
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{sign}{int(value)} B"
            return f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_count(n: int) -> str:
    """Parameter counts: ``5_717_416 -> '5.72M'``."""
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


@dataclass
class MemoryReport:
    """Memory of one training step (forward, loss, backward[, optimizer step]).

    All sizes are in bytes.

    * ``saved_bytes``: tensors autograd keeps for backward, counted once per storage (its full
      size), parameters and buffers of the model excluded. Includes the loss's own saved tensors
      and storages that existed before the step and that the graph keeps: batch tensors and
      plain (non-parameter, non-buffer) tensor attributes of modules, given alone as
      ``saved_input_bytes``.
    * ``by_kind`` / ``by_module``: ``saved_bytes`` split by the operator that saved the storage
      first (``linear``, ``gelu``, ``attention``, ``gelu (s2a)``...; ``other`` for storages saved
      by graph nodes not reachable from the loss) and by the innermost module running when it was
      saved (``<root>`` for the model's own forward, ``<loss>`` for the loss function). Both sum
      to ``saved_bytes``.
    * ``peak_bytes``: highest allocator-level live memory during the step minus the live memory
      before it (weights and batch excluded; activations, gradients, temporaries and optimizer
      state included; with an optimizer step, its state is alive from the start of the step,
      as in every step after the first). Exact on CUDA (the caching allocator's counters) and
      on CPU (the profiler's allocation events: tensor bytes); sampled between autograd nodes
      only by the CPU fallback used while another profiler runs (``peak_method`` says which).
    * ``forward_peak_bytes``: the same, over the forward and loss alone (without the optimizer
      state): where a backward transient sets ``peak_bytes``, this shows what the forward holds.
    * ``forward_live_bytes``: allocator-level growth after forward + loss, measured in a separate
      forward without saved-tensor hooks; ``expected_forward_live_bytes`` is what the hook-based
      count predicts for it (``saved_bytes - saved_input_bytes`` + output and loss storages not
      saved), ``cross_check_ratio`` the ratio of the two. The CPU fallback probe (glibc's
      counters) also sees a roughly constant overhead of autograd bookkeeping (a few hundred KiB
      for a 6-layer transformer), so its ratio is meaningful for steps of some MiB and up. Tensors a custom Function keeps
      as ``ctx.attr`` instead of ``save_for_backward`` escape the hooks but not the allocator.
    * ``num_saved_storages`` / ``num_saved_tensors``: how many storages ``saved_bytes`` counts,
      and how many times the graph saved a tensor in them (a tensor saved by three operators,
      as a shared input is, counts three times).
    * ``output_bytes``: storages of the model outputs (parameters excluded).
    * ``grad_bytes``: parameter gradients after backward; ``optimizer_state_bytes``: state after
      one optimizer step (``measure(..., optimizer_step=True)``), else None.
    """

    saved_bytes: int
    by_kind: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    saved_input_bytes: int = 0
    num_saved_tensors: int = 0
    num_saved_storages: int = 0
    trainable_params: int = 0
    total_params: int = 0
    param_bytes: int = 0
    trainable_param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_state_bytes: int | None = None
    peak_bytes: int | None = None
    peak_method: str | None = None
    forward_peak_bytes: int | None = None
    forward_live_bytes: int | None = None
    expected_forward_live_bytes: int | None = None
    output_bytes: int = 0
    model_name: str = ""
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ derived values
    @property
    def trainable_pct(self) -> float:
        """Trainable parameters as a percentage of all parameters."""
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    @property
    def cross_check_ratio(self) -> float | None:
        """``forward_live_bytes / expected_forward_live_bytes`` (1.0 = perfect agreement)."""
        if self.forward_live_bytes is None or not self.expected_forward_live_bytes:
            return None
        return self.forward_live_bytes / self.expected_forward_live_bytes

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field, plus ``trainable_pct``."""
        data = dataclasses.asdict(self)
        data["trainable_pct"] = self.trainable_pct
        data["cross_check_ratio"] = self.cross_check_ratio
        return data

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of :meth:`to_dict` (indented unless ``kwargs`` say otherwise)."""
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryReport:
        """Report from :meth:`to_dict`'s output; derived keys such as ``trainable_pct``
        are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> MemoryReport:
        """Report from :meth:`to_json`'s text."""
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ printing
    def table(self, top_modules: int = 10) -> str:
        """Human-readable summary: peak and saved bytes, the split by operator kind, and
        the ``top_modules`` modules that keep the most."""
        lines = []
        title = f"Memory report: {self.model_name or 'model'} on {self.device}"
        lines.append(title)
        lines.append("=" * len(title))
        lines.append(
            f"trainable params   {format_count(self.trainable_params)} / "
            f"{format_count(self.total_params)} ({self.trainable_pct:.2f}%)"
        )
        lines.append(
            f"weights            {format_bytes(self.param_bytes)} "
            f"(trainable {format_bytes(self.trainable_param_bytes)}), "
            f"grads {format_bytes(self.grad_bytes)}, "
            f"optimizer state {format_bytes(self.optimizer_state_bytes)}"
        )
        lines.append(
            f"saved for backward {format_bytes(self.saved_bytes)} in {self.num_saved_storages} "
            f"storages, {self.num_saved_tensors} saves (of which batch and module tensor attributes "
            f"{format_bytes(self.saved_input_bytes)})"
        )
        lines.append(
            f"peak step memory   {format_bytes(self.peak_bytes)} [{self.peak_method or 'n/a'}]"
            f" (forward alone {format_bytes(self.forward_peak_bytes)})"
        )
        ratio = self.cross_check_ratio
        lines.append(
            f"allocator check    forward live {format_bytes(self.forward_live_bytes)} vs expected "
            f"{format_bytes(self.expected_forward_live_bytes)}"
            + (f" (ratio {ratio:.3f})" if ratio is not None else "")
        )
        lines.append("")
        lines.append(_two_col_table("operator", self.by_kind, self.saved_bytes))
        if self.by_module:
            lines.append("")
            lines.append(
                _two_col_table("module", self.by_module, self.saved_bytes, limit=top_modules)
            )
            folded = fold_module_indices(self.by_module)
            if len(folded) < len(self.by_module):
                lines.append("")
                lines.append(
                    _two_col_table(
                        "module (indices folded)", folded, self.saved_bytes, limit=top_modules
                    )
                )
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def fold_module_indices(by_module: Mapping[str, int]) -> dict[str, int]:
    """Sum module paths that differ only in numeric indices: ``blocks.3.attn -> blocks.*.attn``."""
    out: dict[str, int] = {}
    for path, nbytes in by_module.items():
        key = ".".join("*" if part.isdigit() else part for part in path.split("."))
        out[key] = out.get(key, 0) + nbytes
    return out


def _two_col_table(
    header: str, values: Mapping[str, int], total: int, limit: int | None = None
) -> str:
    items = sorted(values.items(), key=lambda kv: -kv[1])  # stable: ties keep given order
    hidden = 0
    if limit is not None and len(items) > limit:
        hidden = sum(v for _, v in items[limit:])
        hidden_n = len(items) - limit
        items = items[:limit]
    rows = [(k, format_bytes(v), f"{100.0 * v / total:.1f}%" if total else "-") for k, v in items]
    if hidden:
        rows.append(
            (f"({hidden_n} more)", format_bytes(hidden), f"{100.0 * hidden / total:.1f}%")
        )
    rows.append(("total", format_bytes(total), "100.0%" if total else "-"))
    w0 = max(len(header), *(len(r[0]) for r in rows))
    w1 = max(5, *(len(r[1]) for r in rows))
    out = [f"{header:<{w0}}  {'bytes':>{w1}}  {'%':>6}", f"{'-' * w0}  {'-' * w1}  {'-' * 6}"]
    out += [f"{a:<{w0}}  {b:>{w1}}  {c:>6}" for a, b, c in rows]
    return "\n".join(out)


def format_ratio(ratio: float) -> str:
    """``0.25 -> '0.25x'``; a ratio under 0.01 keeps two significant digits (``'0.0018x'``),
    not ``'0.00x'``, which reads as nothing."""
    return f"{ratio:.2f}x" if ratio == 0 or abs(ratio) >= 0.01 else f"{ratio:.2g}x"


def compare_table(reports: Mapping[str, MemoryReport] | Sequence[MemoryReport], *, kinds: bool = True) -> str:
    """Markdown table with one column per report; ratios are against the first column.

    ``reports``: ``{column name: report}``, or a list of reports named by their ``model_name``
    (``measure(..., name=...)``; a repeated name gets ``#2``...)."""
    if not isinstance(reports, Mapping):
        if isinstance(reports, MemoryReport):
            raise TypeError("compare_table takes several reports: a list of them, or {name: report}")
        named: dict[str, MemoryReport] = {}
        for i, r in enumerate(reports):
            if not isinstance(r, MemoryReport):
                raise TypeError(f"compare_table: item {i} is a {type(r).__name__}, not a MemoryReport")
            name = r.model_name or f"report {i + 1}"
            unique, n = name, i + 1
            while unique in named:  # "vit", "vit #3", "vit": the third is not "vit #3"
                unique, n = f"{name} #{n}", n + 1
            named[unique] = r
        reports = named
    if not reports:
        return ""
    names = list(reports)
    first = reports[names[0]]

    def with_ratio(value: int | None, ref: int | None) -> str:
        text = format_bytes(value)
        if value is not None and ref:
            text += f" ({format_ratio(value / ref)})"
        return text

    rows: list[tuple[str, list[str]]] = [
        (
            "saved for backward",
            [with_ratio(r.saved_bytes, first.saved_bytes) for r in reports.values()],
        ),
        (
            "peak step memory (above weights)",
            [with_ratio(r.peak_bytes, first.peak_bytes) for r in reports.values()],
        ),
        (
            "trainable params",
            [
                f"{format_count(r.trainable_params)} ({r.trainable_pct:.2f}%)"
                for r in reports.values()
            ],
        ),
        ("grads", [format_bytes(r.grad_bytes) for r in reports.values()]),
        (
            "forward live (allocator)",
            [format_bytes(r.forward_live_bytes) for r in reports.values()],
        ),
    ]
    if kinds:
        all_kinds: dict[str, int] = {}
        for r in reports.values():
            for k, v in r.by_kind.items():
                all_kinds[k] = max(all_kinds.get(k, 0), v)
        for k in sorted(all_kinds, key=lambda k: (-all_kinds[k], k)):
            rows.append((f"saved: {k}", [format_bytes(r.by_kind.get(k, 0)) for r in reports.values()]))

    header = ["", *names]
    body = [[label, *cells] for label, cells in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "| " + " | ".join(cells) + " |"

    sep = "|" + "|".join(
        ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    ) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in body)])
