"""Measure how adversarial attacks break a trained WBC classifier or segmenter.

Example::

    python main.py --task segmentation --attack pgd,segpgd,cospgd --eps-list 0 2/255 8/255   # reads Segmentation/checkpoints/best.pt

Loads ``<out>/checkpoints/best.pt``, sweeps each attack over the eps list on the val and
test splits (see ``sweep.py``; the attacks themselves are in ``attacks.py``), runs the
gradient-masking checklist (``checks.py``) and writes ``results.csv``, ``results.json``, the
figures and ``report.md`` into ``--out`` (see ``report.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks import ATTACKS, Attack, attack_info, build_attack, fast_spec
from checkpoint import data_roots, file_sha256, load_checkpoint, model_from_checkpoint, split_seed
from checks import CheckSettings, run_checks
from compare import compare, load_runs, setting_differences
from dataset import CLASS_NAMES, build_splits, training_copies_notes
from distributed import Dist, init_distributed, setup_for_distributed, shutdown, stop_together
from engine import Engine, prepare_model
from files import output_lock
from outcomes import gather_outcomes, per_sample_arrays
from report import Report, library_versions, refuse_earlier_sweep
from splitdata import load_split
from sweep import WORST_CASE_RULE, SweepSpec, run_split
from utils import (DEFAULT_STEP_RULE, PRECISIONS, ArgumentParser, CheckpointError, DataError, ToolError,
                   UsageError, check_number, check_seed, parse_eps_list, parse_step_size, peak_memory_mb,
                   resolve_device, resolve_precision, run_cli, seed_everything, step_size)

TASKS = ("classification", "segmentation")
DEFAULT_EPS = ("0", "2/255", "4/255", "8/255", "16/255", "32/255", "64/255", "128/255")
DEFAULT_L2_EPS = ("0", "0.25", "0.5", "1", "2", "4")  # an L2 norm over 3*H*W values: 8/255 everywhere is 7 at 128 px
#: The original study's segmentation target: background->nucleus, cytoplasm->background,
#: nucleus->cytoplasm.
DEFAULT_TARGET_MAP = (2, 0, 1)
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


# --------------------------------------------------------------------------- arguments
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Adversarial robustness sweep for WBC models",
                                     add_help=add_help)
    parser.add_argument("--task", default=None, choices=TASKS,
                        help="default: the task of --checkpoint, else classification")
    parser.add_argument("--checkpoint", default=None, help="default: <out>/checkpoints/best.pt")
    parser.add_argument("--data", default=None, help="default: the checkpoint's data, else synthetic")
    parser.add_argument("--val-data", default=None, help="default: the checkpoint's --val-data, if it had one")
    parser.add_argument("--test-data", default=None, help="default: the checkpoint's --test-data, if it had one")
    parser.add_argument("--attack", default="pgd",
                        help=f"one attack or a comma list (adds a worst-case row), of: {', '.join(ATTACKS)}")
    parser.add_argument("--eps-list", nargs="+", default=None,
                        help=f"perturbation budgets, e.g. 0 8/255 0.03; default L-inf {' '.join(DEFAULT_EPS)}, "
                             f"L2 {' '.join(DEFAULT_L2_EPS)}")
    parser.add_argument("--steps", type=int, default=10, help="attack iterations (Square: queries)")
    parser.add_argument("--alpha", default=None,
                        help="step size: a number (0.01, 2/255) or a fraction of each eps (eps/4); "
                             "default 2.5*eps/steps")
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
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="under torchrun, cuda gives each local process its own GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="default: Classification/ or Segmentation/")
    parser.add_argument("--examples", type=int, default=4, help="examples in Images/images.png")
    parser.add_argument("--resume", action="store_true", help="skip rows already computed in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier sweep in --out (refused without it or --resume)")
    parser.add_argument("--engine", default="fast", choices=["fast", "library"],
                        help="fast: the PGD family runs packed, with early stop (default); library: as built")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast for the attack's forward/backward; auto: bf16 where native, else fp32")
    parser.add_argument("--memory-format", default="channels_last", choices=list(MEMORY_FORMATS),
                        help="memory format of the fast engine's model and batches")
    parser.add_argument("--no-fold-batchnorm", dest="fold_batchnorm", action="store_false",
                        help="fast engine: keep the batch norms as layers (by default they are folded into the "
                             "convolutions: the same function up to float rounding, with less memory and "
                             "up to ~1.2x less time per step)")
    parser.add_argument("--no-early-stop", dest="early_stop", action="store_false",
                        help="fast engine: iterate every sample for all steps (as the library does)")
    parser.add_argument("--max-memory", type=float, default=4.0,
                        help="GiB a split may take in memory (uint8); larger splits are read from disk")
    parser.add_argument("--no-checks", dest="checks", action="store_false", help="skip the gradient-masking checklist")
    parser.add_argument("--check-limit", type=int, default=64, help="samples the checklist runs on (stratified)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                        help="compare finished sweeps: write compare.png and compare.md into --out "
                             "(default Comparison/) and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


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


def parse_attack_list(text: str, task: str, targeted: bool) -> list[str]:
    """``--attack pgd,segpgd`` as a list of registered names that all fit the task and one norm."""
    names = [name.strip() for name in text.split(",")]
    for name in names:
        info = attack_info(name)
        if not info.supports(task):
            raise UsageError(f"--attack {name} does not support {task}; use one of "
                             f"{', '.join(n for n, i in ATTACKS.items() if i.supports(task))}")
        if targeted and not info.targeted:
            raise UsageError(f"--attack {name} has no targeted mode; drop --targeted or use one of "
                             f"{', '.join(n for n, i in ATTACKS.items() if i.targeted and i.supports(task))}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"--attack lists {', '.join(duplicates)} more than once; name each attack once")
    norms = {attack_info(name).norm for name in names}
    if len(norms) > 1:
        raise UsageError(f"--attack {text} mixes norms ({', '.join(sorted(norms))}): one eps list bounds one norm; "
                         "sweep L-inf and L2 attacks separately")
    return names


def task_of(checkpoint: str | None) -> str:
    """The task recorded in ``checkpoint``, or classification when there is none to read (a
    missing or broken checkpoint is reported later, by ``load_model``)."""
    if checkpoint is not None:
        with contextlib.suppress(ToolError, OSError):
            return load_checkpoint(checkpoint)["task"]
    return "classification"


def validate_args(args: argparse.Namespace) -> None:
    """Turn bad flag combinations into one-line usage errors before any work."""
    args.task = args.task or task_of(args.checkpoint)
    args.attacks = parse_attack_list(args.attack, args.task, args.targeted)
    args.norm = attack_info(args.attacks[0]).norm
    if args.eps_list is None:
        args.eps_list = list(DEFAULT_EPS if args.norm == "Linf" else DEFAULT_L2_EPS)
    args.eps_values = parse_eps_list(args.eps_list, args.norm)
    args.alpha = parse_step_size("--alpha", args.alpha)
    check_number("--max-memory", args.max_memory, low=0)
    check_seed(args.seed)
    checks = [
        (args.steps < 1, f"--steps must be >= 1, got {args.steps}"),
        (args.batch_size < 1, f"--batch-size must be >= 1, got {args.batch_size}"),
        (args.limit is not None and args.limit < 1, f"--limit must be >= 1, got {args.limit}"),
        (args.examples < 0, f"--examples must be >= 0, got {args.examples}"),
        (args.workers < 0, f"--workers must be >= 0, got {args.workers}"),
        (args.check_limit < 1, f"--check-limit must be >= 1, got {args.check_limit}"),
        (args.resume and args.overwrite, "--resume continues the sweep in --out and --overwrite replaces it; "
                                         "give one of them"),
        (args.out is not None and not str(args.out).strip(), "--out is empty; give a folder (or drop --out for "
                                                              "the default)"),
        (args.target_class is not None and (args.task != "classification" or not args.targeted),
         "--target-class needs --targeted and --task classification (segmentation uses --target-map)"),
        (args.target_class is not None and not 0 <= args.target_class < len(CLASS_NAMES),
         f"--target-class must be in [0, {len(CLASS_NAMES) - 1}], got {args.target_class}"),
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
    """The requested splits, built exactly as at training time (at most ``--limit`` each); the
    train split is read without augmentation, so every row sees the same images."""
    train_args = ckpt.get("args") or {}
    datasets = build_splits(args.task, args.data, val_data=args.val_data, test_data=args.test_data,
                            image_size=ckpt["image_size"],
                            seed=split_seed(train_args), limit=args.limit,
                            skip_missing_masks=bool(train_args.get("skip_missing_masks", False)),
                            augment_train=False)
    trained_on = ckpt.get("split_digests") or {}
    for name in dict.fromkeys(args.splits):
        if name in trained_on and trained_on[name] != datasets[name].split_digest:
            raise DataError(f"the {name} split of the data is not the one {args.checkpoint} was trained with "
                            f"(files were added, removed or renamed since, which reshuffles the splits); "
                            f"attack it on the data it was trained on, or retrain")
    chosen = {name: datasets[name] for name in dict.fromkeys(args.splits)}
    for note in training_copies_notes(chosen):
        print(f"note: {note}")
    return chosen


def alpha_for(args: argparse.Namespace, eps: float) -> float:
    return step_size(args.alpha, eps, args.steps)


def seeded_per_sample(args: argparse.Namespace, model: nn.Module, num_classes: int) -> dict[str, bool]:
    """Which attacks the fast engine runs with per-sample random streams (the others draw
    from one stream per call, so their numbers depend on the batch size)."""
    return {name: args.engine == "fast" and fast_spec(build_attack(
        name, model, 1 / 255, steps=args.steps, alpha=alpha_for(args, 1 / 255), num_classes=num_classes)) is not None
        for name in args.attacks}


def sweep_config(args: argparse.Namespace, ckpt: Mapping, ckpt_sha: str, engine: Engine,
                 per_sample: dict[str, bool]) -> dict:
    """Everything that decides the numbers (compared on --resume) plus provenance.

    ``attack_precision`` is what each attack really ran in: autocast applies to the fast
    engine's PGD family only, and an attack without a fast path runs its library object in fp32."""
    precision = str(engine.autocast or torch.float32).replace("torch.", "")
    return {
        "task": args.task, "attack": args.attack, "attacks": list(args.attacks), "norm": args.norm,
        "steps": args.steps, "alpha": args.alpha if args.alpha is not None else DEFAULT_STEP_RULE,
        "random_start": args.random_start, "targeted": args.targeted,
        "target_class": args.target_class, "target_map": args.target_map,
        "seed": args.seed, "data": args.data, "val_data": args.val_data, "test_data": args.test_data,
        "limit": args.limit,
        "checkpoint": str(args.checkpoint), "checkpoint_sha256": ckpt_sha,
        "class_names": list(ckpt["class_names"]), "splits": list(dict.fromkeys(args.splits)),
        "eps_list": args.eps_values, "device": engine.device.type, "batch_size": args.batch_size,
        "engine": engine.kind, "precision": precision,
        "attack_precision": {name: precision if fast else "float32" for name, fast in per_sample.items()},
        "memory_format": args.memory_format, "early_stop": engine.early_stop,
        "fold_batchnorm": engine.kind == "fast" and engine.fold_batchnorm,
        "per_sample_seeding": per_sample, "numbers_depend_on_batch_size": not all(per_sample.values()),
        "worst_case": WORST_CASE_RULE, "versions": library_versions(),
    }


