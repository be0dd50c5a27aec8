"""The low-rank prompt module: ``X' = X + A·B`` at the input of every block.

``A`` is (positions x r), ``B`` is (r x channels). Positions are the tokens of a
(B, N, D) sequence (prefix tokens included), or the H*W grid of a block's
(B, C, H, W) / (B, H, W, C) input. ``A`` starts at zero and ``B`` random
(std ``r ** -0.5``, so that once A moves the prompt has A's scale), so the model's
output at initialisation is exactly the pretrained one.

Gradients: ``dL/dA = dL/dX' · B^T`` and ``dL/dB = A^T · dL/dX'`` (summed over the
batch). Autograd keeps only A and B (parameters) for the matmul and nothing for the
add: the block input is never stored for the prompt.

Text: ``A`` covers the model's maximum sequence length and is sliced to the actual
length; a token whose position is not its index gathers the row of its position: the
model's ``position_ids``, else counted along a left-padded ``attention_mask`` or after a
KV cache (:func:`token_positions`), else the ``position_ids`` its block receives. Images (feature maps, and the tokens of ViTs or of any model the
generic fallback describes from an image input, see ``BackboneInfo.fixed_tokens``): the grid
is the one of the dry run (``example_input``), other sizes raise an error.

Applied by a forward pre-hook on each block, and registered as the block's child module
``s2a_prompt`` (state-dict keys ``<block>.s2a_prompt.A`` / ``.B``), except where the block is a
container whose forward runs every child as a layer (``nn.Sequential``, a ModuleList /
ModuleDict with a forward: the stages of timm's MobileNetV3, GhostNet, MobileViT, the dense
blocks of DenseNet): there a child would be run once more as the block's last layer, so the
prompt lives in ``s2a_prompts`` of the nearest ancestor that is not a container, under the
block's path from it (``s2a_prompts.blocks.0.A``; see :func:`prompt_path`).
"""

from __future__ import annotations

import functools
import math
import weakref
from typing import Any

import torch
from torch import nn

from s2a.models import BackboneInfo
from s2a.models.registry import hidden_from_call, runs_children

PROMPT_ATTR = "s2a_prompt"  # a block's child
PROMPTS_ATTR = "s2a_prompts"  # an ancestor's child that holds the prompts of container blocks


