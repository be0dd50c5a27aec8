"""``TrainConfig``: every option of a training run, validated, with a JSON round trip."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from s2a.tuners.config import ACT_BITS, DEFAULT_MODULES, MODULES

__all__ = [
    "METHODS",
    "PRECISIONS",
    "RUNTIME_FIELDS",
    "TrainConfig",
    "TrainError",
    "default_lr",
]

# every --method (s2a.baselines.METHOD_SPECS describes each one)
METHODS = (
    "full", "linear", "bitfit", "vpt", "lora", "ia3", "prompt-tuning", "adaptformer", "lst",
    "full-ckpt", "bitfit-ckpt", "lora-ckpt", "mesa8", "fewbit2", "s2a", "s2a-lora",
)  # fmt: skip
# methods that compress their activations by default (--act-bits None -> 4; 0 turns it off)
COMPRESSED_BY_DEFAULT = ("s2a", "s2a-lora")
# methods that fix their own activation storage, or recompute instead of storing: no --act-bits
NO_ACT_BITS = ("mesa8", "fewbit2", "full-ckpt", "bitfit-ckpt", "lora-ckpt")
PRECISIONS = ("fp32", "bf16", "fp16")
# options that may differ when a run is resumed (they do not change what is computed)
RUNTIME_FIELDS = ("out", "device", "num_workers", "progress", "log_every", "stop_after", "save_every")


_FLOAT32_MAX = 3.4028234663852886e38


class TrainError(ValueError):
    """A training run that cannot start or continue; the message says why and what to do."""


def _check_decay(lr: float, weight_decay: float, whose: str) -> None:
    """AdamW scales the weights by 1 - lr x weight decay each step: at 1 or more they are
    zeroed or flip sign every step."""
    if lr * weight_decay >= 1:
        raise TrainError(
            f"weight_decay (--weight-decay) must be below {1 / lr:.3g} with lr {lr:g}{whose} (AdamW scales "
            f"the weights by 1 - lr x weight decay each step), got {weight_decay!r}"
        )


def default_lr(method: str, kind: str) -> float:
    """The learning rate used when none is given (AdamW, peak of the schedule).

    ``kind``: "text", "image" (image transformers) or "cnn" (image models whose weights are
    mostly convolutions; the trainer decides). Measured (benchmarks/accuracy.py, on the
    validation split): ``full`` and ``s2a`` on text (MiniLM) and on CNNs (EfficientNet-Lite0),
    which ``linear`` and ``bitfit`` share. Every other value is a default taken from the
    method's usual range; benchmarks/compare.py screens 0.3x / 1x / 3x of it per backbone."""
    if method in ("full", "full-ckpt", "mesa8", "fewbit2"):
        # every weight moves: the usual full fine-tuning range (storage does not change it);
        # EfficientNet-Lite0 on Fashion-MNIST learned best at 1e-3, ViT-size transformers
        # are usually fine-tuned below 5e-4 with AdamW
        return {"text": 5e-5, "cnn": 1e-3}.get(kind, 2e-4)
    if method in ("lora", "lora-ckpt", "s2a-lora", "vpt", "adaptformer"):
        # new low-rank / adapter / prompt tensors from (near) zero; 1e-3 is the common AdamW
        # setting for LoRA, adapters and VPT on ViT and BERT-size models
        return 1e-3
    if method in ("ia3", "lst"):
        # IA3's scaling vectors and LST's freshly initialised side network are usually
        # trained with 3e-3 (T-Few, LST)
        return 3e-3
    if method == "prompt-tuning":
        # a handful of input embeddings must move far; prompt tuning is run with much larger
        # steps than the other methods (0.3 with Adafactor in Lester et al.)
        return 3e-2
    # linear, bitfit, s2a: few tuned tensors on a frozen backbone need a large step to move
    # within a few hundred steps; MiniLM / Rotten Tomatoes, 1000 sentences, 5 epochs, s2a: 1e-3
    # stays near chance, 1e-2 stalls two epochs before it learns, 3e-3 and 5e-3 learn steadily;
    # EfficientNet-Lite0 / Fashion-MNIST: 1e-2 (2e-2 no better on validation)
    return {"text": 5e-3, "cnn": 1e-2}.get(kind, 1e-3)


