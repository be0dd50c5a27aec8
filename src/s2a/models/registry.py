"""The adapter registry, the data it produces (:class:`BackboneInfo`) and the dry run
that measures block shapes. See the package docstring for how to add an adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from .sentence_pooling import masked_max, masked_mean

LAYOUTS = ("tokens", "nchw", "nhwc")
TASKS = ("classification", "lm", "features")
# keyword names under which frameworks pass a block's hidden state
HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "input", "inputs")


class UnsupportedModelError(TypeError):
    """No adapter (not even the generic fallback) can find the blocks of a model."""


# ---------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class BlockSpec:
    """What an adapter declares about one block (shapes come from the dry run).

    ``layout`` None lets the dry run infer it from the block input's rank.
    """

    name: str
    layout: str | None = None
    stage: int = 0
    prefix_tokens: int = 0


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head: ``names`` are the trainable head modules, ``classifiers``
    the final ``nn.Linear`` or 1x1 ``nn.Conv2d`` (one per output head, e.g. DeiT's head and
    head_dist) that :meth:`ModelAdapter.replace_head` replaces; ``trainable`` False for a
    language-model head tied to the embeddings; ``task`` one of :data:`TASKS`."""

    names: tuple[str, ...]
    classifiers: tuple[str, ...]
    trainable: bool = True
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:  # an adapter's typo would silently skip the lm-head handling
            raise ValueError(f"HeadSpec.task must be one of {TASKS}, got {self.task!r}")


