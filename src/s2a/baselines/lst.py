"""Ladder Side-Tuning (Sung et al., 2022): a thin transformer beside a frozen, grad-free backbone.

The backbone runs under ``torch.no_grad()`` (it keeps nothing for backward). Each block's
output ``h_i`` is shrunk by a LEARNED linear down-projection ``D_i -> w`` (``w = D / r``,
``r = 8`` as in LST) and merged into the side state through a gate,
``s = mu_i * down_i(h_i) + (1 - mu_i) * s`` with ``mu_i = sigmoid(alpha_i / T)``, ``alpha_i = 0``,
``T = 0.1``; one pre-norm transformer layer of width ``w`` (heads of 32 channels, feed-forward
``4 w``, no dropout) follows every rung. The side state is read out like the backbone pools
(first token for ``[CLS]``-pooled models, else the masked mean) and a fresh linear head
(zero-initialised) makes the prediction: the backbone's own head is not used, and with
``labels=`` the returned loss is that of the side network's logits (the model's own loss rule:
cross-entropy, MSE or BCE by ``config.problem_type``, as transformers classifiers).
Feature maps (CNNs, Swin) are averaged to a 2 x 2 grid of side tokens per block first.

How this differs from S2A's ``side`` module (:mod:`s2a.tuners.side`), which is also a ladder:
S2A shrinks the hidden states by PARAMETER-FREE channel average pooling (``D -> D/k``), so
nothing of width ``D`` is stored for backward, and uses MLP side blocks. LST's learned
down-projections must store every block's full-width hidden state (the input of a trainable
Linear), which is what this baseline measures. LST also initialises its side network from the
pruned backbone; here it starts randomly (no pruning), a simplification.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from s2a.models.sentence_pooling import masked_mean

from .registry import MethodContext, MethodNotApplicable, MethodResult, freeze

REDUCTION = 8
GRID = 2
TEMPERATURE = 0.1
LST_ATTR = "lst_side"


class LadderSideNetwork(nn.Module):
    """Down-projections, gates, side transformer layers and head (see the module docstring)."""

    def __init__(self, dims: list[int], num_classes: int, readout: str = "mean",
                 reduction: int = REDUCTION) -> None:
        super().__init__()
        width = max(8, math.ceil(dims[-1] / reduction))
        heads = max(1, width // 32)
        width = math.ceil(width / heads) * heads
        self.width, self.readout = width, readout
        self.down = nn.ModuleList(nn.Linear(d, width) for d in dims)
        self.alpha = nn.Parameter(torch.zeros(len(dims)))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in dims
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.layouts: list[str] = []  # of the backbone blocks read (set by attach_lst)
        self.captured: dict[int, torch.Tensor] = {}  # block outputs of the running forward

    def capture(self, index: int, _module: nn.Module, _args: Any, output: Any) -> None:
        """Forward hook of backbone block ``index``."""
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        self.captured[index] = _as_tokens(hidden.detach(), self.layouts[index]).to(self.input_dtype(hidden))

    def input_dtype(self, hidden: torch.Tensor) -> torch.dtype:
        """The dtype the down-projections compute in: autocast's where it is on for the hidden
        state's device (the cast autocast would make anyway, made once here, so that no
        full-precision copy of a block output stays alive), else their weights' (an fp32 side
        network beside a bf16 / fp16 backbone)."""
        kind = hidden.device.type
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
        return self.down[0].weight.dtype

    def forward(self, hiddens: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = None if mask is None else ~mask.to(torch.bool)
        state = None
        for i, h in enumerate(hiddens):
            x = self.down[i](h)
            if state is None:
                state = x
            else:
                mu = torch.sigmoid(self.alpha[i] / TEMPERATURE)
                state = mu * x + (1 - mu) * state
            keep = pad if pad is not None and pad.shape[1] == state.shape[1] else None
            state = self.layers[i](state, src_key_padding_mask=keep)
        state = self.norm(state)
        if self.readout == "first":
            pooled = state[:, 0]
        else:
            pooled = masked_mean(state, mask if mask is not None and mask.shape[1] == state.shape[1] else None)
        return self.head(pooled)


def _as_tokens(hidden: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nhwc":
        hidden = hidden.permute(0, 3, 1, 2)
    if layout in ("nchw", "nhwc"):
        return F.adaptive_avg_pool2d(hidden, GRID).flatten(2).transpose(1, 2)
    return hidden


def _set_logits(output: Any, logits: torch.Tensor, loss: torch.Tensor | None = None) -> Any:
    """``output`` with the side network's logits (and, for ``labels=``, their loss, first)."""
    if isinstance(output, torch.Tensor):
        return logits
    if isinstance(output, dict) or hasattr(output, "logits"):
        if loss is None:
            output["logits"] = logits
            return output
        fields = {**dict(output.items()), "logits": logits, "loss": loss}
        return type(output)(**fields)  # a ModelOutput: the loss takes its place in front
    if isinstance(output, tuple):
        return (logits, *output[1:]) if loss is None else (loss, logits, *output[1:])
    raise TypeError(f"LST: cannot place logits in a model output of type {type(output).__name__}")


