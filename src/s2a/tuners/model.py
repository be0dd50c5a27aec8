"""``s2a.apply``: turn a pretrained model into an S2A fine-tuning model, in place.

1. :func:`s2a.models.describe_backbone` finds the blocks, layouts and head (one
   no-grad dry forward on ``example_input`` or a default input);
2. every parameter is frozen;
3. the classifier head is replaced (``num_classes``) or kept, and made trainable
   (a language-model head tied to the embeddings stays frozen, and so does the head
   when "side" is the only module: the side network then makes the prediction);
4. the configured modules are inserted: "bias" (:mod:`s2a.tuners.bias`), "prompt"
   (:mod:`s2a.tuners.prompt`), "side" (``s2a.tuners.side.attach_side``);
5. BatchNorm layers keep their running statistics (``freeze_norm_stats``);
6. :func:`s2a.compress_activations` with ``act_bits`` / ``op_bits`` (unless None).

The configuration is stored as ``model.s2a_config``; the bookkeeping (what was
inserted, the backbone's fingerprint, which tensors are tuned) as ``model._s2a_tuner``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from s2a.activations import compress_activations
from s2a.activations.apply import unwrap_compiled
from s2a.models import BackboneInfo, describe_backbone, refresh_head
from s2a.models.registry import UnsupportedModelError, dry_run_input, eval_forward

from .bias import add_bias, norm_weights, train_norm_weights, unreached_trainable
from .config import S2AConfig
from .prompt import LowRankPrompt, add_prompts, check_prompts, prompt_path
from .side import SIDE_ATTR, attach_side, check_side

STATE_ATTR = "_s2a_tuner"
FAILED_ATTR = "_s2a_apply_failed"  # the error of an apply that stopped part way
KINDS = ("bias", "norm", "prompt", "side", "head", "other")


@dataclass
class TunerState:
    config: S2AConfig
    info: BackboneInfo
    fingerprint: dict[str, Any]
    backbone_parameters: int
    kinds: dict[str, str] = field(default_factory=dict)  # tuned tensor name -> module kind
    tuned_keys: list[str] = field(default_factory=list)  # state-dict keys save_tuned writes
    prompts: dict[str, LowRankPrompt] = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    example_input: dict[str, Any] | None = None
    merged: bool = False
    # applied on the meta device: the tensors apply added have no values until load_tuned (or a
    # load_state_dict that holds them all) fills them; the hooks that refuse a forward till then
    meta_guard: list = field(default_factory=list)

    def lift_meta_guard(self) -> None:
        for handle in self.meta_guard:
            handle.remove()
        self.meta_guard = []


def _refuse_failed(model: nn.Module) -> None:
    failed = model.__dict__.get(FAILED_ATTR)
    if failed is not None:
        raise RuntimeError(f"s2a.apply failed part way on this model ({failed}), which is left half "
                           "prepared; build a fresh model")


def current_fingerprint(model: nn.Module, state: TunerState) -> dict[str, Any]:
    """``state.fingerprint`` (taken when :func:`apply` ran) with the weight signatures of the
    backbone as it is now: weights loaded, or first materialised from the meta device, after
    ``apply`` are the ones the tuned tensors are trained on."""
    names = set(state.fingerprint.get("shapes", ()))
    weights = {n: weight_signature(t) for n, t in _signed(unwrap_compiled(model)) if n in names}
    return {**state.fingerprint, "weights": weights}


def _signed(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a weight signature covers: parameters, and the running statistics of the
    BatchNorms (the tuned biases are trained on the backbone's own; ``freeze_norm_stats``
    keeps them; other layers' running buffers, such as EvoNorm's, may move in training)."""
    buffers = [(f"{path}.{n}" if path else n, t) for path, m in model.named_modules() if isinstance(m, _BatchNorm)
               for n, t in m.named_buffers(recurse=False)]
    for n, t in (*model.named_parameters(), *buffers):
        if t.is_floating_point() and not t.is_meta:
            yield n, t