def format_eps(eps: float, norm: str) -> str:
    """L-inf budgets as x/255 (pixel grey levels), L2 budgets as plain numbers."""
    return f"{eps * 255:.4g}/255" if norm == "Linf" else f"{eps:.4g}"


def log_row(report: Report, row: dict, norm: str) -> None:
    """Record a finished row and print it with its sanity line (the sweep already enforced it)."""
    report.add_row(row)
    key = "accuracy" if "accuracy" in row else "dice_mean"
    worst = row["linf_max"] if norm == "Linf" else row["l2_max"]
    print(f"{row['split']:>5} {row['attack']:>10} eps={format_eps(row['eps'], norm):<10} {key} {row[key]:.4f}  "
          f"sanity ok: max {norm} {worst:.6f} <= eps, finite, in [0, 1]  ({row['seconds']:.1f} s)")


def build_engine(args: argparse.Namespace, device: torch.device) -> Engine:
    return Engine(kind=args.engine, device=device, batch_size=args.batch_size,
                  autocast=resolve_precision(args.precision, device),
                  memory_format=MEMORY_FORMATS[args.memory_format] if args.engine == "fast" else torch.contiguous_format,
                  early_stop=args.early_stop, fold_batchnorm=args.fold_batchnorm)


def shard_of(dataset: Any, split: str, dist: Dist) -> tuple[Any, int]:
    """This rank's contiguous, unpadded shard of ``dataset`` and the index of its first sample."""
    if not dist.active:
        return dataset, 0
    if len(dataset) < dist.world_size:
        raise UsageError(f"split {split} has {len(dataset)} samples, fewer than the {dist.world_size} processes; "
                         "run fewer processes (--nproc_per_node) or raise --limit")
    shard = dist.shard(len(dataset))
    return type(dataset)([dataset.samples[i] for i in shard], dataset.transform), shard.start