# S2AConfig.prompt_rank's default, kept here so this module stays free of torch (a test checks they agree)
DEFAULT_PROMPT_RANK = 4


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Options of :class:`s2a.train.Trainer` (the CLI flags are the field names with dashes).

    ``lr`` None: :func:`default_lr` for the method and model kind. ``act_bits`` None: 4 for
    ``s2a`` and ``s2a-lora``, no activation compression for the other methods; 0 turns it off
    for ``s2a`` / ``s2a-lora`` too; refused by ``mesa8``, ``fewbit2`` and the ``*-ckpt``
    methods. ``batch_size`` is the global micro-batch (summed over data-parallel processes);
    one optimizer step sees ``batch_size * grad_accum`` examples. ``dropout`` None keeps the
    model's dropout rates; a number sets the rate of every dropout layer (0 turns dropout
    off). ``max_length`` None: 128 tokens, or the model's limit if lower. ``warmup_ratio`` is
    the fraction of all optimizer steps spent warming up linearly before the cosine decay to 0.
    ``max_grad_norm`` 0 disables clipping. ``save_every`` > 0 also writes the last checkpoint
    every that many optimizer steps (it is always written at the end of an epoch and when the
    run is interrupted). ``stop_after`` > 0 stops this invocation after that many optimizer
    steps, writing ``last.pt`` (time-sliced jobs; ``--resume`` continues).
    """

    model: str
    data: str
    out: str
    method: str = "s2a"
    modules: tuple[str, ...] = DEFAULT_MODULES
    prompt_rank: int = DEFAULT_PROMPT_RANK
    act_bits: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    label_smoothing: float = 0.0
    dropout: float | None = None
    precision: str = "fp32"
    seed: int = 0
    split_seed: int = 0
    max_length: int | None = None
    img_size: int | None = None
    weights: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    device: str = "auto"
    num_workers: int = 0
    save_every: int = 0
    log_every: int = 1
    stop_after: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> TrainConfig:
        def fail(name: str, expected: str) -> None:
            raise TrainError(f"{name} ({_flag(name)}) must be {expected}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("model", "data", "out"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                fail(name, "a non-empty string")
        if self.method not in METHODS:
            fail("method", f"one of {list(METHODS)}")
        if isinstance(self.modules, str):
            self.modules = tuple(m.strip() for m in self.modules.split(",") if m.strip())
        self.modules = tuple(self.modules)
        if not self.modules:
            fail("modules", "a non-empty list such as bias,prompt")
        if len(set(self.modules)) < len(self.modules):
            fail("modules", f"each module once (got {','.join(self.modules)})")
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown:
            fail("modules", f"names from {list(MODULES)} (unknown: {unknown})")
        if self.modules != DEFAULT_MODULES and self.method != "s2a":
            raise TrainError(
                f"--modules {','.join(self.modules)} applies only to --method s2a (got --method "
                f"{self.method}, which chooses its own trainable parameters); drop --modules"
            )
        if not is_int(self.prompt_rank) or self.prompt_rank < 1:
            fail("prompt_rank", "an integer >= 1")
        if self.prompt_rank != DEFAULT_PROMPT_RANK and (self.method != "s2a" or "prompt" not in self.modules):
            raise TrainError(
                f"--prompt-rank {self.prompt_rank} applies only to --method s2a with the prompt module "
                f"(got --method {self.method}, --modules {','.join(self.modules)}); drop --prompt-rank "
                "or add prompt to --modules"
            )
        if self.act_bits is not None and (not is_int(self.act_bits) or self.act_bits not in (0, *ACT_BITS)):
            fail("act_bits", f"one of the bit widths {list(ACT_BITS)}, or 0 (off; 'none' on the command line), "
                 "or None in Python (the method's default)")
        if self.method in NO_ACT_BITS and self.act_bits:
            raise TrainError(
                f"--method {self.method} takes no --act-bits (got {self.act_bits}): it fixes its own "
                "activation storage (mesa8, fewbit2) or recomputes activations (*-ckpt)"
            )
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                fail(name, "an integer >= 1")
        for name in ("train_size", "val_size", "test_size", "eval_batch_size", "max_length"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                fail(name, "an integer >= 1")
        if self.img_size is not None and (not is_int(self.img_size) or self.img_size < 8):
            fail("img_size", "an integer >= 8")
        for name in ("num_workers", "save_every", "stop_after"):
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                fail(name, "an integer >= 0")
        for name in ("seed", "split_seed"):  # (torch seeds take 64 bits; the trainer derives others)
            v = getattr(self, name)
            if not is_int(v) or not 0 <= v < 2**32:
                fail(name, "an integer in [0, 2**32)")
        # Past float32's range an AdamW step fails inside PyTorch, after the whole set-up: its
        # first step moves by 10 x lr (bias correction), and scales weights by 1 - lr * decay.
        if self.lr is not None and (not is_num(self.lr) or not 0 < self.lr <= _FLOAT32_MAX / 10):
            fail("lr", "a number > 0 (at most 3.4e37: AdamW's first step is 10 x lr, in float32)")
        if not is_num(self.weight_decay) or not 0 <= self.weight_decay <= _FLOAT32_MAX / 10:
            fail("weight_decay", "a number >= 0 (at most 3.4e37)")
        if self.lr is not None:
            _check_decay(self.lr, self.weight_decay, "")
        if not is_num(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "in [0, 1)")
        if not is_num(self.max_grad_norm) or self.max_grad_norm < 0:
            fail("max_grad_norm", "a number >= 0 (0 disables clipping)")
        if not is_num(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            fail("label_smoothing", "in [0, 1)")
        if self.dropout is not None and (not is_num(self.dropout) or not 0 <= self.dropout < 1):
            fail("dropout", "in [0, 1), or None to keep the model's own rates")
        if self.precision not in PRECISIONS:
            fail("precision", f"one of {list(PRECISIONS)}")
        if not isinstance(self.progress, bool):
            fail("progress", "True or False")
        return self

    # ------------------------------------------------------------------ resolution
    def resolved(self, kind: str) -> TrainConfig:
        """A copy with ``lr`` / ``act_bits`` / ``eval_batch_size`` defaults filled in (``kind``:
        see :func:`default_lr`)."""
        lr = self.lr if self.lr is not None else default_lr(self.method, kind)
        if self.lr is None:
            _check_decay(lr, self.weight_decay, f", the default for --method {self.method} on a {kind} model")
        act_bits = self.act_bits
        if act_bits is None and self.method in COMPRESSED_BY_DEFAULT:
            act_bits = 4
        if act_bits == 0:
            act_bits = None
        eval_bs = self.eval_batch_size or max(self.batch_size, 64)
        return dataclasses.replace(self, lr=lr, act_bits=act_bits if act_bits is not None else 0, eval_batch_size=eval_bs)

    @property
    def compression_bits(self) -> int | None:
        """Bits of activation storage after :meth:`resolved` (None: no compression)."""
        return self.act_bits or None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["modules"] = list(self.modules)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise TrainError(f"unknown training option(s) {unknown}; known: {names}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        lacking = [k for k in required if k not in data]
        if lacking:
            raise TrainError(f"the saved options lack {lacking}: they were edited or written by another program")
        kwargs = dict(data)
        if isinstance(kwargs.get("modules"), list):
            kwargs["modules"] = tuple(kwargs["modules"])
        return cls(**kwargs)

    def fingerprint(self) -> dict[str, Any]:
        """The options that determine the computation (everything but :data:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def fingerprint_changes(self, saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Options whose value differs from ``saved`` (an earlier run's :meth:`fingerprint`), as
        ``name: (saved value, value now)``. An option the saved fingerprint lacks was added after
        that run was written, which therefore ran with its default: it counts as changed only
        when today's value is not that default, so adding an option never strands older runs;
        a runtime option in ``saved`` (one that counted before it was known not to change the
        computation, such as ``save_every``) is ignored."""
        defaults = self._fingerprint_defaults()
        mine = self.fingerprint()
        return {
            k: (saved.get(k, defaults.get(k)), mine.get(k))
            for k in sorted(set(mine) | (set(saved) - set(RUNTIME_FIELDS)))
            if mine.get(k) != saved.get(k, defaults.get(k))
        }

    @classmethod
    def _fingerprint_defaults(cls) -> dict[str, Any]:
        # as to_dict writes them (tuples as lists), so they compare equal to a loaded fingerprint
        return {
            f.name: list(f.default) if isinstance(f.default, tuple) else f.default
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        }