def get_state(model: nn.Module, what: str = "this") -> TunerState:
    model = unwrap_compiled(model)
    _refuse_failed(model)
    state = vars(model).get(STATE_ATTR)
    if state is None:
        # A wrapper around the applied model (peft's, which forwards attribute reads to it;
        # DDP's module): its names carry the wrapper's prefix, which the recorded names do not.
        inner = next((p for p, m in model.named_modules() if p and vars(m).get(STATE_ATTR) is not None), None)
        if inner is not None:
            raise ValueError(f"{what}: the model prepared by s2a.apply is its submodule {inner!r}, inside a "
                             f"wrapper (peft, DDP): pass model.get_submodule({inner!r})")
        raise ValueError(f"{what} needs a model prepared by s2a.apply(model, config)")
    return state


def is_applied(model: nn.Module) -> bool:
    return getattr(unwrap_compiled(model), STATE_ATTR, None) is not None


# ---------------------------------------------------------------------------- fingerprint
def _excluded(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def backbone_fingerprint(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Class name, tensor names and shapes (and their hash) of ``model``'s state dict, and a
    :func:`weight_signature` of each parameter, leaving out the modules under ``exclude`` (a
    head that ``num_classes`` replaces)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not _excluded(k, exclude)}
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    params = [(n, p) for n, p in model.named_parameters() if not _excluded(n, exclude)]
    weights = {n: weight_signature(t) for n, t in _signed(model) if not _excluded(n, exclude)}
    return {"class": type(model).__name__, "num_tensors": len(shapes),
            "num_parameters": sum(p.numel() for _, p in params), "sha256": digest, "shapes": shapes,
            "weights": weights}


_SIGNATURE_SAMPLES = 1024
# Two backbones agree when their projections differ by at most this fraction of the sample's
# norm: a copy in bf16 / fp16 differs by ~2**-9 of it, another initialisation by ~1.4.
WEIGHT_TOLERANCE = 0.02
# ...plus fp16's rounding where values are subnormal in fp16 (timm's cls_token starts at std
# 1e-6): up to 2**-25 per element, a sum of 1024 of them ~ sqrt(1024) * 2**-25 / sqrt(3); this
# floor is six times that, and 1/20 of what another random init of such a tensor moves
_WEIGHT_FLOOR = math.sqrt(_SIGNATURE_SAMPLES) * 2.0**-24


def weight_signature(p: torch.Tensor) -> list[float]:
    """``[projection, norm]`` of up to 1024 evenly spaced elements of ``p`` (float64): their
    dot product with fixed pseudo-random signs, and their Euclidean norm. Cheap at any model
    size, and it tells pretrained weights from another checkpoint or a random initialisation
    while a copy in another dtype still agrees."""
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return [0.0, 0.0]
    k = min(n, _SIGNATURE_SAMPLES)
    # Integer arithmetic: a float linspace rounds differently per CPU instruction set and
    # device, which would pick other elements on the machine that loads the tensors.
    index = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
    sample = flat[index.to(flat.device)].double().cpu()
    signs = torch.randint(0, 2, (sample.numel(),), generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    return [float(sample @ signs), float(sample.norm())]


def weights_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any],
                     loaded_over: Collection[str] = ()) -> str | None:
    """None when the backbones' weights agree (see :func:`weight_signature`; fingerprints without
    signatures, e.g. of a model on the meta device, agree with anything), else a reason.
    ``loaded_over``: tensors the load replaces (a trained bias, a freshly initialised head),
    whose values before it do not matter."""
    a, b = expected.get("weights") or {}, got.get("weights") or {}
    common = sorted((set(a) & set(b)) - set(loaded_over))
    def tolerance(k: str) -> float:
        return WEIGHT_TOLERANCE * max(a[k][1], b[k][1]) + _WEIGHT_FLOOR

    differ = [k for k in common if abs(a[k][0] - b[k][0]) > tolerance(k) or abs(a[k][1] - b[k][1]) > tolerance(k)]
    if not differ:
        return None
    return (f"the weights of {len(differ)} of {len(common)} backbone tensors differ from those the tuned "
            f"tensors were trained on (e.g. {differ[:3]}): load the same pretrained weights (a model "
            "built without them, e.g. pretrained=False, has other values)")


