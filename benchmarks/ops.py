"""CPU cost of the compressed operators and of a whole ViT-S/16 training step, vs native PyTorch.

Part 1, operators: forward + backward of each ``s2a`` operator (4 bits) against the native
operator on ViT-B-like shapes (CNN feature maps for SiLU, ReLU, BatchNorm, convolution), fp32, ``torch.set_num_threads(2)``. The native op, the s2a op
with its default kernels (``torch.compile``d pointwise encode/decode, warmed up first) and the
s2a op with ``S2A_COMPILE=0`` (eager kernels) run round-robin; each gets ``--warmup`` untimed
rounds, then ``--repeats`` timed ones; medians are reported. The pointwise activations (GELU,
SiLU, ReLU...) have compiled encode/decode kernels (``s2a.activations.kernels``), the row-wise
operators (softmax, attention, LayerNorm, BatchNorm) compiled row kernels
(``s2a.activations.rowquant``); the eager column is measured for the pointwise ones only
(``S2A_COMPILE=0`` gives the same bytes and gradients for all).

Part 2, whole step: timm ``vit_small_patch16_224`` (random init, biases + head trainable,
batch 32, 224 px, cross-entropy on random labels): forward + backward + AdamW step, native vs
``compress_activations(bits=4)`` (compiled and eager kernels), plus full fine-tuning native
as a reference; interleaved, median of ``--steps`` steps after warm-up.

    python benchmarks/ops.py            # full sizes
    python benchmarks/ops.py --quick    # small shapes, ViT-Ti batch 2 (smoke test)
    python benchmarks/ops.py --ops softmax,layer_norm   # a subset, no ViT step, no files written

Writes ``benchmarks/results/ops.json`` and ``ops.md`` (``ops_quick.*`` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s2a
from _common import header, interleaved, md_table, metadata, pass_fail, saved_bytes, write_results
from s2a.activations import attention as SA
from s2a.activations import functional as S
from s2a.activations import kernels

BITS = 4
OP_TARGET = 2.0
STEP_TARGET = 1.15


@contextlib.contextmanager
def s2a_compile(enabled: bool):
    """Set ``S2A_COMPILE`` for the duration (read at every kernel call)."""
    old = os.environ.get("S2A_COMPILE")
    os.environ["S2A_COMPILE"] = "1" if enabled else "0"
    try:
        assert kernels.compile_enabled() == enabled
        yield
    finally:
        if old is None:
            os.environ.pop("S2A_COMPILE", None)
        else:
            os.environ["S2A_COMPILE"] = old


# ---------------------------------------------------------------------------- operators
def op_cases(quick: bool) -> list[dict[str, Any]]:
    """name, shape, leaves (tensors needing grad), frozen extras, native / s2a callables."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, mean=0.0, std=1.0):
        return torch.randn(*shape, generator=g) * std + mean

    nb = (lambda n: 1) if quick else (lambda n: n)  # quick: batch 1
    vit_ff = (nb(64), 197, 3072)
    vit_d = (nb(64), 197, 768)
    cnn = (nb(32), 256, 56, 56)
    bn = (nb(32), 256, 28, 28)
    attn = (nb(8), 12, 197, 64)
    conv_in = (nb(32), 64, 56, 56)
    cases = []

    def pointwise(name, native, shape):
        x = rnd(*shape, mean=-0.4, std=1.6)
        cases.append({
            "op": name, "shape": list(shape), "inputs": {"x": x}, "grad_of": ["x"],
            "native": lambda t: native(t["x"]),
            "s2a": lambda t: S.activation(t["x"], name, BITS),
            "compiled_kernels": True,
        })

    pointwise("gelu", F.gelu, vit_ff)
    pointwise("silu", F.silu, cnn)
    pointwise("relu", F.relu, cnn)

    x = rnd(*vit_d)
    w, b = 1 + 0.1 * rnd(768), 0.1 * rnd(768)
    cases.append({
        "op": "layer_norm", "shape": list(vit_d), "note": "x and bias train, weight frozen",
        "inputs": {"x": x, "b": b}, "frozen": {"w": w}, "grad_of": ["x", "b"],
        "native": lambda t: F.layer_norm(t["x"], (768,), t["w"], t["b"], 1e-6),
        "s2a": lambda t: S.layer_norm(t["x"], (768,), t["w"], t["b"], 1e-6, bits=BITS),
    })
    x = rnd(*attn[:3], attn[2], std=3.0)
    cases.append({
        "op": "softmax", "shape": list(x.shape), "note": "logits std 3",
        "inputs": {"x": x}, "grad_of": ["x"],
        "native": lambda t: torch.softmax(t["x"], -1),
        "s2a": lambda t: SA.softmax(t["x"], -1, bits=BITS),
    })
    a = 3.0**0.5
    q, k, v = rnd(*attn, std=a), rnd(*attn, std=a), rnd(*attn)
    for mode, note in (("probs", "probs mode: 4-bit probabilities, 8-bit q/k/v (the functional's default)"),
                       ("recompute", "recompute mode: 8-bit q/k/v, probabilities recomputed (compress_activations' default)")):
        cases.append({
            "op": "sdpa", "shape": list(attn), "note": f"logits std 3, q/k/v train, {note}",
            "inputs": {"q": q, "k": k, "v": v}, "grad_of": ["q", "k", "v"],
            "native": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
            "s2a": lambda t, mode=mode: SA.scaled_dot_product_attention(
                t["q"], t["k"], t["v"], bits=BITS if mode == "probs" else 8, mode=mode, qkv_bits=8),
        })
    x = rnd(*bn, mean=0.5, std=2.0)
    w, b = 1 + 0.1 * rnd(256), 0.1 * rnd(256)
    cases.append({
        "op": "batch_norm", "shape": list(bn),
        "note": "train mode (batch stats), x and bias train, weight frozen",
        "inputs": {"x": x, "b": b}, "frozen": {"w": w, "rm": torch.zeros(256),
                                               "rv": torch.ones(256)},
        "grad_of": ["x", "b"],
        "native": lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True),
        "s2a": lambda t: S.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True, bits=BITS),
    })
    x = rnd(*vit_d)
    cases.append({
        "op": "dropout", "shape": list(vit_d), "note": "p=0.1, default mode (regenerate)",
        "inputs": {"x": x}, "grad_of": ["x"],
        "native": lambda t: F.dropout(t["x"], 0.1, True),
        "s2a": lambda t: S.dropout(t["x"], 0.1, True),
    })
    x = rnd(*conv_in)
    w, b = 0.05 * rnd(64, 64, 3, 3), 0.1 * rnd(64)
    cases.append({
        "op": "conv3x3 (frozen weight)", "shape": list(conv_in),
        "note": "64->64, padding 1, x and bias train, weight frozen",
        "inputs": {"x": x, "b": b}, "frozen": {"w": w}, "grad_of": ["x", "b"],
        "native": lambda t: F.conv2d(t["x"], t["w"], t["b"], 1, 1),
        "s2a": lambda t: S.conv(t["x"], t["w"], t["b"], 1, 1),
    })
    return cases


