"""Train a ResNet classifier or a UResNet segmenter on Raabin-WBC (or the synthetic sample).

    python train.py --depth 50                                  # classification (default)
    python train.py --task segmentation --depth 18 --data ../shared/data/wbc-seg-d1
    torchrun --nproc_per_node 4 train.py --depth 50 --sync-bn   # one node, 4 GPUs (DDP)
    python train.py --depth 18 --adv pgd --adv-eps 4/255         # PGD-AT (or --adv trades)
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
from torch import nn
from torch.utils.data import DistributedSampler, Subset
from tqdm import tqdm

import dataset
from adversarial import (AdvSettings, add_adversarial_args, adversarial_batch, adversarial_settings, robust_metrics,
                         robust_subset, split_source, trades_loss)
from checkpoint import save_checkpoint
from distributed import Dist, init_distributed, setup_for_distributed, shutdown, stop_together
from files import atomic_write_csv, atomic_write_json, check_writable_dir, output_lock
from model import DEPTHS, IMAGENET_MEAN, IMAGENET_STD, TASKS, build_model
from run_folder import (best_metric_key, load_best, load_resume, refuse_earlier_run, remove_earlier_run,
                        restore_state)
from stats import metric_interval
from training_utils import (autocast_dtype, build_optimizer, build_scheduler, channel_stats, class_weights,
                            configure_determinism, plot_training_curves, seed_epoch, soft_dice_loss, summary_line)
from utils import (ArgumentParser, ConfusionMatrix, DataError, ToolError, UsageError, check_number, check_seed,
                   compute_metrics, per_image_confusion, primary_metric, resolve_device, run_cli, seed_everything)

#: Flags left out default per task. Classification's were chosen on the 300 real cells of wbc-seg-d1
#: (211 training images): batch 16 for 13 optimiser steps per epoch instead of 6, and 96 px, which
#: downscales the 104-120 px crops instead of upscaling them and pays for the 30 epochs.
TASK_DEFAULTS: dict[str, dict[str, int]] = {
    "classification": {"epochs": 30, "batch_size": 16, "image_size": 96, "warmup_epochs": 2},
    "segmentation": {"epochs": 25, "batch_size": 32, "image_size": 128, "warmup_epochs": 1},
}
#: Peak learning rates per task and optimiser; classification's follow its halved batch (linear scaling).
DEFAULT_LR = {"classification": {"adamw": 1e-3, "sgd": 0.025}, "segmentation": {"adamw": 2e-3, "sgd": 0.05}}
#: The largest --image-size accepted: a larger one would only fail later, out of memory.
MAX_IMAGE_SIZE = 2048


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
    parser.add_argument("--batch-size", default=None, type=int,
                        help=f"images per process and step (default {_by_task('batch_size')}): under torchrun the "
                             "global batch is this times the number of processes (--lr is not scaled with it; "
                             "scale it yourself if you want)")
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
    parser.add_argument("--sync-bn", action="store_true",
                        help="under torchrun: BatchNorm statistics over all processes (SyncBatchNorm, CUDA only)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, bf16/fp16 on CUDA)")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep NCHW memory format (channels_last is faster for convolutions)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-exact resume)")
    parser.add_argument("--seed", default=0, type=int,
                        help="seeds the augmentation, the shuffling and the initial weights")
    parser.add_argument("--split-seed", default=0, type=int,
                        help="seeds the train/val/test split of --data (runs with different --seed keep their "
                             "test images)")
    parser.add_argument("--out", default=None, help="output folder (default Classification/ or Segmentation/)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoints/last.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in --out (its checkpoints, log and metrics)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    add_adversarial_args(parser)
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
    if args.out is not None and not str(args.out).strip():
        raise UsageError("--out is empty; give a folder (or drop --out for the default)")
    if args.image_size > MAX_IMAGE_SIZE:
        raise UsageError(f"--image-size {args.image_size} is over {MAX_IMAGE_SIZE} px, far above any blood-smear "
                         "crop; choose a smaller size")
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
    check_seed(args.split_seed, "--split-seed")
    adv = adversarial_settings(args)
    args.adv_eps, args.adv_alpha = adv.eps, adv.alpha
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


def training_loss(model: nn.Module, criterion: nn.Module, images: torch.Tensor, target: torch.Tensor,
                  args: argparse.Namespace, adv: AdvSettings, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one step: standard, PGD-AT (on the inner attack's adversarials) or TRADES."""
    if adv.kind == "trades":
        loss, logits = trades_loss(model, images, target, adv, eps, criterion)
        return logits, loss
    if adv.kind == "pgd":
        num_classes = len(dataset.CLASS_NAMES if args.task == "classification" else dataset.SEG_CLASS_NAMES)
        images = adversarial_batch(model, images, target, adv, eps, num_classes)
    logits = model(images)
    loss = criterion(logits.float(), target)
    if args.task == "segmentation" and args.dice_weight > 0:
        loss = loss + args.dice_weight * soft_dice_loss(logits, target)
    return logits, loss


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, loader: torch.utils.data.DataLoader, device: torch.device,
                    epoch: int, args: argparse.Namespace, scaler: torch.amp.GradScaler | None = None,
                    amp_dtype: torch.dtype | None = None, dist: Dist | None = None,
                    adv: AdvSettings | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss (over every process's samples).
    Stops on a non-finite loss. With ``adv`` the inner attack runs under the same autocast."""
    dist, adv = dist or Dist(), adv or AdvSettings()
    model.train()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    total_loss, total_seen, correct, counted = 0.0, 0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs} train", leave=False,
               disable=None if dist.is_main else True)
    for step, (images, target) in enumerate(bar):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, loss = training_loss(model, criterion, images, target, args, adv,
                                         adv.eps_at(epoch, step, len(loader)))
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
    total_loss, total_seen = dist.sum(torch.tensor([total_loss, total_seen], dtype=torch.float64)).tolist()
    return total_loss / max(1, total_seen)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, task: str,
             class_names: list[str], desc: str = "eval", channels_last: bool = True,
             dist: Dist | None = None, interval: bool = False) -> dict:
    """Metrics from a confusion matrix accumulated over the whole split (under torchrun: summed
    over the ranks' shards, so every sample counts once); with ``interval`` also the primary
    metric's 95 % interval, as main.py's tables give it (the loaders of val and test are
    unshuffled contiguous shards, so the gathered per-image matrices are in split order)."""
    dist = dist or Dist()
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    cm, image_cms = ConfusionMatrix(len(class_names)), []
    for images, target in tqdm(loader, desc=desc, leave=False, disable=None if dist.is_main else True):
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        pred = model(images).argmax(1).cpu()
        cm.update(target, pred)
        if interval and task == "segmentation":
            image_cms.append(per_image_confusion(target, pred, len(class_names)))
    split_cm = dist.sum(cm.mat)
    metrics = compute_metrics(task, split_cm, class_names)
    if interval:
        whole = None
        if task == "segmentation":
            k = len(class_names)
            whole = torch.cat(dist.gather(torch.cat(image_cms) if image_cms else torch.zeros(0, k, k, dtype=torch.long)))
        metrics.update(metric_interval(task, split_cm, whole))
    return metrics


def selection_tolerance(task: str, val_size: int, robust_limit: int | None = None) -> float:
    """How far below the best val metric so far a later epoch may be and still replace best.pt.

    For classification, one sample of the set the metric is counted on: the val split, or with
    --adv the robust subset of at most ``robust_limit`` of its samples. On a small val split (44
    real cells) the best epoch is mostly a mid-training spike one image above the plateau, while
    the later model has trained longer at a lower learning rate. Segmentation's Dice over many
    pixels keeps ties only.
    """
    counted = min(val_size, robust_limit) if robust_limit is not None else val_size
    return 1.0 / counted + 1e-9 if task == "classification" else 0.0  # 1e-9: rounding slack


def check_train_split(args: argparse.Namespace, n_train: int, world_size: int = 1) -> None:
    """A process with a single training sample gets batches of one, which BatchNorm cannot
    train on (DistributedSampler gives each process ceil(n_train / world_size) samples)."""
    if math.ceil(n_train / world_size) > 1 or smallest_batchnorm_area(args.task, args.depth, args.image_size) > 1:
        return
    if world_size == 1:
        raise DataError(f"the train split has a single sample, but BatchNorm needs at least 2 per batch at "
                        f"--image-size {args.image_size}; add training images or raise --limit")
    raise DataError(f"the train split has {n_train} sample(s), so each of the {world_size} processes gets batches "
                    f"of one, but BatchNorm needs at least 2 per batch at --image-size {args.image_size}; add "
                    "training images, raise --limit or run fewer processes")


def check_sync_bn(args: argparse.Namespace, dist: Dist) -> None:
    if args.sync_bn and dist.active and dist.device.type != "cuda":
        raise UsageError("--sync-bn needs --device cuda under torchrun (SyncBatchNorm has no CPU kernel); "
                         "drop --sync-bn on CPU")


def main(args: argparse.Namespace) -> dict:
    validate_args(args)
    resolve_device(args.device)  # usage errors come before --out is created
    dist = init_distributed(args.device)
    restore_print = setup_for_distributed(dist.is_main)
    with stop_together(dist):
        try:
            check_sync_bn(args, dist)
            args.world_size = dist.world_size
            with output_lock(args.out) if dist.is_main else contextlib.nullcontext():
                dist.barrier()  # no rank starts before the main one holds the lock
                return train(args, dist)
        finally:
            restore_print()
            shutdown(dist)


def normalisation_stats(args: argparse.Namespace, train_split: Any) -> tuple[list[float], list[float]]:
    """``--mean``/``--std`` where given; otherwise, with ``--pretrained``, ImageNet's (the
    statistics the encoder's weights were trained with, as torchvision's references use), else
    the train split's."""
    if args.mean is not None and args.std is not None:
        return list(args.mean), list(args.std)
    if args.pretrained:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = channel_stats(train_split, args.task, args.image_size)
    return list(args.mean or mean), list(args.std or std)


def build_loaders(args: argparse.Namespace, splits: dict, dist: Dist) -> dict:
    """Train: under torchrun a DistributedSampler (reshuffled per epoch by ``set_epoch``, padded
    to equal shares so every rank takes the same number of steps). Val/test: this rank's
    contiguous, unpadded shard, so that the summed confusion matrices count every sample once."""
    sampler = (DistributedSampler(splits["train"], num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                  seed=args.seed) if dist.active else None)
    loaders = {"train": dataset.make_loader(splits["train"], args.batch_size, train=True, workers=args.workers,
                                            device=dist.device, seed=args.seed, sampler=sampler)}
    for name in ("val", "test"):
        shard = Subset(splits[name], list(dist.shard(len(splits[name])))) if dist.active else splits[name]
        loaders[name] = dataset.make_loader(shard, args.batch_size, train=False, workers=args.workers,
                                            device=dist.device, seed=args.seed)
    return loaders


def validate(module: nn.Module, loaders: dict, robust_val: Any, args: argparse.Namespace, adv: AdvSettings,
             class_names: list[str], dist: Dist) -> dict:
    """Validation metrics, plus ``robust_<metric>`` under PGD-10 at --adv-eps with --adv."""
    for buffer in module.buffers():  # every rank evaluates the main rank's BatchNorm statistics
        dist.broadcast_(buffer)
    val = evaluate(module, loaders["val"], dist.device, args.task, class_names, "val", args.channels_last, dist)
    if adv.active:
        robust = robust_metrics(module, robust_val, args.task, class_names, adv.eps, dist.device, args.batch_size,
                                dist)
        val.update({f"robust_{key}": value for key, value in robust.items()})
    return val


def robust_test_metrics(module: nn.Module, test_split: Any, args: argparse.Namespace, adv: AdvSettings,
                        class_names: list[str], dist: Dist) -> dict:
    """``test_robust_<metric>``: the whole test split under PGD-10 at --adv-eps (with --adv)."""
    if not adv.active:
        return {}
    source = split_source(test_split, dist.shard(len(test_split)), in_memory=False)
    robust = robust_metrics(module, source, args.task, class_names, adv.eps, dist.device, args.batch_size, dist)
    return {f"test_robust_{key}": value for key, value in robust.items()}


def train(args: argparse.Namespace, dist: Dist) -> dict:
    """The training run itself; the main process holds the lock on ``args.out`` throughout."""
    device, adv = dist.device, adversarial_settings(args)
    configure_determinism(args.deterministic, device, args.task)
    seed_everything(args.seed)
    ckpt_dir = args.out / "checkpoints"
    if dist.is_main:
        check_writable_dir(ckpt_dir)
    resume = load_resume(args, ckpt_dir, main_process=dist.is_main) if args.resume else None
    if resume is None and not args.overwrite:
        refuse_earlier_run(args.out)
    dist.barrier()  # with --resume, the main rank has restored best.pt before any rank goes on

    splits = dataset.build_splits(args.task, args.data, args.val_data, args.test_data,
                                  image_size=args.image_size, seed=args.split_seed, limit=args.limit,
                                  skip_missing_masks=args.skip_missing_masks)
    check_train_split(args, len(splits["train"]), dist.world_size)
    class_names = list(dataset.CLASS_NAMES if args.task == "classification" else dataset.SEG_CLASS_NAMES)
    print(dataset.format_split_counts(splits, dataset.CLASS_NAMES))
    for note in dataset.training_copies_notes(splits):
        print(f"note: {note}")
    mean, std = (resume["mean"], resume["std"]) if resume is not None else normalisation_stats(args, splits["train"])
    loaders = build_loaders(args, splits, dist)
    robust_val = robust_subset(splits["val"], adv.val_limit, args.seed, dist) if adv.active else None

    module = build_model(args.task, args.depth, len(class_names), mean, std, pretrained=args.pretrained)
    if args.sync_bn and dist.active:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    module = module.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    weights = class_weights(args, splits["train"], len(class_names))
    criterion = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None,
                                    label_smoothing=args.label_smoothing)
    optimizer = build_optimizer(args, module)
    scheduler = build_scheduler(args, optimizer, len(loaders["train"]))
    amp_dtype = autocast_dtype(device, args.amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    start_epoch, history, best_metric = 0, [], -math.inf
    if resume is not None:
        restore_state(resume, ckpt_dir / "last.pt", args.opt, module, optimizer, scheduler, scaler, device)
        start_epoch, history, best_metric = resume["epoch"], resume["history"], resume["best_metric"]
        print(f"resuming from {ckpt_dir / 'last.pt'} at epoch {start_epoch + 1}")
    model = (nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
             if dist.active else module)

    meta = dict(task=args.task, depth=args.depth, class_names=class_names, image_size=args.image_size,
                mean=mean, std=std, args=vars(args),
                split_digests={name: split.split_digest for name, split in splits.items()})
    key, best_key = primary_metric(args.task), best_metric_key(args.task, args.adv)
    steps = len(loaders["train"])
    tolerance = selection_tolerance(args.task, len(splits["val"]), adv.val_limit if adv.active else None)
    started = time.perf_counter() - sum(row["seconds"] for row in history)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args, epoch, loaders["train"], dist.rank)
        epoch_start = time.perf_counter()
        train_loss = train_one_epoch(model, criterion, optimizer, scheduler, loaders["train"], device,
                                     epoch, args, scaler, amp_dtype, dist, adv)
        val = validate(module, loaders, robust_val, args, adv, class_names, dist)
        improved = not math.isnan(val[best_key]) and val[best_key] >= best_metric - tolerance
        best_metric = max(best_metric, val[best_key]) if improved else best_metric
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                        **({"adv_eps": adv.eps_at(epoch, steps - 1, steps)} if adv.active else {}),
                        **{f"val_{k}": v for k, v in val.items()}, "best": improved,
                        "seconds": time.perf_counter() - epoch_start})
        robust = f"  robust {val[best_key]:.4f}" if adv.active else ""
        print(f"epoch {epoch + 1}/{args.epochs}  loss {train_loss:.4f}  val {summary_line(args.task, val)}{robust}")
        if dist.is_main:
            if args.overwrite and resume is None and epoch == start_epoch:
                remove_earlier_run(args.out)  # only now: a run that fails before its first epoch loses nothing
            state = dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         scaler=scaler.state_dict() if scaler is not None else {},
                         history=history, best_metric=best_metric)
            # last.pt first: a kill before best.pt is written leaves last.pt as the best epoch's
            # checkpoint, from which load_resume() restores best.pt
            save_checkpoint(ckpt_dir / "last.pt", module, epoch=epoch + 1, metrics=val, **meta, **state)
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", module, epoch=epoch + 1, metrics=val, **meta, **state)
            atomic_write_csv(args.out / "log.csv", history, list(history[0].keys()))
            plot_training_curves(history, key, args.out / "Images" / "training_curves.png")
    train_seconds = time.perf_counter() - started

    dist.barrier()  # the main rank has written best.pt
    best = load_best(args, ckpt_dir / "best.pt", history)
    module.load_state_dict(best["model"])
    test = evaluate(module, loaders["test"], device, args.task, class_names, "test", args.channels_last, dist,
                    interval=True)
    robust = robust_test_metrics(module, splits["test"], args, adv, class_names, dist)
    result = {**test, **robust, "best_epoch": best["epoch"], "train_seconds": round(train_seconds, 2),
              "world_size": dist.world_size,
              **{f"{name}_copies_of_training_images": len(splits[name].training_copies) for name in ("val", "test")}}
    shown = f"  robust {robust[f'test_robust_{key}']:.4f}" if robust else ""
    print(f"test ({len(splits['test'])} images, best epoch {best['epoch']}): {summary_line(args.task, test)}{shown}")
    if dist.is_main:
        atomic_write_json(args.out / "metrics.json", result)
    dist.barrier()  # every rank ends together, after metrics.json
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args()))
