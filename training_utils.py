"""train.py's helpers: normalisation statistics, losses, optimizer and schedule, seeding,
the training-curves figure and the one-line metric summary."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dataset
from files import atomic_savefig
from utils import cpu_has_native_bf16


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where the hardware has it, fp16 on older GPUs, None when AMP is off/unsupported."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_has_native_bf16():  # AVX512 alone emulates bf16, slower than fp32
        return torch.bfloat16
    print("note: --amp ignored: this CPU has no fast bf16 support; training in fp32")
    return None


def configure_determinism(deterministic: bool, device: torch.device | None = None,
                          task: str = "classification") -> None:
    """Deterministic kernels, or cudnn's autotuner (as torchvision's reference scripts do):
    benchmark mode picks the fastest convolution algorithm per input shape, but the choice,
    and with it the last bits of the results, may change from run to run.

    On CUDA, deterministic cuBLAS matmuls need ``CUBLAS_WORKSPACE_CONFIG`` (set here when unset,
    before the first cuBLAS call). The segmenter's bilinear-upsampling backward and pixel-wise
    NLL loss have no deterministic CUDA kernels in PyTorch: rather than stop the run at its first
    batch, they run as they are (``warn_only``) and a note says so."""
    torch.backends.cudnn.benchmark = not deterministic
    on_cuda = device is not None and device.type == "cuda"
    if deterministic and on_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    warn_only = deterministic and on_cuda and task == "segmentation"
    if warn_only:
        print("note: --deterministic on CUDA: the segmenter's bilinear upsampling (backward) and pixel loss "
              "have no deterministic CUDA kernels, so a resumed run matches up to float rounding")
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def unaugmented(train_ds: Any, task: str, image_size: int) -> Any:
    """The training samples read as val/test read them (resize only, no augmentation)."""
    return type(train_ds)(train_ds.samples, dataset.build_transform(task, image_size, train=False))


def channel_stats(train_ds: Any, task: str, image_size: int,
                  max_images: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of un-augmented training images, every ``len // max_images``-th one
    (so between ``max_images`` and twice that many; all of them up to ``2 * max_images - 1``)."""
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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank.

    Rank 0 (and so a single process) keeps ``seed * 1000 + epoch``, the seed of a run without
    torchrun; every other rank gets an independent 32-bit seed derived from (seed, epoch, rank),
    so the ranks draw different augmentations and random starts.
    """
    if rank == 0:
        return seed * 1000 + epoch
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_epoch(args: argparse.Namespace, epoch: int, loader: torch.utils.data.DataLoader, rank: int = 0) -> None:
    """Make epoch ``epoch``'s randomness on ``rank`` a function of (seed, epoch, rank) only, so
    --resume is exact. It reseeds torch (CPU and every CUDA device), the loader's shuffling and
    worker seeds and the augmentation before the epoch's first draw, so checkpoints need no RNG
    state. The DistributedSampler's shuffle depends on (seed, epoch) alone: every rank must draw
    the same permutation to take its share of it."""
    seed = epoch_seed(args.seed, epoch, rank)
    torch.manual_seed(seed)
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    loader.dataset.reseed(seed)


def plot_training_curves(history: list[dict], key: str, path: Path) -> None:
    """Training loss and the validation metric per epoch (clean and, with --adv, robust), side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    ax_metric.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", color="tab:green", label="clean")
    if f"val_robust_{key}" in history[0]:
        ax_metric.plot(epochs, [row[f"val_robust_{key}"] for row in history], marker="s", color="tab:red",
                       label="PGD-10 at --adv-eps")
        ax_metric.legend(loc="lower right")
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
