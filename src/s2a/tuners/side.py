"""Lite side branch: a small ladder network that reads the frozen backbone's hidden states.

Each backbone block's output is shrunk by a parameter-free channel average pooling
(:func:`channel_pool`, groups of ``k`` consecutive channels averaged, ``D -> D/k``) and fed,
ladder fashion, into a few light side blocks of width ``D/k`` (:class:`LiteSideNetwork`). The
prediction comes from the side state, optionally fused with a linear head on the backbone's
pooled output through a learned gate. With the side branch as the only tuned module the backbone
runs under ``torch.no_grad()``, so it keeps no activation for backward at all: what is stored is
the side network's (pooled, ``1/k`` as wide) activations.

Integration (:func:`attach_side`)
---------------------------------
``attach_side(model, info, config)`` is called by ``s2a.apply``. It needs only the attributes
below (duck typing; see :class:`BackboneInfo` and :class:`SideConfig`):

``info`` (``s2a.models.BackboneInfo`` fits)
    * ``blocks``: the backbone blocks whose outputs feed the side network, in forward order:
      ``(path, module)`` tuples, or objects with ``name`` (the path) and optionally ``module``
      (else ``model.get_submodule(name)``).
    * ``layouts: list[str]``: layout of each block's output, ``"tokens"`` (B, N, D),
      ``"nchw"`` (B, C, H, W) or ``"nhwc"`` (B, H, W, C).
    * ``dims: list[int]``: channel dimension of each block's output.
    * ``num_classes: int | None``: used when ``config.num_classes`` is None.
    * optional, for ``fuse_side`` only (first available wins): ``pooled(output) -> Tensor``
      giving the backbone's pooled feature (B, D') from the forward output;
      ``classifier_names`` (the input of the first classifier is captured); otherwise the last
      block's output is pooled with ``pool(hidden, layout)`` if present, else a plain mean over
      tokens / space. Its width: ``pooled_dim``, ``feature_dim``, the classifier's
      ``in_features``, else ``dims[-1]``.
    * optional ``token_mask(args, kwargs) -> Tensor | None``: the (B, N) padding mask of a call
      (default: the forward's ``attention_mask`` argument when it is 2-D).

``config``
    ``side_reduction`` (k), ``side_depth``, ``fuse_side``, ``modules`` (tuple of str) and
    ``num_classes``.

Design choices (documented here once)
-------------------------------------
* **Width.** The side width is ``ceil(D_last / k)``. A block whose pooled width differs (the
  stages of hierarchical models, CNNs) is projected to it by a small ``Linear``; blocks of the
  side width enter without projection (plain ViT/BERT: no projection parameters at all).
* **Feature maps** (``"nchw"``/``"nhwc"``): after channel pooling they are averaged spatially
  to a ``feature_grid x feature_grid`` grid (default 1: global average pooling per stage), which
  becomes ``feature_grid**2`` side tokens. Every stage thus gives the same token count.
* **Token count changes** (e.g. Swin stages given as ``"tokens"``): when an input's token count
  differs from the running state's, the state is first reduced to its (masked) mean token and
  broadcast over the new tokens.
* **Ladder.** Backbone block ``i`` (of ``L``) feeds side block ``rungs[i]``; the blocks are
  spread evenly (``depth <= L``: consecutive groups, the last backbone block always feeds the
  last side block; ``depth > L``: backbone blocks spread over the side blocks, some side blocks
  only refine). Each input enters through a gate ``sigmoid(alpha_i)`` (``alpha_i = 0`` at
  initialisation, gate 0.5) and is added to the running state (which starts from the first
  input), then the side block updates the state residually.
* **Side blocks.** ``mixer="mlp"`` (default): pre-norm MLP ``x + W2 GELU(W1 LN(x))`` with
  hidden width ``mlp_ratio * width``, token-wise. ``mixer="attention"``: a tiny pre-norm
  self-attention (key padding mask honoured) before that MLP.
* **Readout.** Final LayerNorm, then the (masked) mean over tokens (``readout="mean"``) or the
  first token (``readout="first"``, e.g. CLS), then a linear head. Heads are zero-initialised
  (``zero_init_heads=True``), so the side network outputs exactly 0 at initialisation: combined
  with other modules, the model's output at initialisation is the backbone's.
* **Fusion** (``fuse=True``): ``logits = g * side + (1 - g) * Linear(backbone_pooled)`` with
  ``g = sigmoid(beta)``, ``beta = 0`` at initialisation.
* **Channel counts not divisible by k**: an error by default (``remainder="error"``, the message
  lists the offending blocks and the reductions that would work); ``remainder="partial"``
  averages the last, smaller group on its own (``ceil(D/k)`` outputs, no zero padding, so every
  output is a true mean).
* Pooling happens in the capture hooks, right after each block, so only the ``1/k``-size pooled
  states stay alive until the side network runs. Side parameters are float32 on the model's
  device; pooled states are cast to float32.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from s2a.models.registry import dry_run_input, eval_forward, refuse_sequence_first, runs_children
from s2a.models.sentence_pooling import masked_mean

__all__ = [
    "LAYOUTS",
    "BackboneInfo",
    "LiteSideNetwork",
    "SideBlockSpec",
    "SideConfig",
    "SideHandle",
    "attach_side",
    "channel_pool",
    "check_side",
    "detach_side",
]

LAYOUTS = ("tokens", "nchw", "nhwc")
_REMAINDERS = ("error", "partial")
_MIXERS = ("mlp", "attention")
_READOUTS = ("mean", "first")
SIDE_ATTR = "s2a_side"
HANDLE_ATTR = "_s2a_side_handle"


# ---------------------------------------------------------------------------- protocols
class BackboneInfo(Protocol):
    """What :func:`attach_side` reads from the adapter's description of a backbone."""

    blocks: Sequence[Any]  # (path, module) tuples or objects with .name [and .module]
    layouts: list[str]
    dims: list[int]
    num_classes: int | None


