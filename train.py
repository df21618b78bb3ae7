"""Train a ResNet classifier or a UResNet segmenter on Raabin-WBC (or the synthetic sample).

    python train.py --depth 50                                  # classification (default)
    python train.py --task segmentation --depth 18 --data ../shared/data/wbc-seg-d1
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dataset
from checkpoint import save_checkpoint
from model import DEPTHS, TASKS, build_model
from run_folder import load_best, load_resume, refuse_earlier_run, remove_earlier_run, restore_state
from utils import (ArgumentParser, ConfusionMatrix, DataError, ToolError, UsageError, atomic_savefig,
                   atomic_write_csv, atomic_write_json, check_number, check_seed, check_writable_dir,
                   compute_metrics, init_distributed_mode, is_main_process, output_lock, primary_metric,
                   resolve_device, run_cli, seed_everything)

#: Flags left out default per task. Classification's were chosen on the 300 real cells of wbc-seg-d1
#: (211 training images): batch 16 for 13 optimiser steps per epoch instead of 6, and 96 px, which
#: downscales the 104-120 px crops instead of upscaling them and pays for the 30 epochs.
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"epochs": 30, "batch_size": 16, "image_size": 96, "warmup_epochs": 2},
    "segmentation": {"epochs": 25, "batch_size": 32, "image_size": 128, "warmup_epochs": 1},
}
#: Peak learning rates per task and optimiser; classification's follow its halved batch (linear scaling).
DEFAULT_LR = {"classification": {"adamw": 1e-3, "sgd": 0.025}, "segmentation": {"adamw": 2e-3, "sgd": 0.05}}


def _by_task(flag: str) -> str:
    return ", ".join(f"{values[flag]} for {task}" for task, values in TASK_DEFAULTS.items())


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="classification", help="classification or segmentation")
    parser.add_argument("--depth", default=50, type=int, help=f"ResNet depth: {', '.join(map(str, DEPTHS))}")
    parser.add_argument("--data", default=None, help="dataset root (default: the synthetic sample)")
    parser.add_argument("--val-data", default=None, help="separate validation root (e.g. Raabin TestA/)")
    parser.add_argument("--test-data", default=None, help="separate test root (e.g. Raabin TestB/)")
    parser.add_argument("--skip-missing-masks", action="store_true", help="skip images that have no mask")
    parser.add_argument("--limit", default=None, type=int, help="at most N samples per split (quick runs)")
    parser.add_argument("--epochs", default=None, type=int, help=f"epochs (default {_by_task('epochs')})")
    parser.add_argument("--batch-size", default=None, type=int, help=f"default {_by_task('batch_size')}")
    parser.add_argument("--opt", default="adamw", help="adamw or sgd")
    parser.add_argument("--lr", default=None, type=float,
                        help="peak learning rate (default: adamw 1e-3 classification, 2e-3 segmentation; "
                             "sgd 0.025 and 0.05)")
    parser.add_argument("--weight-decay", default=1e-4, type=float)
    parser.add_argument("--warmup-epochs", default=None, type=int,
                        help=f"linear warm-up before the cosine decay (default {_by_task('warmup_epochs')})")
    parser.add_argument("--class-weights", action="store_true", help="inverse-frequency weighted cross-entropy")
    parser.add_argument("--label-smoothing", default=0.0, type=float, help="cross-entropy label smoothing")
    parser.add_argument("--dice-weight", default=1.0, type=float, help="weight of the soft Dice loss (segmentation)")
    parser.add_argument("--image-size", default=None, type=int,
                        help=f"images are resized to this square size (default {_by_task('image_size')})")
    parser.add_argument("--mean", default=None, type=float, nargs=3, help="normalisation mean (default: train split)")
    parser.add_argument("--std", default=None, type=float, nargs=3, help="normalisation std (default: train split)")
    parser.add_argument("--pretrained", action="store_true", help="start from ImageNet encoder weights")
    parser.add_argument("--workers", default=2, type=int, help="data-loading worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, bf16/fp16 on CUDA)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep NCHW memory format (channels_last is faster for convolutions)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--out", default=None, help="output folder (default Classification/ or Segmentation/)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (its checkpoints, log and metrics)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad flags before anything is loaded or written."""
    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.depth not in DEPTHS:
        raise UsageError(f"unknown --depth {args.depth}; choose one of {', '.join(map(str, DEPTHS))}")
    if args.opt not in DEFAULT_LR[args.task]:
        raise UsageError(f"unknown --opt {args.opt!r}; choose adamw or sgd")
    for flag in ("batch_size", "image_size", "epochs", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    for flag, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    for flag, value in (("--workers", args.workers), ("--warmup-epochs", args.warmup_epochs)):
        if value < 0:
            raise UsageError(f"{flag} must be 0 or more, got {value}")
    check_number("--lr", args.lr, low=0, low_open=True)
    check_number("--weight-decay", args.weight_decay, low=0)
    check_number("--label-smoothing", args.label_smoothing, low=0, high=1, high_open=True)
    check_number("--dice-weight", args.dice_weight, low=0)
    for value in args.mean or ():
        check_number("--mean", value, low=0, high=1)
    for value in args.std or ():
        check_number("--std", value, low=0, low_open=True)
    check_seed(args.seed)
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it; pass only one")
    if args.batch_size == 1 and smallest_batchnorm_area(args.task, args.depth, args.image_size) == 1:
        raise UsageError(f"--batch-size 1 leaves BatchNorm one value per channel at --image-size "
                         f"{args.image_size}, which cannot train; use --batch-size 2 or more")
    args.lr = args.lr or DEFAULT_LR[args.task][args.opt]
    args.out = Path(args.out or ("Classification" if args.task == "classification" else "Segmentation"))


def smallest_batchnorm_area(task: str, depth: int, image_size: int) -> int:
    """Pixels per channel of the smallest BatchNorm input for one image of ``image_size``.

    Training BatchNorm needs more than one value per channel, i.e. batch * area > 1. Found by
    tracing the model on the meta device (no weights, no compute).
    """
    with torch.device("meta"):
        model = build_model(task, depth, 3).eval()
    areas: list[int] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(lambda _m, inputs, _o: areas.append(inputs[0].shape[2:].numel()))
    with torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size, device="meta"))
    return min(areas, default=2)


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the hardware has it, fp16 on older GPUs, None when AMP is off/unsupported."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    bf16_cpu = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    if "AVX512" in bf16_cpu.upper() or "AMX" in bf16_cpu.upper():
        return torch.bfloat16
    print("note: --amp ignored: this CPU has no fast bf16 support; training in fp32")
    return None


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels, or cudnn's autotuner (as torchvision's reference scripts do):
    benchmark mode picks the fastest convolution algorithm per input shape, but the choice,
    and with it the last bits of the results, may change from run to run."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic)


