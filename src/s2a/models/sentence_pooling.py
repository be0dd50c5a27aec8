"""Classify sentence-transformers encoders from the pooling they were trained with.

A sentence-transformers directory (``1_Pooling/config.json``, e.g. all-MiniLM-L6-v2) was
trained to summarise a sentence by the *mean* of its token states; its BERT pooler
(dense + tanh on ``[CLS]``) is a left-over of pretraining that the sentence objective never
tuned. ``AutoModelForSequenceClassification`` nevertheless classifies from that pooler. Full
fine-tuning can repair this by retraining everything; a frozen backbone (S2A, BitFit, linear
probing) cannot, and then learns from a ``[CLS]`` state that was never meant to carry the
sentence. :func:`use_sentence_pooling` swaps the pooler for the one in the directory's
config, so every method starts from the representation the encoder was built to produce.

The swapped pooler has no parameters. Mean pooling needs the attention mask, which
``BertModel`` does not pass to its pooler: a forward pre-hook on the classifier hands the
mask of the current call to the pooler (and clears it afterwards).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["SentencePooler", "masked_max", "masked_mean", "sentence_pooling_mode", "use_sentence_pooling"]

_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def sentence_pooling_mode(path: str | Path) -> str | None:
    """``"mean"``, ``"cls"`` or ``"max"`` if ``path`` is a sentence-transformers directory.

    None when the directory has no ``1_Pooling/config.json``. Raises ``ValueError`` for a
    pooling config that selects no mode or several (we would silently pick one otherwise).
    """
    cfg_path = Path(path) / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: cannot read the sentence-transformers pooling config: {exc}") from None
    chosen = [mode for key, mode in _MODES.items() if cfg.get(key)]
    if len(chosen) != 1:
        raise ValueError(
            f"{cfg_path}: expected exactly one of {sorted(_MODES)} to be true, got {chosen or 'none'}; "
            "other sentence-transformers poolings are not supported"
        )
    return chosen[0]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, keepdim: bool = False) -> torch.Tensor:
    """Mean over dim 1 of (B, N, C) token states; ``mask`` (B, N) (1 = real token) or None.
    An all-padding row gives zeros, not NaN."""
    if mask is None:
        return x.mean(dim=1, keepdim=keepdim)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1, keepdim=keepdim) / m.sum(dim=1, keepdim=keepdim).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Maximum over dim 1 of (B, N, C) token states, padding left out."""
    if mask is None:
        return x.amax(dim=1)
    return x.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(x.dtype).min).amax(dim=1)


class SentencePooler(nn.Module):
    """Parameter-free pooling of token states: masked mean, masked max or the first token."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("mean", "cls", "max"):
            raise ValueError(f"pooling mode must be mean, cls or max, got {mode!r}")
        self.mode = mode
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mode == "cls":
            return hidden_states[:, 0]
        mask = self.attention_mask
        if mask is None:
            mask = hidden_states.new_ones(hidden_states.shape[:2])
        elif mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"sentence pooling: attention mask of shape {tuple(mask.shape)} does not match the "
                f"{tuple(hidden_states.shape[:2])} token states (a method that adds tokens must "
                "also extend the mask it passes to the model)"
            )
        return masked_mean(hidden_states, mask) if self.mode == "mean" else masked_max(hidden_states, mask)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _pass_mask(pooler: SentencePooler):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        pooler.attention_mask = kwargs.get("attention_mask")

    return hook


def _clear_mask(pooler: SentencePooler):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        pooler.attention_mask = None

    return hook


def use_sentence_pooling(model: nn.Module, mode: str) -> bool:
    """Replace the BERT-style pooler of a transformers classifier by :class:`SentencePooler`.

    Returns False (and changes nothing) when the model's base has no ``pooler`` to replace
    (RoBERTa-style heads read ``[CLS]`` themselves). Inputs must be passed by keyword
    (``model(**batch)``), as the trainer does, for the mask to reach the pooler.
    """
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, nn.Module) or not isinstance(getattr(base, "pooler", None), nn.Module):
        return False
    pooler = SentencePooler(mode)
    base.pooler = pooler
    model.register_forward_pre_hook(_pass_mask(pooler), with_kwargs=True)
    model.register_forward_hook(_clear_mask(pooler), with_kwargs=True)
    return True
