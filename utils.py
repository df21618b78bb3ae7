"""Small shared utilities: errors and the CLI wrapper, flag checks, devices, seeding and the
metrics (all computed from confusion matrices). Their intervals live in stats.py, atomic writes
and the output-folder lock in files.py, torchrun helpers in distributed.py."""
from __future__ import annotations

import argparse
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch


# --------------------------------------------------------------------------- errors
class ToolError(Exception):
    """An expected failure: printed as one line on stderr, never as a traceback."""

    exit_code = 1


class UsageError(ToolError):
    """Bad command-line arguments (exit code 2, like argparse)."""

    exit_code = 2


class DataError(ToolError):
    """The data folder is missing, empty, corrupt or inconsistent."""


class CheckpointError(ToolError):
    """A checkpoint is missing, corrupt, unsafe or made for something else."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2.

    A value that starts with a minus and a digit (``-1/255``, ``-1e-3``) is taken as a value,
    never as an option, so the flag's own check can name it. Plain argparse only does that for
    ``-1`` and ``-0.5`` and otherwise reports "expected at least one argument". No option of
    these tools starts with a digit.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def run_cli(main: Callable[[Any], Any], args: Any) -> int:
    """Run ``main(args)``; turn expected failures into one stderr line and an exit code.

    ``--debug`` (``args.debug``) re-raises so the full traceback is visible.
    """
    try:
        main(args)
    except ToolError as err:
        if getattr(args, "debug", False):
            raise
        _error_line(f"error: {one_line(err)}")
        return err.exit_code
    except KeyboardInterrupt:
        _error_line("error: interrupted; finished rows and checkpoints are kept")
        return 130
    return 0


def _error_line(line: str) -> None:
    """Write ``line`` and its newline in one call. print() writes them separately, and stderr
    to a pipe is unbuffered, so two torchrun ranks failing together could glue their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error raised in a DataLoader worker comes back wrapped ("Caught DataError in
    DataLoader worker ... Original Traceback ..."): keep only the original message.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and "Original Traceback" in str(err):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(err).__name__) else last
    return " ".join(lines)


# --------------------------------------------------------------------------- flag checks
SEED_MAX = 2**32 - 1


def check_number(flag: str, value: float | None, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A usage error unless ``value`` is None or a finite number within the given bounds."""
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if math.isfinite(value) and not too_low and not too_high:
        return
    if low is not None and high is not None:
        bounds = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f" {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bounds = f" {'<' if high_open else '<='} {high:g}"
    else:
        bounds = ""
    raise UsageError(f"{flag} must be a finite number{bounds}, got {value}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """Seeds reach numpy (32 bits) and torch (64 bits, after ``seed * 1000 + epoch``)."""
    if not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{flag} must be an integer in [0, {SEED_MAX}] (2**32 - 1), got {seed}")


# --------------------------------------------------------------------------- devices, seeds
def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; asking for CUDA without it is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available; "
                         "use --device cpu or --device auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    return "AMX" in getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")().upper()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device`` (None: plain fp32).

    ``auto`` is bf16 where it is native (CUDA with bf16, AMX/AVX512-BF16 CPUs), else fp32, and
    never fails; asking for bf16 or fp16 where it is not usable is a usage error.
    """
    cuda = device.type == "cuda"
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
    if name == "auto":
        return torch.bfloat16 if bf16 else None
    if name == "bf16" and not bf16:
        where = "this GPU" if cuda else "this CPU (no AVX512-BF16 or AMX: bf16 would be emulated, ~3x slower)"
        raise UsageError(f"--precision bf16 is not usable on {where}; use --precision fp32 or auto")
    if name == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a CUDA device; use --precision fp32 or auto on a CPU")
    if name not in PRECISIONS:
        raise UsageError(f"unknown --precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def peak_memory_mb(device: torch.device | None = None) -> dict:
    """Peak resident memory of this process (and peak CUDA allocation) in MiB."""
    import resource

    peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device is not None and device.type == "cuda":
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_fraction(text: str) -> float:
    """Parse '8/255', '0.03' or '0' into a float; raises ValueError on anything else."""
    num, sep, den = text.strip().partition("/")
    value = float(num) / float(den) if sep else float(num)
    if not np.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


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


#: The default PGD step rule, as results.json records it.
DEFAULT_STEP_RULE = "2.5*eps/steps"


def parse_step_size(flag: str, value: str | float | None) -> float | str | None:
    """``--alpha`` or ``--adv-alpha``: a step in pixel units ('0.01', '2/255'), the same at every
    eps; a fraction of each eps ('eps/4', kept as that text so results record the rule); or the
    default rule (None, or its own text '2.5*eps/steps'). A parsed value parses to itself."""
    if value is None:
        return None
    text = str(value)
    compact = text.replace(" ", "")
    if compact == DEFAULT_STEP_RULE:
        return None
    per_eps = compact.startswith("eps/")
    try:
        number = float(compact[4:]) if per_eps else parse_fraction(compact)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"{flag} {text!r} is not a finite step size; write a number (0.01 or 2/255, the same at "
                         f"every eps) or a fraction of each eps (eps/4)") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"{flag} must be a finite number > 0, got {text}")
    return f"eps/{number:.10g}" if per_eps else number


def step_size(alpha: float | str | None, eps: float, steps: int) -> float:
    """The PGD step at ``eps`` under a parsed ``--alpha`` (None: 2.5 * eps / steps)."""
    if alpha is None:
        return 2.5 * eps / steps
    if isinstance(alpha, str):
        return eps / float(alpha.removeprefix("eps/"))
    return alpha


def eps_text(eps: float, norm: str) -> str:
    """An eps as tables and figures show it: x/255 for L-inf budgets, a plain number for L2."""
    return f"{eps * 255:.3g}/255" if norm == "Linf" else f"{eps:.3g}"


# --------------------------------------------------------------------------- metrics
def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrix ``cm[true, pred]`` (int64, on CPU) over all elements of the tensors.

    Works for class labels (N,) and segmentation masks (N, H, W) alike. Elements whose
    target is outside ``[0, num_classes)`` (e.g. an ignore index) are skipped.
    """
    target = target.reshape(-1).to(torch.int64)
    pred = pred.reshape(-1).to(torch.int64)
    valid = (target >= 0) & (target < num_classes)
    idx = target[valid] * num_classes + pred[valid]
    cm = torch.bincount(idx, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).cpu()


class ConfusionMatrix:
    """Accumulates a confusion matrix over a whole split (never an average of batch scores)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, target: torch.Tensor, pred: torch.Tensor) -> None:
        self.mat += confusion_matrix(target, pred, self.num_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise num/den with NaN where den == 0 (an undefined score, not a zero)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full_like(num, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_metrics(cm: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy (mean recall over classes present) and per-class recall."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    recall = _safe_div(np.diag(cm), cm.sum(axis=1))
    present = ~np.isnan(recall)
    metrics = {
        "accuracy": float(np.trace(cm) / total) if total else float("nan"),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else float("nan"),
    }
    for name, value in zip(class_names, recall):
        metrics[f"recall_{name.lower()}"] = float(value)
    return metrics


def segmentation_metrics(cm: torch.Tensor | np.ndarray,
                         class_names: Sequence[str] = ("background", "cytoplasm", "nucleus")) -> dict:
    """Pixel accuracy; Dice and IoU per foreground class and their means.

    Dice_c = 2 TP / (2 TP + FP + FN) and IoU_c = TP / (TP + FP + FN), counted over every
    pixel of the split. Class 0 (background) is reported but left out of the means, as is
    usual for WBC segmentation. A class absent from both target and prediction is NaN.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    dice = _safe_div(2 * tp, 2 * tp + fp + fn)
    iou = _safe_div(tp, tp + fp + fn)
    total = cm.sum()
    metrics = {"pixel_accuracy": float(tp.sum() / total) if total else float("nan")}
    for name, d, j in zip(class_names, dice, iou):
        metrics[f"dice_{name}"] = float(d)
        metrics[f"iou_{name}"] = float(j)
    metrics["dice_mean"] = float(np.nanmean(dice[1:])) if np.isfinite(dice[1:]).any() else float("nan")
    metrics["iou_mean"] = float(np.nanmean(iou[1:])) if np.isfinite(iou[1:]).any() else float("nan")
    return metrics


def per_image_confusion(masks: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Confusion matrices ``cm[i, true, pred]`` of every image (int64, on CPU)."""
    n = len(masks)
    image = torch.arange(n, device=masks.device).view(n, 1)
    idx = (image * num_classes + masks.reshape(n, -1).long()) * num_classes + pred.reshape(n, -1).long()
    return torch.bincount(idx.flatten(), minlength=n * num_classes ** 2).view(n, num_classes, num_classes).cpu()


def per_image_dice(cms: torch.Tensor) -> torch.Tensor:
    """Mean foreground Dice of each image; classes absent from mask and prediction are skipped,
    and an image with no foreground in either scores 1."""
    cms = cms.double()
    tp = torch.diagonal(cms, dim1=1, dim2=2)
    denom = cms.sum(1) + cms.sum(2)
    dice = torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.nan)[:, 1:]
    counted = ~torch.isnan(dice)
    mean = torch.where(counted, dice, 0.0).sum(1) / counted.sum(1).clamp_min(1)
    return torch.where(counted.any(1), mean, 1.0)


def lowest_dice_choice(cms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per image, the index of the per-image confusion matrices (one stack per attack) with the
    lowest mean Dice; the first listed wins ties."""
    return torch.stack([per_image_dice(cm) for cm in cms]).argmin(0)


def worst_case_choice(cms: Sequence[torch.Tensor], max_passes: int = 20) -> torch.Tensor:
    """Per image, which attack's outcome the segmentation worst case takes (an index into
    ``cms``, one stack of per-image confusion matrices per attack).

    Dice pools the pixels of the whole split, so an image's own Dice does not tell which of its
    adversarials lowers the split's Dice most (a one-pixel nucleus lost weighs less than thirty
    cytoplasm pixels). The choice starts from the lowest of every single attack and the
    per-image rule (:func:`lowest_dice_choice`), so the worst case is never above any attack's
    row; then, image by image in order, it switches to another attack whenever that strictly
    lowers the split's mean Dice, until a pass switches nothing. Every choice is an adversarial
    one of the attacks really produced, so the result is an achievable worst case.
    """
    stack = torch.stack([cm.long().cpu() for cm in cms])  # (attacks, images, C, C)
    n_attacks, n = stack.shape[:2]
    images = torch.arange(n)
    starts = [torch.full((n,), a) for a in range(n_attacks)] + [lowest_dice_choice(cms).cpu()]
    totals = torch.stack([stack[start, images].sum(0) for start in starts])
    first = int(per_image_dice(totals).argmin())  # a summed matrix is scored like one image's
    choice, total = starts[first].clone(), totals[first]
    best = float(per_image_dice(total[None])[0])
    for _ in range(max_passes):
        switched = False
        for i in range(n):
            candidates = (total - stack[choice[i], i])[None] + stack[:, i]
            keys = per_image_dice(candidates)
            a = int(keys.argmin())
            if keys[a] < best:
                choice[i], total, best, switched = a, candidates[a], float(keys[a]), True
        if not switched:
            break
    return choice


def compute_metrics(task: str, cm: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> dict:
    if task == "classification":
        return classification_metrics(cm, class_names)
    return segmentation_metrics(cm, class_names)


def primary_metric(task: str) -> str:
    """The metric used to pick ``best.pt`` and to draw the robustness curve."""
    return "accuracy" if task == "classification" else "dice_mean"
