"""Checkpoints that hold only tensors and plain types, written atomically and loaded safely.

Loading always uses ``torch.load(weights_only=True)``: a file whose pickle would build
arbitrary Python objects (and so could run code) is refused, never executed.
"""
from __future__ import annotations

import errno
import hashlib
import math
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataset import CLASS_NAMES, SEG_CLASS_NAMES
from files import atomic_torch_save
from model import DEPTHS, TASKS, build_model
from utils import CheckpointError, primary_metric

FORMAT = "wbc-attack-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "task", "depth", "class_names", "image_size", "mean", "std", "model")
#: What train.py adds to every checkpoint so that ``--resume`` can continue from it.
RESUME_KEYS = ("optimizer", "scheduler", "history", "best_metric")


def to_plain(value: Any) -> Any:
    """Turn argparse values (Paths, tuples, numpy scalars) into types weights_only accepts."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, (str, int)) else str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None or isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, task: str, depth: int,
                    class_names: Sequence[str], image_size: int, mean: Sequence[float],
                    std: Sequence[float], epoch: int = 0, metrics: Mapping | None = None,
                    args: Mapping | None = None, **state: Any) -> None:
    """Write a checkpoint atomically. ``state`` holds extra plain/tensor entries for
    ``--resume`` (optimizer, scheduler, scaler, history, best_metric)."""
    module = model.module if hasattr(model, "module") else model
    payload = {
        "format": FORMAT, "version": VERSION, "task": task, "depth": int(depth),
        "class_names": list(class_names), "image_size": int(image_size),
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "epoch": int(epoch), "metrics": to_plain(dict(metrics or {})), "args": to_plain(dict(args or {})),
        "model": module.state_dict(),
    }
    payload.update({key: to_plain(value) for key, value in state.items()})
    atomic_torch_save(path, payload)


def _mismatch(path: Path, field: str, found: Any, expected: Any) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} was made for {field} {found!r}, but {expected!r} was asked; "
                           f"pass a checkpoint trained with {field} {expected!r} or change the flag")


def load_checkpoint(path: str | os.PathLike, *, task: str | None = None, depth: int | None = None,
                    class_names: Sequence[str] | None = None, image_size: int | None = None) -> dict:
    """Load and validate a checkpoint; any problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        raise _unreadable(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path)))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train one with train.py or pass --checkpoint")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by this tool's train.py; "
                              "pass a checkpoint from train.py")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}; "
                              "re-create it with train.py")
    validate_fields(path, ckpt)
    expected = {"task": task, "depth": depth, "image_size": image_size,
                "class_names": list(class_names) if class_names is not None else None}
    for field, value in expected.items():
        if value is not None and ckpt[field] != value:
            raise _mismatch(path, field.replace("_", " "), ckpt[field], value)
    return ckpt


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``; unsafe content and corrupt bytes are told apart."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names a refused callable "GLOBAL module.name"; anything
        # else (random bytes, "Unsupported operand ...") is damage, not an attack.
        if "global" in str(err).lower() and _starts_like_torch_file(path):
            raise CheckpointError(f"refusing to load {path}: it holds Python objects that could run code "
                                  f"when unpickled ({_refused_global(err)}); only load checkpoints you trust "
                                  "and re-save them as plain tensors") from err
        raise CheckpointError(f"checkpoint {path} is corrupt (not a PyTorch checkpoint); "
                              "re-create it or use another --checkpoint") from err
    except OSError as err:
        raise (_corrupt(path, err) if err.errno is None else _unreadable(path, err)) from err
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError) as err:
        raise _corrupt(path, err) from err


def _unreadable(path: Path, err: OSError) -> CheckpointError:
    """The file itself cannot be opened or read (permissions, a folder, a failing disk)."""
    fix = ("make it readable" if isinstance(err, PermissionError) else
           "pass the checkpoint file inside it" if isinstance(err, IsADirectoryError) else "check the file")
    return CheckpointError(f"cannot read checkpoint {path} ({err.strerror or err}); {fix} "
                           "or use another --checkpoint")


def _corrupt(path: Path, err: Exception) -> CheckpointError:
    """The bytes are there but are not a whole PyTorch checkpoint."""
    reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); "
                           "re-create it or use another --checkpoint")


