"""Architecture coverage: does ``s2a.apply`` work on my architecture?

Builds every timm and transformers architecture listed in ``TIMM`` and ``HF`` below (the
result files count them) with tiny random weights (no downloads),
applies ``S2AConfig(modules=("bias", "prompt"))`` (``bias,prompt,side`` on a few) with
``num_classes=5`` where the model has a head, and runs five checks on each:

1. ``apply`` succeeds, or refuses clearly: an ``UnsupportedModelError`` or ``ValueError``
   raised by s2a itself (anything else is a FAIL);
2. at initialisation the eval output equals the untouched model's with the same new head, and
   with ``act_bits=4`` it equals ``act_bits=None`` (after perturbing the trainable tensors);
3. a train-mode forward + backward gives finite gradients, and only to trainable parameters;
   the gradient cosine (4 bits vs None) and the ratio of saved-for-backward bytes
   (``s2a.measure``, 4 bits / None) are recorded;
4. ``save_tuned`` -> ``load_tuned`` into a fresh same-seed model, then ``merge``, give the same
   eval output;
5. information only: what ``compress_activations(plain_model, bits=4, strict=True)`` lists as
   uncovered (modules, then functions called in a training forward).

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/families.py            # everything
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/families.py --quick    # a smoke run
    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/families.py --only vit,hf-bert

Writes ``benchmarks/results/families.json`` / ``.md`` (``families_quick`` with --quick / --only).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import s2a
from _common import header, md_table, metadata, write_results
from s2a.models import UnsupportedModelError, describe_backbone

TOL = 1e-5  # relative max |diff| for "same output"
LOW_COS = 0.99  # gradient cosines below this are listed under the tables
STATUSES = ("pass", "refused", "FAIL", "skipped")  # per row: the worst of its checks
NUM_CLASSES = 5
BP, BPS = ("bias", "prompt"), ("bias", "prompt", "side")

# ------------------------------------------------------------------------------- timm zoo
# key: (timm name, tiny kwargs, image size, also with side)
TIMM: dict[str, tuple[str, dict, int, bool]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, depth=2), 32, True),
    "deit3": ("deit3_small_patch16_224", dict(img_size=32, depth=2), 32, False),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2), 32, False),
    "beit": ("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=96, num_heads=3), 32, False),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, depth=2, num_classes=1000), 28, False),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2), 28, False),
    "cait": ("cait_xxs24_224", dict(img_size=32, depth=2, depth_token_only=1), 32, False),
    "xcit": ("xcit_nano_12_p16_224", dict(img_size=32, depth=2), 32, False),
    "crossvit": ("crossvit_tiny_240", dict(), 240, False),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1, 1, 1), embed_dim=32,
                                                  num_heads=(1, 2, 4, 8), window_size=7), 56, True),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=64, depths=(1, 1, 1, 1), embed_dim=32,
                                               num_heads=(1, 2, 4, 8)), 64, False),
    "hiera": ("hiera_tiny_224", dict(img_size=(64, 64)), 64, True),
    "pvt_v2": ("pvt_v2_b0", dict(), 64, False),
    "maxvit": ("maxvit_tiny_tf_224", dict(img_size=64), 64, False),
    "coatnet": ("coatnet_0_rw_224", dict(img_size=64), 64, False),
    "tiny_vit": ("tiny_vit_5m_224", dict(), 224, False),
    "levit": ("levit_128s", dict(img_size=64), 64, False),
    "efficientformer": ("efficientformer_l1", dict(), 224, False),  # its attention biases need 224 px
    "fastvit": ("fastvit_t8", dict(), 64, False),
    "mobilevit": ("mobilevit_xxs", dict(), 64, False),
    "edgenext": ("edgenext_xx_small", dict(), 64, False),
    "mixer": ("mixer_s16_224", dict(img_size=32), 32, False),
    "poolformer": ("poolformer_s12", dict(), 64, False),
    "poolformerv2": ("poolformerv2_s12", dict(), 64, False),
    "caformer": ("caformer_s18", dict(), 64, False),
    "convnext": ("convnext_atto", dict(), 64, True),
    "convnextv2": ("convnextv2_atto", dict(), 64, False),
    "resnet18": ("resnet18", dict(), 64, False),
    "resnet50": ("resnet50", dict(), 64, True),
    "resnetv2": ("resnetv2_50", dict(), 64, False),
    "regnetx": ("regnetx_002", dict(), 64, False),
    "regnety": ("regnety_002", dict(), 64, False),  # squeeze-and-excitation in every block
    "densenet": ("densenet121", dict(), 64, False),
    "inception_v3": ("inception_v3", dict(), 96, False),
    "mobilenetv2": ("mobilenetv2_050", dict(), 64, False),
    "mobilenetv3": ("mobilenetv3_small_050", dict(), 64, False),
    "efficientnet_b0": ("efficientnet_b0", dict(), 64, True),
    "efficientnet_lite0": ("tf_efficientnet_lite0", dict(), 64, False),
    "ghostnet": ("ghostnet_050", dict(), 64, False),
    "repvit": ("repvit_m0_9", dict(), 64, False),
    # blocks split over sibling containers, nested ModuleLists, an auxiliary token head
    "coat_lite": ("coat_lite_tiny", dict(img_size=64), 64, False),
    "visformer": ("visformer_tiny", dict(img_size=112), 112, False),
    "twins": ("twins_svt_small", dict(img_size=64), 64, False),
    "volo": ("volo_d1_224", dict(img_size=64), 64, False),
}

# ----------------------------------------------------------------------- transformers zoo
V = 100
TEXT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)
DEC = dict(TEXT, num_key_value_heads=1, head_dim=16, pad_token_id=0)
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64)
SEQ2SEQ = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
# key: (model class, config class, config kwargs, input kind, has a classifier head, also side)
HF: dict[str, tuple[str, str, dict, str, bool, bool]] = {
    "bert": ("BertForSequenceClassification", "BertConfig", TEXT, "text", True, True),
    "bert-token": ("BertForTokenClassification", "BertConfig", TEXT, "text", True, False),
    "bert-bare": ("BertModel", "BertConfig", TEXT, "text", False, False),
    "bert-qa": ("BertForQuestionAnswering", "BertConfig", TEXT, "text", False, False),
    "xlnet": ("XLNetForSequenceClassification", "XLNetConfig", dict(
        vocab_size=V, d_model=32, n_layer=2, n_head=2, d_inner=64), "text", True, False),
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(TEXT, pad_token_id=1), "text1", True, False),
    "distilbert": ("DistilBertForSequenceClassification", "DistilBertConfig", dict(
        vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64), "text", True, False),
    "albert": ("AlbertForSequenceClassification", "AlbertConfig", dict(TEXT, embedding_size=16), "text", True, False),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(TEXT, embedding_size=16), "text", True, False),
    "deberta-v2": ("DebertaV2ForSequenceClassification", "DebertaV2Config", TEXT, "text", True, False),
    "mobilebert": ("MobileBertForSequenceClassification", "MobileBertConfig", dict(
        TEXT, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
        "text", True, False),
    "modernbert": ("ModernBertForSequenceClassification", "ModernBertConfig", dict(TEXT, pad_token_id=0), "text", True, False),
    "gte": ("GteForSequenceClassification", "GteConfig", dict(TEXT, pad_token_id=0), "text", True, False),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", dict(TEXT, pad_token_id=1), "text1", True, False),
    "gpt2": ("GPT2ForSequenceClassification", "GPT2Config", GPT2, "text", True, False),
    "gpt2-lm": ("GPT2LMHeadModel", "GPT2Config", GPT2, "text", False, False),
    "gpt-neox": ("GPTNeoXForSequenceClassification", "GPTNeoXConfig", dict(TEXT, pad_token_id=0), "text", True, False),
    "llama": ("LlamaForSequenceClassification", "LlamaConfig", DEC, "text", True, True),
    "llama-lm": ("LlamaForCausalLM", "LlamaConfig", DEC, "text", False, False),
    "mistral": ("MistralForSequenceClassification", "MistralConfig", DEC, "text", True, False),
    "qwen2": ("Qwen2ForSequenceClassification", "Qwen2Config", DEC, "text", True, False),
    "qwen3": ("Qwen3ForSequenceClassification", "Qwen3Config", DEC, "text", True, False),
    "phi": ("PhiForSequenceClassification", "PhiConfig", dict(TEXT, pad_token_id=0), "text", True, False),
    "phi3": ("Phi3ForSequenceClassification", "Phi3Config", dict(TEXT, pad_token_id=0, num_key_value_heads=1), "text", True, False),
    "gemma": ("GemmaForSequenceClassification", "GemmaConfig", DEC, "text", True, False),
    "gemma2": ("Gemma2ForSequenceClassification", "Gemma2Config", DEC, "text", True, False),
    "olmo2": ("Olmo2ForSequenceClassification", "Olmo2Config", DEC, "text", True, False),
    "helium": ("HeliumForSequenceClassification", "HeliumConfig", DEC, "text", True, False),
    "mixtral": ("MixtralForSequenceClassification", "MixtralConfig", dict(
        DEC, num_local_experts=4, num_experts_per_tok=2), "text", True, False),
    "gpt-oss": ("GptOssForSequenceClassification", "GptOssConfig", dict(
        DEC, num_local_experts=4, num_experts_per_tok=2), "text", True, False),
    "qwen2-moe": ("Qwen2MoeForSequenceClassification", "Qwen2MoeConfig", dict(
        DEC, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
        "text", True, False),
    "deepseek-v3": ("DeepseekV3ForSequenceClassification", "DeepseekV3Config", dict(
        DEC, num_key_value_heads=2, head_dim=8, moe_intermediate_size=32, first_k_dense_replace=0, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16), "text", True, False),
    "opt": ("OPTForSequenceClassification", "OPTConfig", dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1), "text1", True, False),
    "bloom": ("BloomForSequenceClassification", "BloomConfig", dict(
        vocab_size=V, hidden_size=32, n_layer=2, n_head=2, pad_token_id=0), "text", True, False),
    "falcon": ("FalconForSequenceClassification", "FalconConfig", dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, pad_token_id=0), "text", True, False),
    "t5-encoder": ("T5EncoderModel", "T5Config", dict(vocab_size=V, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                                     num_heads=2), "text", False, False),
    "bart": ("BartForSequenceClassification", "BartConfig", dict(
        SEQ2SEQ, max_position_embeddings=64, pad_token_id=1, eos_token_id=2, bos_token_id=0), "text-eos", True, False),
    "vit": ("ViTForImageClassification", "ViTConfig", VIT, "image", True, True),
    "deit": ("DeiTForImageClassification", "DeiTConfig", VIT, "image", True, False),
    "dinov2": ("Dinov2ForImageClassification", "Dinov2Config", VIT, "image", True, False),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(VIT, vocab_size=V), "image", True, False),
    "swin": ("SwinForImageClassification", "SwinConfig", dict(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4), "image", True, False),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig", dict(
        image_size=32, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]), "image", True, False),
    "segformer": ("SegformerForImageClassification", "SegformerConfig", dict(
        image_size=32, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=32), "image", True, False),
    "clip-vision": ("CLIPVisionModel", "CLIPVisionConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64), "image", False, False),
    "siglip-vision": ("SiglipVisionModel", "SiglipVisionConfig", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64), "image", False, False),
    "whisper-audio-cls": ("WhisperForAudioClassification", "WhisperConfig", dict(
        SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16), "audio", True, False),
}
QUICK = ["vit", "resnet18", "convnext", "levit", "hf-bert", "hf-llama", "hf-bart", "hf-vit"]


@dataclass
class Arch:
    """One architecture: a builder giving the same weights at every call, and its input."""

    key: str
    library: str
    model_id: str
    build_fn: Any
    inputs: Any  # a tensor (model(x)) or a dict of kwargs (model(**x))
    head: bool
    side: bool

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build_fn()


def timm_arch(key: str) -> Arch:
    name, kw, size, side = TIMM[key]

    def build():
        import timm

        # dropout and drop path off, as in the transformers configs below: the 4-bit and native
        # training forwards must drop the same elements for their gradients to be compared
        for off in ({"drop_rate": 0.0, "drop_path_rate": 0.0}, {"drop_rate": 0.0}, {}):
            try:
                return timm.create_model(name, pretrained=False, **{**off, **kw})
            except TypeError:  # a model that does not take one of them
                if not off:
                    raise

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return Arch(key, "timm", name, build, x, True, side)


def hf_inputs(kind: str) -> dict[str, torch.Tensor]:
    """A batch of 2 without labels; text row 1 is padded after 6 tokens (padding must not break)."""
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_features": torch.randn(2, 8, 32, generator=g)}
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 1 if kind == "text1" else 0
    if kind == "text-eos":  # BART classifies from the last </s>
        ids[1, 6:] = 1
        ids[0, 8] = ids[1, 5] = 2
    return {"input_ids": ids, "attention_mask": mask}


def hf_arch(key: str) -> Arch:
    cls, cfg_cls, kw, kind, head, side = HF[key]

    def build():
        import transformers

        cfg = getattr(transformers, cfg_cls)(**kw, **({"num_labels": 3} if head else {}))
        for k, v in list(vars(cfg).items()):  # dropout off: the 4-bit and native runs must see the same masks
            if isinstance(v, float) and v > 0 and re.search(r"dropout|_pdrop|drop_path|drop_rate", k):
                setattr(cfg, k, 0.0)
        return getattr(transformers, cls)(cfg)

    return Arch("hf-" + key, "transformers", cls, build, hf_inputs(kind), head, side)


# ------------------------------------------------------------------------------- helpers
class ArchTimeout(BaseException):
    """Raised by the alarm; a BaseException so the per-check ``except Exception`` lets it through."""


def _alarm(_signum, _frame):
    raise ArchTimeout


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def main_output(out) -> torch.Tensor:
    """The tensor a user looks at: logits, else the last hidden state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for k in ("logits", "last_hidden_state"):
        if getattr(out, k, None) is not None:
            return getattr(out, k)
    return next(t for t in (out.values() if isinstance(out, dict) else out) if isinstance(t, torch.Tensor))


