"""Adversarial training for train.py: PGD-AT and TRADES, and the robust validation metric.

* PGD-AT (Madry et al., ICLR 2018) trains on adversarial examples of the current model, made by
  the registry's ``pgd`` (or ``segpgd`` for segmentation, ``--adv-attack``) with a random start.
* TRADES (Zhang et al., ICML 2019) minimises CE(f(x), y) + beta * KL(f(x) || f(x')), where x'
  maximises the KL term (``attacks.TRADES``); classification only.

Both inner attacks come from attacks.py and run in eval mode (as the TRADES reference does) on
the unwrapped model, so that DistributedDataParallel only sees the training forwards. TRADES'
training step then runs the clean and the adversarial batch through the model one after the
other, as the reference does, so each has its own BatchNorm batch statistics. eps ramps up
linearly from 0 over ``--adv-warmup-epochs``. Under ``--amp``'s fp16 autocast (GPUs without
bf16) the inner attacks see the model through ``attacks.for_autocast``, which rescales each
sample's loss gradient; otherwise it flushes to zero and the model trains on nearly clean images.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from attacks import TRADES, build_attack, for_autocast
from dataset import stratified_subset
from distributed import Dist
from engine import Engine, predict, predictions_under_attack
from splitdata import DatasetSplit, SplitSource, preload
from utils import (UsageError, check_number, compute_metrics, confusion_matrix, parse_fraction, parse_step_size,
                   step_size)

ADV_KINDS = ("none", "pgd", "trades")
ROBUST_VAL_STEPS = 10


@dataclass(frozen=True)
class AdvSettings:
    """``--adv`` and its companions."""

    kind: str = "none"
    eps: float = 4 / 255
    steps: int = 7
    alpha: float | str | None = None
    warmup_epochs: int = 0
    beta: float = 6.0
    attack: str = "pgd"
    val_limit: int = 64

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def eps_at(self, epoch: int, step: int, steps_per_epoch: int) -> float:
        """eps at a training step: a linear ramp from 0 over the warm-up epochs, then ``eps``."""
        if self.warmup_epochs <= 0:
            return self.eps
        done = (epoch * steps_per_epoch + step + 1) / (self.warmup_epochs * steps_per_epoch)
        return self.eps * min(1.0, done)

    def alpha_for(self, eps: float) -> float:
        return step_size(self.alpha, eps, self.steps)


def add_adversarial_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adversarial training")
    group.add_argument("--adv", default="none", choices=ADV_KINDS, help="none, pgd (PGD-AT) or trades")
    group.add_argument("--adv-eps", default="4/255", help="L-inf training budget in [0, 1], e.g. 4/255")
    group.add_argument("--adv-steps", default=7, type=int, help="inner attack steps")
    group.add_argument("--adv-alpha", default=None,
                       help="inner step size: a number (0.01, 2/255) or a fraction of each eps (eps/4); "
                            "default 2.5*eps/steps")
    group.add_argument("--adv-warmup-epochs", default=0, type=int, help="epochs over which eps ramps up from 0")
    group.add_argument("--adv-attack", default="pgd", choices=["pgd", "segpgd"],
                       help="inner attack of PGD-AT (segpgd: segmentation only)")
    group.add_argument("--trades-beta", default=6.0, type=float, help="weight of TRADES' KL term")
    group.add_argument("--adv-val-limit", default=64, type=int,
                       help="validation samples of the per-epoch robust check (PGD-10 at --adv-eps)")


def adversarial_settings(args: argparse.Namespace) -> AdvSettings:
    """Validate the adversarial flags (one-line usage errors) and bundle them."""
    try:
        eps = parse_fraction(str(args.adv_eps))
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--adv-eps {args.adv_eps!r} is not a number; write e.g. 4/255") from None
    check_number("--adv-eps", eps, low=0, high=1)
    if args.adv_steps < 1:
        raise UsageError(f"--adv-steps must be at least 1, got {args.adv_steps}")
    check_number("--trades-beta", args.trades_beta, low=0)
    if args.adv_warmup_epochs < 0:
        raise UsageError(f"--adv-warmup-epochs must be 0 or more, got {args.adv_warmup_epochs}")
    if args.adv_val_limit < 1:
        raise UsageError(f"--adv-val-limit must be at least 1, got {args.adv_val_limit}")
    if args.adv == "trades" and args.task == "segmentation":
        raise UsageError("--adv trades is a classification method; use --adv pgd for segmentation")
    if args.adv_attack == "segpgd" and args.task != "segmentation":
        raise UsageError("--adv-attack segpgd needs --task segmentation; classification uses pgd")
    alpha = parse_step_size("--adv-alpha", args.adv_alpha)
    return AdvSettings(kind=args.adv, eps=eps, steps=args.adv_steps, alpha=alpha,
                       warmup_epochs=args.adv_warmup_epochs, beta=args.trades_beta, attack=args.adv_attack,
                       val_limit=args.adv_val_limit)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def adversarial_batch(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, settings: AdvSettings,
                      eps: float, num_classes: int) -> torch.Tensor:
    """PGD-AT's training images: the inner attack's adversarials of the current model."""
    if eps <= 0:
        return images
    atk = build_attack(settings.attack, for_autocast(unwrap(model), images.device.type), eps,
                       steps=settings.steps, alpha=settings.alpha_for(eps), random_start=True, num_classes=num_classes)
    return atk(images, targets).detach().contiguous(memory_format=_memory_format(images))


def trades_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, settings: AdvSettings,
                eps: float, criterion: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """TRADES: CE on clean images + beta * KL(clean || adversarial); returns (loss, clean logits)."""
    adv = images
    if eps > 0:
        atk = TRADES(for_autocast(unwrap(model), images.device.type), eps=eps, alpha=settings.alpha_for(eps),
                     steps=settings.steps)
        adv = atk(images).detach().contiguous(memory_format=_memory_format(images))
    logits, adv_logits = model(images).float(), model(adv).float()
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return criterion(logits, targets) + settings.beta * robust, logits


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def split_source(split: Dataset, indices: Sequence[int], in_memory: bool) -> SplitSource:
    """The samples ``indices`` of ``split`` (a dataset of train.py's splits) as a SplitSource:
    decoded once into memory (``in_memory``), or read from disk at every access."""
    part = type(split)([split.samples[i] for i in indices], split.transform)
    source = preload(part) if in_memory and len(part) else None
    return source if source is not None else DatasetSplit(part)


def robust_subset(split: Dataset, limit: int, seed: int, dist: Dist | None = None) -> SplitSource:
    """This rank's contiguous share of the stratified ``limit``-sample subset of ``split`` that
    the per-epoch robust check attacks, decoded once into memory."""
    chosen = stratified_subset(range(len(split)), split.labels, limit, seed)
    return split_source(split, [chosen[i] for i in (dist or Dist()).shard(len(chosen))], in_memory=True)


def robust_metrics(model: nn.Module, source: SplitSource, task: str, class_names: list[str], eps: float,
                   device: torch.device, batch_size: int = 32, dist: Dist | None = None) -> dict:
    """Metrics under PGD-10 (alpha = 2.5*eps/10, no random start) at ``eps``, counted as the
    sweep counts them: fp32 predictions, a classification sample wrong once fooled. Under
    torchrun ``source`` is this rank's shard and the confusion matrices are summed."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        engine = Engine(device=device, batch_size=batch_size)
        cm = robust_confusion(model, source, task, len(class_names), eps, engine)
    finally:
        model.train(was_training)
    return compute_metrics(task, (dist or Dist()).sum(cm), class_names)


def robust_confusion(model: nn.Module, source: SplitSource, task: str, num_classes: int, eps: float,
                     engine: Engine) -> torch.Tensor:
    """The confusion matrix of ``source`` under PGD-10 at ``eps`` (an empty shard counts nothing)."""
    if len(source) == 0:
        return torch.zeros(num_classes, num_classes, dtype=torch.int64)
    targets, clean = [], []
    for chunk in torch.arange(len(source)).split(engine.batch_size):
        images, target = source.batch(chunk, engine.device)
        targets.append(target.cpu())
        clean.append(predict(model, images).cpu())
    targets, pred = torch.cat(targets), torch.cat(clean)
    classification = task == "classification"
    todo = torch.nonzero(pred == targets).flatten() if classification else torch.arange(len(source))
    if eps > 0 and len(todo):
        atk = build_attack("pgd", model, eps, steps=ROBUST_VAL_STEPS, alpha=step_size(None, eps, ROBUST_VAL_STEPS),
                           num_classes=num_classes)
        pred[todo] = predictions_under_attack(model, source, todo, atk, engine, classification=classification)
    return confusion_matrix(targets, pred, num_classes)
