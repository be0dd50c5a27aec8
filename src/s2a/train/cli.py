"""``s2a train``: argument parser and handler (registered by :mod:`s2a.cli`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import METHODS, PRECISIONS, RUNTIME_FIELDS, TrainConfig, TrainError

__all__ = ["add_train_parser", "config_from_args", "run_train"]

EPILOG = """\
examples:
  s2a train --model minilm --data rotten-tomatoes --method s2a --train-size 1000 --out runs/rt-s2a
  s2a train --model minilm --data rotten-tomatoes --method full --train-size 1000 --out runs/rt-full
  s2a train --model efficientnet_lite0 --data fashion-mnist --method s2a --img-size 96 --out runs/fm
  s2a train --model vit_base_patch16_224 --weights vit.safetensors --data path/to/vtab/cifar --out runs/v
  s2a train --out runs/rt-s2a --resume          # continue an interrupted run
  torchrun --nproc_per_node 2 -m s2a.cli train ...   # data parallel (gloo on CPU, NCCL on GPU)

the run directory holds config.json, metrics.jsonl, checkpoints/{last,best}.pt, report.json,
report.md, memory_by_operator.png and curves.png; with --method s2a also tuned/ (the tuned
tensors for s2a.load_tuned; report.md says how to load them).
"""


def _act_bits(text: str) -> int:
    if text.strip().lower() in ("none", "off", "0"):
        return 0
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width such as 4, or none; got {text!r}") from None


def _modules(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _methods_help() -> str:
    from s2a.baselines import METHOD_SPECS

    width = max(len(n) for n in METHOD_SPECS)
    lines = [f"  {n:<{width}}  {s.description}" for n, s in METHOD_SPECS.items()]
    return "\nmethods (--method):\n" + "\n".join(lines) + "\n"


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="fine-tune a model on a dataset (S2A, full, LoRA, VPT, ... see --method) and report accuracy and memory",
        description=(
            "Fine-tune a pretrained model with S2A (frozen backbone, bias / low-rank prompt / side "
            "modules, low-bit activation storage) or one of the methods it is compared with (full "
            "fine-tuning, linear probe, BitFit, VPT, peft LoRA / IA3 / prompt tuning, AdaptFormer, "
            "Ladder Side-Tuning, checkpointing, Mesa- and Few-bit-style storage). Evaluates on the "
            "validation split every epoch, keeps the best and last checkpoints, and reports test "
            "accuracy, trainable parameters, activation memory and speed."
        ),
        epilog=EPILOG + _methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="minilm, efficientnet_lite0, a timm model name, or a transformers model directory")
    g.add_argument(
        "--data",
        help="rotten-tomatoes, fashion-mnist, an image folder, a VTAB-1k directory, a CSV/JSONL file, "
        "a Hugging Face save_to_disk directory, or hf:NAME",
    )
    g.add_argument(
        "--method", choices=METHODS, metavar="METHOD",
        help="fine-tuning method (default s2a); see 'methods' below",
    )  # fmt: skip
    g.add_argument("--modules", type=_modules,
                   help="s2a modules, comma separated, of bias, norm, prompt, side (default bias,prompt; --method s2a only)")
    g.add_argument("--prompt-rank", type=int, help="rank r of the s2a low-rank prompt X + A·B (default 4)")
    g.add_argument(
        "--act-bits", type=_act_bits,
        help="activation storage bits: s2a / s2a-lora default 4 (none = off); other methods default "
        "native, a width compresses them on top; refused by mesa8, fewbit2, *-ckpt",
    )  # fmt: skip
    g.add_argument("--weights", help="weights file for a timm model (.safetensors or a PyTorch state dict)")
    d = p.add_argument_group("data")
    d.add_argument("--train-size", type=int, help="few-shot: N training examples drawn with --seed")
    d.add_argument("--val-size", type=int, help="cap the validation split (seeded)")
    d.add_argument("--test-size", type=int, help="cap the test split (seeded; default: the whole split)")
    d.add_argument("--split-seed", type=int, help="seed of the train/val/test split (default 0)")
    d.add_argument("--text-column", help="text column of a table / Hugging Face dataset")
    d.add_argument("--image-column", help="image column of a Hugging Face dataset (default: image, img, ...)")
    d.add_argument("--label-column", help="label column of a table / Hugging Face dataset")
    d.add_argument("--max-length", type=int, help="tokens per sentence (default 128, or the model's limit if lower)")
    d.add_argument("--img-size", type=int, help="image side (default: the model's input size)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, help="default 3")
    o.add_argument("--batch-size", type=int, help="global micro-batch (default 32)")
    o.add_argument("--eval-batch-size", type=int, help="default max(batch size, 64)")
    o.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    o.add_argument(
        "--lr", type=float,
        help="peak learning rate (default: full, full-ckpt, mesa8, fewbit2 5e-5 text / 2e-4 image "
        "transformer / 1e-3 CNN; s2a, linear, bitfit, bitfit-ckpt 5e-3 text / 1e-3 image transformer / 1e-2 CNN; "
        "lora, lora-ckpt, s2a-lora, vpt, adaptformer 1e-3; ia3, lst 3e-3; prompt-tuning 3e-2; a CNN is "
        "an image model with most of its weights in convolutions)",
    )  # fmt: skip
    o.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.01)")
    o.add_argument("--warmup-ratio", type=float, help="fraction of steps of linear warm-up (default 0.1)")
    o.add_argument("--max-grad-norm", type=float, help="gradient clipping norm, 0 = off (default 1.0)")
    o.add_argument("--label-smoothing", type=float, help="in [0, 1) (default 0)")
    o.add_argument("--dropout", type=float,
                   help="rate of every dropout layer of the model, in [0, 1); 0 turns dropout off (default: the model's own)")
    o.add_argument("--precision", choices=PRECISIONS, help="autocast precision (default fp32)")
    o.add_argument("--seed", type=int, help="default 0")
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True, help="run directory")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --out (training options are read from it; the run group's options, "
                           "--save-every aside, come from this command: give --device again to keep a device)")
    mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    r.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    r.add_argument("--num-workers", type=int, help="data loading processes (default 0)")
    r.add_argument("--save-every", type=int,
                   help="also write last.pt every N optimizer steps (default 0: once per epoch)")
    r.add_argument("--log-every", type=int, help="metrics.jsonl line every N steps (default 1)")
    r.add_argument(
        "--stop-after", type=int, metavar="N",
        help="stop this invocation after N optimizer steps, writing last.pt (time-sliced jobs; --resume "
             "continues; default 0: run to the end)",
    )  # fmt: skip
    r.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.set_defaults(func=run_train)
    return p


OPTION_FIELDS = (
    "model", "data", "method", "modules", "prompt_rank", "act_bits", "weights", "train_size", "val_size", "test_size",
    "split_seed", "text_column", "image_column", "label_column", "max_length", "img_size", "epochs", "batch_size",
    "eval_batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
    "label_smoothing", "dropout", "precision", "seed", "out", "device", "num_workers", "save_every", "log_every",
    "stop_after", "progress",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's :class:`TrainConfig`: explicit options over the saved ones (``--resume``)."""
    from s2a.cli import CliError

    given = {k: getattr(args, k) for k in OPTION_FIELDS if getattr(args, k, None) is not None}
    if args.resume:
        path = Path(args.out) / "config.json"
        if not path.is_file():
            raise CliError(f"nothing to resume: {path} does not exist (drop --resume to start a run there)")
        try:
            whole = json.loads(path.read_text(encoding="utf-8"))
            saved, resolved = whole["config"], whole.get("resolved") or {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CliError(f"{path} is unreadable ({exc}); start again with --overwrite") from None
        if not isinstance(saved, dict) or not isinstance(resolved, dict):
            raise CliError(f"{path} is unreadable (its 'config' is not a mapping of options); start again "
                           "with --overwrite")
        conflicts = []
        for k, v in given.items():
            old = saved.get(k)
            if k in RUNTIME_FIELDS:
                continue
            new = list(v) if isinstance(v, tuple) else v
            if old is None and resolved.get(k) is not None:  # a default the run filled in (--lr, --act-bits)
                if resolved[k] != new:
                    conflicts.append(f"--{k.replace('_', '-')} {new!r} (the run has its default, {resolved[k]!r})")
            elif old != new:
                conflicts.append(f"--{k.replace('_', '-')} {new!r} (the run has {old!r})")
        if conflicts:
            raise CliError(
                "--resume continues a run with its own options; these differ: " + ", ".join(conflicts)
                + ". Drop them, or start a new run (other --out, or --overwrite)."
            )
        # runtime options (device, workers, --stop-after...) come from this command, not the run;
        # --save-every, when not given, stays the run's (a preemptible job keeps saving)
        merged = {k: v for k, v in saved.items() if k not in RUNTIME_FIELDS or k == "save_every"}
        merged.update({k: v for k, v in given.items() if k in RUNTIME_FIELDS})
        try:
            return TrainConfig.from_dict(merged)
        except (TrainError, TypeError, ValueError) as exc:
            raise CliError(f"{path}: {exc}; start again with --overwrite") from None
    missing = [f"--{k}" for k in ("model", "data") if k not in given]
    if missing:
        raise CliError(f"s2a train needs {' and '.join(missing)} (or --resume to continue a run)")
    # an option given at its default value is still one the method would ignore
    method = given.get("method", TrainConfig.method)
    for option in ("modules", "prompt_rank"):
        if option in given and method != "s2a":
            raise CliError(f"--{option.replace('_', '-')} applies only to --method s2a (got --method {method}, "
                           f"which chooses its own trainable parameters); drop --{option.replace('_', '-')}")
    config = TrainConfig(**given)
    if "prompt_rank" in given and "prompt" not in config.modules:
        raise CliError(f"--prompt-rank applies only with the prompt module (got --modules {','.join(config.modules)}); "
                       "drop --prompt-rank or add prompt to --modules")
    return config


def run_train(args: argparse.Namespace, out: Any = None) -> dict[str, Any]:
    from s2a.cli import CliError
    from s2a.data import DataError
    from s2a.zoo import ZooError

    from .trainer import Trainer, TrainInterrupted

    out = sys.stdout if out is None else out
    try:
        cfg = config_from_args(args)
        report = Trainer(cfg, resume=args.resume, overwrite=args.overwrite).fit()
    except TrainInterrupted as exc:
        print(f"s2a train: {exc}", file=sys.stderr)
        if exc.planned:  # --stop-after: done as asked
            return {"interrupted": True, "planned": True}
        raise SystemExit(130) from None
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last checkpoint is kept
        print(
            f"s2a train: stopped; {Path(args.out) / 'checkpoints' / 'last.pt'} (if any) is the last consistent "
            f"state. Continue with: s2a train --out {args.out} --resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    except (TrainError, DataError, ZooError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # the file system (a full disk, --out under a file), not the run
        what = f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"
        if not (Path(args.out) / "config.json").is_file():  # nothing was written: nothing to continue
            raise CliError(f"{what}. Choose an --out that can be written (a folder, or a path under one)") from None
        raise CliError(
            f"{what}. Checkpoints are written to a temporary file and moved into place, so those in "
            f"{Path(args.out) / 'checkpoints'} (if any) are whole: fix the cause, then continue with "
            f"s2a train --out {args.out} --resume (or start over with --overwrite)") from None
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 speaks
        return report

    def mib(v: Any) -> str:
        return "n/a" if v is None else f"{v / 2**20:.2f} MiB"

    def num(v: Any, fmt: str, unit: str) -> str:
        return "n/a" if v is None else f"{v:{fmt}} {unit}"

    from .report import few_timed_steps, steps_text

    few = few_timed_steps(report)

    print(
        f"accuracy {report['accuracy']:.4f} (test, {report['num_test']} examples; best val "
        f"{report['val_accuracy']:.4f} at epoch {report['best_epoch']}) | trainable "
        f"{report['trainable_params']:,} ({report['trainable_percent']:.3f}%) | saved for backward "
        f"{mib(report['saved_activation_bytes'])} | step peak {mib(report['peak_memory_bytes'])} | "
        f"step {num(report['step_time_s'], '.3f', 's')} | {num(report['throughput'], '.1f', 'ex/s')}"
        + (f" (from only {steps_text(few)}, likely with compilation: see the report)"
           if few is not None else ""),
        file=out,
    )
    print(f"wrote {Path(cfg.out) / 'report.md'}", file=out)
    return report


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        help="print finished runs side by side (accuracy, trainable parameters, memory, speed)",
        description="Read report.json of each run directory and print one Markdown table; ratios are to the first run.",
    )
    p.add_argument("runs", nargs="+", help="run directories written by s2a train")
    p.add_argument("--plot", help="also write a PNG of accuracy and activation memory per run")
    p.add_argument("--md", help="also write the table to this Markdown file")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args: argparse.Namespace, out: Any = None) -> str:
    from s2a.cli import CliError

    from .report import compare_runs

    out = sys.stdout if out is None else out
    plot = args.plot
    if plot:
        suffix = Path(plot).suffix.lower()
        if not suffix:  # matplotlib would write plot.png: say so, and name that file
            plot = plot + ".png"
        elif suffix not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
            raise CliError(f"--plot {plot}: write a .png (or .pdf, .svg, .jpg) file")
    try:
        table = compare_runs(args.runs, plot=plot)
        if args.md:
            Path(args.md).parent.mkdir(parents=True, exist_ok=True)
            Path(args.md).write_text(table + "\n", encoding="utf-8")
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}") from None
    print(table, file=out)
    for path in (plot, args.md):
        if path:
            print(f"wrote {path}", file=out)
    return table