def run_checklist(args: argparse.Namespace, ckpt: Mapping, model: nn.Module, engine: Engine, report: Report,
                  datasets: dict, outcomes: dict, dist: Dist) -> None:
    """The gradient-masking checklist on the main rank, on the whole test split (else the last)."""
    split = "test" if "test" in datasets else list(datasets)[-1]
    if not dist.is_main:
        return
    source, _ = load_split(datasets[split], task=args.task, image_size=ckpt["image_size"],
                           max_bytes=args.max_memory * 2**30, pin=engine.device.type == "cuda")
    settings = CheckSettings(task=args.task, class_names=list(ckpt["class_names"]), eps_list=args.eps_values,
                             norm=args.norm, steps=args.steps, alpha=args.alpha, random_start=args.random_start,
                             seed=args.seed, limit=args.check_limit)
    print(f"gradient-masking checklist on {min(args.check_limit, len(source))} {split} samples:")
    start = time.perf_counter()
    report.add_checks(run_checks(model, source, settings, engine, report.sorted_rows(), split=split,
                                 sweep_state=outcomes[split] if not args.targeted else None, on_line=print))
    reuses_pgd = not args.targeted and args.norm == "Linf" and "pgd" in args.attacks
    report.config["checklist"] = {"split": split, "samples": min(args.check_limit, len(source)),
                                  "reuses_sweep_pgd": reuses_pgd}
    sweep_seconds = sum(row["seconds"] for row in report.sorted_rows() if row["attack"] != "worst")
    report.config["seconds"] = {"sweep": round(sweep_seconds, 1), "checks": round(time.perf_counter() - start, 1)}
    print(f"checklist: {report.config['seconds']['checks']:.0f} s, "
          f"{report.config['seconds']['checks'] / max(sweep_seconds, 1e-9):.0%} of the sweep's {sweep_seconds:.0f} s")