def unaugmented(train_ds: Any, task: str, image_size: int) -> Any:
    """The training samples read as val/test read them (resize only, no augmentation)."""
    return type(train_ds)(train_ds.samples, dataset.build_transform(task, image_size, train=False))


def channel_stats(train_ds: Any, task: str, image_size: int,
                  max_images: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of (up to ``max_images``, evenly spaced) un-augmented training images."""
    plain = unaugmented(train_ds, task, image_size)
    step = max(1, len(plain) // max_images)
    total, total_sq, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
    for index in range(0, len(plain), step):
        pixels = plain[index][0].double().reshape(3, -1)
        total += pixels.sum(1)
        total_sq += (pixels ** 2).sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def class_weights(args: argparse.Namespace, train_ds: Any, num_classes: int) -> torch.Tensor | None:
    """Inverse-frequency weights (mean 1) from image labels or, for segmentation, the pixel
    counts of the un-augmented training masks (augmentation would make them random)."""
    if not args.class_weights:
        return None
    if args.task == "classification":
        counts = torch.bincount(torch.tensor(train_ds.labels), minlength=num_classes).double()
    else:
        plain = unaugmented(train_ds, args.task, args.image_size)
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for index in range(len(plain)):
            counts += torch.bincount(plain[index][1].reshape(-1), minlength=num_classes).double()
    weights = counts.sum() / counts.clamp_min(1) / num_classes
    return (weights / weights.mean()).float()


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes (batch-level sums)."""
    probs = logits.float().softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return 1 - dice[1:].mean()


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=args.lr)


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to zero."""
    total = max(1, args.epochs * steps_per_epoch)
    warmup = min(args.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loader: torch.utils.data.DataLoader, device: torch.device,
                    epoch: int, args: argparse.Namespace, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss. Stops on a non-finite loss."""
    model.train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    total_loss, total_seen, correct, counted = 0.0, 0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs} train", leave=False,
               disable=None if is_main_process() else True)
    for step, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
            loss = criterion(logits.float(), target)
            if args.task == "segmentation" and args.dice_weight > 0:
                loss = loss + args.dice_weight * soft_dice_loss(logits, target)
        if not torch.isfinite(loss):
            raise ToolError(f"non-finite training loss ({loss.item()}) at epoch {epoch + 1} step {step + 1}; "
                            f"the last good checkpoint is kept in {args.out / 'checkpoints'}; "
                            "lower --lr or drop --amp")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        total_loss += loss.item() * images.shape[0]
        total_seen += images.shape[0]
        correct += (logits.argmax(1) == target).sum().item()
        counted += target.numel()
        bar.set_postfix(loss=f"{total_loss / total_seen:.4f}", acc=f"{correct / counted:.3f}")
    return total_loss / max(1, total_seen)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, task: str,
             class_names: list[str], desc: str = "eval", channels_last: bool = True) -> dict:
    """Metrics from a confusion matrix accumulated over the whole split."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    cm = ConfusionMatrix(len(class_names))
    for images, target in tqdm(loader, desc=desc, leave=False, disable=None):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        cm.update(target, model(images).argmax(1).cpu())
    cm.reduce_from_all_processes()
    return compute_metrics(task, cm.mat, class_names)


def selection_tolerance(task: str, val_size: int) -> float:
    """How far below the best val metric so far a later epoch may be and still replace best.pt.

    For classification, one val sample: on a small val split (44 real cells) the best epoch is
    mostly a mid-training spike one image above the plateau, while the later model has trained
    longer at a lower learning rate. Segmentation's Dice over many pixels keeps ties only.
    """
    return 1.0 / val_size + 1e-9 if task == "classification" else 0.0  # 1e-9: rounding slack


def seed_epoch(args: argparse.Namespace, epoch: int, loader: torch.utils.data.DataLoader) -> None:
    """Make epoch ``epoch``'s randomness a function of (seed, epoch) only, so --resume is exact.

    It reseeds torch (CPU and every CUDA device), the loader's shuffling and worker seeds and the
    augmentation before the epoch's first draw, so checkpoints need no RNG state.
    """
    epoch_seed = args.seed * 1000 + epoch
    torch.manual_seed(epoch_seed)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    loader.dataset.reseed(epoch_seed)


def plot_training_curves(history: list[dict], key: str, path: Path) -> None:
    """Training loss and the validation metric per epoch, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_metric.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", color="tab:green")
    ax_metric.set(xlabel="epoch", ylabel=f"validation {key}", title=f"Validation {key}", ylim=(0, 1.02))
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def summary_line(task: str, metrics: dict) -> str:
    keys = (["accuracy", "balanced_accuracy"] if task == "classification"
            else ["pixel_accuracy", "dice_cytoplasm", "dice_nucleus", "dice_mean"])
    return "  ".join(f"{key} {metrics[key]:.4f}" for key in keys)