class SideConfig(Protocol):
    """What :func:`attach_side` reads from the S2A configuration."""

    side_reduction: int
    side_depth: int
    fuse_side: bool
    modules: tuple[str, ...]
    num_classes: int | None


class SideBlockSpec(NamedTuple):
    """Description of one backbone block output: its channel count and layout."""

    dim: int
    layout: str = "tokens"


# ---------------------------------------------------------------------------- pooling
def _check_reduction(k: Any, name: str = "reduction") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{name} must be an integer >= 1 (the channel group size k), got {k!r}")
    return k


def _check_layout(layout: Any) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def pooled_width(dim: int, k: int, remainder: str = "error") -> int:
    """Number of channels :func:`channel_pool` gives for ``dim`` channels."""
    if remainder not in _REMAINDERS:
        raise ValueError(f"remainder must be one of {_REMAINDERS}, got {remainder!r}")
    _check_reduction(k)
    if dim % k:
        if remainder == "error":
            raise ValueError(
                f"channel_pool: {dim} channels are not divisible by reduction k={k}; choose a k "
                f"that divides {dim} (e.g. {_divisors(dim)}) or pass remainder='partial'"
            )
        return -(-dim // k)
    return dim // k


def _divisors(n: int, limit: int = 64) -> list[int]:
    return [d for d in range(2, min(n, limit) + 1) if n % d == 0][:8]


def channel_pool(
    x: torch.Tensor, k: int, layout: str = "tokens", *, remainder: str = "error"
) -> torch.Tensor:
    """Parameter-free channel average pooling: groups of ``k`` consecutive channels averaged.

    ``layout``: ``"tokens"`` (channels last, any rank >= 2, e.g. (B, N, D)), ``"nhwc"``
    (B, H, W, C) or ``"nchw"`` (B, C, H, W). The channel dimension ``D`` becomes ``D / k``;
    output channel ``j`` is the mean of input channels ``j*k .. j*k+k-1``. Other dimensions and
    the layout are unchanged. ``k = 1`` returns ``x`` itself.

    ``D`` not divisible by ``k``: ``remainder="error"`` (default) raises ``ValueError``;
    ``remainder="partial"`` averages the last ``D mod k`` channels as a smaller group
    (``ceil(D / k)`` outputs; no zero padding, every output is a true mean).

    The backward of the means stores nothing (only shapes), so the pooling adds no saved
    activation even when gradients flow through it.
    """
    _check_layout(layout)
    _check_reduction(k)
    if layout == "nchw":
        if x.dim() != 4:
            raise ValueError(f"channel_pool: layout 'nchw' expects a 4-D tensor, got shape {tuple(x.shape)}")
        cdim = 1
    else:
        if layout == "nhwc" and x.dim() != 4:
            raise ValueError(f"channel_pool: layout 'nhwc' expects a 4-D tensor, got shape {tuple(x.shape)}")
        if x.dim() < 2:
            raise ValueError(f"channel_pool: layout 'tokens' expects rank >= 2, got shape {tuple(x.shape)}")
        cdim = x.dim() - 1
    d = x.shape[cdim]
    pooled_width(d, k, remainder)  # validates
    if k == 1:
        return x
    full = (d // k) * k
    parts = []
    if full:
        head = x.narrow(cdim, 0, full) if full != d else x
        parts.append(head.unflatten(cdim, (full // k, k)).mean(cdim + 1))
    if full != d:
        parts.append(x.narrow(cdim, full, d - full).mean(cdim, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cdim)


def _spatial_pool_nchw(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C) tokens by spatial averaging."""
    if grid == 1:
        return x.mean(dim=(-2, -1)).unsqueeze(1)
    h, w = x.shape[-2:]
    if h % grid == 0 and w % grid == 0:  # reshape + mean: its backward saves nothing
        x = x.unflatten(-1, (grid, w // grid)).unflatten(-3, (grid, h // grid)).mean(dim=(-3, -1))
    else:
        x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------- side network
class _SideBlock(nn.Module):
    """Pre-norm residual side block: [attention] + MLP, width ``width``."""

    def __init__(self, width: int, mlp_ratio: float, mixer: str) -> None:
        super().__init__()
        hidden = max(1, round(width * mlp_ratio))
        self.attn: nn.Module | None = None
        if mixer == "attention":
            self.attn = _SideAttention(width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.attn(x, mask)
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class _SideAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        heads = next(h for h in range(max(1, width // 32), 0, -1) if width % h == 0)
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None
        if mask is not None:
            attn_mask = mask.to(torch.bool)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


def _rungs(num_blocks: int, depth: int) -> list[int]:
    """Side block fed by each backbone block (see the module docstring)."""
    if depth <= num_blocks:
        return [-(-(i + 1) * depth // num_blocks) - 1 for i in range(num_blocks)]
    if num_blocks == 1:
        return [0]
    return [round(i * (depth - 1) / (num_blocks - 1)) for i in range(num_blocks)]


class LiteSideNetwork(nn.Module):
    """Ladder side network at width ``D_last / k`` fed by channel-pooled backbone states.

    Args:
        blocks: one ``(dim, layout)`` per backbone block output, in forward order
            (:class:`SideBlockSpec` or plain tuples); layout in :data:`LAYOUTS`.
        reduction: channel pooling group size ``k``.
        depth: number of light side blocks.
        num_classes: outputs of the head.
        backbone_dim: width of the backbone's pooled output (required with ``fuse``).
        fuse: fuse the side logits with a linear head on the backbone's pooled output through a
            learned gate ``sigmoid(beta)`` (``beta = 0`` at initialisation).
        mlp_ratio: hidden width of the side MLPs relative to the side width.
        mixer: ``"mlp"`` (token-wise MLP blocks) or ``"attention"`` (tiny attention + MLP).
        readout: ``"mean"`` (masked mean over tokens) or ``"first"`` (first token, e.g. CLS).
        feature_grid: feature maps are averaged to ``feature_grid x feature_grid`` side tokens.
        remainder: ``"error"`` or ``"partial"``, see :func:`channel_pool`.
        width: side width (default ``ceil(dims[-1] / k)``).
        zero_init_heads: zero-initialise the heads (the network outputs 0 at initialisation).

    See the module docstring for the design. Call it with the raw block outputs
    (``forward(hiddens)``) or with states already pooled by :meth:`pool_hidden`
    (``forward(pooled, pre_pooled=True)``).
    """

    def __init__(
        self,
        blocks: Sequence[SideBlockSpec | tuple[int, str]],
        reduction: int,
        depth: int,
        num_classes: int,
        backbone_dim: int | None = None,
        fuse: bool = False,
        *,
        mlp_ratio: float = 2.0,
        mixer: str = "mlp",
        readout: str = "mean",
        feature_grid: int = 1,
        remainder: str = "error",
        width: int | None = None,
        zero_init_heads: bool = True,
    ) -> None:
        super().__init__()
        specs = [SideBlockSpec(*b) if not isinstance(b, SideBlockSpec) else b for b in blocks]
        if not specs:
            raise ValueError("LiteSideNetwork needs at least one backbone block description")
        k = _check_reduction(reduction, "reduction (side_reduction)")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth (side_depth) must be an integer >= 1, got {depth!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        for name, value, allowed in (
            ("mixer", mixer, _MIXERS), ("readout", readout, _READOUTS), ("remainder", remainder, _REMAINDERS)
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if isinstance(feature_grid, bool) or not isinstance(feature_grid, int) or feature_grid < 1:
            raise ValueError(f"feature_grid must be an integer >= 1, got {feature_grid!r}")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        problem = _reduction_problem(specs, k, remainder)
        if problem:
            raise ValueError(problem + ("" if remainder == "partial" else "; or use remainder='partial'"))
        if fuse and backbone_dim is None:
            raise ValueError("fuse=True needs backbone_dim (width of the backbone's pooled output)")

        self.specs = specs
        self.reduction = k
        self.depth = depth
        self.num_classes = num_classes
        self.readout = readout
        self.feature_grid = feature_grid
        self.remainder = remainder
        self.pooled_dims = [pooled_width(s.dim, k, remainder) for s in specs]
        self.width = int(width) if width is not None else self.pooled_dims[-1]
        self.rungs = _rungs(len(specs), depth)

        self.gate_logits = nn.Parameter(torch.zeros(len(specs)))
        self.proj = nn.ModuleList(
            nn.Identity() if d == self.width else nn.Linear(d, self.width) for d in self.pooled_dims
        )
        self.blocks = nn.ModuleList(_SideBlock(self.width, mlp_ratio, mixer) for _ in range(depth))
        self.norm = nn.LayerNorm(self.width)
        self.head = nn.Linear(self.width, num_classes)
        self.fuse = bool(fuse)
        self.backbone_dim = backbone_dim
        if self.fuse:
            self.backbone_head = nn.Linear(int(backbone_dim), num_classes)
            self.fuse_logit = nn.Parameter(torch.zeros(()))
        if zero_init_heads:
            heads = [self.head, self.backbone_head] if self.fuse else [self.head]
            for h in heads:
                nn.init.zeros_(h.weight)
                nn.init.zeros_(h.bias)

    # ------------------------------------------------------------------ pieces
    def pool_hidden(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Pooled side input of backbone block ``index``: (B, tokens, pooled_dims[index]).

        Channel pooling, then (feature maps) spatial averaging to ``feature_grid**2`` tokens.
        Parameter-free; its backward stores nothing unless a non-divisible spatial grid needs
        ``adaptive_avg_pool2d``.
        """
        spec = self.specs[index]
        expected_rank = 3 if spec.layout == "tokens" else 4
        if hidden.dim() != expected_rank:
            raise ValueError(
                f"side input {index}: layout {spec.layout!r} expects a {expected_rank}-D tensor, "
                f"got shape {tuple(hidden.shape)}"
            )
        cdim = 1 if spec.layout == "nchw" else -1
        if hidden.shape[cdim] != spec.dim:
            raise ValueError(
                f"side input {index}: expected {spec.dim} channels ({spec.layout}), got shape "
                f"{tuple(hidden.shape)}"
            )
        x = channel_pool(hidden, self.reduction, spec.layout, remainder=self.remainder)
        if spec.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        if spec.layout != "tokens":
            x = _spatial_pool_nchw(x, self.feature_grid)
        return x

    @staticmethod
    def _mask_for(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return mask if mask is not None and mask.shape[1] == n else None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hiddens: Sequence[torch.Tensor],
        backbone_pooled: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        *,
        pre_pooled: bool = False,
    ) -> torch.Tensor:
        """Logits (B, num_classes) from the backbone block outputs ``hiddens`` (in order).

        ``token_mask`` (B, N): 1/True for real tokens, 0/False for padding; the readout is then a
        masked mean (attention mixers also mask the padded keys), so padded positions never
        change the logits. It applies to side states with N tokens (text); others ignore it.
        ``pre_pooled``: ``hiddens`` are already the outputs of :meth:`pool_hidden`.
        """
        if len(hiddens) != len(self.specs):
            raise ValueError(
                f"LiteSideNetwork expects {len(self.specs)} hidden states, got {len(hiddens)}"
            )
        if self.fuse and backbone_pooled is None:
            raise ValueError("this side network fuses with the backbone: pass backbone_pooled")
        dtype = self.gate_logits.dtype
        if token_mask is not None:
            if token_mask.dim() != 2:
                raise ValueError(f"token_mask must be (B, N), got shape {tuple(token_mask.shape)}")
            token_mask = token_mask.to(device=self.gate_logits.device, dtype=torch.bool)
        gates = torch.sigmoid(self.gate_logits)
        inputs: list[list[int]] = [[] for _ in range(self.depth)]
        for i, rung in enumerate(self.rungs):
            inputs[rung].append(i)

        state: torch.Tensor | None = None
        for j, block in enumerate(self.blocks):
            for i in inputs[j]:
                p = hiddens[i] if pre_pooled else self.pool_hidden(i, hiddens[i])
                x = gates[i] * self.proj[i](p.to(dtype))
                if state is None:
                    state = x
                elif state.shape[1] == x.shape[1]:
                    state = state + x
                else:  # token count changed: carry the mean token over
                    state = masked_mean(state, self._mask_for(token_mask, state.shape[1]), True) + x
            if state is not None:
                state = block(state, self._mask_for(token_mask, state.shape[1]))
        assert state is not None  # the first side block always gets backbone block 0
        state = self.norm(state)
        if self.readout == "first":
            feat = state[:, 0]
        else:
            feat = masked_mean(state, self._mask_for(token_mask, state.shape[1]))
        logits = self.head(feat)
        if self.fuse:
            assert backbone_pooled is not None
            if backbone_pooled.dim() != 2 or backbone_pooled.shape[-1] != self.backbone_dim:
                raise ValueError(
                    f"backbone_pooled must be (B, {self.backbone_dim}), got shape "
                    f"{tuple(backbone_pooled.shape)}"
                )
            g = torch.sigmoid(self.fuse_logit)
            logits = g * logits + (1 - g) * self.backbone_head(backbone_pooled.to(dtype))
        return logits

    def extra_repr(self) -> str:
        return (
            f"blocks={len(self.specs)}, reduction={self.reduction}, width={self.width}, "
            f"depth={self.depth}, rungs={self.rungs}, fuse={self.fuse}"
        )


def _reduction_problem(specs: Sequence[SideBlockSpec], k: int, remainder: str) -> str | None:
    """Why ``k`` cannot pool these blocks (None if it can); validates each block's layout/dim."""
    bad_dims = []
    for i, spec in enumerate(specs):
        _check_layout(spec.layout)
        if isinstance(spec.dim, bool) or not isinstance(spec.dim, int) or spec.dim < 1:
            raise ValueError(f"block {i}: dim must be a positive integer, got {spec.dim!r}")
        if spec.dim < k or (spec.dim % k and remainder == "error"):
            bad_dims.append((i, spec.dim))
    if not bad_dims:
        return None
    dims = sorted({d for _, d in bad_dims})
    common = [d for d in range(1, 65) if all(s.dim % d == 0 for s in specs)]
    return (f"reduction (side_reduction) k={k} does not divide the channel count of blocks "
            f"{[i for i, _ in bad_dims]} (channels {dims}); reductions dividing every block: {common}")


def _check_home(model: nn.Module) -> None:
    if runs_children(model):
        raise ValueError(
            f"the side network cannot be attached to a bare {type(model).__name__}: it is registered "
            f"as model.{SIDE_ATTR}, and this container's forward runs every child as a layer. Wrap "
            "the model in an nn.Module whose forward calls it")


def _refuse_layerdrop(model: nn.Module) -> None:
    for name in ("layerdrop", "encoder_layerdrop", "decoder_layerdrop"):
        rate = getattr(getattr(model, "config", None), name, None)
        if isinstance(rate, (int, float)) and rate > 0:  # wav2vec2, HuBERT: blocks skipped at random in training
            raise ValueError(
                f"the side branch reads every block's output and LayerDrop skips blocks in training "
                f"(config.{name}={rate}): set model.config.{name} = 0.0 before s2a.apply, or leave 'side' "
                "out of modules")


def _out_layouts(info: Any) -> list[str]:
    """The layouts of the block outputs the side branch reads (a hand-made info: its layouts)."""
    return list(getattr(info, "out_layouts", None) or info.layouts)


def check_side(info: BackboneInfo, config: SideConfig, model: nn.Module | None = None,
               example_input: Any = None) -> None:
    """Raise the ValueError :func:`attach_side` would raise for this backbone (``model``, when
    given) and config, before anything is changed (``s2a.apply`` calls it first, so that a bad
    config leaves the model untouched). With ``model``, a head that does not make one
    prediction per input is refused too (a dry run on ``example_input``, see
    :func:`_check_per_input_head`)."""
    if model is not None:
        _check_home(model)
        _refuse_layerdrop(model)
    refuse_sequence_first(info, "side branch")
    dims = [int(d) for d in info.dims]
    if not dims:
        raise ValueError("the side branch needs blocks, and this backbone has none that s2a found")
    if not (getattr(config, "num_classes", None) or getattr(info, "num_classes", None)):
        raise ValueError("the side branch makes the prediction: set num_classes (this backbone has no "
                         "classifier head to take it from)")
    problem = _reduction_problem([SideBlockSpec(d, lay) for d, lay in zip(dims, _out_layouts(info), strict=True)],
                                 _check_reduction(config.side_reduction, "side_reduction"), "error")
    if problem:
        raise ValueError(problem)
    if model is not None:
        _check_per_input_head(model, info, example_input)


def _rows(out: Any) -> int | None:
    try:
        return _first_tensor(out).shape[0]
    except TypeError:
        return None


def _check_per_input_head(model: nn.Module, info: Any, example_input: Any) -> None:
    """The side network makes one prediction per input (a sequence, an image), which replaces
    or is added to the head's: refuse a head that makes another kind (one per token, QA's
    start / end logits, one per choice), whose output the side branch would silently drop."""
    if not getattr(info, "head_names", ()):
        return  # a bare backbone: the side network's logits become its output
    rows: list[int | None] = []
    last = _resolve_blocks(model, info)[-1][1]
    hook = last.register_forward_hook(lambda _m, _a, out: rows.append(_rows(out)))
    try:
        with torch.no_grad():
            out = eval_forward(model, dry_run_input(model, example_input, getattr(info, "adapter", None)))
    finally:
        hook.remove()
    logits, batch = _get_logits(out), rows[-1] if rows else None
    if logits is None:
        keys = [k for k in (out.keys() if isinstance(out, Mapping) else ()) if str(k).endswith("logits")]
        why = f"its output has no logits ({', '.join(keys)})" if keys else "its output has no logits"
    elif logits.dim() != 2:
        why = f"its logits have shape {tuple(logits.shape)}" + (f" for a batch of {batch}" if batch else "")
    elif batch is not None and batch != logits.shape[0]:
        why = f"its logits have shape {tuple(logits.shape)} while its blocks see {batch} rows"
    else:
        return
    raise ValueError(
        f"the side branch makes one prediction per input (logits of shape (batch, num_classes)), but "
        f"{type(model).__name__}'s head {tuple(info.head_names)} makes another kind: {why}. Use 'side' "
        "with a sequence or image classification model (or a bare backbone and num_classes), or "
        "leave 'side' out of modules")


# ---------------------------------------------------------------------------- integration
def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"side branch: cannot find the hidden state in a block output of type {type(out).__name__}")


def _get_logits(output: Any, with_loss: bool = False) -> torch.Tensor | None:
    """The logits in a forward output; ``with_loss``: labels were passed, so a plain tuple
    (transformers' ``return_dict=False``) starts with the loss."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        i = 1 if with_loss else 0
        v = output[i] if len(output) > i else None
        return v if isinstance(v, torch.Tensor) else None
    if isinstance(output, Mapping):
        v = output.get("logits")
        return v if isinstance(v, torch.Tensor) else None
    v = getattr(output, "logits", None)
    return v if isinstance(v, torch.Tensor) else None


def _hf_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss a transformers sequence-classification head computes (problem_type rules)."""
    cfg = getattr(model, "config", None)
    problem = getattr(cfg, "problem_type", None)
    n = logits.shape[-1]
    labels = labels.to(logits.device)
    if problem is None:
        if n == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        if n == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _with_logits(model: nn.Module, output: Any, logits: torch.Tensor, labels: Any) -> Any:
    """``output`` with its logits replaced (see :func:`attach_side`)."""
    if isinstance(output, torch.Tensor):
        return logits
    loss = _hf_loss(model, logits, labels) if isinstance(labels, torch.Tensor) else None
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        if loss is not None:
            return (loss, logits, *output[2:])
        return (logits, *output[1:])
    if isinstance(output, Mapping) and "logits" in output:
        if hasattr(output, "__dataclass_fields__"):  # transformers ModelOutput: keys + attributes
            output["logits"] = logits
            if loss is not None:
                output["loss"] = loss
            return output
        new = dict(output)
        new["logits"] = logits
        if loss is not None:
            new["loss"] = loss
        return new
    if hasattr(output, "logits"):
        output.logits = logits
        if loss is not None and hasattr(output, "loss"):
            output.loss = loss
        return output
    try:  # a transformers base model (no head): a classification output
        from transformers.modeling_outputs import SequenceClassifierOutput
    except ImportError:  # pragma: no cover - transformers is a dependency
        return logits
    return SequenceClassifierOutput(
        loss=loss,
        logits=logits,
        hidden_states=getattr(output, "hidden_states", None),
        attentions=getattr(output, "attentions", None),
    )


class SideHandle:
    """What :func:`attach_side` returns: ``network``, ``side_only``, and ``remove()``.

    It also holds everything the wrapped forward and the capture hooks use: they are
    ``partial`` objects of module-level functions over this handle, never closures, so that a
    deepcopy of the model (an EMA or teacher copy) gets its own handle bound to its own
    modules, and the model still pickles."""

    def __init__(self, model: nn.Module, network: LiteSideNetwork, side_only: bool) -> None:
        self.model = model
        self.network = network
        self.side_only = side_only
        self.hook_handles: list[Any] = []
        self.active = 0
        self.captured: dict[int, torch.Tensor] = {}
        self.had_instance_forward = "forward" in model.__dict__
        self.previous_forward = model.__dict__.get("forward")
        self.original_forward: Callable[..., Any] = model.forward
        self.positional_names: tuple[str, ...] | None = None  # of original_forward, in order
        self.wrapped_forward: Callable[..., Any] | None = None
        self.removed = False
        # set by attach_side
        self.block_paths: list[str] = []
        self.layouts: list[str] = []
        self.fuse = False
        self.pool_last = False
        self.pooled_fn: Callable[[Any], torch.Tensor] | None = None
        self.pool_fn: Callable[..., torch.Tensor] | None = None
        self.pool_takes_mask = False
        self.call_mask: torch.Tensor | None = None  # the running forward's token mask
        self.mask_fn: Callable[[tuple, dict], torch.Tensor | None] | None = None
        # side only: backbone parameters frozen when attached; one unfrozen since (by hand, after
        # s2a.apply) makes the backbone run with grad, else it would silently never train
        # (held as (module, name): to_empty / load_state_dict(assign=True) put new Parameters there)
        self.frozen: tuple[tuple[nn.Module, str], ...] = ()
        self.detach = side_only  # the running forward's: keep the backbone out of autograd

    def remove(self) -> None:
        """Undo :func:`attach_side`: hooks, the forward wrapper and ``model.s2a_side``."""
        if self.removed:
            return
        from .model import STATE_ATTR  # (model imports this module)

        if getattr(self.model, STATE_ATTR, None) is not None:
            raise RuntimeError(
                "this side branch belongs to a model prepared by s2a.apply, whose tuned tensors, "
                "save_tuned and load_tuned count on it; s2a has no undo of apply: build a fresh model "
                "(and s2a.apply it without 'side' in modules) instead of removing the side branch")
        current = self.model.__dict__.get("forward")
        if current is not self.wrapped_forward:
            raise RuntimeError(
                "model.forward was replaced after attach_side; undo that wrapper first"
            )
        for h in self.hook_handles:
            h.remove()
        self.hook_handles.clear()
        if self.had_instance_forward:
            self.model.forward = self.previous_forward
        else:
            del self.model.__dict__["forward"]
        if getattr(self.model, SIDE_ATTR, None) is self.network:
            delattr(self.model, SIDE_ATTR)
        if self.model.__dict__.get(HANDLE_ATTR) is self:
            del self.model.__dict__[HANDLE_ATTR]
        self.captured.clear()
        self.removed = True

    def call_argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The value the original forward receives as ``name`` (keyword or positional)."""
        if name in kwargs:
            return kwargs[name]
        if self.positional_names is None:  # once: inspect.signature costs tens of µs per call
            try:
                params = inspect.signature(self.original_forward).parameters.values()
            except (TypeError, ValueError):
                params = []
            names = []
            for p in params:
                if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                    break
                names.append(p.name)
            self.positional_names = tuple(names)
        names = self.positional_names[: len(args)]
        return args[names.index(name)] if name in names else None


class _SideForward:
    """``model.forward`` while a side branch is attached (see :func:`attach_side`). A class, not
    a closure, for deepcopy and pickling; it shows the original forward's signature (the
    transformers Trainer reads it to pick the batch columns)."""

    def __init__(self, handle: SideHandle) -> None:
        self.handle = handle

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.handle.original_forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = self.handle
        h.captured = {}
        outer_mask, h.call_mask = h.call_mask, self._mask(args, kwargs)
        mask = h.call_mask
        outer_detach = h.detach
        # a side-only backbone runs without a graph unless something asks for its gradient: a
        # parameter unfrozen by hand, or an input that requires grad (saliency, adversarial steps)
        h.detach = detach = h.side_only and not any(_trains(m, n) for m, n in h.frozen) and not any(
            isinstance(v, torch.Tensor) and v.requires_grad for v in (*args, *kwargs.values()))
        h.active += 1
        try:
            with torch.no_grad() if detach else contextlib.nullcontext():
                output = h.original_forward(*args, **kwargs)
                pooled = h.pooled_fn(output) if h.pooled_fn is not None else None
        finally:
            h.active -= 1
            h.call_mask, h.detach = outer_mask, outer_detach  # a nested call gives the outer one its own back
        captured, h.captured = h.captured, {}
        missing = [h.block_paths[i] for i in range(len(h.block_paths)) if i not in captured]
        if missing:
            raise RuntimeError(f"side branch: these blocks did not run in the forward: {missing} (the side "
                               "branch reads every block: a forward that skips blocks, such as LayerDrop's, "
                               "cannot run with it)")
        if h.fuse and pooled is None:
            pooled = captured.get(-1)
            if pooled is None:
                raise RuntimeError("side branch: no pooled backbone output was found but fuse_side=True")
        if pooled is not None:
            pooled = _compact(pooled.detach() if detach else pooled)
        hiddens = [captured[i] for i in range(len(h.block_paths))]
        frames = getattr(h.model, "_get_feature_vector_attention_mask", None)
        if mask is not None and callable(frames) and h.layouts[-1] == "tokens" and mask.shape[1] != hiddens[-1].shape[1]:
            mask = frames(hiddens[-1].shape[1], mask)  # transformers audio models: a mask per sample, blocks see frames
        side = h.network(hiddens, pooled, mask, pre_pooled=True)
        labels = h.call_argument("labels", args, kwargs)
        logits = side
        if not h.side_only:
            own = _get_logits(output, with_loss=isinstance(labels, torch.Tensor))
            if own is not None and own.dim() == 2 and own.shape == side.shape:
                logits = own + side
        return _with_logits(h.model, output, logits, labels)

    def _mask(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        h = self.handle
        if h.mask_fn is not None:
            return h.mask_fn(args, kwargs)
        mask = h.call_argument("attention_mask", args, kwargs)
        return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _trains(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.requires_grad


def _capture_block(handle: SideHandle, index: int, _module: nn.Module, _args: Any, output: Any) -> None:
    if not handle.active:
        return
    hidden = _first_tensor(output)
    if handle.detach:
        hidden = hidden.detach()
    handle.captured[index] = _compact(handle.network.pool_hidden(index, hidden))
    if handle.pool_last and index == len(handle.block_paths) - 1:
        handle.captured[-1] = _compact(_pool(handle, hidden, handle.layouts[index]))


def _capture_classifier_input(handle: SideHandle, _module: nn.Module, args: tuple) -> None:
    if handle.active and -1 not in handle.captured and args:
        x = args[0]
        if x.dim() == 3:
            x = _pool(handle, x, "tokens")
        elif x.dim() == 4:  # a 1x1 conv classifier (timm ResNetV2) reads the pooled (B, C, 1, 1) map
            x = x.mean(dim=(2, 3))
        handle.captured[-1] = _compact(x.detach() if handle.detach else x)


def _resolve_blocks(model: nn.Module, info: Any) -> list[tuple[str, nn.Module]]:
    """``info.blocks`` as ``(path, module)``: tuples, or objects with ``name`` [and ``module``]."""
    out = []
    for b in info.blocks:
        if isinstance(b, tuple):
            name, module = b
        else:
            name = b.name
            module = getattr(b, "module", None)
            if module is None:
                module = model.get_submodule(name)
        if not isinstance(module, nn.Module):
            raise TypeError(f"attach_side: block {name!r} is not an nn.Module ({type(module).__name__})")
        out.append((str(name), module))
    return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied when it is a view into a larger storage (a kept view keeps it all alive).
    (While compiling, the storage cannot be traced: a non-contiguous tensor stands for such a
    view, as in the head's input copy of :mod:`s2a.tuners.model`.)"""
    if torch.compiler.is_compiling():
        return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
    try:
        larger = t.untyped_storage().nbytes() > t.numel() * t.element_size()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - odd tensor subclasses
        return t
    return t.clone(memory_format=torch.contiguous_format) if larger else t


def _pool(handle: SideHandle, hidden: torch.Tensor, layout: str) -> torch.Tensor:
    """The backbone's pooling of ``hidden``; tokens without padding (a decoder's last token is
    its last real one: text batches are padded on the right)."""
    mask = handle.call_mask
    if layout != "tokens" or mask is None or mask.shape != hidden.shape[:2]:
        mask = None
    if handle.pool_fn is not None:
        return handle.pool_fn(hidden, layout, mask=mask) if handle.pool_takes_mask else handle.pool_fn(hidden, layout)
    if layout == "nchw":
        return hidden.mean(dim=(2, 3))
    if layout == "nhwc":
        return hidden.mean(dim=(1, 2))
    return masked_mean(hidden, mask)


def detach_side(model: nn.Module) -> bool:
    """Undo :func:`attach_side` on ``model`` (if attached); True if something was removed. A
    model prepared by ``s2a.apply`` is refused (RuntimeError): its tuner state counts on the
    side branch."""
    handle = model.__dict__.get(HANDLE_ATTR)
    if handle is None:
        return False
    handle.remove()
    return True


def attach_side(model: nn.Module, info: BackboneInfo, config: SideConfig) -> SideHandle:
    """Attach a :class:`LiteSideNetwork` to ``model`` in place; returns a :class:`SideHandle`.

    * Registers the side network as ``model.s2a_side`` (its parameters live in the model's
      ``state_dict`` and require grad); the handle is also kept as ``model._s2a_side_handle``
      (:func:`detach_side` finds it there).
    * Forward hooks on ``info.blocks`` capture and pool each block's output while the wrapped
      forward runs (detached when ``"side"`` is the only module, so no gradient reaches the
      backbone).
    * ``model.forward`` becomes an instance attribute that:

      - side only: runs the original forward under ``torch.no_grad()`` (the backbone saves
        nothing for backward), then the side network with autograd in the caller's grad mode;
        the result replaces the model's logits. A backbone parameter frozen at attach time and
        unfrozen since (a block unfrozen by hand after ``s2a.apply``) makes the backbone run, at
        that call, with grad and undetached, so that it trains;
      - combined with other modules: runs the backbone normally; the side output is added to the
        model's logits when they have ``num_classes`` columns, else it replaces them.

      Outputs: a tensor becomes the logits tensor; an object with ``logits`` (transformers
      ``ModelOutput``, dict) gets them replaced, and its ``loss`` recomputed from the new logits
      when ``labels=`` was passed (transformers' ``problem_type`` rules); a transformers output
      without ``logits`` (a base model) becomes a ``SequenceClassifierOutput``; a tuple gets its
      first element (second after a loss, when labels were passed) replaced.
    * ``fuse_side``: the backbone's pooled feature is ``info.pooled(output)`` when ``info`` has
      that callable; else the input of the first classifier ``info.classifier_names[0]``
      (captured by a pre-hook; pooled by ``info.pool`` if still 3-D, averaged over space if
      4-D); else the last block's output pooled by ``info.pool(hidden, layout)`` (or a plain
      token / spatial mean). Its width is ``info.pooled_dim`` or ``info.feature_dim``
      (classifier input), else ``dims[-1]``.
    * The padding mask for text is ``info.token_mask(args, kwargs)`` if ``info`` has it, else
      the forward's ``attention_mask`` argument when it is 2-D.
    """
    modules = tuple(getattr(config, "modules", ("side",)))
    if "side" not in modules:
        raise ValueError(f"attach_side called but 'side' is not in config.modules {modules}")
    side_only = set(modules) == {"side"}
    if hasattr(model, SIDE_ATTR) or HANDLE_ATTR in model.__dict__:
        raise RuntimeError(f"model already has a side network ({SIDE_ATTR}); remove it first")
    _check_home(model)
    _refuse_layerdrop(model)
    blocks = _resolve_blocks(model, info)
    layouts = _out_layouts(info)
    dims = [int(d) for d in info.dims]
    if not blocks:
        raise ValueError("attach_side: info.blocks is empty")
    if not len(blocks) == len(layouts) == len(dims):
        raise ValueError(
            f"attach_side: info.blocks ({len(blocks)}), info.layouts ({len(layouts)}) and "
            f"info.dims ({len(dims)}) must have the same length"
        )
    num_classes = getattr(config, "num_classes", None) or getattr(info, "num_classes", None)
    if num_classes is None:
        raise ValueError("attach_side: num_classes is unknown (set config.num_classes)")

    # where the backbone's pooled feature comes from (fuse_side only)
    fuse = bool(getattr(config, "fuse_side", False))
    pooled_fn = getattr(info, "pooled", None) if fuse else None
    if pooled_fn is not None and not callable(pooled_fn):
        raise TypeError("attach_side: info.pooled must be a callable pooled(output) -> Tensor")
    classifier: nn.Module | None = None
    backbone_dim = getattr(info, "pooled_dim", None)
    if fuse and pooled_fn is None:
        names = tuple(getattr(info, "classifier_names", ()) or ())
        if names:
            classifier = model.get_submodule(names[0])
            backbone_dim = backbone_dim or getattr(info, "feature_dim", None)
            if backbone_dim is None and isinstance(classifier, nn.Linear):
                backbone_dim = classifier.in_features
    backbone_dim = int(backbone_dim or dims[-1])
    network = LiteSideNetwork(
        list(zip(dims, layouts, strict=True)),
        reduction=config.side_reduction,
        depth=config.side_depth,
        num_classes=int(num_classes),
        backbone_dim=backbone_dim if fuse else None,
        fuse=fuse,
    )
    ref = next(model.parameters(), None)
    if ref is not None:
        network.to(device=ref.device)
    for p in network.parameters():
        p.requires_grad_(True)

    handle = SideHandle(model, network, side_only)
    if side_only:
        handle.frozen = tuple((m, n) for m in model.modules() for n, p in m._parameters.items()
                              if p is not None and not p.requires_grad)
    handle.block_paths = [path for path, _ in blocks]
    handle.layouts = layouts
    handle.fuse = fuse
    handle.pool_last = fuse and pooled_fn is None and classifier is None
    handle.pooled_fn = pooled_fn
    info_pool = getattr(info, "pool", None)
    handle.pool_fn = info_pool if callable(info_pool) else None
    if handle.pool_fn is not None:
        try:
            handle.pool_takes_mask = "mask" in inspect.signature(handle.pool_fn).parameters
        except (TypeError, ValueError):
            handle.pool_takes_mask = False
    handle.mask_fn = getattr(info, "token_mask", None)
    for index, (_path, block) in enumerate(blocks):
        handle.hook_handles.append(block.register_forward_hook(functools.partial(_capture_block, handle, index)))
    if classifier is not None:
        handle.hook_handles.append(
            classifier.register_forward_pre_hook(functools.partial(_capture_classifier_input, handle)))
    forward = _SideForward(handle)
    model.add_module(SIDE_ATTR, network)
    model.forward = forward
    handle.wrapped_forward = forward
    model.__dict__[HANDLE_ATTR] = handle
    return handle
