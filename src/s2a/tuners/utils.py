"""What is trainable, saving / loading only the tuned tensors, and merging for inference."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2a._files import atomic_write
from s2a.activations import restore

from .config import S2AConfig
from .model import (
    KINDS,
    STATE_ATTR,
    apply,
    backbone_fingerprint,
    current_fingerprint,
    fingerprint_mismatch,
    get_state,
    is_applied,
    rebuild_input,
    unwrap_compiled,
    weights_mismatch,
)

TENSORS_FILE = "tuned.safetensors"
CONFIG_FILE = "s2a_config.json"
FORMAT = "s2a-tuned"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------- counting
@dataclass
class TrainableParameters:
    """Trainable parameter counts of a model. ``str()`` prints PEFT's one-line summary;
    :meth:`table` adds the split by S2A module kind and by top-level module."""

    trainable: int
    total: int
    backbone: int | None = None
    by_kind: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    by_name: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def percent_of_backbone(self) -> float | None:
        return 100.0 * self.trainable / self.backbone if self.backbone else None

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || "
                f"trainable%: {self.percent:.4f}")

    def table(self) -> str:
        lines = [str(self)]
        if self.backbone:
            lines.append(f"backbone params: {self.backbone:,d} || trainable / backbone: "
                         f"{self.percent_of_backbone:.4f}%")
        if self.by_kind:
            lines.append("by module kind: " + ", ".join(f"{k}={v:,d}" for k, v in self.by_kind.items()))
        if self.by_module:
            lines.append("by module: " + ", ".join(f"{k}={v:,d}" for k, v in self.by_module.items()))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "total": self.total, "backbone": self.backbone,
                "percent": self.percent, "percent_of_backbone": self.percent_of_backbone,
                "by_kind": dict(self.by_kind), "by_module": dict(self.by_module)}


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count trainable parameters (``requires_grad``), in total, per S2A module kind
    ("bias", "norm", "prompt", "side", "head", "other") and per top-level module."""
    model = unwrap_compiled(model)
    state = getattr(model, STATE_ATTR, None)
    kinds = state.kinds if state is not None else {}
    total = trainable = 0
    by_kind: dict[str, int] = {}
    by_module: dict[str, int] = {}
    by_name: dict[str, int] = {}
    for name, p in model.named_parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        trainable += p.numel()
        by_name[name] = p.numel()
        kind = kinds.get(name, "other")
        by_kind[kind] = by_kind.get(kind, 0) + p.numel()
        top = name.split(".", 1)[0] if "." in name else "<root>"
        by_module[top] = by_module.get(top, 0) + p.numel()
    by_kind = {k: by_kind[k] for k in KINDS if k in by_kind}
    return TrainableParameters(trainable, total, state.backbone_parameters if state else None,
                               by_kind, by_module, by_name)


# ---------------------------------------------------------------------------- save / load
def _trained_since_apply(model: nn.Module, state: Any) -> list[str]:
    """Parameters made trainable after :func:`s2a.apply` (a block unfrozen by hand): saved too."""
    tuned = set(state.tuned_keys)
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in tuned]