def compare_runs(args: argparse.Namespace) -> list:
    """``--compare``: no sweep, only the side-by-side figure and table of finished ones."""
    runs = load_runs(args.compare)  # usage errors come before --out is created
    out = Path(args.out or "Comparison")
    with output_lock(out):
        compare(runs, out)
    print(f"compared {', '.join(run.name for run in runs)}; wrote {out / 'compare.png'} and {out / 'compare.md'}")
    differences = setting_differences(runs)
    if differences:
        print(f"note: the runs are not like for like ({'; '.join(differences)}); compare.md says so")
    unfinished = [str(run.folder) for run in runs if not run.complete]
    if unfinished:
        print(f"note: {', '.join(unfinished)} hold an interrupted sweep; finish it with --resume before comparing")
    return runs


def main(args: argparse.Namespace) -> Report | list:
    if args.compare:
        return compare_runs(args)
    validate_args(args)
    args.out = Path(args.out or ("Classification" if args.task == "classification" else "Segmentation"))
    args.checkpoint = Path(args.checkpoint or args.out / "checkpoints" / "best.pt")
    resolve_device(args.device)  # usage errors come before --out is created
    dist = init_distributed(args.device)
    restore_print = setup_for_distributed(dist.is_main)
    with stop_together(dist):
        try:
            engine = build_engine(args, dist.device)
            with output_lock(args.out) if dist.is_main else contextlib.nullcontext():
                dist.barrier()
                return run_sweep(args, dist, engine)
        finally:
            restore_print()
            shutdown(dist)


