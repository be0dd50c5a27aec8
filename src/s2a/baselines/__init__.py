"""Fine-tuning methods side by side: S2A and the methods it is measured against.

:data:`METHOD_SPECS` maps every ``s2a train --method`` name to a one-line description, an
apply function and how it treats ``--act-bits``; :func:`apply_spec` applies one (the trainer
reaches it through :func:`s2a.train.methods.apply_method`). One module per family:

* :mod:`.simple`: ``full``, ``linear``, ``bitfit``, ``s2a``;
* :mod:`.vpt`: ``vpt`` (VPT-deep prompt tokens);
* :mod:`.adaptformer`: ``adaptformer`` (parallel bottleneck adapters);
* :mod:`.lst`: ``lst`` (Ladder Side-Tuning);
* :mod:`.peft_methods`: ``lora``, ``ia3``, ``prompt-tuning``, ``s2a-lora`` (Hugging Face peft);
* :mod:`.checkpointing`: ``full-ckpt``, ``bitfit-ckpt``, ``lora-ckpt`` (torch.utils.checkpoint per block);
* :mod:`.engine`: ``mesa8``, ``fewbit2`` (configurations of s2a's activation engine that
  imitate Mesa and Few-bit Backward / Approx-BP; not those projects' code).
"""

from . import adaptformer, checkpointing, engine, lst, peft_methods, simple, vpt
from .registry import (
    METHOD_SPECS,
    MethodContext,
    MethodNotApplicable,
    MethodResult,
    MethodSpec,
    applicable_methods,
    apply_spec,
    backbone_info,
    register_method,
)

__all__ = [
    "METHOD_SPECS",
    "MethodContext",
    "MethodNotApplicable",
    "MethodResult",
    "MethodSpec",
    "applicable_methods",
    "apply_spec",
    "backbone_info",
    "register_method",
]

_TARGETS = peft_methods.supports_targets
for _spec in (
    MethodSpec("full", "full fine-tuning: every parameter trains", simple.apply_full, norm_stats="trained"),
    MethodSpec("linear", "linear probing: only the classifier head trains", simple.apply_linear),
    MethodSpec("bitfit", "BitFit: existing biases and the head train", simple.apply_bitfit),
    MethodSpec("vpt", "VPT-deep: 10 learnable prompt tokens per block, and the head",
               vpt.apply_vpt, vpt.supports_vpt),
    MethodSpec("lora", "LoRA r=8 through peft on the attention projections, and the head",
               peft_methods.apply_lora, _TARGETS),
    MethodSpec("ia3", "IA3 through peft (key, value and MLP scaling vectors; on timm's fused qkv, query too), and the head",
               peft_methods.apply_ia3, _TARGETS),
    MethodSpec("prompt-tuning", "prompt tuning through peft: 20 virtual input tokens (text), and the head",
               peft_methods.apply_prompt_tuning, peft_methods.supports_prompt_tuning),
    MethodSpec("adaptformer", "AdaptFormer: bottleneck-64 adapters beside every MLP, and the head",
               adaptformer.apply_adaptformer, adaptformer.supports_adaptformer),
    MethodSpec("lst", "Ladder Side-Tuning: learned down-projections into a thin side transformer",
               lst.apply_lst, lst.supports_lst),
    MethodSpec("full-ckpt", "full fine-tuning with activation checkpointing of every block",
               checkpointing.apply_full_ckpt, storage="never", norm_stats="trained"),
    MethodSpec("bitfit-ckpt", "BitFit with activation checkpointing of every block",
               checkpointing.apply_bitfit_ckpt, storage="never"),
    MethodSpec("lora-ckpt", "peft LoRA with activation checkpointing of every block",
               checkpointing.apply_lora_ckpt, _TARGETS, storage="never"),
    MethodSpec("mesa8", "full fine-tuning, every operator stored at 8 bits by our engine (Mesa-style)",
               engine.apply_mesa8, storage="fixed", norm_stats="trained"),
    MethodSpec("fewbit2", "full fine-tuning, 2-bit GELU/SiLU derivative codes (Few-bit / Approx-BP style)",
               engine.apply_fewbit2, storage="fixed", norm_stats="trained"),
    MethodSpec("s2a", "S2A: --modules (bias, norm, prompt, side) on a frozen backbone, --act-bits storage",
               simple.apply_s2a, storage="default", norm_stats="method"),
    MethodSpec("s2a-lora", "peft LoRA with S2A's --act-bits activation storage (default 4)",
               peft_methods.apply_s2a_lora, _TARGETS, storage="default"),
):
    register_method(_spec)