def fingerprint_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any]) -> str | None:
    """None when the fingerprints agree, else a human-readable reason."""
    if expected.get("class") != got.get("class"):
        return f"the tuned tensors belong to a {expected.get('class')}, the model is a {got.get('class')}"
    if expected.get("sha256") == got.get("sha256"):
        return None
    a, b = expected.get("shapes", {}), got.get("shapes", {})
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    differ = sorted(k for k in set(a) & set(b) if list(a[k]) != list(b[k]))
    parts = []
    if differ:
        parts.append("shapes differ: " + ", ".join(f"{k} {a[k]} vs {b[k]}" for k in differ[:5])
                     + (f" (+{len(differ) - 5} more)" if len(differ) > 5 else ""))
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the model, e.g. {missing[:3]}")
    if extra:
        parts.append(f"{len(extra)} tensor(s) not in the saved backbone, e.g. {extra[:3]}")
    if differ and all("pos_embed" in k or "position_embedding" in k for k in differ):
        parts.append("only position embeddings differ: the model was built for another input size "
                     "(build it with the img_size it was tuned at, e.g. timm.create_model(..., img_size=N))")
    return (f"{got.get('class')} with {got.get('num_parameters'):,} parameters does not match the "
            f"saved backbone with {expected.get('num_parameters'):,}: " + "; ".join(parts or ["hash differs"]))


# ---------------------------------------------------------------------------- example input
def describe_input(example_input: Any) -> dict[str, Any] | None:
    """Shapes and dtypes of an example input (what a dry run on load needs)."""
    def one(t):
        return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}

    if example_input is None:
        return None
    if isinstance(example_input, torch.Tensor):
        return {"kind": "tensor", "value": one(example_input)}
    if isinstance(example_input, Mapping):
        if all(isinstance(v, torch.Tensor) for v in example_input.values()):
            return {"kind": "kwargs", "value": {k: one(v) for k, v in example_input.items()}}
        return None
    if isinstance(example_input, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in example_input):
        return {"kind": "args", "value": [one(v) for v in example_input]}
    return None


def rebuild_input(spec: Mapping[str, Any] | None, device: torch.device | None = None,
                  float_dtype: torch.dtype | None = None) -> Any:
    """An input with the shapes of :func:`describe_input` (zeros; masks ones); floating
    tensors in ``float_dtype`` when given (the model's: it may be loaded in another precision
    than the one it was saved from)."""
    if spec is None:
        return None

    def one(d, name=""):
        fill = torch.ones if name == "attention_mask" else torch.zeros
        dtype = getattr(torch, d["dtype"])
        if float_dtype is not None and dtype.is_floating_point:
            dtype = float_dtype
        return fill(d["shape"], dtype=dtype, device=device)

    kind, value = spec["kind"], spec["value"]
    if kind == "tensor":
        return one(value)
    if kind == "kwargs":
        return {k: one(v, k) for k, v in value.items()}
    return tuple(one(v) for v in value)


# ---------------------------------------------------------------------------- apply
def _compact_head_input(module: nn.Module, args: tuple) -> tuple | None:
    """A trainable head keeps its input for its weight's gradient. Where that input is a view
    of a larger tensor (the class token ``x[:, 0]`` of a ViT's (B, N, D) output, taken by the
    model or inside the head), it would keep the whole tensor alive: the head (and each
    Linear / Conv in it) gets a copy of just the view. (While compiling, the
    storage cannot be traced: a non-contiguous input stands for such a view.)"""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or not x.is_floating_point() or not torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        if x.dim() != 2 or x.is_contiguous():  # (pooled features; not a feature map in channels_last)
            return None
    else:
        try:
            if x.untyped_storage().nbytes() < 2 * x.numel() * x.element_size():
                return None
        except (NotImplementedError, RuntimeError):  # torch.func wrappers, tensor subclasses
            return None
    return (x.clone(memory_format=torch.contiguous_format), *args[1:])


def _keep_running_stats(module: nn.Module, args) -> None:
    module.training = False