def run_sweep(args: argparse.Namespace, dist: Dist, engine: Engine) -> Report:
    """The sweep itself, run while the main process holds the lock on ``args.out``."""
    seed_everything(args.seed)
    if engine.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ckpt, model = load_model(args, engine.device)
    refuse_earlier_sweep(args.out, resume=args.resume, overwrite=args.overwrite)
    model = prepare_model(model, engine)
    roots = data_roots(ckpt.get("args") or {}, data=args.data, val_data=args.val_data, test_data=args.test_data)
    args.data, args.val_data, args.test_data = roots["data"], roots["val_data"], roots["test_data"]
    num_classes = len(ckpt["class_names"])
    target_fn = make_target_fn(args, num_classes)
    per_sample = seeded_per_sample(args, model, num_classes)
    for name in (n for n, seeded in per_sample.items() if args.engine == "fast" and not seeded):
        print(f"note: {name} has no fast path; it runs as its torchattacks/cleverhans object")
    datasets, outcomes = load_splits(args, ckpt), {}
    config = sweep_config(args, ckpt, file_sha256(args.checkpoint), engine, per_sample)
    config["world_size"] = dist.world_size
    config["split_digests"] = {split: dataset.split_digest for split, dataset in datasets.items()}
    config["copies_of_training_images"] = {split: len(dataset.training_copies) for split, dataset in datasets.items()
                                           if split != "train"}
    report = Report(args.out, args.task, config, splits=list(dict.fromkeys(args.splits)),
                    eps_list=args.eps_values, attacks=args.attacks, resume=args.resume)
    spec = SweepSpec(task=args.task, class_names=list(ckpt["class_names"]), eps_list=args.eps_values,
                     attacks=tuple(args.attacks), norm=args.norm, targeted=args.targeted, seed=args.seed,
                     min_norm=tuple(n for n in args.attacks if not attack_info(n).eps_bounded),
                     examples=args.examples, fingerprint=report.fingerprint)

    def make_attack(name: str, eps: float) -> Attack:
        return build_attack(name, model, eps, steps=args.steps, alpha=alpha_for(args, eps),
                            random_start=args.random_start, num_classes=num_classes,
                            targeted=args.targeted, seed=args.seed)

    shards = {split: shard_of(dataset, split, dist) for split, dataset in datasets.items()}
    for split, (dataset, offset) in shards.items():
        source, note = load_split(dataset, task=args.task, image_size=ckpt["image_size"],
                                  max_bytes=args.max_memory * 2**30, pin=engine.device.type == "cuda",
                                  workers=args.workers)
        if note:
            print(f"note: split {split}: {note}")
        state = run_split(model, source, spec, engine, split=split, make_attack=make_attack,
                          target_fn=target_fn, state_dir=args.out / ".sweep_state", resume=args.resume,
                          on_row=lambda row: log_row(report, row, args.norm) if dist.is_main else None,
                          dist=dist, offset=offset)
        report.add_examples(split, state["examples"])
        outcomes[split] = gather_outcomes(state, args.task, dist)  # a collective: every rank takes part
        report.add_per_sample(split, per_sample_arrays(outcomes[split], args.task, args.attacks))
    if args.checks:
        run_checklist(args, ckpt, model, engine, report, datasets, outcomes, dist)
    report.config["memory"] = peak_memory_mb(engine.device)
    if dist.is_main:
        report.finish()
        print(f"peak memory: {report.config['memory']}")
        print(f"wrote {args.out / 'results.csv'} and {args.out / 'report.md'}")
    dist.barrier()
    return report


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
