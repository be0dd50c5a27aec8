"""``S2AConfig``: what :func:`s2a.apply` inserts and how it stores activations.

A validated dataclass with a JSON round trip. Every invalid value raises
``ValueError`` naming the field and the allowed values.

>>> cfg = S2AConfig(modules=("bias", "prompt"), prompt_rank=4, act_bits=4)
>>> S2AConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from s2a.activations import OP_KINDS
from s2a.activations.apply import bits_allowed
from s2a.activations.functional import POINTWISE_BITS
from s2a.activations.rowquant import ROW_BITS

MODULES = ("bias", "norm", "prompt", "side")
DEFAULT_MODULES = ("bias", "prompt")
# act_bits applies to every operator kind, so it must suit the pointwise and the row-wise ones.
ACT_BITS = tuple(b for b in POINTWISE_BITS if b in ROW_BITS)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class S2AConfig:
    """Configuration of :func:`s2a.apply`.

    Attributes:
        modules: tunable modules to insert, any non-empty subset of ``("bias", "norm",
            "prompt", "side")``; default bias + low-rank prompt. ``norm`` trains the scale
            (weight) of every normalisation layer: free for LayerNorm / RMSNorm, whose
            backward stores the normalised input anyway; a BatchNorm on frozen statistics
            then has to store it (at ``act_bits``), where otherwise it stores nothing.
        prompt_rank: r of the low-rank prompt ``X + A·B`` (A: positions x r, B: r x channels).
        prompt_positions: text models: the positions the prompt covers (rows of A); None: the
            model's maximum (``max_position_embeddings``), which for long-context decoders
            (131072 for Llama 3.1) makes A most of the trainable parameters. Longer sequences,
            or positions at or past it, then raise an error. Vision prompts cover the dry
            run's grid and take no ``prompt_positions``.
        side_reduction: k of the side branch's channel average pooling (D -> D/k).
        side_depth: number of light blocks in the side branch.
        act_bits: bits of the activation storage (``s2a.compress_activations``); None
            turns compression off.
        op_bits: per-operator bits ``{kind: bits}``, kinds from ``s2a.activations.OP_KINDS``;
            kinds not listed use ``act_bits`` (attention keeps its own 8-bit default); 0
            keeps a kind native (attention calls whose logits are too large to recompute from
            8-bit Q / K already keep their probabilities instead, with a warning).
        num_classes: replace the classifier head by a fresh one with this many outputs;
            None keeps the model's head. On a backbone without a head (timm ``num_classes=0``,
            a transformers ``AutoModel``) with ``"side"`` in ``modules``: the side branch's
            output width (it makes the prediction).
        add_missing_bias: give Linear/Conv/Norm layers without a bias a zero-initialised one
            (not where the dry run shows the output cannot depend on it).
        fuse_side: fuse the side branch's prediction with the backbone's through a learned gate.
        freeze_norm_stats: keep BatchNorm layers of the frozen backbone on their running
            statistics in training (the backbone's buffers then never change).
    """

    modules: tuple[str, ...] = DEFAULT_MODULES
    prompt_rank: int = 4
    prompt_positions: int | None = None
    side_reduction: int = 8
    side_depth: int = 4
    act_bits: int | None = 4
    op_bits: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None
    add_missing_bias: bool = True
    fuse_side: bool = False
    freeze_norm_stats: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> S2AConfig:
        """Normalise the fields in place (``modules`` as a tuple) and raise ValueError
        naming a bad one; returns self."""
        mods = self.modules
        if isinstance(mods, str):
            mods = (mods,)
        try:
            mods = tuple(mods)
        except TypeError:
            raise ValueError(
                f"modules={self.modules!r}: expected a non-empty subset of {list(MODULES)}"
            ) from None
        bad = [m for m in mods if m not in MODULES]
        if bad or not mods:
            raise ValueError(
                f"modules={self.modules!r}: expected a non-empty subset of {list(MODULES)}"
                + (f" (unknown: {bad})" if bad else "")
            )
        # canonical order, no duplicates
        self.modules = tuple(m for m in MODULES if m in mods)

        for name, lo in (("prompt_rank", 1), ("side_reduction", 1), ("side_depth", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < lo:
                raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")

        if self.prompt_positions is not None:
            if not _is_int(self.prompt_positions) or self.prompt_positions < 1:
                raise ValueError(f"prompt_positions={self.prompt_positions!r}: expected None or an integer >= 1")
            if "prompt" not in self.modules:
                raise ValueError(
                    f"prompt_positions={self.prompt_positions}: needs 'prompt' in modules (got {list(self.modules)})")

        if self.act_bits is not None and (not _is_int(self.act_bits) or self.act_bits not in ACT_BITS):
            raise ValueError(f"act_bits={self.act_bits!r}: expected None or one of {list(ACT_BITS)}")

        if not isinstance(self.op_bits, Mapping):
            raise ValueError(
                f"op_bits={self.op_bits!r}: expected a dict {{kind: bits}} with kinds from {list(OP_KINDS)}"
            )
        op_bits = dict(self.op_bits)
        for kind, bits in op_bits.items():
            if kind not in OP_KINDS:
                raise ValueError(f"op_bits: unknown operator kind {kind!r}; allowed kinds: {list(OP_KINDS)}")
            allowed = bits_allowed(kind)
            if not _is_int(bits) or (bits != 0 and bits not in allowed):
                raise ValueError(f"op_bits[{kind!r}]={bits!r}: expected 0 (kept native) or one of {list(allowed)}")
        if op_bits and self.act_bits is None:
            raise ValueError("op_bits: per-operator bits need act_bits (got act_bits=None, compression off)")
        self.op_bits = op_bits

        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise ValueError(f"num_classes={self.num_classes!r}: expected None or an integer >= 1")

        for name in ("add_missing_bias", "fuse_side", "freeze_norm_stats"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r}: expected True or False")
        if self.fuse_side and "side" not in self.modules:
            raise ValueError("fuse_side=True: needs 'side' in modules")
        return self

    # ------------------------------------------------------------------ helpers
    def compression_ops(self) -> dict[str, int] | None:
        """The ``ops`` argument for :func:`s2a.compress_activations` (None: all kinds at act_bits)."""
        if self.act_bits is None or not self.op_bits:
            return None
        from s2a.activations.apply import CompressionSpec

        defaults = CompressionSpec(bits=self.act_bits)  # (8 bits for attention's q/k/v, matmul, star_relu)
        ops = {k: self.op_bits.get(k, defaults.bits_for(k)) for k in OP_KINDS}
        if "attention" not in self.op_bits:
            ops["attention"] = defaults.attention_storage()[1]
        return {k: b for k, b in ops.items() if b != 0}  # 0: that kind stays native

    def replace(self, **changes: Any) -> S2AConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; :meth:`from_dict` reads it back."""
        d = dataclasses.asdict(self)
        d["modules"] = list(self.modules)
        d["op_bits"] = dict(self.op_bits)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> S2AConfig:
        """Config from :meth:`to_dict`'s output; unknown keys or bad values raise ValueError."""
        if not isinstance(data, Mapping):
            raise ValueError(f"S2AConfig.from_dict expects a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown S2AConfig field(s) {unknown}; allowed fields: {names}")
        kwargs = dict(data)
        if "modules" in kwargs and isinstance(kwargs["modules"], list):
            kwargs["modules"] = tuple(kwargs["modules"])
        return cls(**kwargs)

    def to_json(self, **kwargs: Any) -> str:
        """JSON text (indented, sorted keys unless ``kwargs`` say otherwise)."""
        kwargs.setdefault("indent", 2)
        kwargs.setdefault("sort_keys", True)
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> S2AConfig:
        """Config from :meth:`to_json`'s text; malformed JSON raises ValueError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"S2AConfig.from_json: not valid JSON ({e})") from None
        return cls.from_dict(data)
