"""Measure how adversarial attacks break a trained WBC classifier or segmenter.

Example::

    python main.py --task classification --attack pgd --eps-list 0 2/255 8/255 --limit 64

Loads ``<out>/checkpoints/best.pt``, sweeps the attack over the eps list on the val and
test splits (see ``sweep.py``) and writes ``results.csv``, ``results.json``, the figures
and ``report.md`` into ``--out`` (see ``report.py``).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from attacks import ATTACKS, Attack, attack_info, build_attack
from checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from dataset import build_splits, make_loader
from report import Report, library_versions
from sweep import SweepSpec, run_split
from utils import (ArgumentParser, CheckpointError, UsageError, check_number, check_seed, output_lock,
                   parse_fraction, resolve_device, run_cli, seed_everything)

TASKS = ("classification", "segmentation")
DEFAULT_EPS = ("0", "2/255", "4/255", "8/255", "16/255", "32/255", "64/255", "128/255")
#: The original study's segmentation target: background->nucleus, cytoplasm->background,
#: nucleus->cytoplasm.
DEFAULT_TARGET_MAP = (2, 0, 1)


# --------------------------------------------------------------------------- arguments
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Adversarial robustness sweep for WBC models",
                                     add_help=add_help)
    parser.add_argument("--task", default="classification", choices=TASKS)
    parser.add_argument("--checkpoint", default=None, help="default: <out>/checkpoints/best.pt")
    parser.add_argument("--data", default=None, help="default: the checkpoint's data, else synthetic")
    parser.add_argument("--attack", default="pgd", help=f"one of: {', '.join(ATTACKS)}")
    parser.add_argument("--eps-list", nargs="+", default=list(DEFAULT_EPS),
                        help="perturbation budgets in [0, 1], e.g. 0 8/255 0.03")
    parser.add_argument("--steps", type=int, default=10, help="attack iterations (Square: queries)")
    parser.add_argument("--alpha", type=float, default=None, help="step size; default 2.5*eps/steps")
    parser.add_argument("--random-start", action="store_true")
    parser.add_argument("--targeted", action="store_true")
    parser.add_argument("--target-class", type=int, default=None,
                        help="classification target; default the next class (y+1) %% C")
    parser.add_argument("--target-map", default=None,
                        help="segmentation target per class, e.g. 2,0,1 (the default)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N samples per split (a stratified, seeded subset)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: Classification/ or Segmentation/")
    parser.add_argument("--examples", type=int, default=4, help="examples in Images/images.png")
    parser.add_argument("--resume", action="store_true", help="skip rows already computed in --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def parse_eps_list(texts: Sequence[str], norm: str = "Linf") -> list[float]:
    """Parse, check, sort and deduplicate ``--eps-list`` values.

    L-inf budgets live in [0, 1] (images are in [0, 1]); an L2 budget is a norm over all
    3*H*W pixels, so it may exceed 1.
    """
    values = set()
    for text in texts:
        try:
            value = parse_fraction(text)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--eps-list value {text!r} is not a number; write e.g. 8/255 or 0.03") from None
        if value < 0 or (norm == "Linf" and value > 1):
            raise UsageError(f"--eps-list value {text!r} is outside [0, 1]; L-inf budgets are in pixel "
                             "units of [0, 1] images, e.g. 8/255")
        values.add(value)
    return sorted(values)


def parse_target_map(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        return list(DEFAULT_TARGET_MAP)
    try:
        mapping = [int(part) for part in text.split(",")]
    except ValueError:
        mapping = []
    if len(mapping) != num_classes or not all(0 <= m < num_classes for m in mapping):
        raise UsageError(f"--target-map {text!r} needs {num_classes} comma-separated classes in "
                         f"[0, {num_classes - 1}], e.g. 2,0,1")
    return mapping


def validate_args(args: argparse.Namespace) -> None:
    """Turn bad flag combinations into one-line usage errors before any work."""
    info = attack_info(args.attack)
    args.eps_values = parse_eps_list(args.eps_list, info.norm)
    check_number("--alpha", args.alpha, low=0, low_open=True)
    check_seed(args.seed)
    checks = [
        (args.steps < 1, f"--steps must be >= 1, got {args.steps}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.limit is not None and args.limit < 1, f"--limit must be >= 1, got {args.limit}"),
        (args.examples < 0, f"--examples must be >= 0, got {args.examples}"),
        (args.workers < 0, f"--workers must be >= 0, got {args.workers}"),
        (args.task == "segmentation" and not info.segmentation,
         f"--attack {args.attack} does not support segmentation; use one of "
         f"{', '.join(n for n, i in ATTACKS.items() if i.segmentation)}"),
        (args.targeted and not info.targeted,
         f"--attack {args.attack} has no targeted mode; drop --targeted or use one of "
         f"{', '.join(n for n, i in ATTACKS.items() if i.targeted)}"),
        (args.target_class is not None and (args.task != "classification" or not args.targeted),
         "--target-class needs --targeted and --task classification (segmentation uses --target-map)"),
        (args.target_map is not None and (args.task != "segmentation" or not args.targeted),
         "--target-map needs --targeted and --task segmentation (classification uses --target-class)"),
    ]
    for failed, message in checks:
        if failed:
            raise UsageError(message)


def make_target_fn(args: argparse.Namespace, num_classes: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Map true labels (or masks) to target labels; None for untargeted sweeps."""
    if not args.targeted:
        return None
    if args.task == "segmentation":
        table = torch.tensor(parse_target_map(args.target_map, num_classes))
        return lambda masks: table.to(masks.device)[masks]
    if args.target_class is None:
        return lambda labels: (labels + 1) % num_classes
    if not 0 <= args.target_class < num_classes:
        raise UsageError(f"--target-class must be in [0, {num_classes - 1}], got {args.target_class}")
    return lambda labels: torch.full_like(labels, args.target_class)