def sequence_classification_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a transformers ``*ForSequenceClassification`` / ``*ForImageClassification``
    model computes from ``labels=`` (its ``config.problem_type``, inferred the same way when
    unset), on the side network's logits."""
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    if num_labels is None or not hasattr(config, "problem_type"):
        raise TypeError(f"LST: labels= given to {type(model).__name__}, whose loss rule LST does not know "
                        "(it knows transformers classifiers'); compute the loss from the returned logits")
    labels = labels.to(logits.device)
    problem = config.problem_type
    if problem is None:  # as transformers decides, and records, on the first call with labels
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
        config.problem_type = problem
    if problem == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze().float(), labels.squeeze().to(torch.float32))
        return F.mse_loss(logits.float(), labels.to(torch.float32))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels).float(), labels.view(-1))
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))
    raise ValueError(f"LST: {type(model).__name__} has config.problem_type={problem!r}, a loss rule LST "
                     "does not know; compute the loss from the returned logits")


class _LSTForward:
    """``model.forward`` while the side network is attached: the backbone without gradients,
    then the side network over the captured block outputs. A class over the model and the
    side network, not closures over them: a deep copy (an EMA, a teacher) runs its own
    backbone and side network, and the model pickles."""

    def __init__(self, model: nn.Module, original: Any) -> None:
        self.model = model
        self.original = original  # an instance-level forward that was replaced, or None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        side: LadderSideNetwork = getattr(self.model, LST_ATTR)
        side.captured = {}
        # the frozen head's loss would be the backbone's, without gradients: the loss of the
        # side network's logits is computed below instead
        labels = kwargs.pop("labels", None)
        with torch.no_grad():
            if self.original is not None:
                output = self.original(*args, **kwargs)
            else:
                output = type(self.model).forward(self.model, *args, **kwargs)
        captured, side.captured = side.captured, {}
        missing = [i for i in range(len(side.layouts)) if i not in captured]
        if missing:
            raise RuntimeError(f"LST: blocks {missing} did not run in the forward")
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        logits = side([captured[i] for i in range(len(side.layouts))], mask)
        loss = None if labels is None else sequence_classification_loss(self.model, logits, labels)
        return _set_logits(output, logits, loss)


def attach_lst(model: nn.Module, info: Any, num_classes: int) -> LadderSideNetwork:
    """Attach the side network as ``model.lst_side`` and patch ``model.forward`` (in place)."""
    layouts = [b.out_layout for b in info.blocks]  # of what it reads: the block outputs
    dims = [b.out_dim for b in info.blocks]
    readout = "first" if info.pooling == "cls" and all(lay == "tokens" for lay in layouts) else "mean"
    ref = next(model.parameters())
    side = LadderSideNetwork(dims, num_classes, readout).to(ref.device)
    side.layouts = layouts
    for i, block in enumerate(info.blocks):
        model.get_submodule(block.name).register_forward_hook(functools.partial(side.capture, i))
    original = model.__dict__.get("forward")
    model.add_module(LST_ATTR, side)
    model.forward = functools.update_wrapper(_LSTForward(model, original), original or type(model).forward)
    return side


def supports_lst(info: Any) -> str | None:
    kinds = {"tokens" if b.out_layout == "tokens" else "map" for b in info.blocks}
    if len(kinds) > 1:  # its ladder mixes one token sequence: 4 pooled cells beside 49 tokens
        return ("its ladder carries one sequence through every block, and these blocks output feature maps "
                "and then tokens (EfficientFormer's last stage)")
    return None


def apply_lst(model: nn.Module, ctx: MethodContext) -> MethodResult:
    info = ctx.info(model)
    if info.num_classes is None:
        raise MethodNotApplicable(f"--method lst: {type(model).__name__} has no classifier to take the class count from")
    freeze(model)
    side = attach_lst(model, info, info.num_classes)
    n = sum(p.numel() for p in side.parameters())
    return MethodResult(model, [
        f"Ladder Side-Tuning: side network of width {side.width} over {len(info.blocks)} blocks "
        f"({n:,} parameters) trains; backbone and its head frozen and run without gradients"
    ])
