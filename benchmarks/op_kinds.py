"""Bytes saved for backward by one operator kind: that kind left native vs compressed.

For each kind the README quotes a figure for, one model with bias + prompt and 4-bit storage
(``s2a.apply(model, S2AConfig(act_bits=4, num_classes=10))``; every kind at its default width,
8 bits for ``star_relu`` and ``matmul``) is measured three ways by ``s2a.measure(model, batch,
optimizer_step=True)``: every kind compressed, the kind alone left native
(``op_bits={kind: 0}``), and no compression at all (``act_bits=None``, for reference).
timm models: random init, fp32, 224 px, batch 1. ``matmul``: the tiny random MPNet and
DeBERTa-v2 of ``families.py`` (eager attention), its batch of 2 sequences of 9 tokens.

    HF_HUB_OFFLINE=1 python benchmarks/op_kinds.py                  # ~5 min on 2 shared cores
    python benchmarks/op_kinds.py --render benchmarks/results/op_kinds.json   # only the .md

Writes ``benchmarks/results/op_kinds.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, md_table, metadata, mib, write_results

# (kind, model, builder key): "timm:NAME" or "hf:KEY" (a key of families.HF)
SETUPS = [
    ("star_relu", "caformer_s18", "timm:caformer_s18"),
    ("grn", "convnextv2_atto", "timm:convnextv2_atto"),
    ("group_norm", "poolformer_s12", "timm:poolformer_s12"),
    ("max_pool", "hiera_tiny_224", "timm:hiera_tiny_224"),
    ("matmul", "MPNet (tiny, random)", "hf:mpnet"),
    ("matmul", "DeBERTa-v2 (tiny, random)", "hf:deberta-v2"),
]
WAYS = {"compressed": {"act_bits": 4}, "kind_native": {"act_bits": 4}, "native": {"act_bits": None}}


def build(key: str) -> tuple[torch.nn.Module, Any, str, int]:
    """(model, batch, input description, samples in the batch); the same weights every call."""
    lib, name = key.split(":")
    torch.manual_seed(0)
    if lib == "timm":
        import timm

        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        return timm.create_model(name, pretrained=False, num_classes=10), x, "1×3×224×224", 1
    from families import hf_arch

    arch = hf_arch(name)
    model = arch.build()
    ids = arch.inputs["input_ids"]
    return model, arch.inputs, f"{ids.shape[0]}×{ids.shape[1]} tokens", ids.shape[0]


def run_one(kind: str, model_name: str, key: str) -> dict[str, Any]:
    import s2a

    row: dict[str, Any] = {"kind": kind, "model": model_name, "builder": key}
    for way, kw in WAYS.items():
        model, batch, row["input"], row["samples"] = build(key)
        op_bits = {kind: 0} if way == "kind_native" else {}
        s2a.apply(model, s2a.S2AConfig(modules=("bias", "prompt"), num_classes=10, op_bits=op_bits, **kw))
        model.train()
        rep = s2a.measure(model, batch, optimizer_step=True, name=f"{model_name} [{way}]").to_dict()
        row[way] = {k: rep[k] for k in ("saved_bytes", "peak_bytes", "peak_method", "by_kind")}
    return row


def size(n: int, dec: bool = False) -> str:
    """MiB (MB with ``dec``: 10^6 B); KiB (kB) below a tenth of one, as the tiny text models keep."""
    unit = 1e6 if dec else 2**20
    if n >= unit / 10:
        return mib(n) if not dec else f"{n / unit:.1f}"
    return f"{n / (1e3 if dec else 2**10):.1f} {'kB' if dec else 'KiB'}"


def to_markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["kind"], r["model"], "error: " + r["error"], *[""] * 7])
            continue
        c, n, nat = r["compressed"], r["kind_native"], r["native"]
        rows.append([
            f"`{r['kind']}`", r["model"], r["input"], size(n["saved_bytes"]), size(c["saved_bytes"]),
            f"{c['saved_bytes'] / n['saved_bytes']:.3f}", size(nat["saved_bytes"]),
            size(n["peak_bytes"]), size(c["peak_bytes"]),
            f"{size(n['saved_bytes'] // r['samples'], True)} → {size(c['saved_bytes'] // r['samples'], True)}",
        ])
    lines = header(
        "Saved for backward by one operator kind: left native vs compressed", data["meta"],
        notes=["bias + prompt, `S2AConfig(act_bits=4, num_classes=10)` (each kind at its default "
               "width: 8 bits for `star_relu` and `matmul`); *kind native*: the same with "
               "`op_bits={kind: 0}`, every other kind compressed; *no compression*: "
               "`act_bits=None`. timm models: random init, fp32, 224 px, batch 1; `matmul`: the tiny "
               "random MPNet / DeBERTa-v2 of families.py (eager attention, dropout off).",
               "Saved and peak from `s2a.measure(model, batch, optimizer_step=True)` (peak: the "
               "step's live memory above weights and batch, AdamW state included); the JSON has "
               "exact bytes and the split by operator kind. Ratio: compressed / kind native."],
    )
    lines += ["", *md_table(
        ["kind", "model", "input", "saved MiB, kind native", "saved MiB, compressed", "ratio",
         "saved MiB, no compression", "peak MiB, kind native", "peak MiB, compressed",
         "saved MB (10⁶ B) per sample, native → compressed"], rows)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--render", metavar="JSON", help="only rewrite the .md from a results .json")
    args = ap.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(to_markdown(data) + "\n")
        return
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t0 = time.perf_counter()
    meta = metadata(repeats="1 measured step per set-up (measure() runs forward twice)")
    results = []
    for kind, model_name, key in SETUPS:
        try:
            results.append(run_one(kind, model_name, key))
        except Exception as e:  # one failing model does not take the others down
            results.append({"kind": kind, "model": model_name, "error": f"{type(e).__name__}: {e}"})
        print(kind, model_name, "error" if "error" in results[-1] else "ok", flush=True)
    meta["runtime_s"] = time.perf_counter() - t0
    data = {"meta": meta, "results": results}
    write_results("op_kinds", data, to_markdown(data))


if __name__ == "__main__":
    main()