# --------------------------------------------------------------------------- setup
def load_model(args: argparse.Namespace, device: torch.device) -> tuple[dict, nn.Module]:
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["task"] != args.task:
        raise CheckpointError(f"checkpoint {args.checkpoint} is a {ckpt['task']} model but --task is "
                              f"{args.task}; pass --task {ckpt['task']} or another --checkpoint")
    return ckpt, model_from_checkpoint(ckpt, device)


def load_splits(args: argparse.Namespace, ckpt: Mapping) -> dict:
    """The requested splits, built exactly as at training time (at most ``--limit`` each)."""
    train_args = ckpt.get("args") or {}
    datasets = build_splits(args.task, args.data, val_data=train_args.get("val_data"),
                            test_data=train_args.get("test_data"), image_size=ckpt["image_size"],
                            seed=train_args.get("seed", 0), limit=args.limit,
                            skip_missing_masks=bool(train_args.get("skip_missing_masks", False)))
    return {name: datasets[name] for name in dict.fromkeys(args.splits)}


def alpha_for(args: argparse.Namespace, eps: float) -> float:
    return args.alpha if args.alpha is not None else 2.5 * eps / args.steps


def sweep_config(args: argparse.Namespace, ckpt: Mapping, ckpt_sha: str, device: torch.device) -> dict:
    """Everything that decides the numbers (compared on --resume) plus provenance."""
    return {
        "task": args.task, "attack": args.attack, "norm": ATTACKS[args.attack].norm,
        "steps": args.steps, "alpha": args.alpha if args.alpha is not None else "2.5*eps/steps",
        "random_start": args.random_start, "targeted": args.targeted,
        "target_class": args.target_class, "target_map": args.target_map,
        "seed": args.seed, "data": args.data, "limit": args.limit,
        "checkpoint": str(args.checkpoint), "checkpoint_sha256": ckpt_sha,
        "class_names": list(ckpt["class_names"]), "splits": list(dict.fromkeys(args.splits)),
        "eps_list": args.eps_values, "device": str(device), "batch_size": args.batch_size,
        "versions": library_versions(),
    }


def log_row(report: Report, row: dict, norm: str) -> None:
    """Record a finished row and print it with its sanity line (the sweep already enforced it)."""
    report.add_row(row)
    key = "accuracy" if "accuracy" in row else "dice_mean"
    worst = row["linf_max"] if norm == "Linf" else row["l2_max"]
    eps = f"{row['eps'] * 255:.4g}/255" if norm == "Linf" else f"{row['eps']:.4g} (L2)"
    print(f"{row['split']:>5} eps={eps:<12} {key} {row[key]:.4f}  "
          f"sanity ok: max {norm} {worst:.6f} <= eps, finite, in [0, 1]  ({row['seconds']:.1f} s)")


def main(args: argparse.Namespace) -> Report:
    validate_args(args)
    args.out = Path(args.out or ("Classification" if args.task == "classification" else "Segmentation"))
    args.checkpoint = Path(args.checkpoint or args.out / "checkpoints" / "best.pt")
    device = resolve_device(args.device)  # a usage error: before --out is created
    with output_lock(args.out):
        return run_sweep(args, device)


def run_sweep(args: argparse.Namespace, device: torch.device) -> Report:
    """The sweep itself, run while this process holds the lock on ``args.out``."""
    seed_everything(args.seed)
    ckpt, model = load_model(args, device)
    if args.data is None:
        args.data = (ckpt.get("args") or {}).get("data")
    num_classes = len(ckpt["class_names"])
    target_fn = make_target_fn(args, num_classes)
    report = Report(args.out, args.task, sweep_config(args, ckpt, file_sha256(args.checkpoint), device),
                    splits=list(dict.fromkeys(args.splits)), eps_list=args.eps_values, resume=args.resume)
    info = ATTACKS[args.attack]
    spec = SweepSpec(task=args.task, class_names=list(ckpt["class_names"]), eps_list=args.eps_values,
                     attack=args.attack, norm=info.norm, eps_bounded=info.eps_bounded,
                     targeted=args.targeted, seed=args.seed, examples=args.examples,
                     fingerprint=report.fingerprint)

    def make_attack(eps: float) -> Attack:
        return build_attack(args.attack, model, eps, steps=args.steps, alpha=alpha_for(args, eps),
                            random_start=args.random_start, num_classes=num_classes,
                            targeted=args.targeted, seed=args.seed)

    for split, dataset in load_splits(args, ckpt).items():
        loader = make_loader(dataset, args.batch_size, train=False, workers=args.workers,
                             device=device, seed=args.seed)
        examples = run_split(model, loader, spec, split=split, make_attack=make_attack,
                             target_fn=target_fn, device=device,
                             on_row=lambda row: log_row(report, row, info.norm),
                             state_dir=args.out / ".sweep_state", resume=args.resume)
        report.add_examples(split, examples)
    report.finish()
    print(f"wrote {args.out / 'results.csv'} and {args.out / 'report.md'}")
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
