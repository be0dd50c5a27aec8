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
length; blocks that receive ``position_ids`` (decoders with a KV cache) gather the
rows of their positions, and decoder blocks that receive none but a KV cache (Bloom,
GPT-Neo) take the rows after the tokens their layer's cache holds. A token's row is
otherwise its index: with left padding pass the ``position_ids`` the attention mask gives
(as ``generate`` does), or, for models that take none (Bloom), pad on the right, as
``s2a train`` does. Images (feature maps, and the tokens of ViTs or of any model the
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

import math

import torch
from torch import nn

from s2a.models import BackboneInfo
from s2a.models.registry import hidden_from_call, refuse_sequence_first, runs_children

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
        # the index of the block's layer in a transformers KV cache, for a decoder block handed
        # the cache but no position_ids (None: never read a cache)
        self.cache_layer: int | None = None
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

    def delta(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """The term added to ``x`` (broadcastable to it); text tokens without ``position_ids``
        take the rows from ``start`` on (the length of a KV cache before them)."""
        if self.layout == "tokens":
            n = x.shape[1]
            if position_ids is not None:
                # (no check on another device, nor while compiling: it would wait for the device /
                # break the graph; the index itself then fails)
                if (position_ids.device.type == "cpu" and not torch.compiler.is_compiling()
                        and int(position_ids.max()) >= self.positions):
                    raise ValueError(
                        f"low-rank prompt covers {self.positions} positions, got position "
                        f"{int(position_ids.max())} (a text prompt covers S2AConfig.prompt_positions, "
                        "by default the model's maximum length)")
                return self._rows(position_ids)
            if self.fixed_length and n != self.positions:
                raise ValueError(
                    f"sequence of {n} tokens at a block whose low-rank prompt was built for "
                    f"{self.positions} (the image size of the dry run): its rows belong to that "
                    "grid's patches; pass example_input= of the size you train with to s2a.apply")
            if start + n > self.positions:
                raise ValueError(
                    f"sequence of {n} tokens{f' after {start} cached ones' if start else ''}, but the "
                    f"low-rank prompt covers {self.positions} positions (text: the maximum length, or "
                    "S2AConfig.prompt_positions; vision: the dry run's length, so pass example_input= "
                    "of the size you train with)")
            return self._rows(slice(start, start + n))
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

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        return x + self.delta(x, position_ids, start).to(x.dtype)

    def pre_hook(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        """Forward pre-hook (``with_kwargs=True``) of the block: prompt its hidden state."""
        found = hidden_from_call(args, kwargs)
        if found is None:
            return None
        where, x = found
        pos = kwargs.get(self.position_ids_kwarg) if self.position_ids_kwarg else None
        pos = pos if isinstance(pos, torch.Tensor) else None
        start = _cached_length(kwargs, self.cache_layer) if pos is None and self.cache_layer is not None else 0
        y = self(x, pos, start)
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
    refuse_sequence_first(info, "low-rank prompt")
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


def add_prompts(
    model: nn.Module, info: BackboneInfo, rank: int, positions: int | None = None
) -> tuple[dict[str, LowRankPrompt], list]:
    """Insert a :class:`LowRankPrompt` before every block of ``info`` (registered at
    :func:`prompt_path`, applied by a forward pre-hook on the block). ``positions``: the rows
    of a text prompt (None: the model's maximum length).

    Returns ({block name: prompt}, hook handles)."""
    check_prompts(model, info)
    if positions is not None:
        _check_positions(info, positions)
    prompts, handles = {}, []
    for block in info.blocks:
        module = model.get_submodule(block.name)
        if block.layout == "tokens" and info.max_positions is not None:
            grid = (positions or max(info.max_positions, block.in_grid[0]),)
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
        if block.layout == "tokens" and not fixed and info.position_ids_kwarg is None:
            prompt.cache_layer = _cache_layer(module, len(prompts))
        _register(model, block.name, prompt)
        handles.append(module.register_forward_pre_hook(prompt.pre_hook, with_kwargs=True))
        prompts[block.name] = prompt
    return prompts, handles


def _check_positions(info: BackboneInfo, positions: int) -> None:
    if info.max_positions is None or not any(b.layout == "tokens" for b in info.blocks):
        raise ValueError(
            f"prompt_positions={positions}: only text models take it (their prompt covers their "
            f"maximum length); the prompt of this {info.family} backbone covers the grid of the "
            "dry run's input: drop prompt_positions, and pass example_input= of the size you train with")
    if positions > info.max_positions:
        raise ValueError(
            f"prompt_positions={positions} exceeds the model's maximum length ({info.max_positions} "
            "positions): use at most that")
    longest = max(b.in_grid[0] for b in info.blocks if b.layout == "tokens")
    if longest > positions:
        raise ValueError(
            f"prompt_positions={positions}, but the dry run's input holds {longest} tokens: the prompt "
            "must cover the lengths you train on; raise prompt_positions or pass a shorter example_input")


_CACHE_KWARGS = ("layer_past", "past_key_value", "past_key_values", "cache")


def _cache_layer(block: nn.Module, position: int) -> int:
    """The index of ``block``'s layer in a transformers cache: its attention's ``layer_idx``,
    else its place among the model's blocks."""
    return next((m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)), position)


def _cached_length(kwargs: dict, layer: int) -> int:
    """Tokens the KV cache a decoder block is handed holds for its layer before this call (a
    transformers ``Cache``, or the legacy ``(key, value)`` of the layer); 0 without one."""
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length(layer))
    key = cache[0] if isinstance(cache, (tuple, list)) and cache else None
    return int(key.shape[-2]) if isinstance(key, torch.Tensor) else 0