_keep_running_stats.keeps_running_stats = True  # read by s2a.compression_summary


def _refuse_unfilled(model: nn.Module, _args: Any) -> None:
    if not any(p.is_meta for p in model.parameters()):
        raise RuntimeError(
            "s2a.apply ran on this model on the meta device, so the tensors it added (zero biases, "
            "prompts, side branch, new head) were given no values: to_empty() left them uninitialised. "
            "Fill them with s2a.load_tuned(model, directory) (or a load_state_dict holding them), or "
            "call s2a.apply on a model whose weights are loaded")


def _lift_guard_when_filled(model: nn.Module, incompatible: Any) -> None:
    state = getattr(model, STATE_ATTR, None)
    if state is not None and not set(state.tuned_keys) & set(incompatible.missing_keys):
        state.lift_meta_guard()


def keep_norm_stats(model: nn.Module) -> list:
    """Run every BatchNorm layer of ``model`` on its running statistics, in training too (a
    frozen backbone's BatchNorm would otherwise normalise with each batch's statistics and
    overwrite the pretrained ones). Returns the hook handles."""
    return [m.register_forward_pre_hook(_keep_running_stats) for m in model.modules()
            if isinstance(m, _BatchNorm)]


def apply(model: nn.Module, config: S2AConfig | Mapping[str, Any] | None = None,
          example_input: Any = None) -> nn.Module:
    """Prepare ``model`` for S2A fine-tuning, in place; returns ``model``.

    Args:
        model: a timm / transformers / plain PyTorch model (see :mod:`s2a.models`).
        config: an :class:`S2AConfig` (or its dict); default ``S2AConfig()``: bias +
            low-rank prompt, 4-bit activations.
        example_input: one batch for the dry forward that measures the block shapes (a
            tensor, a tuple of args or a dict of kwargs). Image models: the prompt of a
            feature map is tied to this input size. Default: the model's own input size
            (a short token sequence for text models).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"s2a.apply expects an nn.Module, got {type(model).__name__}")
    wrapper, model = model, unwrap_compiled(model)
    if config is None:
        config = S2AConfig()
    elif isinstance(config, Mapping):
        config = S2AConfig.from_dict(config)
    elif isinstance(config, S2AConfig):
        config = config.replace()  # a validated copy: later edits of the caller's object do not leak in
    else:
        raise TypeError(f"config must be an S2AConfig or a dict, got {type(config).__name__}")
    _refuse_failed(model)
    if is_applied(model):
        raise RuntimeError("model is already prepared by s2a.apply; build a fresh model to change the config")
    inner = next((n for n, m in model.named_modules() if n and is_applied(m)), None)
    if inner is not None:  # its prompts would be frozen and left out of save_tuned
        raise RuntimeError(
            f"model.{inner} is already prepared by s2a.apply: apply once, to the whole model (build the "
            "inner model fresh and wrap it first), or train the wrapper's own parts by hand")
    wrapped = next((n or type(m).__name__ for n, m in model.named_modules()
                    if type(m).__module__.split(".")[0] == "peft"), None)
    if wrapped is not None:
        raise ValueError(
            f"s2a.apply got a model that HF peft has wrapped ({wrapped}): apply freezes every weight, "
            "peft's LoRA weights and head copies included, and would add biases inside its layers. "
            "Call s2a.apply on the base model instead; or, to train LoRA with 4-bit activations, call "
            "s2a.compress_activations(peft_model) (what `s2a train --method s2a-lora` does)")
    if config.act_bits is not None:
        from s2a.activations.apply import refuse_compressed

        refuse_compressed(model, "(s2a.apply compresses with config.act_bits)")

    try:
        info = describe_backbone(model, example_input)
    except UnsupportedModelError as exc:
        if not set(config.modules) <= {"bias", "norm"}:
            raise
        raise UnsupportedModelError(
            f"{exc}. Bias and norm tuning alone need no blocks: freeze the model, set requires_grad on its "
            "biases (and norm weights) by hand, and call s2a.compress_activations(model) for the 4-bit storage"
        ) from None
    # A backbone without a head (timm num_classes=0, a transformers AutoModel) takes
    # num_classes as the side branch's output width: the side network makes the prediction.
    new_head = config.num_classes is not None and not ("side" in config.modules and not info.head_names)
    replaced = info.head_names if new_head else ()
    if "side" in config.modules:
        check_side(info, config, model, example_input)
    if "prompt" in config.modules:
        check_prompts(model, info)
    if "norm" in config.modules and not norm_weights(model):
        raise ValueError(f"modules includes 'norm', but {type(model).__name__} has no normalisation layer "
                         "with a scale (weight) to train; leave 'norm' out")
    fingerprint = backbone_fingerprint(model, exclude=replaced)
    original_keys = set(model.state_dict().keys())
    if new_head:  # refuses a model without a head (or a language model) before changing it
        info.adapter.replace_head(model, config.num_classes)
        refresh_head(info, model)
    try:
        _prepare(model, config, info, example_input, fingerprint, replaced, original_keys)
        return wrapper
    except BaseException as exc:
        model.__dict__[FAILED_ATTR] = f"{type(exc).__name__}: {exc}"
        raise


def _first_image(example: Any) -> torch.Tensor | None:
    """The first (B, C, H, W) floating tensor of an input (a tensor, args or kwargs)."""
    items = example.values() if isinstance(example, Mapping) else example if isinstance(example, (tuple, list)) else [example]
    return next((t for t in items if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()), None)


def _patch_embedding(model: nn.Module) -> nn.Module | None:
    """The patch embedding of a ViT that takes images of other sizes: a timm one built with
    ``dynamic_img_size``, else a transformers ``*PatchEmbeddings`` (ViT, DINOv2) or
    ``*VisionEmbeddings`` (CLIP, SigLIP: an int ``patch_size`` beside ``patch_embedding``),
    which take them by ``interpolate_pos_encoding``. Not Swin's, which pad the image to whole
    patches (their grid is not size // patch)."""
    if getattr(model, "dynamic_img_size", False):
        return getattr(model, "patch_embed", None)
    return next((m for m in model.modules()
                 if (type(m).__name__.endswith("PatchEmbeddings") or hasattr(m, "patch_embedding"))
                 and getattr(m, "patch_size", None) is not None and not hasattr(m, "maybe_pad")), None)


class _PatchGridGuard:
    """Forward pre-hook on the patch embedding of a ViT that takes other image sizes
    (:func:`_patch_embedding`): its prompt rows belong to the dry run's patch grid, and an
    image of another grid with as many patches (32x64 against 64x32) would pass the blocks' token count check with its rows
    on the wrong patches. Compared as patch grids (``dynamic_img_pad`` pads 60x60 to 64x64's)."""

    def __init__(self, patch_embed: nn.Module, size: tuple[int, ...]) -> None:
        self.size = size
        self.grid = self._grid(patch_embed, size)

    @staticmethod
    def _grid(patch_embed: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
        feat_size = getattr(patch_embed, "dynamic_feat_size", None)
        if callable(feat_size):
            return tuple(feat_size(size))
        patch = getattr(patch_embed, "patch_size", None)  # transformers: ViT, DINOv2 (interpolate_pos_encoding)
        if isinstance(patch, int):
            patch = (patch, patch)
        if isinstance(patch, (tuple, list)) and len(patch) == len(size) and all(isinstance(p, int) and p > 0 for p in patch):
            return tuple(n // p for n, p in zip(size, patch, strict=True))
        return size

    def __call__(self, patch_embed: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4 and self._grid(patch_embed, tuple(x.shape[2:])) != self.grid:
            raise ValueError(f"image of size {tuple(x.shape[2:])}, but the low-rank prompts were built for "
                             f"{self.size} (their rows belong to its patch grid {self.grid}): pass "
                             "example_input= of the size you train with to s2a.apply")


def _prepare(model: nn.Module, config: S2AConfig, info: BackboneInfo, example_input: Any,
             fingerprint: dict[str, Any], replaced: tuple[str, ...], original_keys: set[str]) -> nn.Module:
    """The changes :func:`apply` makes once the config is known to fit the model (a failure
    here is unexpected; the model is then marked half prepared)."""
    # After the head swap: a new head starts trainable, and with "side" alone it must not.
    for p in model.parameters():
        p.requires_grad_(False)

    kinds: dict[str, str] = {}
    # With the side branch alone the prediction comes from the side network (it replaces
    # the model's logits), so the backbone's own head stays frozen.
    side_only = config.modules == ("side",)
    hooks: list = []
    if info.head_trainable and not side_only:
        for name in info.head_names:
            head = model.get_submodule(name)
            for pn, p in head.named_parameters():
                p.requires_grad_(True)
                kinds[f"{name}.{pn}"] = "head"
            # ...and its inner layers: RoBERTa's / ELECTRA's head takes features[:, 0] itself
            layers = [m for m in head.modules() if m is head or isinstance(m, (nn.Linear, _ConvNd))]
            hooks += [m.register_forward_pre_hook(_compact_head_input) for m in layers]
    prompts: dict[str, LowRankPrompt] = {}
    if "bias" in config.modules:
        # The dry run tells which added zero biases the output never depends on (dropped).
        probe = functools.partial(eval_forward, model, dry_run_input(model, example_input, info.adapter))
        names, handles = add_bias(model, add_missing=config.add_missing_bias, probe=probe)
        hooks += handles
        for n in names:
            kinds.setdefault(n, "bias")
    if "norm" in config.modules:
        for n in train_norm_weights(model):
            kinds.setdefault(n, "norm")
    if "prompt" in config.modules:
        prompts, handles = add_prompts(model, info, config.prompt_rank, config.prompt_positions)
        hooks += handles
        for block, prompt in prompts.items():
            path = prompt_path(model, block)
            for pn, _ in prompt.named_parameters():
                kinds[f"{path}.{pn}"] = "prompt"
        patch_embed = _patch_embedding(model)
        image = _first_image(dry_run_input(model, example_input, info.adapter))
        if isinstance(patch_embed, nn.Module) and image is not None:
            guard = _PatchGridGuard(patch_embed, tuple(image.shape[2:]))
            hooks.append(patch_embed.register_forward_pre_hook(guard))
    if config.freeze_norm_stats:
        hooks += keep_norm_stats(model)

    state = TunerState(config=config, info=info, fingerprint=fingerprint,
                       backbone_parameters=fingerprint["num_parameters"], kinds=kinds, prompts=prompts,
                       hooks=hooks, example_input=describe_input(example_input))
    if any(p.is_meta for p in model.parameters()):
        state.meta_guard = [model.register_forward_pre_hook(_refuse_unfilled),
                            model.register_load_state_dict_post_hook(_lift_guard_when_filled)]
    setattr(model, STATE_ATTR, state)
    model.s2a_config = config

    if "side" in config.modules:
        before = {n for n, _ in model.named_parameters()}
        attach_side(model, info, config)
        for n, p in model.named_parameters():
            if n not in before and p.requires_grad:
                kinds.setdefault(n, "side")
        if not info.head_names and not side_only:
            # The side logits replace a bare backbone's output: what only that output read (its
            # final norm, pooler) would never get a gradient.
            probe = functools.partial(eval_forward, model, dry_run_input(model, example_input, info.adapter))
            params = dict(model.named_parameters())
            for n in unreached_trainable(model, probe, exclude=(SIDE_ATTR,)):
                params[n].requires_grad_(False)
                kinds.pop(n, None)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n in trainable:
        kinds.setdefault(n, "other")
    replaced_keys = {k for k in model.state_dict() if any(k.startswith(h + ".") for h in replaced)}
    tuned = [k for k in model.state_dict()
             if k in trainable or k not in original_keys or k in replaced_keys]
    if not config.freeze_norm_stats:
        stats = ("running_mean", "running_var", "num_batches_tracked")
        tuned += [k for k in model.state_dict() if k.rsplit(".", 1)[-1] in stats and k not in tuned]
    state.tuned_keys = tuned

    if config.act_bits is not None:
        compress_activations(model, bits=config.act_bits, ops=config.compression_ops())
    return model
