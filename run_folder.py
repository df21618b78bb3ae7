"""A training run's output folder: earlier runs, ``--overwrite``, ``--resume`` and this run's best.pt.

train.py never tests, resumes or silently replaces checkpoints it did not write: a fresh run
refuses a folder that holds checkpoints unless ``--overwrite`` is given, ``--resume`` refuses a
``last.pt`` made with other numbers-changing flags, and the final test loads ``best.pt`` only if
it holds the best epoch of this run's own history.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoint import load_checkpoint, load_weights, split_seed, validate_resume_state
from files import atomic_path
from utils import CheckpointError, ToolError, primary_metric

#: Flags that change a run's numbers: --resume refuses to continue a run with any of them changed.
#: --workers among them: each DataLoader worker augments from its own seed, so the same epoch
#: augments differently with another number of workers. --epochs may change (see schedule_note).
RESUME_FLAGS = ("workers", "opt", "lr", "weight_decay", "warmup_epochs", "batch_size", "class_weights",
                "label_smoothing", "dice_weight", "seed", "split_seed", "data", "val_data", "test_data", "limit",
                "skip_missing_masks", "amp", "sync_bn", "adv", "adv_eps", "adv_steps", "adv_alpha",
                "adv_warmup_epochs", "trades_beta", "adv_attack", "adv_val_limit")
#: What a checkpoint written before a flag existed was trained with (compared on --resume).
RESUME_DEFAULTS = {"sync_bn": False, "adv": "none"}
#: A state-dict key that only the optimizer of each --opt has.
OPTIMIZER_MARK = {"adamw": "betas", "sgd": "momentum"}
#: What a training run writes into --out; --overwrite removes an earlier run's copies.
RUN_FILES = ("checkpoints/best.pt", "checkpoints/last.pt", "log.csv", "metrics.json", "Images/training_curves.png")


def refuse_earlier_run(out: Path) -> None:
    """A fresh run never silently replaces the checkpoints of an earlier one."""
    found = [name for name in ("best.pt", "last.pt") if (out / "checkpoints" / name).exists()]
    if found:
        raise ToolError(f"{out} already holds checkpoints of an earlier run ({', '.join(found)}); pass --resume "
                        "to continue it, --overwrite to replace it, or choose another --out")


def remove_earlier_run(out: Path) -> None:
    """--overwrite: remove the earlier run's files, so none of them is mistaken for this run's."""
    removed = [name for name in RUN_FILES if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    if removed:
        print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}")


def _shown(flag: str, value: Any) -> str:
    name = "--" + flag.replace("_", "-")
    if value is None or value is False:
        return f"no {name}"
    return name if value is True else f"{name} {value}"


def load_resume(args: argparse.Namespace, ckpt_dir: Path, main_process: bool = True) -> dict:
    """``last.pt``, checked to hold a resumable state made with the same numbers-changing flags
    and number of processes; the main process also makes sure best.pt holds the best epoch."""
    path = ckpt_dir / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: no epoch of a run in {args.out} finished, so there "
                              "is nothing to resume; drop --resume to start afresh"
                              + (" with --overwrite" if (ckpt_dir / "best.pt").exists() else ""))
    ckpt = load_checkpoint(path, task=args.task, depth=args.depth, image_size=args.image_size)
    validate_resume_state(path, ckpt)
    recorded = {**ckpt["args"], "split_seed": split_seed(ckpt["args"])}
    for flag in RESUME_FLAGS:
        was = recorded.get(flag, RESUME_DEFAULTS.get(flag, getattr(args, flag)))
        if was != getattr(args, flag):
            raise CheckpointError(f"{path} was trained with {_shown(flag, was)} but this run has "
                                  f"{_shown(flag, getattr(args, flag))}; resume with the same flags, or start "
                                  "afresh with --overwrite or another --out")
    check_world_size(path, recorded.get("world_size", 1), getattr(args, "world_size", 1))
    for name in ("mean", "std"):
        given = getattr(args, name)
        if given is not None and [float(v) for v in given] != ckpt[name]:
            raise CheckpointError(f"{path} was trained with --{name} {ckpt[name]} but this run has --{name} "
                                  f"{given}; drop --{name} to resume (the checkpoint's is used)")
    if main_process:
        restore_best(ckpt_dir, ckpt)
        note = schedule_note(recorded.get("epochs"), args.epochs)
        if note:
            print(note)
    return ckpt


def schedule_note(was: int | None, now: int) -> str | None:
    """Resuming with another --epochs is allowed (to train a finished run longer), but the
    warm-up and cosine decay are laid over the new number of epochs from the step reached, so
    the learning rate jumps and the run matches no uninterrupted one: say so."""
    if was is None or was == now:
        return None
    return (f"note: this run was started with --epochs {was}; resuming with --epochs {now} lays the learning-rate "
            f"schedule over {now} epochs from here, so the rate jumps and the result matches no uninterrupted run "
            f"(resume with --epochs {was} for an exact one)")


def check_world_size(path: Path, recorded: int, current: int) -> None:
    """The global batch, the shuffle and the schedule's steps per epoch depend on the number of
    processes, so a run resumes only with the number it was started with."""
    if recorded != current:
        raise CheckpointError(f"{path} was trained by {recorded} process(es) but this run has {current}; resume "
                              f"with the same number (torchrun --nproc_per_node/--nnodes), or start afresh with "
                              "--overwrite or another --out")


def restore_best(ckpt_dir: Path, last: dict) -> None:
    """Make sure best.pt holds the best epoch recorded in last.pt before training goes on.

    A kill between writing last.pt and best.pt of an improved epoch leaves best.pt one
    improvement behind; last.pt is then exactly that epoch's best checkpoint, so it is copied.
    """
    key = best_metric_key(last["task"], last["args"].get("adv", "none"))
    row = best_row(last["history"], key)
    if row is None:
        return
    best = ckpt_dir / "best.pt"
    try:
        found = load_checkpoint(best, task=last["task"]) if best.exists() else None
    except CheckpointError:
        found = None
    if found is not None and holds_row(found, row, key):
        return
    if row["epoch"] != last["epoch"]:
        raise CheckpointError(f"{best} does not hold this run's best epoch {row['epoch']} (it is missing, "
                              "unreadable or from another run); start afresh with --overwrite or another --out")
    with atomic_path(best) as tmp:
        shutil.copyfile(ckpt_dir / "last.pt", tmp)


def restore_state(resume: dict, path: Path, opt: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, scaler: torch.amp.GradScaler | None, device: torch.device) -> None:
    """Load weights, optimizer, scheduler and scaler state from ``resume`` (one-line errors); the
    random streams need no state: train.py reseeds them at every epoch."""
    load_weights(model, resume)
    if any(OPTIMIZER_MARK[opt] not in group for group in resume["optimizer"]["param_groups"]):
        raise CheckpointError(f"{path} holds the state of another optimizer than --opt {opt}; "
                              "resume with the --opt it was trained with")
    try:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path} holds an optimizer or scheduler state that does not fit this model "
                              f"({str(err).splitlines()[0][:100]}); start afresh with --overwrite") from err
    for param, state in optimizer.state.items():
        if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != param.shape for v in state.values()):
            raise CheckpointError(f"{path} holds an optimizer state whose shapes do not fit the model; "
                                  "start afresh with --overwrite")


def best_metric_key(task: str, adv: str) -> str:
    """The validation metric that picks best.pt: the primary one or, with --adv, its value
    under PGD-10 at --adv-eps (history column ``val_robust_<metric>``)."""
    key = primary_metric(task)
    return key if adv == "none" else f"robust_{key}"


def best_row(history: list[dict], key: str) -> dict | None:
    """The history row of the epoch that last wrote best.pt (train.py marks it ``best``), if its
    ``val_<key>`` is finite."""
    chosen = next((row for row in reversed(history) if row.get("best")), None)
    value = chosen.get(f"val_{key}") if chosen is not None else None
    return chosen if value is not None and not math.isnan(value) else None


def holds_row(ckpt: dict, row: dict, key: str) -> bool:
    """Whether checkpoint ``ckpt`` was written at the epoch of history ``row``, with its metric."""
    return ckpt["epoch"] == row["epoch"] and ckpt["metrics"].get(key) == row[f"val_{key}"]


def load_best(args: argparse.Namespace, path: Path, history: list[dict]) -> dict:
    """This run's best.pt, and only that: never a best.pt left by another run."""
    key = best_metric_key(args.task, getattr(args, "adv", "none"))
    row = best_row(history, key)
    if row is None:
        raise ToolError(f"no epoch gave a finite validation {key} (see {args.out / 'log.csv'}), so there is no "
                        "best.pt to test; check the validation split (--val-data, --limit) or lower --lr")
    best = load_checkpoint(path, task=args.task, depth=args.depth, image_size=args.image_size)
    if not holds_row(best, row, key):
        raise CheckpointError(f"{path} holds epoch {best['epoch']}, not this run's best epoch {row['epoch']}: it "
                              "was not written by this run; retrain with --overwrite")
    return best
