"""Every fine-tuning method side by side: accuracy, parameters, memory and speed per backbone.

Backbones (defaults; ``--batch-size`` / ``--img-size`` / ``--seq-len`` override):

* ``minilm``: all-MiniLM-L6-v2 (real weights), batch 32, 128 tokens; accuracy from the
  ``rt-1000`` regime of ``benchmarks/accuracy.py`` (Rotten Tomatoes, 1000 sentences);
* ``efficientnet_lite0``: ImageNet EfficientNet-Lite0 (real weights), batch 32, 64 px; accuracy
  from ``fm-1000`` (Fashion-MNIST, 1000 images);
* ``vit_b16`` / ``swin_t``: timm ViT-B/16 and Swin-T, random weights, batch 64, 224 px, fp32:
  memory and speed only;
* ``vit_tiny``: timm ViT-Ti/16, random weights (a quick check of the script itself).

Every method is measured in this one process, one after the other on a freshly built model:
``s2a.measure`` (one training step with an AdamW step) gives the bytes saved for backward and
the step's peak growth over the weights; ``peak_memory_bytes`` = parameter and buffer bytes +
that peak (gradients and the optimizer's two fp32 tensors per trainable parameter included;
the input batch is not). ``step_time_s`` is the median of ``--repeats`` timed training steps
(forward, cross-entropy, backward, AdamW, zero_grad) after ``--warmup`` untimed ones;
``throughput`` = batch / step time. Memory and speed use a synthetic batch of the configured
shape (random token ids / pixels): they do not depend on the values.

Accuracy (real backbones): mean and std over ``--seeds`` seeds of the test accuracy (%) of
``s2a train`` runs cached under ``benchmarks/runs/accuracy/<regime>/<method>/seed<k>``, the
same tree and settings as ``benchmarks/accuracy.py`` (``full`` and ``s2a`` runs are shared);
``--run-missing`` launches the missing ones first. Rows without finished runs have accuracy null.

    HF_HUB_OFFLINE=1 python benchmarks/compare.py                                # everything
    HF_HUB_OFFLINE=1 python benchmarks/compare.py --backbones vit_tiny --methods full,lora,s2a \\
        --batch-size 4 --name compare_quick                                      # a quick check

Rows this invocation does not measure are kept from an existing ``<name>.json``, each with the
sitting (date, load, command) it was measured in, so backbones and methods can be measured in
separate sittings (``full`` is re-measured each time: it is the reference of the ratios). Rows
are merged only if measured with the same settings (model, batch, image size / sequence length,
classes, device): otherwise the script refuses, naming the difference (use another ``--name``, or
rerun those methods too).
``--time-methods`` times a subset (memory is always measured for every method): one ViT-B/16
step at batch 64 takes tens of seconds on a CPU. A row re-measured untimed keeps the step time
of its earlier sitting, which the Markdown names ("step times measured ...").

Writes ``benchmarks/results/<name>.json`` (``rows``: one per backbone and method with
``backbone, method, accuracy, accuracy_std, trainable_params, saved_activation_bytes,
peak_memory_bytes, step_time_s, throughput`` and each as ``*_vs_full``), ``<name>.md`` and
``<name>.png`` (accuracy against peak memory with the Pareto front for real backbones; peak
memory and step time bars for the others).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as acc_bench
from _common import (
    RESULTS,
    finished_report,
    header,
    md_table,
    metadata,
    mib,
    pass_fail,
    run_train,
    train_command,
    write_results,
)

BACKBONES: dict[str, dict[str, Any]] = {
    "minilm": {"model": "minilm", "kind": "text", "batch": 32, "seq_len": 128, "classes": 2, "regime": "rt-1000"},
    "efficientnet_lite0": {"model": "efficientnet_lite0", "kind": "image", "batch": 32, "img_size": 64,
                           "classes": 10, "regime": "fm-1000"},
    "vit_b16": {"model": "vit_base_patch16_224", "kind": "image", "batch": 64, "img_size": 224, "classes": 100},
    "swin_t": {"model": "swin_tiny_patch4_window7_224", "kind": "image", "batch": 64, "img_size": 224, "classes": 100},
    "vit_tiny": {"model": "vit_tiny_patch16_224", "kind": "image", "batch": 8, "img_size": 224, "classes": 10},
}  # fmt: skip
# row label -> s2a train options (S2A's own rows: module sets and storage widths)
VARIANTS: dict[str, dict[str, Any]] = {
    **{m: {"method": m} for m in ("full", "linear", "bitfit", "vpt", "lora", "ia3", "prompt-tuning",
                                  "adaptformer", "lst", "full-ckpt", "bitfit-ckpt", "lora-ckpt", "mesa8",
                                  "fewbit2")},
    "s2a": {"method": "s2a", "modules": "bias,prompt", "act_bits": "4"},
    "s2a-2bit": {"method": "s2a", "modules": "bias,prompt", "act_bits": "2"},
    "s2a-3bit": {"method": "s2a", "modules": "bias,prompt", "act_bits": "3"},
    "s2a-8bit": {"method": "s2a", "modules": "bias,prompt", "act_bits": "8"},
    "s2a-bias": {"method": "s2a", "modules": "bias", "act_bits": "4"},
    "s2a-prompt": {"method": "s2a", "modules": "prompt", "act_bits": "4"},
    "s2a-nocomp": {"method": "s2a", "modules": "bias,prompt", "act_bits": "none"},
    "s2a-side": {"method": "s2a", "modules": "side", "act_bits": "4"},
    "s2a-bias+prompt+side": {"method": "s2a", "modules": "bias,prompt,side", "act_bits": "4"},
    "s2a-lora": {"method": "s2a-lora", "act_bits": "4"},
}  # fmt: skip
FIELDS = ("accuracy", "accuracy_std", "lr", "lr_choice", "trainable_params", "saved_activation_bytes", "peak_memory_bytes",
          "step_time_s", "throughput")  # fmt: skip


# ---------------------------------------------------------------------------- accuracy
# A peer whose rate accuracy.py did not tune is screened on seed 0 at its base rate and at these
# multiples of it; the rate with the best validation accuracy (never the test split) runs every seed.
# A best rate at the edge of what was tried is a guess cut short: the screen goes on a factor of 3
# further that way while that keeps improving, at most LR_EXTEND more rates.
LR_SCREEN = (0.3, 1.0, 3.0)
LR_EXTEND = 2
# Same optimisation, other storage: checkpointing and Mesa / Few-bit storage change how a method
# keeps its activations, not what it optimises, so they train at that method's rate.
SHARES_RATE = {"full-ckpt": "full", "mesa8": "full", "fewbit2": "full", "lora-ckpt": "lora", "bitfit-ckpt": "bitfit"}


def base_lr(label: str, kind: str) -> float:
    """accuracy.py's measured rates for full / s2a (shared runs); linear and BitFit, which train a
    subset of what s2a trains, start from s2a's; default_lr otherwise."""
    from s2a.train.config import default_lr

    method = VARIANTS[SHARES_RATE.get(label, label)]["method"]
    tuned_as = {"bitfit": "s2a", "linear": "s2a"}.get(method, method)
    return acc_bench.LR.get((tuned_as, kind)) or default_lr(method, kind)