def proj_loss(out, _batch=None) -> torch.Tensor:
    """Fixed random projections of the outputs: one loss for classifiers, LMs and bare backbones
    alike, with a gradient reaching every output element (the logits, else every floating tensor
    of the output, e.g. last hidden state and pooler output)."""
    if isinstance(out, torch.Tensor) or getattr(out, "logits", None) is not None:
        ys = [main_output(out)]
    else:
        ys = [t for t in (out.values() if isinstance(out, dict) else out)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    g = torch.Generator().manual_seed(7)
    return sum((y.float() * torch.randn(y.shape, generator=g)).sum() / y.numel() ** 0.5 for y in ys)


def eval_out(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return main_output(call(model, inputs)).detach().clone()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def with_head_of(ref, model, names) -> None:
    """Give ``ref`` copies of ``model``'s new classifiers (the same outputs and weights), built
    afresh so that no hook or patched forward of ``model`` comes along."""
    for name in names:
        src = model.get_submodule(name)
        if isinstance(src, torch.nn.Linear):
            new = torch.nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
        elif isinstance(src, torch.nn.Conv2d):
            new = torch.nn.Conv2d(src.in_channels, src.out_channels, 1, bias=src.bias is not None)
        else:
            raise TypeError(f"classifier {name} is a {type(src).__name__}")
        new.load_state_dict(src.state_dict())
        ref.set_submodule(name, new)


def copy_matching(dst, src) -> None:
    """Copy every state-dict entry of ``src`` that ``dst`` has with the same shape."""
    sd = src.state_dict()
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            if k in sd and sd[k].shape == v.shape:
                v.copy_(sd[k])


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def describe_error(e: BaseException) -> str:
    """Type, first line and where: the innermost s2a frame, so a FAIL points at the library."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/s2a/" in f.filename]
    where = f" [{ours[-1].filename.split('/s2a/')[-1]}:{ours[-1].lineno}]" if ours else ""
    return f"{type(e).__name__}: {first_line(e)}{where}"


def is_refusal(e: BaseException) -> bool:
    """An s2a error type raised by s2a itself, with a message: the user is told what to do."""
    frames = traceback.extract_tb(e.__traceback__)
    return (isinstance(e, (UnsupportedModelError, ValueError)) and bool(str(e).strip())
            and bool(frames) and "/s2a/" in frames[-1].filename)


def ok(detail: str = "") -> dict:
    return {"status": "pass", "detail": detail}


def fail(detail: str) -> dict:
    return {"status": "FAIL", "detail": detail}


# -------------------------------------------------------------------------------- checks
def check_outputs(arch, m4, mN, modules) -> dict:
    """Check 2: the inserted modules are an identity at init, and 4-bit storage never changes a
    forward (compared after perturbing the trainable tensors, so prompts are non-zero)."""
    problems = []
    if "side" not in modules:  # the side branch makes its own prediction: no reference
        ref = arch.build()
        if arch.head:
            with_head_of(ref, mN, describe_backbone(mN).classifier_names)
        d = rel(eval_out(m4, arch.inputs), eval_out(ref, arch.inputs))
        if d > TOL:
            problems.append(f"init output differs from the untouched model: rel {d:.2e}")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in m4.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    copy_matching(mN, m4)
    d = rel(eval_out(m4, arch.inputs), eval_out(mN, arch.inputs))
    if d > TOL:
        problems.append(f"act_bits=4 vs None eval output: rel {d:.2e}")
    return fail("; ".join(problems)) if problems else ok()


def check_grads(arch, m4, mN) -> tuple[dict, float | None, float | None]:
    """Check 3: gradients reach only trainable tensors and are finite; how close 4-bit
    gradients are to native ones, and how many saved bytes the 4-bit storage keeps."""
    grads = {}
    for tag, m in (("4", m4), ("N", mN)):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # any randomness left in a training forward draws the same numbers in both
        proj_loss(call(m, arch.inputs)).backward()
        grads[tag] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        frozen = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
        if frozen:
            return fail(f"frozen parameters got gradients ({tag}): {frozen[:3]}"), None, None
    g4, gN = grads["4"], grads["N"]
    names = [n for n in g4 if g4[n] is not None and gN.get(n) is not None]
    if not names:
        return fail("no trainable parameter got a gradient"), None, None
    a = torch.cat([g4[n].flatten().double() for n in names])
    b = torch.cat([gN[n].flatten().double() for n in names])
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return fail("non-finite gradients"), None, None
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    for m in (m4, mN):
        m.zero_grad(set_to_none=True)
    r4 = s2a.measure(m4, arch.inputs, proj_loss)
    rN = s2a.measure(mN, arch.inputs, proj_loss)
    missing = [n for n in g4 if g4[n] is None]
    return ok(f"no gradient reached {missing[:3]}" if missing else ""), cos, r4.saved_bytes / max(rN.saved_bytes, 1)


def check_save_load_merge(arch, m4) -> dict:
    """Check 4: what a user saves is what they get back, and merging for inference is exact."""
    want = eval_out(m4, arch.inputs)
    with tempfile.TemporaryDirectory() as d:
        s2a.save_tuned(m4, d)
        fresh = arch.build()
        s2a.load_tuned(fresh, d, example_input=arch.inputs)
    problems = []
    if (dl := rel(eval_out(fresh, arch.inputs), want)) > TOL:
        problems.append(f"load_tuned output: rel {dl:.2e}")
    s2a.merge(fresh)
    if (dm := rel(eval_out(fresh, arch.inputs), want)) > TOL:
        problems.append(f"merged output: rel {dm:.2e}")
    return fail("; ".join(problems)) if problems else ok()


def strict_listing(arch) -> str:
    """Check 5 (information): what strict compression of the plain model lists, first the modules
    it cannot compress, then (those skipped) the functions a training forward calls natively."""
    def listed(e):  # the message's list of "path: what" strings
        for group in re.findall(r"\[[^\[\]]*\]", str(e)):
            items = ast.literal_eval(group)
            if items and all(isinstance(i, str) for i in items):
                return items
        return [first_line(e)]

    modules, calls = [], []
    try:
        s2a.compress_activations(arch.build(), bits=4, strict=True)
    except s2a.UncoveredOperatorsError as e:
        modules = listed(e)
    plain = arch.build()
    skip = [m.split(": ")[0] for m in modules]
    s2a.compress_activations(plain, bits=4, strict=True, skip=[s for s in skip if s != "<root>"])
    plain.train()
    try:
        proj_loss(call(plain, arch.inputs)).backward()
    except s2a.UncoveredOperatorsError as e:
        calls = listed(e)
    items = modules + calls
    if not items:
        return "clean"
    return f"{len(modules)} modules + {len(calls)} calls: " + "; ".join(items[:2]) + ("; ..." if len(items) > 2 else "")


def run_checks(arch: Arch, modules: tuple[str, ...], row: dict[str, Any]) -> None:
    """Checks 1-5 of one architecture and module set into ``row``, each caught on its own."""
    checks = row["checks"]
    try:  # a model that fails on its own input is this script's problem, not s2a's
        eval_out(arch.build(), arch.inputs)
    except Exception as e:
        checks["model"] = {"status": "skipped", "detail": "untouched model fails: " + describe_error(e)}
        return
    cfg = s2a.S2AConfig(modules=modules, num_classes=NUM_CLASSES if arch.head else None, act_bits=4)
    try:
        m4 = s2a.apply(arch.build(), cfg, example_input=arch.inputs)
        mN = s2a.apply(arch.build(), cfg.replace(act_bits=None), example_input=arch.inputs)
        info = describe_backbone(m4)
        row["family"], row["blocks"] = info.family, len(info.blocks)
        row["trainable"] = str(s2a.trainable_parameters(m4))
        checks["apply"] = ok()
    except Exception as e:
        checks["apply"] = ({"status": "refused", "detail": first_line(e)} if is_refusal(e)
                           else fail(describe_error(e)))
    if checks["apply"]["status"] == "pass":
        for name, fn in (("outputs", lambda: check_outputs(arch, m4, mN, modules)),
                         ("grads", lambda: check_grads(arch, m4, mN)),
                         ("save_load_merge", lambda: check_save_load_merge(arch, m4))):
            try:
                res = fn()
                if name == "grads":
                    res, row["grad_cos"], row["bytes_ratio"] = res
                checks[name] = res
            except Exception as e:
                checks[name] = fail(describe_error(e))
    if modules == BP:
        try:
            row["strict"] = strict_listing(arch)
        except Exception as e:
            row["strict"] = "error: " + describe_error(e)


def run_arch(arch: Arch, modules: tuple[str, ...], limit_s: float) -> dict[str, Any]:
    """One row of the table, under a time limit (a hang must not stop the sweep)."""
    row: dict[str, Any] = {"arch": arch.key, "library": arch.library, "model": arch.model_id,
                           "modules": ",".join(modules), "family": None, "blocks": None,
                           "grad_cos": None, "bytes_ratio": None, "strict": None, "checks": {}}
    t0 = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        run_checks(arch, modules, row)
    except ArchTimeout:
        row["checks"]["timeout"] = fail(f"timed out after {limit_s:.0f} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    row["seconds"] = round(time.time() - t0, 1)
    statuses = [c["status"] for c in row["checks"].values()]
    row["overall"] = next((s for s in ("FAIL", "skipped", "refused") if s in statuses), "pass")
    return row


# -------------------------------------------------------------------------------- report
def cell(check: dict | None) -> str:
    if check is None:
        return "-"
    return {"pass": "pass", "refused": "refused", "FAIL": "**FAIL**"}[check["status"]]


def markdown(rows: list[dict], meta: dict) -> str:
    """One table per library, then every refusal and failure with its message."""
    n = {s: sum(r["overall"] == s for r in rows) for s in STATUSES}
    libs = ", ".join(f"{len({r['arch'] for r in rows if r['library'] == lib})} {lib}" for lib in ("timm", "transformers"))
    summary = (f"**{len(rows)} runs ({libs} architectures): {n['pass']} pass, {n['refused']} refused, "
               f"{n['FAIL']} FAIL" + (f", {n['skipped']} skipped" if n["skipped"] else "") + ".** "
               f"Strict compression of the plain model is clean on "
               f"{sum(r['strict'] == 'clean' for r in rows)} of {sum(r['strict'] is not None for r in rows)}.")
    notes = [
        f"Tiny random-init models, batch 2, {NUM_CLASSES}-class head where the model has one, prompt rank 4; "
        f"'same output' = max |diff| <= {TOL:g} x max |reference|. Loss: a fixed random projection of "
        "the logits (or of every output tensor of a bare backbone). Dropout and drop path off (transformers "
        "configs; timm drop_rate / drop_path_rate where the model takes them), each training forward "
        "seeded alike.",
        "Checks: 1 apply (refused = UnsupportedModelError / ValueError raised by s2a with a message), "
        "2 eval output = untouched model at init and 4-bit = native after perturbing the trainable "
        "tensors, 3 finite gradients only on trainable tensors, 4 save_tuned -> load_tuned -> merge. "
        "grad cos: all trainable gradients, 4-bit vs native; bytes: saved-for-backward 4-bit / native "
        "(s2a.measure). strict: compress_activations(plain model, strict=True), information only: the "
        "modules it cannot compress, then (those skipped) the native calls of a training forward that "
        "keep a full-precision activation (count, first two).",
    ]
    lines = [*header("Architecture coverage of s2a.apply", meta, notes), summary, ""]
    for lib in ("timm", "transformers"):
        sub = [r for r in rows if r["library"] == lib]
        if not sub:
            continue
        lines += [f"## {lib}", ""]
        lines += md_table(
            ["arch", "modules", "family", "blocks", "1 apply", "2 outputs", "3 grads", "4 save/load/merge",
             "grad cos", "bytes 4b/native", "strict (plain model)", "s"],
            [[f"{r['arch']} (`{r['model']}`)", r["modules"], r["family"] or "-", r["blocks"] or "-",
              cell(r["checks"].get("apply")), cell(r["checks"].get("outputs")), cell(r["checks"].get("grads")),
              cell(r["checks"].get("save_load_merge")),
              "-" if r["grad_cos"] is None else f"{r['grad_cos']:.4f}",
              "-" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:.3f}",
              (r["strict"] or "-").replace("|", "/"), r["seconds"]] for r in sub])
        lines.append("")
    issues = [(r, k, c) for r in rows for k, c in r["checks"].items() if c["status"] != "pass" or c["detail"]]
    if issues:
        lines += ["## Refusals, failures and notes", ""]
        lines += [f"- {r['arch']} [{r['modules']}] {k}: {c['status']}: {c['detail']}" for r, k, c in issues]
    low = [r for r in rows if r["grad_cos"] is not None and r["grad_cos"] < LOW_COS]
    if low:
        lines += ["", f"Gradient cosine (4-bit vs native) below {LOW_COS}: "
                  + ", ".join(f"{r['arch']} [{r['modules']}] {r['grad_cos']:.3f}" for r in low) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated keys (timm keys, hf-* for transformers)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--limit", type=float, default=300, help="seconds per architecture and module set")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    archs = [timm_arch(k) for k in TIMM] + [hf_arch(k) for k in HF]
    wanted = args.only.split(",") if args.only else QUICK if args.quick else None
    if wanted:
        unknown = set(wanted) - {a.key for a in archs}
        if unknown:
            ap.error(f"unknown architectures: {sorted(unknown)}")
        archs = [a for a in archs if a.key in wanted]
    t0 = time.time()
    meta = metadata(repeats=1, tolerance=TOL, num_classes=NUM_CLASSES, limit_s=args.limit)
    rows = []
    for arch in archs:
        for modules in (BP, BPS) if arch.side else (BP,):
            row = run_arch(arch, modules, args.limit)
            rows.append(row)
            bad = {k: c["detail"] for k, c in row["checks"].items() if c["status"] != "pass" or c["detail"]}
            print(f"{arch.key:20s} {row['modules']:17s} {row['overall']:7s} {row['seconds']:6.1f}s {bad or ''}",
                  flush=True)
    meta["runtime_s"] = time.time() - t0
    counts = {s: sum(r["overall"] == s for r in rows) for s in STATUSES}
    name = "families_quick" if wanted else "families"
    jp, mp = write_results(name, {"meta": meta, "summary": counts, "rows": rows}, markdown(rows, meta))
    print(f"{counts}; wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