def make_runner(case: dict[str, Any], fn: Callable, compile_on: bool | None):
    leaves = {k: v.clone().requires_grad_(k in case["grad_of"]) for k, v in case["inputs"].items()}
    t = {**case.get("frozen", {}), **leaves}
    with torch.no_grad():
        out = fn(t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    del out

    def run():
        ctx = contextlib.nullcontext() if compile_on is None else s2a_compile(compile_on)
        with ctx:
            y = fn(t)
            y.backward(g)
        for k in case["grad_of"]:
            leaves[k].grad = None

    def forward_only():
        return fn(t)

    return run, forward_only


def bench_ops(quick: bool, repeats: int, warmup: int,
              only: set[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for case in op_cases(quick):
        if only is not None and case["op"].split()[0] not in only:
            continue
        native, native_fwd = make_runner(case, case["native"], None)
        comp, comp_fwd = make_runner(case, case["s2a"], True)
        fns = [native, comp]
        if case.get("compiled_kernels"):
            eager, _ = make_runner(case, case["s2a"], False)
            fns.append(eager)
        comp()  # first call compiles (not timed)
        t = interleaved(fns, repeats, warmup=warmup)
        row = {
            "op": case["op"], "shape": case["shape"], "note": case.get("note", ""),
            "native_ms": t[0]["median_ms"], "s2a_ms": t[1]["median_ms"],
            "ratio": t[1]["median_ms"] / t[0]["median_ms"],
            "native_cpu_ms": t[0]["cpu_median_ms"], "s2a_cpu_ms": t[1]["cpu_median_ms"],
            "cpu_ratio": t[1]["cpu_median_ms"] / t[0]["cpu_median_ms"],
            "native_saved_bytes": saved_bytes(native_fwd),
            "s2a_saved_bytes": saved_bytes(comp_fwd),
            "raw_ms": {"native": t[0]["wall_ms"], "s2a": t[1]["wall_ms"]},
        }
        if len(t) == 3:
            row.update(eager_ms=t[2]["median_ms"], eager_ratio=t[2]["median_ms"] / t[0]["median_ms"],
                       eager_cpu_ratio=t[2]["cpu_median_ms"] / t[0]["cpu_median_ms"])
            row["raw_ms"]["s2a_eager"] = t[2]["wall_ms"]
        row["pass"] = row["ratio"] <= OP_TARGET
        print(f"{row['op']:24s} native {row['native_ms']:8.1f} ms  s2a {row['s2a_ms']:8.1f} ms "
              f"({row['ratio']:.2f}x)" + (f"  eager {row['eager_ms']:8.1f} ms "
                                          f"({row['eager_ratio']:.2f}x)" if "eager_ms" in row else ""),
              flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- ViT-S step
def bench_step(quick: bool, steps: int, warmup: int) -> dict[str, Any]:
    import timm

    from s2a.cli import set_bias_only, set_full

    name, batch = ("vit_tiny_patch16_224", 2) if quick else ("vit_small_patch16_224", 32)
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False)
    base.train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    y = torch.randint(0, base.num_classes, (batch,), generator=gen)

    def setup(kind: str):
        model = copy.deepcopy(base)
        (set_full if kind == "full" else set_bias_only)(model)
        if kind.startswith("s2a"):
            s2a.compress_activations(model, bits=BITS)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        compile_on = None if not kind.startswith("s2a") else kind == "s2a"

        def step():
            ctx = contextlib.nullcontext() if compile_on is None else s2a_compile(compile_on)
            with ctx:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    kinds = ["bias", "s2a", "s2a_eager", "full"]
    fns = [setup(k) for k in kinds]
    fns[1]()  # compile outside the timed rounds
    t = interleaved(fns, steps, warmup=warmup)
    res = {"model": name, "batch": batch, "steps": steps, "warmup": warmup}
    for k, tk in zip(kinds, t, strict=True):
        res[k] = {"median_ms": tk["median_ms"], "min_ms": tk["min_ms"],
                  "cpu_median_ms": tk["cpu_median_ms"], "wall_ms": tk["wall_ms"]}
    ref = res["bias"]["median_ms"]
    res["ratio"] = res["s2a"]["median_ms"] / ref
    res["eager_ratio"] = res["s2a_eager"]["median_ms"] / ref
    res["full_ratio"] = res["full"]["median_ms"] / ref
    res["s2a_vs_full"] = res["s2a"]["median_ms"] / res["full"]["median_ms"]
    res["cpu_ratio"] = res["s2a"]["cpu_median_ms"] / res["bias"]["cpu_median_ms"]
    res["pass"] = res["ratio"] <= STEP_TARGET
    print(f"step {name} b{batch}: " + ", ".join(f"{k} {res[k]['median_ms']:.0f} ms" for k in kinds),
          flush=True)
    return res


# ---------------------------------------------------------------------------- report
def fmt_shape(s: list[int]) -> str:
    return "(" + ",".join(map(str, s)) + ")"


def to_markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    notes = [
        "fp32 CPU, `torch.set_num_threads(2)`. Wall-clock medians; native, s2a (compiled "
        "kernels) and s2a (`S2A_COMPILE=0`) run interleaved after warm-up. CPU-time ratio = "
        "ratio of median process CPU time (all threads), less sensitive to other jobs on the "
        "machine than wall clock.",
        f"Operators at {BITS} bits (attention in recompute mode: 8-bit q/k/v, as compress_activations runs it). Target: s2a forward+backward <= {OP_TARGET:g}x native. "
        f"Whole step target: <= {STEP_TARGET:g}x the uncompressed step of the same set-up.",
    ]
    if data["quick"]:
        notes.insert(0, "**--quick smoke run: small shapes, not the benchmark.**")
    lines = header("CPU cost of compressed operators and of a ViT-S training step", meta, notes)
    lines += ["## Operators: forward + backward", ""]
    rows = []
    for r in data["ops"]:
        rows.append([
            r["op"], fmt_shape(r["shape"]), r["note"], f"{r['native_ms']:.1f}",
            f"{r['s2a_ms']:.1f}", f"**{r['ratio']:.2f}x**", f"{r['cpu_ratio']:.2f}x",
            f"{r['eager_ms']:.1f} ({r['eager_ratio']:.2f}x)" if "eager_ms" in r else "not measured",
            f"{r['native_saved_bytes'] / 2**20:.1f} -> {r['s2a_saved_bytes'] / 2**20:.2f}",
            pass_fail(r["pass"]),
        ])
    lines += md_table(
        ["operator", "shape", "set-up", "native ms", "s2a ms", "ratio", "CPU-time ratio",
         "s2a S2A_COMPILE=0 ms (ratio)", "saved MiB native -> s2a", f"<= {OP_TARGET:g}x"],
        rows,
    )
    s = data["step"]
    lines += [
        "",
        f"## Whole training step: {s['model']}, batch {s['batch']}, 224 px, forward + "
        f"cross-entropy + backward + AdamW step ({s['steps']} timed steps after "
        f"{s['warmup']} warm-up)",
        "",
    ]
    lines += md_table(
        ["set-up", "median ms", "min ms", "ratio vs bias native", "CPU-time ratio"],
        [
            ["biases+head, native", f"{s['bias']['median_ms']:.0f}", f"{s['bias']['min_ms']:.0f}",
             "1.00x", "1.00x"],
            ["biases+head, s2a 4-bit (compiled kernels)", f"{s['s2a']['median_ms']:.0f}",
             f"{s['s2a']['min_ms']:.0f}", f"**{s['ratio']:.3f}x**", f"{s['cpu_ratio']:.3f}x"],
            ["biases+head, s2a 4-bit (S2A_COMPILE=0)", f"{s['s2a_eager']['median_ms']:.0f}",
             f"{s['s2a_eager']['min_ms']:.0f}", f"{s['eager_ratio']:.3f}x",
             f"{s['s2a_eager']['cpu_median_ms'] / s['bias']['cpu_median_ms']:.3f}x"],
            ["full fine-tuning, native (reference)", f"{s['full']['median_ms']:.0f}",
             f"{s['full']['min_ms']:.0f}", f"{s['full_ratio']:.3f}x",
             f"{s['full']['cpu_median_ms'] / s['bias']['cpu_median_ms']:.3f}x"],
        ],
    )
    lines += [
        "",
        f"Target compressed step <= {STEP_TARGET:g}x uncompressed: **{pass_fail(s['pass'])}** "
        f"({s['ratio']:.3f}x). Compressed bias step vs native full fine-tuning step: "
        f"{s['s2a_vs_full']:.3f}x.",
        "",
        "## Summary",
        "",
    ]
    fails = [r["op"] for r in data["ops"] if not r["pass"]]
    lines.append(
        f"- Operators <= {OP_TARGET:g}x: "
        + (f"{len(data['ops']) - len(fails)}/{len(data['ops'])} PASS; FAIL: {', '.join(fails)}"
           if fails else f"all {len(data['ops'])} PASS")
    )
    lines.append(f"- ViT step <= {STEP_TARGET:g}x: {pass_fail(s['pass'])} ({s['ratio']:.3f}x)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and ViT-Ti batch 2")
    ap.add_argument("--repeats", type=int, help="timed rounds per operator (default 9; quick 3)")
    ap.add_argument("--warmup", type=int, help="untimed rounds (default 2; quick 1)")
    ap.add_argument("--steps", type=int, help="timed ViT steps (default 7; quick 2)")
    ap.add_argument("--ops", help="comma-separated operators to run (e.g. softmax,layer_norm); "
                    "a subset run prints its table, skips the ViT step and writes no result files")
    ap.add_argument("--skip-step", action="store_true",
                    help="skip the ViT step (prints only, writes no result files)")
    args = ap.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    steps = args.steps or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    meta = metadata(repeats=f"operators: median of {repeats} after {warmup} warm-up rounds; "
                            f"ViT step: median of {steps} after {warmup} warm-up steps")
    data: dict[str, Any] = {"meta": meta, "quick": args.quick, "bits": BITS}
    only = set(args.ops.split(",")) if args.ops else None
    data["ops"] = bench_ops(args.quick, repeats, warmup, only)
    if args.skip_step or only is not None:
        for r in data["ops"]:
            print(f"{r['op']:24s} cpu-time ratio {r['cpu_ratio']:.2f}x  saved "
                  f"{r['native_saved_bytes']} -> {r['s2a_saved_bytes']} B")
        return  # a subset or no step: nothing complete to write
    data["step"] = bench_step(args.quick, steps, warmup)
    meta["runtime_s"] = time.perf_counter() - t0
    meta["load_avg_at_end"] = os.getloadavg()
    name = "ops_quick" if args.quick else "ops"
    jp, mp = write_results(name, data, to_markdown(data))
    print(mp.read_text())
    print(f"wrote {jp} and {mp} in {meta['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
