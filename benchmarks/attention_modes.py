"""Compare the two storage modes of ``s2a.activations.attention`` on CPU.

For ViT-B-like attention (B=8, 12 heads, N=197, d=64) and BERT-like text
attention (N=128 with padding masks or a causal mask) this reports, per mode and
bit width: bytes saved for backward per call (the distinct storages passing through
``saved_tensors_hooks``), gradient cosine of dq, dk, dv against exact float64
autograd, and CPU time of forward+backward against native
``F.scaled_dot_product_attention`` (median over repeats, 2 threads, native and
compressed runs interleaved). Also times the standalone ``softmax``. The modes are measured
as such: the recompute guard (calls with logits too large for the stored Q / K keep P,
``RECOMPUTE_MAX_LOGIT_ERROR``) is off here, since it would turn the 2-4 bit recompute rows
into probs rows.

    PYTHONPATH=src python benchmarks/attention_modes.py [--repeats 15] [--quick]

Writes ``benchmarks/results/attention_modes.json`` and ``.md`` (``attention_modes_quick.*``
with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s2a.activations import attention
from s2a.activations.attention import scaled_dot_product_attention, softmax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cosine, header, interleaved, metadata, paired_ratio, saved_bytes, write_results

BITS = (2, 3, 4, 8)
MODES = ("probs", "recompute")


def make_case(name: str, gen: torch.Generator) -> dict:
    """q, k ~ N(0, sqrt(sigma)) so logits q.k/sqrt(d) have std sigma; v, dO ~ N(0, 1)."""
    text = name.startswith("text")
    B, H, N, d = 8, 12, (128 if text else 197), 64
    sigma = {"vit_sigma2": 2.0, "vit_sigma4": 4.0}.get(name, 3.0)
    a = math.sqrt(sigma)
    q = torch.randn(B, H, N, d, generator=gen) * a
    k = torch.randn(B, H, N, d, generator=gen) * a
    if name == "vit_sinks":  # a few keys (CLS, registers) attract most queries
        u = torch.randn(B, H, 1, d, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True)
        k[:, :, :4] += 6 * a * u
        q += 2 * a * u
    v = torch.randn(B, H, N, d, generator=gen)
    g = torch.randn(B, H, N, d, generator=gen)
    kw: dict = {}
    lengths = torch.randint(N // 2, N + 1, (B,), generator=gen)
    keep = torch.arange(N)[None, :] < lengths[:, None]  # (B, S) key padding
    if name == "text_bool_pad":
        kw["attn_mask"] = keep[:, None, None, :]
    elif name == "text_float_pad":
        kw["attn_mask"] = torch.where(keep, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    elif name == "text_causal":
        kw["is_causal"] = True
    return {"name": name, "shape": [B, H, N, d], "logit_std": sigma, "qkvg": (q, k, v, g), "kw": kw}


def run_fwd_bwd(fn, q, k, v, g, kw):
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*xs, **kw)
    out.backward(g)
    return out, [x.grad for x in xs]


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float, float]:
    """Interleaved timing after one warm-up round: (median ms of a, median ms of b, median of
    the per-round ratios b/a)."""
    ta, tb = interleaved([fn_a, fn_b], repeats)
    return ta["median_ms"], tb["median_ms"], paired_ratio(ta, tb)


def cpu_time_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Process CPU time (ms) on 1 thread, min over repeats: robust to a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fn_a()
        fn_b()
        ta, tb = [], []
        for _ in range(repeats):
            t0 = time.process_time()
            fn_a()
            t1 = time.process_time()
            fn_b()
            t2 = time.process_time()
            ta.append(t1 - t0)
            tb.append(t2 - t1)
        return min(ta) * 1e3, min(tb) * 1e3
    finally:
        torch.set_num_threads(threads)


def bench_case(case: dict, repeats: int, time_bits: tuple[int, ...]) -> dict:
    q, k, v, g = case["qkvg"]
    kw = case["kw"]
    B = q.shape[0]
    ref_out, ref = run_fwd_bwd(
        F.scaled_dot_product_attention,
        q.double(),
        k.double(),
        v.double(),
        g.double(),
        kw_double(kw),
    )
    native_bytes = saved_bytes(lambda: run_fwd_bwd(F.scaled_dot_product_attention, q, k, v, g, kw))
    rows = []
    for mode in MODES:
        for bits in BITS:

            def ours(mode=mode, bits=bits):
                return run_fwd_bwd(
                    lambda *x, **a: scaled_dot_product_attention(*x, **a, mode=mode, bits=bits),
                    q,
                    k,
                    v,
                    g,
                    kw,
                )

            out, grads = ours()
            row = {
                "mode": mode,
                "bits": bits,
                "saved_bytes": saved_bytes(ours),
                "max_abs_out_err": float((out.detach().double() - ref_out).abs().max()),
                "cos_dq": cosine(grads[0], ref[0]),
                "cos_dk": cosine(grads[1], ref[1]),
                "cos_dv": cosine(grads[2], ref[2]),
            }
            row["saved_bytes_per_sample"] = row["saved_bytes"] / B
            if bits in time_bits:

                def native():
                    return run_fwd_bwd(F.scaled_dot_product_attention, q, k, v, g, kw)

                tn, to, ratio = timed_pair(native, ours, repeats)
                cn, co = cpu_time_pair(native, ours, max(5, repeats // 2))
                row.update(native_ms=tn, ms=to, time_ratio=ratio)
                row.update(native_cpu1_ms=cn, cpu1_ms=co, cpu1_ratio=co / cn)
            rows.append(row)
            print(case["name"], json.dumps(row), flush=True)
    return {
        "case": case["name"],
        "shape_BHNd": case["shape"],
        "logit_std": case["logit_std"],
        "mask": describe_mask(kw),
        "native_saved_bytes": native_bytes,
        "native_saved_bytes_per_sample": native_bytes / B,
        "rows": rows,
    }


def kw_double(kw: dict) -> dict:
    out = dict(kw)
    m = out.get("attn_mask")
    if m is not None and m.is_floating_point():
        out["attn_mask"] = m.double()
    return out


def describe_mask(kw: dict) -> str:
    if kw.get("is_causal"):
        return "causal"
    m = kw.get("attn_mask")
    if m is None:
        return "none"
    kind = "bool" if m.dtype == torch.bool else "float(finfo.min)"
    return f"{kind} key padding {tuple(m.shape)}"


def bench_softmax(repeats: int) -> dict:
    x = torch.randn(8, 12, 197, 197) * 3
    g = torch.randn_like(x)

    def run(fn):
        xr = x.clone().requires_grad_()
        fn(xr).backward(g)
        return xr.grad

    ref = run(lambda t: torch.softmax(t.double(), -1))
    out = {"shape": list(x.shape), "logit_std": 3.0, "rows": []}
    for bits in BITS:
        grad = run(lambda t, b=bits: softmax(t, -1, bits=b))

        def native():
            return run(lambda t: torch.softmax(t, -1))

        def ours(b=bits):
            return run(lambda t: softmax(t, -1, bits=b))

        tn, to, ratio = timed_pair(native, ours, repeats)
        cn, co = cpu_time_pair(native, ours, max(5, repeats // 2))
        row = {
            "bits": bits,
            "saved_bytes": saved_bytes(lambda b=bits: run(lambda t: softmax(t, -1, bits=b))),
            "native_saved_bytes": saved_bytes(lambda: run(lambda t: torch.softmax(t, -1))),
            "cos_dx": cosine(grad, ref),
            "native_ms": tn,
            "ms": to,
            "time_ratio": ratio,
            "native_cpu1_ms": cn,
            "cpu1_ms": co,
            "cpu1_ratio": co / cn,
        }
        out["rows"].append(row)
        print("softmax", json.dumps(row), flush=True)
    return out


def to_markdown(res: dict) -> str:
    notes = [
        f"Timings are medians of {res['repeats']} interleaved native/compressed forward+backward "
        "runs (fp32, wall clock); the machine is shared with other jobs, so wall-clock timings are "
        "noisy (ratio = median of per-pair ratios). The last column is process CPU time on 1 "
        "thread (min over runs), which is robust to the other jobs.",
        "Cosines: dq/dk/dv against exact float64 autograd. Bytes: the distinct storages passing "
        "`saved_tensors_hooks` per call, and per sample (= per ViT-B block per sample for "
        "the ViT cases: 12 heads x 197 tokens x 64 dims).",
    ]
    if res["quick"]:
        notes.insert(0, "**--quick smoke run: two cases, 4-bit rows timed; not the benchmark.**")
    lines = header("Attention storage modes (CPU)", res["meta"], notes)
    for c in res["cases"]:
        lines += [
            f"## {c['case']}: B,H,N,d = {c['shape_BHNd']}, logit std {c['logit_std']}, "
            f"mask {c['mask']}",
            "",
            f"Native fp32 SDPA saves {c['native_saved_bytes_per_sample'] / 1e3:.1f} KB per sample.",
            "",
            "| mode | bits | KB/sample | cos dq | cos dk | cos dv | ms (ours) | ms (native) | ratio "
            "| 1-thread CPU ms ours / native (ratio) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            t = (
                f"{r['ms']:.1f} | {r['native_ms']:.1f} | {r['time_ratio']:.2f}x | "
                f"{r['cpu1_ms']:.1f} / {r['native_cpu1_ms']:.1f} ({r['cpu1_ratio']:.2f}x)"
                if "ms" in r
                else "- | - | - | -"
            )
            lines.append(
                f"| {r['mode']} | {r['bits']} | {r['saved_bytes_per_sample'] / 1e3:.1f} | "
                f"{r['cos_dq']:.5f} | {r['cos_dk']:.5f} | {r['cos_dv']:.5f} | {t} |"
            )
        lines.append("")
    s = res["softmax"]
    lines += [
        f"## softmax alone: x {s['shape']}, logit std {s['logit_std']}",
        "",
        "| bits | KB saved | native KB | cos dx | ms (ours) | ms (native) | ratio "
        "| 1-thread CPU ms ours / native (ratio) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['bits']} | {r['saved_bytes'] / 1e3:.1f} | {r['native_saved_bytes'] / 1e3:.1f} | "
            f"{r['cos_dx']:.5f} | {r['ms']:.1f} | {r['native_ms']:.1f} | {r['time_ratio']:.2f}x | "
            f"{r['cpu1_ms']:.1f} / {r['native_cpu1_ms']:.1f} ({r['cpu1_ratio']:.2f}x) |"
        )
    lines.append("")
    lines += res.get("conclusion", [])
    return "\n".join(lines) + "\n"


def conclusion(res: dict) -> list[str]:
    vit = [c for c in res["cases"] if c["case"].startswith("vit")]
    out = ["## Choice of default", ""]
    # (mode, bits) as the table names them; recompute's bits are Q/K/V's.
    for mode, bits, note in [*((m, 4, "") for m in MODES),
                             ("recompute", 8, " (compress_activations' default: Q/K/V at 8 bits)")]:
        rows = [r for c in vit for r in c["rows"] if r["mode"] == mode and r["bits"] == bits]
        worst = min(min(r["cos_dq"], r["cos_dk"], r["cos_dv"]) for r in rows)
        kb = rows[0]["saved_bytes_per_sample"] / 1e3
        out.append(
            f"- {mode} at {bits} bits{note}: {kb:.1f} KB per ViT-B block per sample, worst cosine over "
            f"ViT cases {worst:.4f} ({'meets' if worst >= 0.99 else 'misses'} 0.99)."
        )
    out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="time only 4-bit rows, two cases")
    args = ap.parse_args()
    torch.set_num_threads(2)
    attention.RECOMPUTE_MAX_LOGIT_ERROR = math.inf
    gen = torch.Generator().manual_seed(0)
    names = [
        "vit_sigma2",
        "vit_sigma3",
        "vit_sigma4",
        "vit_sinks",
        "text_bool_pad",
        "text_float_pad",
        "text_causal",
    ]
    if args.quick:
        names = ["vit_sigma3", "text_bool_pad"]
    t0 = time.perf_counter()
    meta = metadata(repeats=f"{args.repeats} interleaved rounds after 1 warm-up")
    res = {"meta": meta, "quick": args.quick, "repeats": args.repeats, "cases": []}
    for name in names:
        case = make_case(name, gen)
        time_bits = (4,) if args.quick or name not in ("vit_sigma3", "text_bool_pad") else BITS
        res["cases"].append(bench_case(case, args.repeats, time_bits))
    res["softmax"] = bench_softmax(args.repeats)
    res["conclusion"] = conclusion(res)
    meta["runtime_s"] = time.perf_counter() - t0
    _, mp = write_results("attention_modes_quick" if args.quick else "attention_modes", res, to_markdown(res))
    print(mp.read_text())


if __name__ == "__main__":
    main()