# ---------------------------------------------------------------------------- infos
@dataclass
class BlockInfo:
    """One block: its INPUT gets the prompt, its OUTPUT feeds the side branch.

    ``in_shape`` / ``out_shape`` exclude the batch dimension (as seen in the dry run).
    """

    name: str
    layout: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    stage: int = 0
    prefix_tokens: int = 0
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def out_layout(self) -> str:
        """The output's layout: the input's, but tokens from a block that takes a feature map
        and returns (N, D) (EfficientFormer's last stage)."""
        return "tokens" if self.layout != "tokens" and len(self.out_shape) == 2 else self.layout

    @staticmethod
    def _dim(layout: str, shape: tuple[int, ...]) -> int:
        return shape[0] if layout == "nchw" else shape[-1]

    @staticmethod
    def _grid(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        if layout == "tokens":
            return (shape[0],)
        return tuple(shape[1:]) if layout == "nchw" else tuple(shape[:-1])

    @property
    def in_dim(self) -> int:
        """Channels of the block input (D for tokens, C for feature maps)."""
        return self._dim(self.layout, self.in_shape)

    @property
    def out_dim(self) -> int:
        """Channels of the block output."""
        return self._dim(self.out_layout, self.out_shape)

    @property
    def in_grid(self) -> tuple[int, ...]:
        """(N,) for tokens, (H, W) for feature maps, of the block input."""
        return self._grid(self.layout, self.in_shape)

    @property
    def out_grid(self) -> tuple[int, ...]:
        return self._grid(self.out_layout, self.out_shape)

    @property
    def in_positions(self) -> int:
        n = 1
        for s in self.in_grid:
            n *= s
        return n


@dataclass
class BackboneInfo:
    """Everything the tuners need to know about a backbone (see :func:`describe_backbone`).

    Attributes:
        family: name of the adapter that described it ("timm-vit", "hf-bert", "generic", ...).
        model_class: class name of the model.
        blocks: the blocks in forward order.
        head_names / classifier_names / head_trainable / task: see :class:`HeadSpec`
            (empty names and task "features" for a bare backbone).
        pooling: how the backbone pools its last hidden state for the head:
            "cls" (first token), "mean" (tokens or spatial average), "max" (token-wise
            maximum; sentence-transformers max pooling), "last" (last real token).
        num_prefix_tokens: class / distillation / register tokens in front of the patch
            tokens (0 for text and CNNs).
        max_positions: positions a prompt must cover for variable-length inputs (text:
            the model's maximum sequence length); None: the dry run's grid is fixed.
        fixed_tokens: the token count of "tokens" blocks is the dry run's, each token one
            patch of the input image's grid (ViTs), so another count is another image size:
            True for an adapter without ``max_positions``; for the generic fallback, which
            cannot tell a text model from an image model, True when the dry run's input held
            an image (a floating tensor of >= 4 dims, such as (B, C, H, W)), False for token
            ids or embeddings (sequences of any length up to the dry run's).
        position_ids_kwarg: keyword under which blocks receive position ids (decoders
            with a KV cache), or None.
        feature_dim / num_classes: input and output width of the (first) classifier.
    """

    family: str
    model_class: str
    blocks: list[BlockInfo]
    head_names: tuple[str, ...] = ()
    classifier_names: tuple[str, ...] = ()
    head_trainable: bool = False
    task: str = "features"
    pooling: str = "mean"
    num_prefix_tokens: int = 0
    max_positions: int | None = None
    fixed_tokens: bool = False
    position_ids_kwarg: str | None = None
    feature_dim: int | None = None
    num_classes: int | None = None
    adapter: ModelAdapter | None = field(default=None, repr=False, compare=False)

    # -- convenience accessors ------------------------------------------------------
    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def layouts(self) -> list[str]:
        return [b.layout for b in self.blocks]

    @property
    def out_layouts(self) -> list[str]:
        """Layout of every block's output (what the side branch reads)."""
        return [b.out_layout for b in self.blocks]

    @property
    def dims(self) -> list[int]:
        """Output channels of every block (what the side branch reads)."""
        return [b.out_dim for b in self.blocks]

    def block_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(b.name) for b in self.blocks]

    def classifier_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.classifier_names]

    # -- pooled features -------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, layout: str = "tokens", mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pool one hidden state to (B, C) the way this backbone pools for its head.

        ``mask`` (B, T), 1 for real tokens: padding is left out of a mean or max, and
        ``"last"`` reads each row's last real token (text batches are padded on the right)."""
        if layout == "nchw":
            return hidden.mean(dim=(2, 3))
        if layout == "nhwc":
            return hidden.mean(dim=(1, 2))
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is not None and mask.shape != hidden.shape[:2]:
            raise ValueError(f"pool: mask of shape {tuple(mask.shape)} does not match the "
                             f"{tuple(hidden.shape[:2])} token states")
        if self.pooling == "last":
            if mask is None:
                return hidden[:, -1]
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            last = (mask.bool() * (positions + 1)).argmax(dim=1)  # an all-padding row reads token 0
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        hidden = hidden[:, self.num_prefix_tokens:]
        keep = None if mask is None else mask[:, self.num_prefix_tokens:]
        return masked_max(hidden, keep) if self.pooling == "max" else masked_mean(hidden, keep)

    def pooled_features(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run ``model`` and return the (B, F) features its classifier receives (for a
        backbone without head: its last hidden state pooled by :meth:`pool`)."""
        captured: dict[str, torch.Tensor] = {}
        if self.classifier_names:
            module = model.get_submodule(self.classifier_names[0])

            def grab(mod, inputs):
                captured.setdefault("x", inputs[0])

            handle = module.register_forward_pre_hook(grab)
            try:
                model(*args, **kwargs)
            finally:
                handle.remove()
            x = captured["x"]
            if x.dim() == 4:  # a 1x1 conv classifier reads the pooled (B, C, 1, 1) map
                return x.mean(dim=(2, 3))
            return self.pool(x, mask=_attention_mask(kwargs)) if x.dim() == 3 else x
        out = model(*args, **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = first_tensor(out)
        if hidden.dim() == 2:
            return hidden
        layout = self.blocks[-1].layout if hidden.dim() == 4 else "tokens"
        return self.pool(hidden, layout, mask=_attention_mask(kwargs) if layout == "tokens" else None)


def _attention_mask(kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


# ---------------------------------------------------------------------------- adapter API
class ModelAdapter:
    """Base class of a model-family adapter. Override :meth:`matches` and :meth:`blocks`;
    the rest has sensible defaults."""

    #: short family name shown in :class:`BackboneInfo`
    name: str = "adapter"

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[BlockSpec]:
        raise NotImplementedError

    def head(self, model: nn.Module) -> HeadSpec | None:
        return None

    def pooling(self, model: nn.Module) -> str:
        return "mean"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def max_positions(self, model: nn.Module) -> int | None:
        return None

    def position_ids_kwarg(self, model: nn.Module) -> str | None:
        return None

    def example_input(self, model: nn.Module) -> Any:
        """A default input for the dry run: a tensor, a tuple of args or a dict of kwargs."""
        return default_image_input(model)

    def replace_head(self, model: nn.Module, num_classes: int) -> None:
        """Replace the classifier(s) by fresh layers of the same kind (``nn.Linear`` or 1x1
        ``nn.Conv2d``) with ``num_classes`` outputs."""
        spec = self.head(model)
        if spec is None or not spec.classifiers:
            raise ValueError(
                f"num_classes: {type(model).__name__} has no classification head to replace; "
                "build the model with one (timm: num_classes > 0; transformers: a "
                "*ForSequenceClassification / *ForImageClassification class), add 'side' to "
                "modules (the side network then makes the prediction) or pass num_classes=None"
            )
        if spec.task == "lm":
            raise ValueError(
                f"num_classes: {type(model).__name__} is a language model (head {spec.classifiers}); "
                "use num_classes=None or a *ForSequenceClassification model"
            )
        cls = type(model).__name__
        if "ForQuestionAnswering" in cls or "ForMultipleChoice" in cls:
            scores = ("answer-span starts and ends" if "ForQuestionAnswering" in cls else
                      "each choice with one output (the number of choices comes from the input)")
            raise ValueError(f"num_classes: {cls} scores {scores}, not classes: its head trains as it is; "
                             "pass num_classes=None")
        for path in spec.classifiers:
            replace_classifier(model, path, num_classes)
        # a transformers classifier's own loss reshapes the logits by its label count
        config = getattr(model, "config", None)
        if isinstance(getattr(config, "num_labels", None), int):
            config.num_labels = num_classes
        if isinstance(getattr(model, "num_labels", None), int):
            model.num_labels = num_classes


_REGISTRY: list[ModelAdapter] = []
_A = TypeVar("_A", bound="ModelAdapter | type[ModelAdapter]")


def register_adapter(adapter: _A, *, first: bool = True) -> _A:
    """Register an adapter (instance or class). ``first=True`` (default) puts it before the
    built-in ones so that it can override them. Returns the adapter, so it works as a
    class decorator."""
    instance = adapter() if isinstance(adapter, type) else adapter
    if not isinstance(instance, ModelAdapter):
        raise TypeError(f"register_adapter expects a ModelAdapter, got {type(instance).__name__}")
    if first:
        _REGISTRY.insert(0, instance)
    else:
        _REGISTRY.append(instance)
    return adapter


def unregister_adapter(adapter: ModelAdapter | type[ModelAdapter]) -> None:
    for a in list(_REGISTRY):
        if a is adapter or type(a) is adapter:
            _REGISTRY.remove(a)


def registered_adapters() -> list[ModelAdapter]:
    return list(_REGISTRY)


def find_adapter(model: nn.Module) -> ModelAdapter:
    for adapter in _REGISTRY:
        if adapter.matches(model):
            return adapter
    from .generic import GENERIC

    if GENERIC.matches(model):
        return GENERIC
    classes = sorted({type(m).__name__ for m in model.modules()})
    raise UnsupportedModelError(
        f"s2a cannot find the blocks of {type(model).__name__}: no registered adapter "
        f"({', '.join(a.name for a in _REGISTRY)}) matches and the generic fallback found no "
        "ModuleList/Sequential with >= 2 children of one class (nor such a group of attribute "
        "stages holding most of the parameters). Module classes found: "
        f"{classes}. Add an adapter with s2a.models.register_adapter (see s2a.models)."
    )


# ---------------------------------------------------------------------------- helpers
def first_tensor(obj: Any) -> torch.Tensor | None:
    """The hidden state inside a block output: a tensor, or the first tensor of a
    tuple / list / ModelOutput."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def hidden_from_call(args: tuple, kwargs: dict) -> tuple[str | int, torch.Tensor] | None:
    """(where, tensor) of a block's hidden state in a forward call: position 0 or a
    keyword of :data:`HIDDEN_KWARGS`."""
    if args and isinstance(args[0], torch.Tensor):
        return 0, args[0]
    for key in HIDDEN_KWARGS:
        v = kwargs.get(key)
        if isinstance(v, torch.Tensor):
            return key, v
    return None


def normalize_input(example_input: Any) -> tuple[tuple, dict]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, Mapping):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise TypeError(
        "example_input must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_input).__name__}"
    )