class LowRankPrompt(nn.Module):
    """``x + A·B`` for one block input of ``layout`` "tokens" | "nchw" | "nhwc"."""

    def __init__(self, layout: str, grid: tuple[int, ...], channels: int, rank: int,
                 position_ids_kwarg: str | None = None, *, init_std: float | None = None,
                 fixed_length: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if layout not in ("tokens", "nchw", "nhwc"):
            raise ValueError(f"layout={layout!r}; expected 'tokens', 'nchw' or 'nhwc'")
        self.layout = layout
        self.grid = tuple(int(g) for g in grid)
        self.channels = int(channels)
        self.rank = int(rank)
        self.position_ids_kwarg = position_ids_kwarg
        # Image tokens: row i belongs to one patch of the dry run's grid, so a sequence of
        # another length (another image size) would put the rows on the wrong patches.
        self.fixed_length = bool(fixed_length)
        self.merged = False
        # text: the rows of the tokens of the model's current call, shared by the prompts of
        # every block and set by the model's own pre-hook (see text_positions_hooks)
        self.call_positions: dict[str, torch.Tensor | None] = {}
        positions = math.prod(self.grid)
        std = rank ** -0.5 if init_std is None else init_std
        self.A = nn.Parameter(torch.zeros(positions, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.randn(rank, channels, device=device, dtype=dtype) * std)

    @property
    def positions(self) -> int:
        return math.prod(self.grid)

    def extra_repr(self) -> str:
        return (f"layout={self.layout}, grid={self.grid}, channels={self.channels}, "
                f"rank={self.rank}{', merged' if self.merged else ''}")

    # ------------------------------------------------------------------ the prompt
    def _rows(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """(..., C) prompt of the given positions."""
        if self.merged:
            return self.prompt[rows]
        return self.A[rows] @ self.B

    def delta(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The term added to ``x`` (broadcastable to it)."""
        if self.layout == "tokens":
            n = x.shape[1]
            if position_ids is not None:
                if position_ids.device.type == "cpu" and int(position_ids.max()) >= self.positions:
                    raise ValueError(
                        f"low-rank prompt covers {self.positions} positions, got position "
                        f"{int(position_ids.max())}")
                return self._rows(position_ids)
            if self.fixed_length and n != self.positions:
                raise ValueError(
                    f"sequence of {n} tokens at a block whose low-rank prompt was built for "
                    f"{self.positions} (the image size of the dry run): its rows belong to that "
                    "grid's patches; pass example_input= of the size you train with to s2a.apply")
            if n > self.positions:
                raise ValueError(
                    f"sequence of {n} tokens, but the low-rank prompt covers {self.positions} "
                    "positions (the maximum length, or the dry run's length for vision "
                    "models: pass example_input= of the size you train with)")
            return self._rows(slice(0, n))
        grid = tuple(x.shape[2:]) if self.layout == "nchw" else tuple(x.shape[1:3])
        if grid != self.grid:
            raise ValueError(
                f"feature map of size {grid} at a block whose low-rank prompt was built for "
                f"{self.grid} (set by the input size of the dry run: pass example_input= of "
                "the size you train with to s2a.apply)")
        p = self._rows(slice(None))  # (H*W, C)
        if self.layout == "nchw":
            return p.t().reshape(self.channels, *self.grid)
        return p.reshape(*self.grid, self.channels)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.delta(x, position_ids).to(x.dtype)

    def pre_hook(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Forward pre-hook (``with_kwargs=True``) of the block: prompt its hidden state."""
        found = hidden_from_call(args, kwargs)
        if found is None:
            return None
        where, x = found
        pos = _recomputable_rows(self.call_positions.get("rows"), kwargs.get("attention_mask"))
        if pos is None and self.position_ids_kwarg:
            pos = kwargs.get(self.position_ids_kwarg)
        y = self(x, pos if isinstance(pos, torch.Tensor) and pos.shape[-1] == x.shape[1] else None)
        if where == 0:
            return (y, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[where] = y
        return args, kwargs

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_(self) -> LowRankPrompt:
        """Replace A and B by the constant ``A·B`` (a buffer): the output is unchanged."""
        if self.merged:
            return self
        prompt = (self.A @ self.B).detach().clone()
        del self.A
        del self.B
        self.register_buffer("prompt", prompt)
        self.merged = True
        return self


def _prompt_home(model: nn.Module, block_name: str) -> tuple[str, list[str]]:
    """(path of the module that holds the prompt of block ``block_name``, attribute chain from
    it to the prompt). See :func:`prompt_path`."""
    if not runs_children(model.get_submodule(block_name)):
        return block_name, [PROMPT_ATTR]
    parts = block_name.split(".") if block_name else []
    for i in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:i])
        if not runs_children(model.get_submodule(owner)):
            return owner, [PROMPTS_ATTR, *parts[i:]]
    raise ValueError(
        f"the low-rank prompt of block {block_name!r} ({type(model.get_submodule(block_name)).__name__}) "
        "has no place in the model: that block and every module above it are containers "
        "(nn.Sequential / ModuleList / ModuleDict) whose forward would run a prompt registered "
        "there as one more layer. Wrap the model in an nn.Module whose forward calls it, or "
        "leave 'prompt' out of modules")


def prompt_path(model: nn.Module, block_name: str) -> str:
    """Module path (in ``model``) of the prompt of block ``block_name``: ``<block>.s2a_prompt``,
    or for a container block ``<ancestor>.s2a_prompts.<rest of the block's path>`` (the
    nearest ancestor that is not a container: its forward calls only the children it names).
    Raises ValueError where no such ancestor exists (a bare nn.Sequential model whose blocks
    are nn.Sequential too)."""
    owner, chain = _prompt_home(model, block_name)
    return ".".join([owner, *chain]) if owner else ".".join(chain)


def check_prompts(model: nn.Module, info: BackboneInfo) -> None:
    """Raise the error :func:`add_prompts` would raise for a block without a place for its
    prompt, before anything is changed."""
    for block in info.blocks:
        _prompt_home(model, block.name)


def _register(model: nn.Module, block_name: str, prompt: LowRankPrompt) -> None:
    owner, chain = _prompt_home(model, block_name)
    holder = model.get_submodule(owner)
    for key in chain[:-1]:  # the ModuleDicts under s2a_prompts (never called: no forward)
        if key not in holder._modules:
            holder.add_module(key, nn.ModuleDict())
        holder = holder._modules[key]
        if not isinstance(holder, nn.ModuleDict):
            raise RuntimeError(f"block {block_name}: the prompt of a block above it is in the way "
                               f"of its own ({prompt_path(model, block_name)})")
    if chain[-1] in holder._modules:
        raise RuntimeError(f"block {block_name} already has a low-rank prompt")
    holder.add_module(chain[-1], prompt)


def add_prompts(model: nn.Module, info: BackboneInfo, rank: int) -> tuple[dict[str, LowRankPrompt], list]:
    """Insert a :class:`LowRankPrompt` before every block of ``info`` (registered at
    :func:`prompt_path`, applied by a forward pre-hook on the block).

    Returns ({block name: prompt}, hook handles)."""
    check_prompts(model, info)
    prompts, handles = {}, []
    for block in info.blocks:
        module = model.get_submodule(block.name)
        if block.layout == "tokens" and info.max_positions is not None:
            grid = (max(info.max_positions, block.in_grid[0]),)
        else:
            grid = block.in_grid
        ref = next(module.parameters(), None)
        if ref is None or not ref.is_floating_point():
            ref = next((p for p in model.parameters() if p.is_floating_point()), None)
        kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        # Image tokens: their count is the dry run's patch grid (see BackboneInfo.fixed_tokens);
        # text: shorter sequences take the first rows.
        fixed = block.layout == "tokens" and info.fixed_tokens
        prompt = LowRankPrompt(block.layout, grid, block.in_dim, rank, info.position_ids_kwarg,
                               fixed_length=fixed, **kw)
        _register(model, block.name, prompt)
        handles.append(module.register_forward_pre_hook(prompt.pre_hook, with_kwargs=True))
        prompts[block.name] = prompt
    text = [p for p in prompts.values() if p.layout == "tokens" and not p.fixed_length]
    # an encoder-decoder's call carries two sequences: its blocks' own position_ids, if any
    if text and not getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        handles += text_positions_hooks(model, text)
    return prompts, handles


# id of a block's attention_mask -> the rows of the call that made it, while that mask lives: a
# checkpoint around a block's __call__ runs its hooks again in backward, after the model's call
# (and its rows) ended, with the same mask object
_ROWS_BY_MASK: dict[int, torch.Tensor] = {}


def _recomputable_rows(rows: torch.Tensor | None, mask: Any) -> torch.Tensor | None:
    if not isinstance(mask, torch.Tensor):
        return rows
    key = id(mask)
    if rows is None:
        return _ROWS_BY_MASK.get(key)
    if key not in _ROWS_BY_MASK:
        weakref.finalize(mask, _ROWS_BY_MASK.pop, key, None)
    _ROWS_BY_MASK[key] = rows
    return rows


def _past_length(cache: Any) -> int:
    """Tokens a transformers KV cache (a ``Cache``, or the legacy tuple of (key, value) per
    layer) holds before this call."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0]:
        key = cache[0][0]
        return int(key.shape[-2]) if isinstance(key, torch.Tensor) else 0
    return 0


def token_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Positions of the tokens of one call of a transformers text model, (B, n) or (1, n): its
    ``position_ids`` when given; else counted along a 2-D ``attention_mask`` (as ``generate``
    does: left padding shifts nothing) after the tokens of a KV cache; None when the call is
    a plain full-length one (rows 0..n-1) or does not say."""
    pos = kwargs.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() in (1, 2):
        return pos
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        embeds = kwargs.get("inputs_embeds")
        tokens = embeds if isinstance(embeds, torch.Tensor) and embeds.dim() == 3 else None
    if tokens is None:
        return None
    n = tokens.shape[1]
    cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None), None)
    past = _past_length(cache)
    mask = kwargs.get("attention_mask")
    if (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + n
            and not bool(mask[:, 0].all())):  # left padding; a full first column counts as 0..n-1
        return (mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
    if past:
        return torch.arange(past, past + n, device=tokens.device).unsqueeze(0)
    return None


def text_positions_hooks(model: nn.Module, prompts: list[LowRankPrompt]) -> list:
    """Hooks on ``model`` that give ``prompts`` the positions of each call's tokens
    (:func:`token_positions`), so that a token takes the prompt row of its position in its
    sequence: after a KV cache (blocks that see no ``position_ids``: Bloom, GPT-Neo) and
    after left padding, as in training."""
    shared: dict[str, torch.Tensor | None] = {}
    for p in prompts:
        p.call_positions = shared
    # partials, not closures: a deepcopy of the model gives its copy's hooks the copy's dict,
    # and the model still pickles
    return [model.register_forward_pre_hook(functools.partial(_note_positions, shared), with_kwargs=True),
            model.register_forward_hook(functools.partial(_forget_positions, shared), always_call=True)]


def _note_positions(shared: dict, _module: nn.Module, args: tuple, kwargs: dict) -> None:
    shared["rows"] = token_positions(args, kwargs)


def _forget_positions(shared: dict, *_: Any) -> None:
    shared.pop("rows", None)