def screened(label: str) -> bool:
    """Rows whose rate is screened here: not full / s2a (tuned by accuracy.py) or their variants
    (s2a-2bit, s2a-side, ...: they train at s2a's rate)."""
    return label not in SHARES_RATE and VARIANTS[label]["method"] not in ("full", "s2a")


def _lr_dir_label(label: str, lr: float, base: float) -> str:
    return label if lr == base else f"{label}@lr{lr:g}"


def chosen_lr(backbone: str, label: str, run_missing: bool = False) -> tuple[float, str, str]:
    """(rate, run-directory label, how it was chosen) of a row's accuracy runs; with ``run_missing``
    the seed-0 screen is run first where it is incomplete."""
    b = BACKBONES[backbone]
    if label in SHARES_RATE:
        lr, dir_label, _ = chosen_lr(backbone, SHARES_RATE[label], run_missing)
        return lr, label if dir_label == SHARES_RATE[label] else f"{label}@lr{lr:g}", f"{SHARES_RATE[label]}'s rate"
    base = base_lr(label, b["kind"])
    if not screened(label):  # only full and s2a themselves were tuned; s2a's variants reuse its rate
        return base, label, "tuned by accuracy.py" if label in ("full", "s2a") else "s2a's rate"
    grid = [float(f"{base * m:.3g}") for m in LR_SCREEN]
    vals = {}

    def screen(lr: float) -> bool:
        report = cached_run(backbone, label, _lr_dir_label(label, lr, base), lr, 0, run_missing,
                            f"learning-rate screen {backbone} {label} lr={lr:g}")
        if report is not None:
            vals[lr] = report["val_accuracy"]
        return report is not None

    if not all([screen(lr) for lr in grid]):
        listed = "/".join(f"{lr:g}" for lr in grid)
        return base, label, f"default, not screened ({listed} on seed 0 not all run)"
    best = max(grid, key=lambda lr: (vals[lr], lr == base))  # ties keep the base rate
    for _ in range(LR_EXTEND):
        edge = max(vals) if best == max(vals) else min(vals) if best == min(vals) else None
        if edge is None:
            break
        nxt = float(f"{edge * (3 if edge == max(vals) else 1 / 3):.3g}")
        if not screen(nxt):
            listed = "/".join(f"{lr:g}" for lr in sorted(vals))
            return best, _lr_dir_label(label, best, base), (
                f"best validation of {listed} (seed 0; {nxt:g}, past the edge, not run)")
        if vals[nxt] <= vals[best]:
            break
        best = nxt
    listed = "/".join(f"{lr:g}" for lr in sorted(vals))
    return best, _lr_dir_label(label, best, base), f"best validation of {listed} (seed 0)"


def cached_run(backbone: str, label: str, dir_label: str, lr: float, seed: int, run_missing: bool,
               what: str) -> dict[str, Any] | None:
    """The report of one cached accuracy run made with these settings, launching it first when
    missing (or stale) and ``run_missing``; None when it is not there."""
    b = BACKBONES[backbone]
    out = acc_bench.run_dir(b["regime"], dir_label, seed)
    epochs = acc_bench.REGIMES[b["regime"]]["epochs"]
    report = finished_report(out, lr=lr, epochs=epochs)
    if report is None and run_missing:
        print(f"[compare] {what}", flush=True)
        run_train(accuracy_command(backbone, label, dir_label, lr, seed))
        report = finished_report(out, lr=lr, epochs=epochs)
    return report