def check_train_split(args: argparse.Namespace, n_train: int) -> None:
    """A one-sample train split gives batches of one, which BatchNorm cannot train on."""
    if n_train == 1 and smallest_batchnorm_area(args.task, args.depth, args.image_size) == 1:
        raise DataError(f"the train split has a single sample, but BatchNorm needs at least 2 per batch at "
                        f"--image-size {args.image_size}; add training images or raise --limit")


def main(args: argparse.Namespace) -> dict:
    validate_args(args)
    init_distributed_mode(args)
    device = resolve_device(args.device)
    with output_lock(args.out) if is_main_process() else contextlib.nullcontext():
        return train(args, device)


def train(args: argparse.Namespace, device: torch.device) -> dict:
    """The training run itself; the main process holds the lock on ``args.out`` throughout."""
    configure_determinism(args.deterministic)
    seed_everything(args.seed)
    ckpt_dir = args.out / "checkpoints"
    if is_main_process():
        check_writable_dir(ckpt_dir)
    resume = load_resume(args, ckpt_dir) if args.resume else None
    if resume is None and not args.overwrite:
        refuse_earlier_run(args.out)

    splits = dataset.build_splits(args.task, args.data, args.val_data, args.test_data,
                                  image_size=args.image_size, seed=args.seed, limit=args.limit,
                                  skip_missing_masks=args.skip_missing_masks)
    check_train_split(args, len(splits["train"]))
    class_names = list(dataset.CLASS_NAMES if args.task == "classification" else dataset.SEG_CLASS_NAMES)
    if is_main_process():
        print(dataset.format_split_counts(splits, dataset.CLASS_NAMES))
    if resume is not None:
        mean, std = resume["mean"], resume["std"]
    elif args.mean is None or args.std is None:
        mean, std = channel_stats(splits["train"], args.task, args.image_size)
        mean, std = args.mean or mean, args.std or std
    else:
        mean, std = args.mean, args.std
    loaders = {name: dataset.make_loader(ds, args.batch_size, train=(name == "train"), workers=args.workers,
                                         device=device, seed=args.seed) for name, ds in splits.items()}

    model = build_model(args.task, args.depth, len(class_names), mean, std, pretrained=args.pretrained)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    weights = class_weights(args, splits["train"], len(class_names))
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer, len(loaders["train"]))
    amp_dtype = autocast_dtype(device, args.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, history, best_metric = 0, [], -math.inf
    if resume is not None:
        restore_state(resume, ckpt_dir / "last.pt", args.opt, model, optimizer, scheduler, scaler, device)
        start_epoch, history, best_metric = resume["epoch"], resume["history"], resume["best_metric"]
        print(f"resuming from {ckpt_dir / 'last.pt'} at epoch {start_epoch + 1}")
    elif args.overwrite and is_main_process():
        remove_earlier_run(args.out)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda" else None)

    meta = dict(task=args.task, depth=args.depth, class_names=class_names, image_size=args.image_size,
                mean=mean, std=std, args=vars(args))
    key = primary_metric(args.task)
    tolerance = selection_tolerance(args.task, len(splits["val"]))
    started = time.perf_counter() - sum(row["seconds"] for row in history)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args, epoch, loaders["train"])
        epoch_start = time.perf_counter()
        train_loss = train_one_epoch(model, criterion, optimizer, scheduler, loaders["train"], device,
                                     epoch, args, scaler, amp_dtype)
        val = evaluate(model, loaders["val"], device, args.task, class_names, "val", args.channels_last)
        improved = not math.isnan(val[key]) and val[key] >= best_metric - tolerance
        best_metric = max(best_metric, val[key]) if improved else best_metric
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                        **{f"val_{k}": v for k, v in val.items()}, "best": improved,
                        "seconds": time.perf_counter() - epoch_start})
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  val {summary_line(args.task, val)}")
        if is_main_process():
            state = dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict() if scaler is not None else {},
                         history=history, best_metric=best_metric)
            # last.pt first: a kill before best.pt is written leaves last.pt as the best epoch's
            # checkpoint, from which load_resume() restores best.pt
            save_checkpoint(ckpt_dir / "last.pt", model, epoch=epoch + 1, metrics=val, **meta, **state)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", model, epoch=epoch + 1, metrics=val, **meta, **state)
            atomic_write_csv(args.out / "log.csv", history, list(history[0].keys()))
            plot_training_curves(history, key, args.out / "Images" / "training_curves.png")
    train_seconds = time.perf_counter() - started

    best = load_best(args, ckpt_dir / "best.pt", history)
    (model.module if args.distributed else model).load_state_dict(best["model"])
    test = evaluate(model, loaders["test"], device, args.task, class_names, "test", args.channels_last)
    result = {**test, "best_epoch": best["epoch"], "train_seconds": round(train_seconds, 2)}
    print(f"test ({len(splits['test'])} images, best epoch {best['epoch']}): {summary_line(args.task, test)}")
    if is_main_process():
        atomic_write_json(args.out / "metrics.json", result)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
