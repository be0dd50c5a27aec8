"""Training-step memory of S2A's structure modules (bias, prompt, side and their combinations).

ViT-B/16 (timm ``vit_base_patch16_224``, random init, fp32, 224 px, batch 64, 100 classes):
every non-empty combination of the modules through ``s2a.apply(model, S2AConfig(...))`` with
4-bit activation storage, bias+prompt without it (``act_bits=None``), and native full fine-tuning
as the reference. Each set-up is measured by ``s2a.memory.measure(..., optimizer_step=True)`` in its
own subprocess.

    HF_HUB_OFFLINE=1 python benchmarks/structure_memory.py           # full size
    HF_HUB_OFFLINE=1 python benchmarks/structure_memory.py --quick   # vit_tiny, batch 2

Writes ``benchmarks/results/structure_memory.json`` / ``.md`` (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, md_table, metadata, mib, run_child, write_results

MODULE_SETS = [c for n in (1, 2, 3) for c in itertools.combinations(("bias", "prompt", "side"), n)]
FULL = {"quick": ("vit_tiny_patch16_224", 2), "full": ("vit_base_patch16_224", 64)}


def setups() -> list[tuple[str, tuple[str, ...], int | None]]:
    # Every module set with 4-bit storage; without compression only S2A's default set.
    out: list[tuple[str, tuple[str, ...], int | None]] = [("full", (), None)]
    out.append(("bias+prompt", ("bias", "prompt"), None))
    out += [("+".join(mods) + "+4bit", mods, 4) for mods in MODULE_SETS]
    return out


def run_one(label: str, quick: bool) -> dict[str, Any]:
    import timm

    import s2a
    from s2a.memory import measure

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    name, batch = FULL["quick" if quick else "full"]
    _, mods, bits = next(s for s in setups() if s[0] == label)
    model = timm.create_model(name, pretrained=False, num_classes=100)
    if mods:
        s2a.apply(model, s2a.S2AConfig(modules=mods, act_bits=bits, num_classes=100))
    model.train()
    x = torch.randn(batch, 3, 224, 224)
    report = measure(model, x, optimizer_step=True, name=f"{name} [{label}]")
    return {"setup": label, "model": name, "batch": batch, "report": report.to_dict()}


def to_markdown(data: dict[str, Any]) -> str:
    rows, full = [], next(r for r in data["results"] if r["setup"] == "full").get("report")  # None: failed

    def vs(key: str, rep: dict[str, Any]) -> str:
        return f"{rep[key] / full[key]:.3f}" if full and full[key] else "-"

    for r in data["results"]:
        if "error" in r:
            rows.append([r["setup"], "error: " + r["error"], "", "", "", "", ""])
            continue
        rep = r["report"]
        rows.append([
            r["setup"], mib(rep["saved_bytes"]), vs("saved_bytes", rep),
            mib(rep["peak_bytes"]), vs("peak_bytes", rep),
            f"{rep['trainable_params']:,}", f"{100 * rep['trainable_params'] / rep['total_params']:.2f}%",
        ])
    lines = header(
        "Training-step memory of the structure modules (ViT-B/16)", data["meta"],
        notes=[f"Model {data['model']}, batch {data['batch']}, 224 px, fp32, random init, 100-class "
               "head; `s2a.apply(model, S2AConfig(modules=..., act_bits=...))`; `full` is native "
               "full fine-tuning. Saved/peak as in memory.md (measure(), optimizer_step=True)."],
    )
    lines += ["", *md_table(["set-up", "saved MiB", "vs full", "peak MiB", "peak vs full",
                             "trainable params", "trainable %"], rows)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_one(args.child, args.quick)))
        return
    t0 = time.perf_counter()
    meta = metadata(repeats="1 measured step per set-up")  # the date and load of the start
    results = []
    for label, _, _ in setups():
        results.append(run_child(__file__, [label], {"setup": label}, ["--quick"] if args.quick else []))
        print(label, "error" if "error" in results[-1] else "ok", flush=True)
    name, batch = FULL["quick" if args.quick else "full"]
    meta["runtime_s"] = time.perf_counter() - t0
    data = {"meta": meta, "model": name, "batch": batch, "results": results}
    write_results("structure_memory" + ("_quick" if args.quick else ""), data, to_markdown(data))


if __name__ == "__main__":
    main()