def accuracy_command(backbone: str, label: str, dir_label: str, lr: float, seed: int) -> list[str]:
    b = BACKBONES[backbone]
    regime = acc_bench.REGIMES[b["regime"]]
    opts = VARIANTS[label]
    return train_command(acc_bench.run_dir(b["regime"], dir_label, seed), model=regime["model"], data=regime["data"],
                         method=opts["method"], seed=seed, lr=lr, epochs=regime["epochs"], batch=acc_bench.BATCH,
                         val_size=acc_bench.VAL_SIZE, train_size=regime.get("train_size"),
                         img_size=regime.get("img_size"), modules=opts.get("modules"),
                         act_bits=opts.get("act_bits"))  # fmt: skip


def accuracy_of(backbone: str, label: str, seeds: list[int], run_missing: bool) -> dict[str, Any]:
    """``accuracy`` (mean %), ``accuracy_std``, ``n`` (seeds finished), ``lr`` and ``lr_choice`` of
    the cached runs, launching missing ones (the learning-rate screen first) if asked."""
    b = BACKBONES[backbone]
    if "regime" not in b:
        return {"accuracy": None, "accuracy_std": None, "n": 0, "lr": None, "lr_choice": None}
    lr, dir_label, how = chosen_lr(backbone, label, run_missing)
    accs = []
    for s in seeds:
        d = acc_bench.run_dir(b["regime"], dir_label, s)
        report = cached_run(backbone, label, dir_label, lr, s, run_missing, f"accuracy run {d}")
        if report is not None:
            accs.append(100 * report["accuracy"])
    mean = statistics.mean(accs) if accs else None
    std = (statistics.stdev(accs) if len(accs) > 1 else 0.0) if accs else None
    return {"accuracy": mean, "accuracy_std": std, "n": len(accs), "lr": lr, "lr_choice": how}


# ---------------------------------------------------------------------------- memory and speed
def synthetic_batch(zm: Any, b: dict[str, Any], batch: int) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, b["classes"], (batch,), generator=g)
    if b["kind"] == "text":
        vocab = zm.model.get_input_embeddings().num_embeddings
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, b["seq_len"]), generator=g)
        inputs: Any = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "token_type_ids": torch.zeros_like(ids)}  # fmt: skip
    else:
        inputs = torch.randn(batch, 3, b["img_size"], b["img_size"], generator=g)
    return inputs, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LOAD_AT_START: list[float] = []
# what defines a row's measurement besides its method: rows measured with other values are not comparable
SETUP_KEYS = ("model", "batch", "img_size", "seq_len", "classes", "device")


def setup_of(backbone: str, device: str) -> dict[str, Any]:
    """The settings this invocation measures ``backbone`` with (fp32 always: not a setting here)."""
    return {k: v for k, v in {**BACKBONES[backbone], "device": device}.items() if k in SETUP_KEYS}


def _earlier_setup(old: dict[str, Any], detail: dict[str, Any]) -> dict[str, Any] | None:
    """A kept row's settings; rows written before they were stored take their file's backbone
    description and their sitting's device."""
    if "setup" in detail:
        return detail["setup"]
    cfg = old.get("backbones", {}).get(detail["backbone"])
    if cfg is None:
        return None
    device = old.get("sittings", {}).get(detail.get("measured"), {}).get("device", "cpu")
    return {k: v for k, v in {**cfg, "device": device}.items() if k in SETUP_KEYS}


def setup_conflicts(name: str, old: dict[str, Any], setups: dict[str, dict[str, Any]],
                    remeasured: set[tuple[str, str]]) -> None:
    """Refuse to merge, into ``<name>.json``, rows measured with other settings than this
    invocation's (``setups``: backbone -> settings) beside rows it measures: their bytes, times
    and ratios would not be comparable."""
    for bb, mine in setups.items():
        differ: dict[str, set[str]] = {}
        for d in old.get("details", []):
            if d["backbone"] != bb or (bb, d["method"]) in remeasured:
                continue
            theirs = _earlier_setup(old, d) or {}
            for k in SETUP_KEYS:
                if theirs.get(k) != mine.get(k):
                    differ.setdefault(f"{k} {theirs.get(k)} (theirs) vs {mine.get(k)} (now)", set()).add(d["method"])
        if differ:
            methods = sorted(set().union(*differ.values()))
            raise SystemExit(
                f"compare: {RESULTS / name}.json holds {bb} rows measured with other settings: "
                + "; ".join(f"{what}: {', '.join(sorted(ms))}" for what, ms in differ.items())
                + f". Write to another --name, or rerun those methods too (--methods {','.join(methods)}) "
                "with these settings.")


