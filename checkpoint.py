"""Checkpoints that hold only tensors and plain types, written atomically and loaded safely.

Loading always uses ``torch.load(weights_only=True)``: a file whose pickle would build
arbitrary Python objects (and so could run code) is refused, never executed.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import build_model
from utils import CheckpointError, atomic_torch_save

FORMAT = "wbc-attack-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "task", "depth", "class_names", "image_size", "mean", "std", "model")


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
    ``--resume`` (optimizer, scheduler, scaler, rng, history, best_metric)."""
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
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train one with train.py or pass --checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in str(err).lower():
            raise CheckpointError(f"refusing to load {path}: it holds Python objects that could run code "
                                  f"when unpickled ({first_line[:120]}); only load checkpoints you trust "
                                  "and re-save them as plain tensors") from err
        raise CheckpointError(f"checkpoint {path} is corrupt ({first_line[:120]}); re-create it") from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as err:
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); "
                              "re-create it or use another --checkpoint") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint written by this tool's train.py; "
                              "pass a checkpoint from train.py")
    expected = {"task": task, "depth": depth, "image_size": image_size,
                "class_names": list(class_names) if class_names is not None else None}
    for field, value in expected.items():
        if value is not None and ckpt[field] != value:
            raise _mismatch(path, field.replace("_", " "), ckpt[field], value)
    return ckpt


def model_from_checkpoint(ckpt: Mapping, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the model recorded in ``ckpt`` and load its weights (eval mode)."""
    model = build_model(ckpt["task"], ckpt["depth"], len(ckpt["class_names"]), ckpt["mean"], ckpt["std"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit a {ckpt['task']} model of depth {ckpt['depth']} "
                              f"({str(err).splitlines()[0][:120]}); re-create the checkpoint") from err
    return model.to(device).eval()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