def default_image_input(model: nn.Module) -> torch.Tensor:
    """zeros(1, C, H, W) at the model's own input size (timm ``patch_embed.img_size`` /
    ``pretrained_cfg['input_size']``, transformers ``config.image_size``)."""
    chans, size = None, None
    pe = getattr(model, "patch_embed", None)
    if pe is not None and getattr(pe, "img_size", None) is not None:
        size = tuple(pe.img_size)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        chans = cfg["input_size"][0]
        size = size or tuple(cfg["input_size"][1:])
    hf = getattr(model, "config", None)
    if hf is not None and hasattr(hf, "image_size"):
        s = hf.image_size
        size = size or ((s, s) if isinstance(s, int) else tuple(s))
        chans = chans or getattr(hf, "num_channels", 3)
    if size is None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                chans, size = m.in_channels, (224, 224)
                break
    if size is None:
        raise ValueError(
            f"cannot guess an input for {type(model).__name__}: pass example_input= "
            "(one batch of the size you will train with)"
        )
    return torch.zeros(1, chans or 3, *size)


def text_input(model: nn.Module, length: int = 8) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.ones(1, length, dtype=torch.long)}


def is_classifier_layer(module: nn.Module) -> bool:
    """An output layer s2a can replace: ``nn.Linear``, or a 1x1 ``nn.Conv2d`` (timm's
    ResNetV2 / DPN classify the pooled (B, C, 1, 1) map with one)."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and module.groups == 1)


def classifier_features(module: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a classifier layer (see :func:`is_classifier_layer`)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def replace_classifier(model: nn.Module, path: str, num_classes: int) -> nn.Module:
    """Put a fresh layer of the same kind (Linear or 1x1 Conv2d) with ``num_classes``
    outputs at ``path``."""
    old = model.get_submodule(path)
    if not is_classifier_layer(old):
        raise ValueError(f"num_classes: head {path} is a {type(old).__name__}, not nn.Linear "
                         "or a 1x1 nn.Conv2d")
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, **factory)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None, **factory)
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return new


#: Module classes whose forward runs their children as layers: ``nn.Sequential`` calls each in
#: turn, and subclasses of ``nn.ModuleList`` / ``nn.ModuleDict`` with a forward iterate
#: themselves (timm's DenseNet blocks, ``FeatureDictNet``). A module s2a registers as a child of
#: one of these would be run as one more layer.
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def runs_children(module: nn.Module) -> bool:
    """Whether ``module``'s forward may call every child (see :data:`CONTAINERS`): s2a then
    must not add a child module to it."""
    return isinstance(module, CONTAINERS)


def module_path(model: nn.Module, module: nn.Module) -> str | None:
    for n, m in model.named_modules():
        if m is module:
            return n
    return None


# ---------------------------------------------------------------------------- describe
def _channels_first_norm(m: nn.Module) -> bool:
    """A LayerNorm over dim 1 of a feature map: transformers' ConvNeXt norms say so in their
    ``data_format``, timm's in their class name (LayerNorm2d and its subclasses); all of
    them subclass nn.LayerNorm, which normalises the last dimension."""
    return isinstance(m, nn.LayerNorm) and (getattr(m, "data_format", None) == "channels_first"
                                            or any(c.__name__.lower().endswith("2d") for c in type(m).__mro__))


def _layout_from_weights(block: nn.Module, shape: tuple[int, ...]) -> str | None:
    """The layout of a (B, ?, ?, ?) block input read from the first layer (in registration
    order) whose channel count is ``shape[1]`` or ``shape[3]`` (both when C == W: a
    channels-first LayerNorm then says NCHW); None when no layer has either (SwinV2's
    stages open with a PatchMerging that works on 4C channels)."""
    for m in block.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)):
            c = (m.in_channels if isinstance(m, nn.Conv2d)
                 else m.num_features if isinstance(m, nn.BatchNorm2d) else m.num_channels)
            if c == shape[1]:
                return "nchw"
            if c == shape[3]:
                return "nhwc"
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            c = m.in_features if isinstance(m, nn.Linear) else m.normalized_shape[-1]
            if c == shape[1] and _channels_first_norm(m):
                return "nchw"
            if c == shape[3]:
                return "nhwc"
            if c == shape[1]:
                return "nchw"
    return None


def refuse_sequence_first(info: BackboneInfo, module_kind: str) -> None:
    """Raise for a block that takes sequence-first (N, B, D) tokens, which ``module_kind`` (the
    prompt, the side branch) would read as (B, N, D); biases do not care."""
    for block in info.blocks:
        m = block.module
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.self_attn.batch_first:
            raise UnsupportedModelError(
                f"block {block.name} ({type(m).__name__} with batch_first=False) takes sequence-first "
                f"(N, B, D) tokens; the {module_kind} reads (B, N, D). Build the layers with batch_first=True "
                "(the weights are the same) and feed them (B, N, D), or leave the module out")


def _infer_layouts(specs: list[BlockSpec], modules: list[nn.Module], shapes: dict[int, list]) -> list[str]:
    """Each block's layout: the adapter's, "tokens" for a rank-3 input, else read from the
    block's layers. A block whose layers tell nothing takes the layout of a neighbour it is
    chained to (its input is that block's output, same shape): the tensor passes between
    them unchanged. A block still undecided is refused, never guessed: a wrong layout
    silently gives the prompt the grid and channel count of other dimensions."""
    layouts: list[str | None] = []
    for spec, module, (in_shape, _) in zip(specs, modules, shapes.values(), strict=True):
        if spec.layout:
            layouts.append(spec.layout)
        elif len(in_shape) == 3:
            layouts.append("tokens")
        elif len(in_shape) != 4:
            raise UnsupportedModelError(
                f"block {spec.name}: input of rank {len(in_shape)} (shape {tuple(in_shape)}); s2a "
                "handles (B, N, D) tokens and (B, C, H, W) / (B, H, W, C) feature maps"
            )
        else:
            layouts.append(_layout_from_weights(module, in_shape))
    for i in range(1, len(layouts)):
        if layouts[i] is None and shapes[i][0] == shapes[i - 1][1]:
            layouts[i] = layouts[i - 1]
    for i in range(len(layouts) - 2, -1, -1):
        if layouts[i] is None and shapes[i][1] == shapes[i + 1][0]:
            layouts[i] = layouts[i + 1]
    for spec, layout, (in_shape, _) in zip(specs, layouts, shapes.values(), strict=True):
        if layout is None:
            raise UnsupportedModelError(
                f"cannot tell whether the input {tuple(in_shape)} of block {spec.name} is "
                f"(B, C, H, W) or (B, H, W, C): none of its Conv2d / Linear / norm layers has "
                f"{in_shape[1]} or {in_shape[3]} channels, and no neighbouring block with a known "
                "layout feeds it or reads it unchanged. Declare the layout: register an adapter "
                "whose BlockSpec gives layout='nchw' or 'nhwc' (see s2a.models)"
            )
    return layouts


def _dry_run(model: nn.Module, specs: list[BlockSpec], example_input: Any, watch: nn.Module | None = None):
    """Run one no-grad eval forward, recording each block's input and output shape; also
    whether every block received ``position_ids`` of its tokens (decoders that follow a KV
    cache pass them to their layers), and the first output shape of ``watch`` (or None)."""
    modules = [model.get_submodule(s.name) for s in specs]
    shapes: dict[int, list] = {i: [None, None] for i in range(len(specs))}
    handles = []

    positions: set[int] = set()  # blocks that received the token positions (see below)
    called: set[int] = set()

    def pre(i):
        def hook(mod, args, kwargs):
            called.add(i)
            if shapes[i][0] is None:
                found = hidden_from_call(args, kwargs)
                if found is not None:
                    shapes[i][0] = tuple(found[1].shape)
                    pos = kwargs.get("position_ids")
                    if (isinstance(pos, torch.Tensor) and not pos.is_floating_point() and pos.dim() == 2
                            and found[1].dim() == 3 and pos.shape[-1] == found[1].shape[1]):
                        positions.add(i)
        return hook

    def post(i):
        def hook(mod, args, output):
            if shapes[i][1] is None:
                t = first_tensor(output)
                if t is not None:
                    shapes[i][1] = tuple(t.shape)
        return hook

    watched: list[tuple[int, ...]] = []

    def see(mod, args, output):
        t = first_tensor(output)
        if t is not None and not watched:
            watched.append(tuple(t.shape))

    for i, m in enumerate(modules):
        handles.append(m.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(m.register_forward_hook(post(i)))
    if watch is not None:
        handles.append(watch.register_forward_hook(see))
    try:
        with torch.no_grad():
            eval_forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
    unseen = [i for i, (a, b) in shapes.items() if a is None or b is None]
    missing = [specs[i].name for i in unseen]
    if missing and called.issuperset(unseen):
        raise UnsupportedModelError(
            f"the blocks {missing} of {type(model).__name__} ran with other than one tensor in or out (a list "
            "of branches, as CrossViT's): s2a's prompts and side branch need one hidden state per block; "
            "register an adapter that names blocks with one (s2a.models.register_adapter)")
    if missing:
        raise UnsupportedModelError(
            f"the dry forward of {type(model).__name__} did not run blocks {missing} with a "
            "tensor input/output (they were never called, or with other than one tensor): pass "
            "example_input= if the dry run's input was not what the model takes, else register an adapter"
        )
    return modules, shapes, len(positions) == len(modules), (watched[0] if watched else None)


def eval_forward(model: nn.Module, example_input: Any) -> Any:
    """``model``'s output on ``example_input`` in eval mode (no dropout, BatchNorm statistics
    untouched); every module's train/eval flag is restored afterwards. Grad mode: the caller's."""
    flags = [(m, m.training) for m in model.modules()]
    args, kwargs = normalize_input(example_input)
    try:
        model.eval()
        return model(*args, **kwargs)
    finally:
        for m, t in flags:
            m.training = t


def dry_run_input(model: nn.Module, example_input: Any = None, adapter: ModelAdapter | None = None) -> Any:
    """The input of the dry run: ``example_input``, else the adapter's default input on the
    model's device (floats in its dtype)."""
    if example_input is not None:
        return example_input
    return _on_model(model, (adapter or find_adapter(model)).example_input(model))