def sitting_of(t0: float) -> str:
    """The key of one invocation's rows: its start time to the second and its process id
    (invocations on different backbones may start together)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)) + f" pid {os.getpid()}"


def measure_one(backbone: str, label: str, device: torch.device, warmup: int, repeats: int,
                timed: bool = True, measured: str = "") -> dict[str, Any]:
    from s2a.memory import measure
    from s2a.train.methods import apply_method
    from s2a.zoo import call_model, load_model, logits_of

    b = BACKBONES[backbone]
    opts = VARIANTS[label]
    torch.manual_seed(0)
    zm = load_model(b["model"], b["classes"], max_length=b.get("seq_len"), img_size=b.get("img_size"))
    inputs, labels = synthetic_batch(zm, b, b["batch"])
    example = {k: v[:2] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:2]
    bits = opts.get("act_bits")
    act_bits = None if bits in (None, "none") else int(bits)
    modules = tuple(opts.get("modules", "bias,prompt").split(","))
    res = apply_method(zm.model, opts["method"], head_names=zm.head_names, modules=modules,
                       act_bits=act_bits, example_input=example)  # fmt: skip
    model = res.model.to(device).train()
    inputs = {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.to(device)
    labels = labels.to(device)

    def loss_fn(out: Any, _batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits_of(out).float(), labels)

    report = measure(model, inputs, loss_fn, optimizer_step=True, name=f"{backbone} [{label}]")
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(warmup + repeats if timed else 0):
        _sync(device)
        t0 = time.perf_counter()
        loss = F.cross_entropy(call_model(model, inputs).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times) if times else None
    row = {
        "backbone": backbone, "method": label,
        "trainable_params": sum(p.numel() for p in params),
        "saved_activation_bytes": report.saved_bytes,
        "peak_memory_bytes": weights + report.peak_bytes if report.peak_bytes is not None else None,
        "step_time_s": step, "throughput": b["batch"] / step if step else None,
    }  # fmt: skip
    detail = {
        "backbone": backbone, "method": label, "options": opts, "total_params": report.total_params,
        "weight_bytes": weights, "step_peak_bytes": report.peak_bytes, "peak_method": report.peak_method,
        "grad_bytes": report.grad_bytes, "optimizer_state_bytes": report.optimizer_state_bytes,
        "saved_by_kind": report.by_kind, "step_times_s": times, "notes": res.notes, "measured": measured,
        "setup": setup_of(backbone, str(device)),
    }  # fmt: skip
    del model, res, zm, opt, report
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"row": row, "detail": detail}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``<field>_vs_full`` for every numeric field, against the backbone's ``full`` row (step time
    and throughput: :func:`step_ratios`, against the ``full`` row of the same sitting)."""
    full = {r["backbone"]: r for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(r["backbone"])
        for f in FIELDS:
            if f in ("accuracy_std", "lr", "lr_choice", "step_time_s", "throughput"):
                continue
            a, b = r.get(f), (ref or {}).get(f)
            r[f"{f}_vs_full"] = a / b if a is not None and b else None


def timed_in(detail: dict[str, Any] | None) -> str | None:
    """The sitting that timed a row (its own, unless an untimed re-measure kept the time)."""
    if not detail or not detail.get("step_times_s"):
        return None
    return detail.get("timed", detail.get("measured"))


def step_ratios(data: dict[str, Any]) -> None:
    """Step time and throughput against full fine-tuning timed in the *same* sitting: sittings
    ran on different machines, so a time is only compared with times taken beside it."""
    details = {(d["backbone"], d["method"]): d for d in data.get("details", [])}
    refs = data.setdefault("full_step_times", {})
    for r in data["rows"]:
        sitting = timed_in(details.get((r["backbone"], r["method"])))
        if r["method"] == "full" and sitting and r["step_time_s"]:
            refs.setdefault(r["backbone"], {})[sitting] = r["step_time_s"]
    for r in data["rows"]:
        sitting = timed_in(details.get((r["backbone"], r["method"])))
        ref = refs.get(r["backbone"], {}).get(sitting) if sitting else None
        ok = ref and r["step_time_s"]
        r["step_time_s_vs_full"] = r["step_time_s"] / ref if ok else None
        r["throughput_vs_full"] = ref / r["step_time_s"] if ok else None


# ---------------------------------------------------------------------------- the figures
# rows that count as S2A, and the methods allowed to use less peak memory than S2A on ViT-B/16
S2A_PREFIX = "s2a"
SIDE_LIKE = ("linear", "lst", "s2a-side")


def checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The three figures of issue 5, on the rows that were measured (absent rows: no check)."""
    rows = data["rows"]
    out: list[dict[str, Any]] = []
    by = {(r["backbone"], r["method"]): r for r in rows}
    details = {(d["backbone"], d["method"]): d for d in data.get("details", [])}
    for bb in dict.fromkeys(r["backbone"] for r in rows):
        full, s2a = by.get((bb, "full")), by.get((bb, "s2a"))
        if full is None or s2a is None:
            continue
        if bb == "vit_b16":
            ratio = full["peak_memory_bytes"] / s2a["peak_memory_bytes"]
            out.append({"backbone": bb, "check": "s2a peak memory at least 6x below full",
                        "value": f"{ratio:.2f}x", "ok": ratio >= 6.0})
            lower = [r["method"] for r in rows if r["backbone"] == bb and r["method"] not in SIDE_LIKE
                     and not r["method"].startswith(S2A_PREFIX)
                     and r["peak_memory_bytes"] < s2a["peak_memory_bytes"]]  # fmt: skip
            out.append({"backbone": bb, "check": "s2a peak below every method but side-tuning / linear",
                        "value": ", ".join(lower) or "none lower", "ok": not lower})
        # step times compare only within a sitting: each against full fine-tuning timed beside it
        ckpt = by.get((bb, "full-ckpt"))
        if ckpt is not None and ckpt.get("step_time_s_vs_full") is None:
            ckpt = None
        mine = s2a.get("step_time_s_vs_full")
        if mine is None:
            out.append({"backbone": bb, "check": "s2a step faster than full",
                        "value": "not timed beside full", "ok": None})  # fmt: skip
        elif ckpt is not None and timed_in(details.get((bb, "s2a"))) != timed_in(details.get((bb, "full-ckpt"))):
            # each ratio is against its own sitting's full: two sittings' ratios are not comparable
            out.append({"backbone": bb, "check": "s2a step faster than full (full-ckpt: not comparable, "
                        "different sittings)", "value": f"{mine:.2f} x full; full-ckpt "
                        f"{ckpt['step_time_s_vs_full']:.2f} x full in another sitting", "ok": mine < 1.0})
        else:
            slower = mine >= 1.0 or (ckpt is not None and mine >= ckpt["step_time_s_vs_full"])
            out.append({"backbone": bb, "check": "s2a step faster than full" + (" and full-ckpt" if ckpt else ""),
                        "value": f"{mine:.2f} x full" + (f" vs {ckpt['step_time_s_vs_full']:.2f} x full" if ckpt else ""),
                        "ok": not slower})  # fmt: skip
        scored = [r for r in rows if r["backbone"] == bb and r["accuracy"] is not None]
        # S2A's configurations are the compressed ones: s2a-nocomp is the ablation without
        # the activation storage ("A"), a yardstick for the 4-bit cost, not a setting to pick.
        ours = [r for r in scored if r["method"].startswith(S2A_PREFIX)
                and VARIANTS.get(r["method"], {}).get("act_bits") != "none"]  # fmt: skip
        others = [r for r in scored if not r["method"].startswith(S2A_PREFIX) and r["method"] != "full"]
        if ours and not others:
            out.append({"backbone": bb, "check": "best S2A row on the Pareto front",
                        "value": "no baseline besides full has accuracy runs yet", "ok": None})
        elif ours:
            best = max(ours, key=lambda r: r["accuracy"])
            leaner = [r for r in rows if r["backbone"] == bb and not r["method"].startswith(S2A_PREFIX)
                      and r["peak_memory_bytes"] <= best["peak_memory_bytes"]]  # fmt: skip
            rivals = [r["method"] for r in leaner if r["accuracy"] is not None
                      and r["accuracy"] >= best["accuracy"] - 0.5]  # fmt: skip
            unknown = [r["method"] for r in leaner if r["accuracy"] is None]
            check = (f"best S2A row ({best['method']}) on the Pareto front "
                     "(no method within 0.5 points uses less memory)")  # fmt: skip
            if rivals or not unknown:
                out.append({"backbone": bb, "check": check, "value": ", ".join(rivals) or "none", "ok": not rivals})
            else:  # a leaner method without accuracy runs could still be a rival
                out.append({"backbone": bb, "check": check, "ok": None,
                            "value": "leaner methods without accuracy runs: " + ", ".join(unknown)})
    return out


# ---------------------------------------------------------------------------- outputs
def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated by one with less or equal memory and higher or equal accuracy."""
    front, best = [], float("-inf")
    for mem, acc, label in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((mem, acc, label))
            best = acc
    return front


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(backbones), figsize=(7 * len(backbones), 5.5), squeeze=False)
    for ax, bb in zip(axes[0], backbones, strict=True):
        rs = [r for r in rows if r["backbone"] == bb and r["peak_memory_bytes"] is not None]
        pts = [(r["peak_memory_bytes"] / 2**20, r["accuracy"], r["method"]) for r in rs if r["accuracy"] is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
            for x, y, label in pts:
                ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            front = pareto(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color="tab:red", label="Pareto front")
            ax.set_xlabel("peak training memory (MiB)")
            ax.set_ylabel("test accuracy (%)")
            ax.legend()
        else:  # random weights (or no finished accuracy runs): memory and step time bars
            labels = [r["method"] for r in rs]
            x = range(len(rs))
            ax.bar([i - 0.2 for i in x], [r["peak_memory_bytes"] / 2**20 for r in rs], 0.4, label="peak MiB")
            ax.set_ylabel("peak training memory (MiB)")
            ax2 = ax.twinx()
            ax2.bar([i + 0.2 for i in x], [r["step_time_s"] or 0.0 for r in rs], 0.4, color="tab:orange",
                    label="step s (0 = not timed)")
            ax2.set_ylabel("step time (s)")
            ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
            ax.legend(loc="upper left")
            ax2.legend(loc="upper right")
        ax.set_title(bb)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_text(row: dict[str, Any]) -> str:
    """The row's AdamW rate and a short word on how it was chosen (the notes explain them)."""
    if row.get("lr") is None:
        return "-"
    how = row.get("lr_choice") or ""
    mark = ("screened" if how.startswith("best") else "tuned" if how.startswith("tuned")
            else "default" if how.startswith("default") else how)  # fmt: skip
    return f"{row['lr']:g} ({mark})"


def to_markdown(data: dict[str, Any]) -> str:
    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    backbones = {r["backbone"] for r in data["rows"]}
    lines = header(
        "Every method side by side", data["meta"],
        notes=[
            "Peak = parameters + buffers + the step's peak growth (activations, gradients, AdamW state); "
            "saved = bytes kept for backward (s2a.measure). Ratios are to full fine-tuning of the same backbone.",
            "Accuracy: test %, mean ± std over the finished seeds (n) of cached s2a train runs; '-' = not run.",
            "lr: the AdamW peak rate of the accuracy runs. tuned: full and s2a, picked on the validation split "
            "by accuracy.py; screened: the peer ran seed 0 at 0.3x, 1x and 3x its base rate (s2a's for linear "
            "and BitFit, default_lr otherwise), then 3x further past the edge while that improved (at most "
            f"{LR_EXTEND} more), and the best validation accuracy chose the rate of every seed; "
            "'<method>'s rate': the same optimisation with other storage (checkpointing, Mesa / Few-bit), "
            "or an s2a variant (other bit widths or modules), shares that method's rate; default: not "
            "screened yet.",
            "Every method with a frozen backbone keeps its BatchNorm running statistics (as s2a does); full "
            "fine-tuning and its storage variants train them.",
            "mesa8 / fewbit2 are configurations of s2a's activation engine imitating Mesa and Few-bit, not "
            "those projects' code. mesa8 leaves the inputs of trainable linear / matmul and convolution layers "
            "at full precision (Mesa stores them at 8 bits): its memory is an upper bound on Mesa's (on "
            "ViT-B/16 at batch 64 those inputs are about 3.1 GiB of its saved bytes). fewbit2 leaves out Approx-BP's "
            "memory-sharing LayerNorm.",
            "IA3 on a timm block's fused qkv projection scales the queries too (IA3 scales keys and values): "
            "a third of that output is kept beyond what IA3 needs (ViT-B/16 at batch 64: about 443 of its 3,103 MiB of "
            "stored products).",
            *(["MiniLM's dropout (0.1) is on in its measured steps. On the CPU, PyTorch keeps a 4-byte mask value per "
               "element and runs attention with dropout unfused, keeping the attention probabilities; "
               "s2a regenerates its masks from a seed. A GPU's fused kernels avoid most of this, so the peers' "
               "MiniLM peaks are higher here than they would be there (not measured: no GPU here)."]
              if "minilm" in backbones else []),
            *(["The lead over the checkpointed peers depends on the batch: where the weights dominate they match or "
               "slightly undercut s2a (compare_vit_b16_batch16.md: ViT-B/16 at batch 16, bitfit-ckpt and lora-ckpt 606.5 and "
               "618.7 MiB, s2a 620.0)."]
              if any(data["backbones"][b]["batch"] != 16 for b in backbones) else []),
            "The peak is that of a steady-state step: AdamW's state (2 x the trainable bytes) is allocated "
            "before the forward, as it is in every step after the first.",
        ],
    )  # fmt: skip
    for bb in dict.fromkeys(r["backbone"] for r in data["rows"]):
        cfg = data["backbones"][bb]
        lines += ["", f"## {bb}", "", f"`{cfg['model']}`, batch {cfg['batch']}, "
                  + (f"{cfg['seq_len']} tokens" if cfg["kind"] == "text" else f"{cfg['img_size']} px")]
        mine = [d for d in data["details"] if d["backbone"] == bb]
        memory_dates = {d["measured"] for d in mine if "measured" in d}
        timing_dates = {timed_in(d) for d in mine}
        for date in sorted((memory_dates | timing_dates) - {None}):
            m = data.get("sittings", {}).get(date)
            if m is not None:
                what = {(True, True): "measured", (True, False): "memory measured",
                        (False, True): "step times measured"}[(date in memory_dates, date in timing_dates)]
                la = m.get("load_avg_at_start")
                machine = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
                lines.append(f"- {what} {date} on {machine}" + (f", load average {la[0]:.2f} at start" if la else "")
                             + f", {m['repeats']}: `{m['command']}`")
        lines.append("")
        table = []
        by_method = {d["method"]: d for d in mine}
        full_sitting = timed_in(by_method.get("full"))
        marked = False
        for r in (r for r in data["rows"] if r["backbone"] == bb):
            sitting = timed_in(by_method.get(r["method"]))
            mark = "" if sitting is None or sitting == full_sitting else " *"
            marked = marked or bool(mark)
            n = data["seeds_finished"].get(f"{bb}/{r['method']}", 0)
            acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.2f} ± {r['accuracy_std']:.2f} (n={n})"
            table.append([
                r["method"], acc, lr_text(r), f"{r['trainable_params']:,}", mib(r["saved_activation_bytes"]),
                ratio(r["saved_activation_bytes_vs_full"]), mib(r["peak_memory_bytes"]),
                ratio(r["peak_memory_bytes_vs_full"]),
                "-" if r["step_time_s"] is None else f"{r['step_time_s']:.3f}{mark}",
                "-" if r["throughput"] is None else f"{r['throughput']:.1f}",
                ratio(r["step_time_s_vs_full"]),
            ])  # fmt: skip
        lines += md_table(["method", "accuracy %", "lr", "trainable", "saved MiB", "vs full", "peak MiB", "vs full",
                           "step s", "ex/s", "step vs full"], table)  # fmt: skip
        if marked:
            lines += ["", "\\* timed in another sitting than the `full` row above (see the sitting lines): its "
                      "'step vs full' is against full fine-tuning timed in that same sitting, on that machine."]
        skipped = [s for s in data["skipped"] if s["backbone"] == bb]
        if skipped:
            lines += ["", "Not applicable: " + "; ".join(f"{s['method']} ({s['reason']})" for s in skipped)]
    if data.get("not_measured"):
        lines += ["", f"Not measured (the run stopped before them): {', '.join(data['not_measured'])}"]
    if data.get("checks"):
        lines += ["", "## Checks (issue 5)", ""]
        lines += md_table(["backbone", "check", "value", "result"],
                          [[c["backbone"], c["check"], c["value"], "NOT RUN" if c["ok"] is None else pass_fail(c["ok"])]
                           for c in data["checks"]])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="minilm,efficientnet_lite0,vit_b16,swin_t", help=f"of {list(BACKBONES)}")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"comma separated, of {list(VARIANTS)}")
    ap.add_argument("--batch-size", type=int, help="override every backbone's batch")
    ap.add_argument("--img-size", type=int, help="override the image side of image backbones")
    ap.add_argument("--seq-len", type=int, help="override MiniLM's sequence length")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--time-methods", help="time only these methods (comma separated, or 'none'; default every "
                    "one): on ViT-B/16 at batch 64 a CPU step takes tens of seconds")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--run-missing", action="store_true", help="launch the missing accuracy runs first")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--name", default="compare", help="result file name under benchmarks/results/")
    ap.add_argument("--refresh-accuracy", action="store_true",
                    help="only re-read the accuracy runs into an existing result (no measuring)")
    args = ap.parse_args()
    backbones = [b for b in args.backbones.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    for names, known in ((backbones, BACKBONES), (methods, VARIANTS)):
        bad = [n for n in names if n not in known]
        if bad:
            ap.error(f"unknown {bad}; known: {list(known)}")
    if "full" not in methods:
        methods.insert(0, "full")  # the reference of every ratio
    if args.time_methods is None:
        timed = set(methods)
    else:
        timed = set() if args.time_methods == "none" else set(args.time_methods.split(","))
    if timed - set(VARIANTS):
        ap.error(f"--time-methods: unknown {sorted(timed - set(VARIANTS))}; known: {list(VARIANTS)}")
    for b in backbones:
        cfg = BACKBONES[b]
        if args.batch_size:
            cfg["batch"] = args.batch_size
        if args.img_size and cfg["kind"] == "image":
            cfg["img_size"] = args.img_size
        if args.seq_len and cfg["kind"] == "text":
            cfg["seq_len"] = args.seq_len
    from s2a.train.config import TrainError

    device = torch.device(args.device)
    seeds = list(range(args.seeds))
    if args.refresh_accuracy:
        refresh_accuracy(args.name, seeds, args.run_missing, set(backbones), set(methods))
        return
    path = RESULTS / f"{args.name}.json"
    if path.is_file():  # refuse now, not after hours of measuring
        setup_conflicts(args.name, _with_sittings(json.loads(path.read_text())),
                        {b: setup_of(b, str(device)) for b in backbones}, {(b, m) for b in backbones for m in methods})
    t0 = time.time()
    LOAD_AT_START[:] = os.getloadavg() if hasattr(os, "getloadavg") else ()
    rows, details, skipped, finished = [], [], [], {}
    for bb in backbones:
        for label in methods:
            print(f"[compare] {bb} {label}", flush=True)
            try:
                res = measure_one(bb, label, device, args.warmup, args.repeats, timed=label in timed,
                                  measured=sitting_of(t0))
            except TrainError as exc:
                reason = str(exc).split(" Methods that apply")[0].rstrip(".")
                skipped.append({"backbone": bb, "method": label, "reason": reason})
                continue
            acc = accuracy_of(bb, label, seeds, args.run_missing)
            res["row"].update(acc)
            finished[f"{bb}/{label}"] = acc["n"]
            rows.append({"backbone": bb, "method": label, **{f: res["row"].get(f) for f in FIELDS}})
            details.append(res["detail"])
            write_partial(args, backbones, methods, rows, skipped, finished, details, t0)  # a long run may be cut short
    write_partial(args, backbones, methods, rows, skipped, finished, details, t0)


def write_partial(args: argparse.Namespace, backbones: list[str], methods: list[str], rows: list[dict[str, Any]],
                  skipped: list[dict[str, Any]], finished: dict[str, int], details: list[dict[str, Any]],
                  t0: float) -> None:
    """Write the results measured so far (every row carries its own numbers)."""
    rows, details = [dict(r) for r in rows], [dict(d) for d in details]  # the merge edits them
    timing = f"{args.repeats} timed steps after {args.warmup} warm-up"
    if args.time_methods == "none":
        timing = "memory only, no timed steps"
    elif args.time_methods:
        timing += f" (timed: {args.time_methods})"
    meta = metadata(repeats=f"{timing}; accuracy over {args.seeds} seeds",
                    runtime_s=time.time() - t0, device=str(args.device))  # fmt: skip
    meta["date"] = sitting_of(t0)
    if LOAD_AT_START:  # metadata() reads the load now, at this write; the sitting began earlier
        meta["load_avg_at_start"] = list(LOAD_AT_START)
    planned = [f"{b}/{m}" for b in backbones for m in methods]
    done = {f"{r['backbone']}/{r['method']}" for r in rows} | {f"{x['backbone']}/{x['method']}" for x in skipped}
    data = {"meta": meta, "sittings": {meta["date"]: meta},
            "backbones": {b: BACKBONES[b] for b in backbones}, "rows": rows,
            "skipped": skipped, "seeds_finished": finished, "details": details,
            "not_measured": [p for p in planned if p not in done]}  # fmt: skip
    with _locked(args.name):
        setups = {b: setup_of(b, str(args.device)) for b in backbones}
        finish(args.name, keep_earlier_rows(args.name, data, setups, {(b, m) for b in backbones for m in methods}),
               quiet=True)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold ``<name>``'s lock while reading, merging and writing it: invocations measuring other
    backbones may run at the same time, and each write merges the rows the others wrote."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _with_sittings(old: dict[str, Any]) -> dict[str, Any]:
    """Results written before rows carried their sitting were measured in one, ``meta``."""
    if "sittings" in old:
        return old
    old["sittings"] = {old["meta"]["date"]: old["meta"]}
    for d in old.get("details", []):
        d.setdefault("measured", old["meta"]["date"])
    return old


def keep_earlier_rows(name: str, data: dict[str, Any], setups: dict[str, dict[str, Any]],
                      planned: set[tuple[str, str]]) -> dict[str, Any]:
    """Carry over, from an existing ``<name>.json``, every row this invocation did not measure:
    a ViT-B/16 pass takes hours on a CPU, and need not be repeated to add or refresh other
    rows. Each row's sitting (date, load, command) stays in ``sittings``, named per row.
    ``setups``: this invocation's settings per backbone; ``planned``: the (backbone, method)
    rows it measures, a row measured with other settings among them is dropped, not kept, until
    it is re-measured (a partial write must not mix the two)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return data
    old = _with_sittings(json.loads(path.read_text()))
    new = {(r["backbone"], r["method"]) for r in data["rows"]} | {(x["backbone"], x["method"]) for x in data["skipped"]}
    # again at each write: an invocation started meanwhile may have written other settings
    setup_conflicts(name, old, setups, planned)
    stale = {(d["backbone"], d["method"]) for d in old.get("details", [])
             if (d["backbone"], d["method"]) in planned and _earlier_setup(old, d) != setups.get(d["backbone"])}

    def earlier(x: dict[str, Any]) -> bool:
        return (x["backbone"], x["method"]) not in new | stale

    now = data["meta"]["date"]
    data["sittings"] = {**{k: v for k, v in old.get("sittings", {}).items() if k != now}, now: data["meta"]}
    data["backbones"] = {**old.get("backbones", {}), **data["backbones"]}
    order = {(b, m): i for i, (b, m) in enumerate((b, m) for b in BACKBONES for m in VARIANTS)}
    data["rows"] = sorted([r for r in old["rows"] if earlier(r)] + data["rows"],
                          key=lambda r: order.get((r["backbone"], r["method"]), len(order)))  # fmt: skip
    data["skipped"] = [x for x in old.get("skipped", []) if earlier(x)] + data["skipped"]
    data["details"] = [x for x in old.get("details", []) if earlier(x)] + data["details"]
    _keep_earlier_times(old, data)
    data["seeds_finished"] = {**old.get("seeds_finished", {}), **data["seeds_finished"]}
    if "full_step_times" not in old:  # written before it was kept: the full rows' own sittings
        step_ratios(old)
    data["full_step_times"] = old["full_step_times"]
    done = {f"{b}/{m}" for b, m in new}
    data["not_measured"] = [p for p in old.get("not_measured", []) if p not in done] + [
        p for p in data["not_measured"] if p not in old.get("not_measured", [])]
    return data


def _keep_earlier_times(old: dict[str, Any], data: dict[str, Any]) -> None:
    """A row re-measured without timing (``--time-methods``) keeps its earlier step time, and its
    detail names the sitting that timed it (``timed``): memory is refreshed in an hour, a ViT-B/16
    timing pass takes several."""
    old_rows = {(r["backbone"], r["method"]): r for r in old["rows"]}
    old_details = {(d["backbone"], d["method"]): d for d in old.get("details", [])}
    details = {(d["backbone"], d["method"]): d for d in data["details"]}
    for r in data["rows"]:
        key = (r["backbone"], r["method"])
        prev, prev_detail, detail = old_rows.get(key), old_details.get(key), details.get(key)
        if r["step_time_s"] is not None or prev is None or prev.get("step_time_s") is None:
            continue
        if detail is None or prev_detail is None or _earlier_setup(old, prev_detail) != detail.get("setup"):
            continue  # a time taken with other settings is not this row's
        r["step_time_s"], r["throughput"] = prev["step_time_s"], prev["throughput"]
        detail["step_times_s"] = prev_detail.get("step_times_s", [])
        detail["timed"] = prev_detail.get("timed", prev_detail.get("measured"))


def finish(name: str, data: dict[str, Any], quiet: bool = False) -> None:
    add_ratios(data["rows"])  # after the merge: kept rows are compared with today's full
    step_ratios(data)
    data["checks"] = checks(data)
    md = to_markdown(data)
    write_results(name, data, md)
    plot(data["rows"], RESULTS / f"{name}.png")
    if not quiet:
        print(md)


def refresh_accuracy(name: str, seeds: list[int], run_missing: bool, backbones: set[str], methods: set[str]) -> None:
    """Re-read the accuracy runs into an existing ``<name>.json`` (memory and speed are kept):
    accuracy runs finish over hours, the measurements in minutes. With ``run_missing``, only the
    rows of ``backbones`` x ``methods`` launch their missing runs."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--refresh-accuracy: {path} does not exist; run without it first")
    if run_missing:  # launch first: this can take hours, while other sittings add rows
        for r in json.loads(path.read_text())["rows"]:
            if r["backbone"] in backbones and r["method"] in methods:
                accuracy_of(r["backbone"], r["method"], seeds, True)
    with _locked(name):  # read now, not before the runs: rows written meanwhile stay
        data = json.loads(path.read_text())
        for r in data["rows"]:
            acc = accuracy_of(r["backbone"], r["method"], seeds, False)
            r.update({f: acc[f] for f in ("accuracy", "accuracy_std", "lr", "lr_choice")})
            data["seeds_finished"][f"{r['backbone']}/{r['method']}"] = acc["n"]
        data["meta"]["accuracy_refreshed"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        finish(name, data)


if __name__ == "__main__":
    main()