def tuned_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned tensors of an applied model (the tensors apply made trainable or inserted, and
    any parameter made trainable since), detached CPU copies."""
    state = get_state(model, "tuned_state_dict")
    model = unwrap_compiled(model)
    sd = model.state_dict()
    keys = [*state.tuned_keys, *_trained_since_apply(model, state)]
    return {k: sd[k].detach().to("cpu", copy=True).contiguous() for k in keys}


def save_tuned(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write only the tuned tensors (``tuned.safetensors``) and ``s2a_config.json`` (the
    config, the backbone's fingerprint, a checksum of the tensors) into ``directory``.
    Each file is written to a temporary file and moved into place (``os.replace``), the
    tensors first, so a reader never sees a half-written file. Returns the directory."""
    from safetensors.torch import save

    state = get_state(model, "save_tuned")
    if state.merged:
        raise RuntimeError("save_tuned: the model was merged for inference; save before s2a.merge")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = tuned_state_dict(model)
    blob = save(tensors, metadata={"format": "pt", "s2a": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "backbone": current_fingerprint(model, state),
        "family": state.info.family,
        "example_input": state.example_input,
        # a feature map's prompt rows belong to its grid: 8x16 and 16x8 have the same shapes
        "prompt_grids": {block: list(prompt.grid) for block, prompt in state.prompts.items()},
        "tensors": {"file": TENSORS_FILE, "sha256": hashlib.sha256(blob).hexdigest(),
                    "bytes": len(blob), "count": len(tensors),
                    "numel": sum(t.numel() for t in tensors.values()),
                    "trained_since_apply": sorted(set(tensors) - set(state.tuned_keys))},
    }
    atomic_write(directory / TENSORS_FILE, lambda fh: fh.write(blob))
    config_text = json.dumps(meta, indent=2).encode()
    atomic_write(directory / CONFIG_FILE, lambda fh: fh.write(config_text))
    return directory


def read_tuned(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a :func:`save_tuned` directory, checked for corruption."""
    from safetensors.torch import load

    directory = Path(directory)
    cfg_path, t_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    for p in (cfg_path, t_path):
        if not p.is_file():
            raise FileNotFoundError(f"load_tuned: {p} not found (expected a directory written by s2a.save_tuned)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_tuned: {cfg_path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"load_tuned: {cfg_path} is not an s2a tuned-model config")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"load_tuned: {cfg_path} has format version {meta['format_version']}, "
                         f"this s2a reads up to {FORMAT_VERSION}")
    blob = t_path.read_bytes()
    expected = meta.get("tensors", {}).get("sha256")
    if expected is not None and hashlib.sha256(blob).hexdigest() != expected:
        raise ValueError(f"load_tuned: {t_path} is corrupt or does not belong to {cfg_path} "
                         "(checksum mismatch)")
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"load_tuned: {t_path} is corrupt ({type(e).__name__}: {e})") from None
    return meta, tensors


def _in_use(config: S2AConfig) -> dict[str, Any]:
    """The config's fields that shape the tuned tensors: a prompt rank without the prompt
    module, or side settings without the side branch, change nothing."""
    unused = {"prompt": ("prompt_rank", "prompt_positions"), "side": ("side_reduction", "side_depth", "fuse_side")}
    drop = {f for module, fields in unused.items() if module not in config.modules for f in fields}
    drop |= {"act_bits", "op_bits"}  # how activations are stored, not the tensors
    return {k: v for k, v in config.to_dict().items() if k not in drop}


def load_tuned(model: nn.Module, directory: str | os.PathLike, example_input: Any = None, *,
               check_weights: bool = True) -> nn.Module:
    """Load tuned tensors written by :func:`save_tuned` onto ``model``, in place.

    ``model`` is a freshly built backbone (then the saved config is applied first, with
    ``example_input`` or the saved input shape for the dry run) or one already prepared
    by :func:`s2a.apply` with the same config. A backbone of another class or with other
    tensor shapes, a corrupt file, or missing / unexpected tensors raise ``ValueError``; so
    do backbone weights other than those the tensors were trained on (a sampled signature,
    see :func:`s2a.tuners.model.weight_signature`; another dtype passes) unless
    ``check_weights=False``.
    """
    wrapper, model = model, unwrap_compiled(model)
    meta, tensors = read_tuned(directory)
    config = S2AConfig.from_dict(meta["config"])
    saved_fp = meta.get("backbone", {})
    if is_applied(model):
        state = get_state(model)
        if state.merged:
            raise RuntimeError("load_tuned: the model was merged for inference (prompts folded into "
                               "constants); load onto a freshly built backbone instead")
        mine, saved = _in_use(state.config), _in_use(config)
        if mine != saved:
            differ = ", ".join(f"{k}={mine.get(k)!r} (saved {saved.get(k)!r})"
                               for k in sorted(set(mine) | set(saved)) if mine.get(k) != saved.get(k))
            raise ValueError(f"load_tuned: the model was prepared with another config than the saved tensors: {differ}")
        now = current_fingerprint(model, state)
    else:
        replaced = ()
        if config.num_classes is not None:
            from s2a.models import find_adapter

            head = find_adapter(model).head(model)
            replaced = head.names if head is not None else ()
        now = backbone_fingerprint(model, exclude=replaced)
    why = fingerprint_mismatch(saved_fp, now)
    if why:
        raise ValueError(f"load_tuned: backbone mismatch: {why}")
    why = weights_mismatch(saved_fp, now, loaded_over=tensors) if check_weights else None
    if why:
        raise ValueError(f"load_tuned: backbone mismatch: {why}; or pass check_weights=False to load anyway")
    if not is_applied(model):
        stand_in = example_input is None
        if stand_in:
            p = next((p for p in model.parameters() if p.is_floating_point()), None)
            example_input = rebuild_input(meta.get("example_input"), p.device if p is not None else None,
                                          p.dtype if p is not None else None)
        try:
            apply(model, config, example_input=example_input)
        except Exception as exc:
            if not stand_in:
                raise
            # zeros of the saved shapes: some models refuse them (BART wants an <eos> token)
            raise ValueError(
                f"load_tuned: the dry run on a stand-in input (zeros of the shapes saved with the "
                f"tuned tensors) failed: {type(exc).__name__}: {str(exc).rstrip('.')}. Pass example_input= a real "
                "batch like the one given to s2a.apply"
            ) from exc
        state = get_state(model)
    grids = {block: list(prompt.grid) for block, prompt in state.prompts.items()}
    saved_grids = meta.get("prompt_grids", grids)  # (older saves did not record them)
    other = [f"{block} {grids.get(block)} (saved {g})" for block, g in saved_grids.items() if grids.get(block) != g]
    if other:
        raise ValueError(f"load_tuned: the prompts were trained on other feature-map grids: {other[:3]}; "
                         "pass example_input= of the size used at save time")
    since = [k for k in meta.get("tensors", {}).get("trained_since_apply", []) if k not in state.tuned_keys]
    params = dict(model.named_parameters())
    absent = [k for k in since if k not in params]
    if absent:
        raise ValueError(f"load_tuned: the saved tensors include parameters trained after s2a.apply that "
                         f"this model does not have: {absent[:5]}")
    expected = {*state.tuned_keys, *since}
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise ValueError(f"load_tuned: the saved tensors do not fit this model: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    sd = model.state_dict()
    bad = [f"{k} {list(t.shape)} vs {list(sd[k].shape)}" for k, t in tensors.items() if t.shape != sd[k].shape]
    if bad:
        raise ValueError(f"load_tuned: tensor shapes differ (saved vs model): {bad[:5]}"
                         " (for image models pass example_input= of the size used at save time)")
    with torch.no_grad():
        for k, t in tensors.items():
            sd[k].copy_(t)
    for k in since:  # trainable again, and saved again by save_tuned
        params[k].requires_grad_(True)
        state.tuned_keys.append(k)
        state.kinds[k] = "other"
    if not any(p.is_meta for p in model.parameters()):
        state.lift_meta_guard()  # every tensor apply added has its values now
    return wrapper


# ---------------------------------------------------------------------------- merge
def merge(model: nn.Module) -> nn.Module:
    """Fold what can be folded for inference, in place; returns ``model``.

    Removes the activation-compression wrappers (:func:`s2a.restore`, keeping the SDPA
    attention path they selected), turns every low-rank prompt into a constant buffer
    ``A·B``, freezes every parameter. Biases are already ordinary parameters of their
    layers. The output is unchanged."""
    state = get_state(model, "merge")
    wrapper, model = model, unwrap_compiled(model)
    # Keep the attention code path the model ran with under s2a (compression switches
    # timm / transformers attention to SDPA; restore would switch it back).
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is True]
    hf = [(m, m.config._attn_implementation) for m in model.modules()
          if hasattr(m, "set_attn_implementation") and hasattr(getattr(m, "config", None), "_attn_implementation")]
    restore(model)
    for m in fused:
        m.fused_attn = True
    for m, impl in hf:
        if m.config._attn_implementation != impl:
            m.set_attn_implementation(impl)
    for prompt in state.prompts.values():
        prompt.merge_()
    for p in model.parameters():
        p.requires_grad_(False)
    state.merged = True
    return wrapper