def _holds_image(example_input: Any) -> bool:
    """Whether an input holds an image (or video): a floating tensor of >= 4 dims."""
    args, kwargs = normalize_input(example_input)
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4
               for t in (*args, *kwargs.values()))


def _on_model(model: nn.Module, example: Any) -> Any:
    """A default input moved to the model's device, floats in the model's dtype."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    if ref is None:
        return example

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(ref.device, ref.dtype) if t.is_floating_point() else t.to(ref.device)

    if isinstance(example, Mapping):
        return {k: move(v) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return tuple(move(v) for v in example)
    return move(example)


def describe_backbone(model: nn.Module, example_input: Any = None) -> BackboneInfo:
    """Find the blocks, layouts, dims, prefix tokens and head of ``model``.

    One no-grad eval forward measures the shapes (on ``example_input`` or the adapter's
    default input); the model's parameters, buffers and train/eval flags are unchanged.
    On a model already prepared by :func:`s2a.apply` (and without ``example_input``) the
    stored description is returned.
    """
    state = getattr(model, "_s2a_tuner", None)
    if state is not None and example_input is None:
        return state.info
    adapter = find_adapter(model)
    specs = adapter.blocks(model)
    if len(specs) == 0:
        raise UnsupportedModelError(f"adapter {adapter.name} found no blocks in {type(model).__name__}")
    example_input = dry_run_input(model, example_input, adapter)
    from .generic import GenericAdapter

    generic = isinstance(adapter, GenericAdapter)
    patch_embed = getattr(model, "patch_embed", None) if generic else None
    modules, shapes, gets_positions, patches = _dry_run(
        model, specs, example_input, patch_embed if isinstance(patch_embed, nn.Module) else None)
    layouts = _infer_layouts(specs, modules, shapes)
    blocks = []
    for i, (spec, module, layout) in enumerate(zip(specs, modules, layouts, strict=True)):
        in_shape, out_shape = shapes[i]
        if layout not in LAYOUTS:
            raise ValueError(f"adapter {adapter.name}: layout {layout!r} not in {LAYOUTS}")
        blocks.append(BlockInfo(spec.name, layout, in_shape[1:], out_shape[1:], spec.stage,
                                spec.prefix_tokens, module))
    max_positions = adapter.max_positions(model)
    pooling, prefix = adapter.pooling(model), adapter.num_prefix_tokens(model)
    if generic:
        pooling, prefix = adapter.seen_prefix(blocks, patches, pooling, prefix)
    info = BackboneInfo(
        family=adapter.name,
        model_class=type(model).__name__,
        blocks=blocks,
        pooling=pooling,
        num_prefix_tokens=prefix,
        max_positions=max_positions,
        fixed_tokens=max_positions is None and (not generic or _holds_image(example_input)),
        # The generic fallback cannot know a decoder's signature: blocks that were handed the
        # token positions get prompt rows by position, so tokens decoded one at a time with a
        # KV cache take their own rows, not the first ones.
        # Any adapter's only when the dry run saw them as (batch, tokens): multimodal rotary
        # positions (3, batch, tokens) would index no prompt row.
        position_ids_kwarg=(adapter.position_ids_kwarg(model) or ("position_ids" if generic else None))
        if gets_positions else None,
        adapter=adapter,
    )
    refresh_head(info, model)
    return info


def refresh_head(info: BackboneInfo, model: nn.Module) -> BackboneInfo:
    """(Re)read the head of ``model`` into ``info`` (after a head replacement)."""
    spec = info.adapter.head(model) if info.adapter is not None else None
    if spec is None:
        info.head_names, info.classifier_names = (), ()
        info.head_trainable, info.task = False, "features"
        info.feature_dim = info.num_classes = None
        return info
    info.head_names, info.classifier_names = tuple(spec.names), tuple(spec.classifiers)
    info.head_trainable, info.task = spec.trainable, spec.task
    info.feature_dim = info.num_classes = None
    if spec.classifiers:
        clf = model.get_submodule(spec.classifiers[0])
        if is_classifier_layer(clf):
            info.feature_dim, info.num_classes = classifier_features(clf)
    return info

