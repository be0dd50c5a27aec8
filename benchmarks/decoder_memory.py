"""Training-step memory of decoders: S2A against full fine-tuning and its peers.

``--arch llama`` (default): a decoder of SmolLM2-135M's shape (transformers
``LlamaForSequenceClassification``: 30 layers, width 576, SwiGLU MLP of width 1536, 9 query /
3 key-value heads, random init, fp32, 2-class head), batch 8 x 256 tokens. ``--arch moe``: a
mixture-of-experts decoder with the layer shape of IBM's Granite-3.0-1B-A400M
(``GraniteMoeForCausalLM``: width 1024, 32 experts of width 512, 8 routed per token, 16 query /
8 key-value heads; 6 of its 24 layers, so that full fine-tuning fits this machine), trained
through its last position's logits (``logits_to_keep=1``), batch 8 x 256. Each fine-tuning method comes from ``s2a train``'s registry
(``s2a.baselines.apply_spec``), so these are the set-ups that ``s2a train --method ...`` runs;
``s2a-unfused`` is ``s2a`` with the gated MLPs run unfused (each operator compressed on its own,
both factors of the SwiGLU product kept natively: s2a before the fused gated MLP), to show
what that fusion adds. Each set-up is measured by ``s2a.memory.measure(model, batch,
optimizer_step=True)`` (forward, default loss ``mean(logits**2)``, backward, AdamW step) in its
own subprocess. Then the step time of full, lora, lora-ckpt, s2a-unfused and s2a (one process, steps
interleaved round-robin: zero_grad, forward, loss, backward, AdamW step), ``--repeats`` rounds.

    HF_HUB_OFFLINE=1 python benchmarks/decoder_memory.py           # full size (5-17 min on 2 cores; --arch moe ~11)
    HF_HUB_OFFLINE=1 python benchmarks/decoder_memory.py --quick   # 2 layers, batch 2 x 32
    HF_HUB_OFFLINE=1 python benchmarks/decoder_memory.py --arch moe

Writes ``benchmarks/results/decoder_memory.json`` / ``.md`` (``decoder_memory_moe`` with
``--arch moe``; ``_quick`` with --quick).
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
from _common import (
    header,
    interleaved,
    md_table,
    metadata,
    mib,
    paired_ratio,
    run_child,
    write_results,
)

# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json), 2 labels; --quick: 2 layers
CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
              rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, num_labels=2,
              pad_token_id=0)
# Granite-3.0-1B-A400M's layer shape (ibm-granite/granite-3.0-1b-a400m-base config.json)
MOE_CONFIG = dict(vocab_size=49155, hidden_size=1024, intermediate_size=512, num_local_experts=32,
                  num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=8,
                  max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  pad_token_id=0)
ARCHS = {  # arch: (config, model class, sizes {"full"/"quick": (layers, batch, tokens)}, head, fused kind)
    "llama": (CONFIG, "LlamaForSequenceClassification", {"full": (30, 8, 256), "quick": (2, 2, 32)},
              ("score",), "gated_mlp"),
    "moe": (MOE_CONFIG, "GraniteMoeForCausalLM", {"full": (6, 8, 256), "quick": (2, 2, 32)},
            (), "moe_experts"),
}
# (label, registry method, act_bits)
SETUPS = (
    ("full", "full", None),
    ("full-ckpt", "full-ckpt", None),
    ("lora", "lora", None),
    ("lora-ckpt", "lora-ckpt", None),
    ("ia3", "ia3", None),
    ("s2a-native", "s2a", None),
    ("s2a-unfused", "s2a", 4),
    ("s2a", "s2a", 4),
    ("s2a-lora", "s2a-lora", 4),
)


def _size(arch: str, quick: bool) -> tuple[int, int, int]:
    return ARCHS[arch][2]["quick" if quick else "full"]


def _model(arch: str, quick: bool):
    import transformers

    config, cls, _, _, _ = ARCHS[arch]
    model_cls = getattr(transformers, cls)
    layers, _, _ = _size(arch, quick)
    torch.manual_seed(0)
    return model_cls(model_cls.config_class(**{**config, "num_hidden_layers": layers})).train()


TIMED = ("full", "lora", "lora-ckpt", "s2a-unfused", "s2a")


def _inputs(arch: str, quick: bool) -> dict[str, Any]:
    _, batch, tokens = _size(arch, quick)
    gen = torch.Generator().manual_seed(0)
    # no KV cache, as `s2a train` runs a decoder's training forward (s2a.zoo.call_model)
    inputs = {"input_ids": torch.randint(1, ARCHS[arch][0]["vocab_size"], (batch, tokens), generator=gen),
              "use_cache": False}
    if arch == "moe":  # one position's logits, not 49155 per token
        inputs["logits_to_keep"] = 1
    return inputs


def _setup(arch: str, label: str, quick: bool, inputs: dict) -> tuple[torch.nn.Module, int]:
    """The model configured for set-up ``label``, and how many gated MLPs (MoE: experts) run fused."""
    from s2a import compression_summary
    from s2a.baselines import MethodContext, apply_spec

    _, method, bits = next(s for s in SETUPS if s[0] == label)
    _, _, _, head, fused_kind = ARCHS[arch]
    model = apply_spec(_model(arch, quick), MethodContext(method, head, ("bias", "prompt"), bits,
                                                          example_input=inputs)).model
    state = getattr(model, "_s2a_compression", None)
    if state is not None and label == "s2a-unfused":
        for module, kind, *_ in state.patched:
            if kind.startswith(fused_kind):
                module.__dict__.pop("forward")  # back to the model's own forward
        return model, 0
    return model, sum(v.startswith(fused_kind) for v in compression_summary(model).values())


def run_one(arch: str, label: str, quick: bool) -> dict[str, Any]:
    from s2a.memory import measure

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    _, method, bits = next(s for s in SETUPS if s[0] == label)
    inputs = _inputs(arch, quick)
    model, fused = _setup(arch, label, quick, inputs)
    t0 = time.perf_counter()
    report = measure(model, inputs, lambda out, _: out.logits.pow(2).mean(), optimizer_step=True,
                     name=f"{arch} [{label}]")
    return {"setup": label, "method": method, "act_bits": bits, "fused_blocks": fused,
            "measure_s": time.perf_counter() - t0, "report": report.to_dict()}


def time_steps(arch: str, quick: bool, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    inputs = _inputs(arch, quick)
    steps = []
    for label in TIMED:
        model, _ = _setup(arch, label, quick, inputs)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            model(**inputs).logits.pow(2).mean().backward()
            opt.step()

        steps.append(step)
    times = interleaved(steps, repeats)
    out = {label: t for label, t in zip(TIMED, times, strict=True)}
    for label in TIMED:
        out[label]["vs_full_paired"] = paired_ratio(out["full"], out[label])
    return out


def to_markdown(data: dict[str, Any]) -> str:
    by = {r["setup"]: r for r in data["results"]}
    full = by["full"].get("report")  # None: full failed, no ratios

    def vs(key: str, rep: dict[str, Any]) -> str:
        return f"{rep[key] / full[key]:.3f}" if full and full[key] else "-"

    rows = []
    for r in data["results"]:
        if "error" in r:
            # a method refused for this model is not a failure of the run: say why, without the traceback
            _, sep, why = r["error"].partition("MethodNotApplicable: ")
            rows.append([r["setup"], f"not applicable: {why.strip()}" if sep else "error: " + r["error"], *[""] * 7])
            continue
        rep = r["report"]
        kinds = sorted(rep["by_kind"].items(), key=lambda kv: -kv[1])[:3]
        rows.append([
            r["setup"], mib(rep["saved_bytes"]), vs("saved_bytes", rep),
            mib(rep["peak_bytes"]), vs("peak_bytes", rep),
            f"{rep['trainable_params']:,}", f"{100 * rep['trainable_params'] / rep['total_params']:.2f}%",
            ", ".join(f"{k} {mib(v)}" for k, v in kinds), f"{r['measure_s']:.0f}",
        ])
    layers, batch, tokens = data["size"]
    moe = data.get("arch") == "moe"
    model = (
        f"transformers `GraniteMoeForCausalLM` with the layer shape of Granite-3.0-1B-A400M (width "
        f"1024, 32 experts of width 512, 8 routed per token), {layers} of its 24 layers, trained "
        "through the last position's logits (`logits_to_keep=1`; no head trains but in full)"
        if moe else
        f"transformers `LlamaForSequenceClassification` with SmolLM2-135M's configuration, "
        f"{layers} layers, 2-class head")
    unfused = ("the experts run by transformers' own forward (each expert's SwiGLU keeps its "
               "gathered input, gate/up output and both factors)" if moe else
               "each gated MLP run unfused (its SwiGLU product keeps both factors)")
    lines = header(
        "Training-step memory of a mixture-of-experts decoder (Granite-3.0-1B-A400M layers)" if moe else
        "Training-step memory of a LLaMA-architecture decoder (SmolLM2-135M shape)", data["meta"],
        notes=[
            f"{model}; random init, fp32, batch {batch} x {tokens} tokens, `use_cache=False` "
            "(as `s2a train` runs a training forward); "
            "methods as `s2a train --method` applies them (`s2a.baselines.apply_spec`); s2a = "
            "bias + low-rank prompt (zero-initialised biases on the bias-free projections) with "
            "4-bit activations; s2a-native: the same structure, native storage; s2a-unfused: "
            f"s2a with {unfused}.",
            "Saved: tensors autograd keeps for backward; peak: allocator-level peak of the step "
            "(forward, backward, AdamW step) over the memory before it, as in memory.md. "
            "`measure s`: wall time of `measure()` (two forwards, one backward, one optimizer "
            "step; not a step-time benchmark).",
        ],
    )
    lines += ["", *md_table(["set-up", "saved MiB", "vs full", "peak MiB", "peak vs full",
                             "trainable params", "trainable %", "largest saved kinds", "measure s"], rows)]
    timing = data.get("step_time")
    if timing:
        lines += ["", f"## Step time ({data['repeats']} interleaved rounds after one warm-up, same process)", "",
                  *md_table(["set-up", "median s", "min s", "median vs full (paired)"],
                            [[k, f"{t['median_ms'] / 1e3:.2f}", f"{t['min_ms'] / 1e3:.2f}",
                              f"{t['vs_full_paired']:.2f}x"] for k, t in timing.items()])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="llama")
    ap.add_argument("--repeats", type=int, default=5, help="step-time rounds (0: no timing)")
    ap.add_argument("--child")
    ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_one(args.arch, args.child, args.quick)))
        return
    t0 = time.perf_counter()
    # the date and load of the start, not of the end
    meta = metadata(repeats=f"memory: 1 measured step per set-up; time: {args.repeats} rounds")
    results = []
    for label, _, _ in SETUPS:
        results.append(run_child(__file__, [label], {"setup": label},
                                 ["--arch", args.arch] + (["--quick"] if args.quick else [])))
        print(label, results[-1].get("error", "ok"), flush=True)
    meta["load_avg_at_timing"] = os.getloadavg()
    timing = time_steps(args.arch, args.quick, args.repeats) if args.repeats > 0 else None
    meta["runtime_s"] = time.perf_counter() - t0
    data = {"meta": meta, "arch": args.arch, "size": _size(args.arch, args.quick), "results": results,
            "step_time": timing, "repeats": args.repeats}
    name = "decoder_memory" + ("_moe" if args.arch == "moe" else "") + ("_quick" if args.quick else "")
    write_results(name, data, to_markdown(data))


if __name__ == "__main__":
    main()