def _starts_like_torch_file(path: Path) -> bool:
    """A zip archive (torch.save) or a pickle stream (legacy torch.save, plain pickle)."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    return head == b"PK" or head[:1] == b"\x80"


def _refused_global(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
    return (lines[0] if lines else str(err).strip().splitlines()[0])[:120]


# --------------------------------------------------------------------------- field validation
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_numbers(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(_is_number(v) and math.isfinite(v) for v in value))


def _state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _optional_path(value: Any) -> bool:
    return value is None or isinstance(value, str)


#: field -> (check, what it must be). Every field a tool reads is checked before it is used.
FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda v: isinstance(v, str) and v in TASKS, f"one of {', '.join(TASKS)}"),
    "depth": (lambda v: _is_int(v) and v in DEPTHS, f"one of {', '.join(map(str, DEPTHS))}"),
    "image_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "mean": (lambda v: _finite_numbers(v, 3), "3 finite numbers"),
    "std": (lambda v: _finite_numbers(v, 3) and min(v) > 0, "3 finite positive numbers"),
    "model": (_state_dict, "a state dict of named tensors"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "metrics": (lambda v: isinstance(v, dict), "a dict"),
    "args": (lambda v: isinstance(v, dict), "a dict"),
    "split_digests": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                      "a dict of split name -> digest"),
}
#: Training arguments that main.py reads back (for the data split) -> check, what it must be.
ARG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data": (_optional_path, "a path or null"),
    "val_data": (_optional_path, "a path or null"),
    "test_data": (_optional_path, "a path or null"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "split_seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "skip_missing_masks": (lambda v: isinstance(v, bool), "true or false"),
}


def split_seed(train_args: Mapping) -> int:
    """The seed of a run's data split: ``--split-seed``, or ``--seed`` for a checkpoint written
    before the split had its own seed (which split with it)."""
    return train_args.get("split_seed", train_args.get("seed", 0))


def data_roots(train_args: Mapping, **given: str | None) -> dict[str, str | None]:
    """The run's ``data``, ``val_data`` and ``test_data`` roots as training stored them (as typed),
    each replaced by the one ``given`` where that is not None (the data has moved since)."""
    return {field: given.get(field) if given.get(field) is not None else train_args.get(field)
            for field in ("data", "val_data", "test_data")}


def _bad_field(path: Path, field: str, value: Any, expected: str) -> CheckpointError:
    shown = type(value).__name__ if isinstance(value, (dict, torch.Tensor)) else repr(value)[:60]
    return CheckpointError(f"checkpoint {path} is corrupt: field {field} is {shown}, expected {expected}; "
                           "re-create it with train.py")


def validate_fields(path: Path, ckpt: Mapping) -> None:
    """Check the type and value of every field (a wrong one is a corrupt checkpoint, exit 1)."""
    for field, (ok, expected) in FIELD_CHECKS.items():
        if field in ckpt and not ok(ckpt[field]):
            raise _bad_field(path, field, ckpt[field], expected)
    names = list(CLASS_NAMES if ckpt["task"] == "classification" else SEG_CLASS_NAMES)
    if ckpt["class_names"] != names:  # the datasets' label order; a model for other classes cannot be used
        raise _bad_field(path, "class_names", ckpt["class_names"], f"the {ckpt['task']} classes {names}")
    for field, (ok, expected) in ARG_CHECKS.items():
        if field in ckpt.get("args", {}) and not ok(ckpt["args"][field]):
            raise _bad_field(path, f"args.{field}", ckpt["args"][field], expected)
    bad = [name for name, tensor in ckpt["model"].items()
           if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise CheckpointError(f"checkpoint {path} is corrupt: its model weights hold NaN or inf ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); re-create it")


def _history_ok(history: Any, epoch: Any, task: str) -> bool:
    """One row per finished epoch, numbered 1..epoch, with the fields train.py reads back."""
    if not isinstance(history, list) or len(history) != epoch:
        return False
    fields = ("seconds", "train_loss", f"val_{primary_metric(task)}")
    return all(isinstance(row, dict) and row.get("epoch") == i + 1 and all(_is_number(row.get(f)) for f in fields)
               for i, row in enumerate(history))


def _optimizer_ok(state: Any) -> bool:
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return False
    groups = state.get("param_groups")
    return (isinstance(groups, list) and len(groups) > 0
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) and _is_number(g.get("lr"))
                    for g in groups))


RESUME_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer": (_optimizer_ok, "an optimizer state dict"),
    "scheduler": (lambda v: isinstance(v, dict) and _is_int(v.get("last_epoch")), "a scheduler state dict"),
    "scaler": (lambda v: isinstance(v, dict), "a dict"),
    "best_metric": (lambda v: _is_number(v) and not math.isnan(v), "a number"),
}


def validate_resume_state(path: Path, ckpt: Mapping) -> None:
    """A ``last.pt`` must also hold everything ``--resume`` restores."""
    missing = [key for key in RESUME_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: it lacks the resume state "
                              f"({', '.join(missing)}); start afresh with --overwrite or choose another --out")
    for field, (ok, expected) in RESUME_CHECKS.items():
        if field in ckpt and not ok(ckpt[field]):
            raise _bad_field(path, field, ckpt[field], expected)
    if not _history_ok(ckpt["history"], ckpt.get("epoch", 0), ckpt["task"]):
        raise _bad_field(path, "history", ckpt["history"], f"one row per epoch 1..{ckpt.get('epoch', 0)}")


def model_from_checkpoint(ckpt: Mapping, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model recorded in ``ckpt`` and load its weights (eval mode)."""
    model = build_model(ckpt["task"], ckpt["depth"], len(ckpt["class_names"]), ckpt["mean"], ckpt["std"])
    load_weights(model, ckpt)
    return model.to(device).eval()


def load_weights(model: nn.Module, ckpt: Mapping) -> None:
    """``model.load_state_dict(ckpt["model"])`` with a one-line error if the weights do not fit."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        detail = _weights_mismatch(model.state_dict(), ckpt["model"]) or _details(err)
        raise CheckpointError(f"checkpoint weights do not fit a {ckpt['task']} model of depth {ckpt['depth']} "
                              f"({detail}); re-create the checkpoint") from err


def _weights_mismatch(own: Mapping[str, torch.Tensor], weights: Mapping[str, Any]) -> str:
    """The keys ``weights`` lacks, the keys it has in excess and the tensors of another shape."""
    resized = [f"{key} (checkpoint {_shape(weights[key])}, model {_shape(value)})" for key, value in own.items()
               if key in weights and _shape(weights[key]) != _shape(value)]
    found = {"missing keys": [key for key in own if key not in weights],
             "unexpected keys": [key for key in weights if key not in own], "size mismatch": resized}
    return "; ".join(f"{what}: {_first_few(items)}" for what, items in found.items() if items)


def _shape(value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return "x".join(map(str, value.shape)) or "scalar"


def _first_few(items: Sequence[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _details(err: Exception) -> str:
    """torch's message on one line, without its "Error(s) in loading state_dict for X:" heading."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines[1:] or lines)[:300] or type(err).__name__


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
