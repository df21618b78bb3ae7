"""The attack loop: the only place attacks are run (a library: no argparse, no prints).

``run_attack`` attacks a set of samples of a split and hands back finished adversarials.
Its fast engine runs the PGD family (PGD, PGDL2, BIM, FGSM, SegPGD, CosPGD; see
``attacks.fast_spec``) itself:

* the samples still to attack are packed into full batches, and a finished sample's slot
  is refilled at once (AutoAttack packs its robust samples the same way);
* with a ``fooled_fn`` (classification), a sample stops at the first iterate that fools it
  (by the counted fp32 prediction, also under autocast) and that iterate is kept;
* the forward and backward may run under autocast (bf16/fp16), in channels_last, on a copy
  of the model whose batch norms are folded into its convolutions (``prepare_model``);
* without a random start, an untargeted L-inf attack's first step (the gradient at the clean
  image) is the same at every eps, so ``FirstSteps`` keeps its sign from one eps to the next
  and later eps start at step 1;
* every random start can be drawn from the sample's own seed (``per_sample_noise``), and a
  sample's loss is its own (never averaged over the batch), so its adversarial does not
  depend on which samples share its batch or its process.

Every other attack, and every attack with ``Engine(kind="library")``, runs as the
torchattacks/cleverhans object of its ``atk`` line. The prediction that is counted always
comes from an fp32 forward of the final adversarial image.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacks import Attack, PGDSpec, fast_spec, fp16_safe_logits, pgd_loss, pgd_step, random_start_delta
from model import fold_batchnorm
from splitdata import SplitSource
from utils import ToolError

NORM_TOLERANCE = 1e-6  # for fp32 adversarials (the fast engine keeps its iterates in fp32)
L2_RELATIVE_TOLERANCE = 1e-5  # see budget_tolerance
Noise = Callable[[torch.Tensor, PGDSpec, Sequence[int]], torch.Tensor]


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Engine:
    """How attacks run: ``fast`` (our PGD-family loop where one exists) or ``library``."""

    kind: str = "fast"
    device: torch.device = torch.device("cpu")
    batch_size: int = 32
    autocast: torch.dtype | None = None
    memory_format: torch.memory_format = torch.contiguous_format
    early_stop: bool = True
    fold_batchnorm: bool = False
    reuse_first_step: bool = True


def prepare_model(model: nn.Module, engine: Engine) -> nn.Module:
    """The model as the engine runs it: in its memory format and, for the fast engine with
    ``fold_batchnorm``, with the batch norms folded into the convolutions (a copy)."""
    if engine.kind == "fast" and engine.fold_batchnorm:
        model = fold_batchnorm(model)
    return model.to(memory_format=engine.memory_format)


# --------------------------------------------------------------------------- seeds and checks
def _digest(*parts: object) -> int:
    text = "|".join(repr(p) if isinstance(p, float) else str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2**63)


def row_seed(seed: int, split: str, eps: float, attack: str = "") -> int:
    """A seed for one (split, eps, attack) row that does not depend on what ran before it."""
    return _digest(seed, split, float(eps), attack)


def sample_seed(seed: int, split: str, eps: float, attack: str, index: int) -> int:
    """The seed of one sample's random start: the same whatever its batch or process."""
    return _digest(seed, split, float(eps), attack, int(index))


def per_sample_noise(seed: int, split: str, attack: str, offset: int = 0) -> Noise:
    """Random starts drawn from each sample's own generator (see :func:`sample_seed`); sample
    ``i`` of a shard that starts at ``offset`` is sample ``offset + i`` of its split."""
    def draw(index: torch.Tensor, spec: PGDSpec, shape: Sequence[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(sample_seed(seed, split, spec.eps, attack, offset + i))
                for i in index.tolist()]
        return torch.cat([random_start_delta((1, *shape), spec, gen) for gen in gens])
    return draw


def perturbation_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.detach().flatten(1)
    return flat.abs().amax(dim=1) if norm == "Linf" else flat.norm(dim=1)


def budget_tolerance(dtype: torch.dtype, norm: str = "Linf", eps: float = 0.0) -> float:
    """How far rounding may carry a perturbation past eps: pixels in [0, 1] stored as
    ``dtype`` are off by at most half a unit in the last place, i.e. eps(dtype) / 2 for the
    image and the adversarial together (fp32: 1e-6; bf16: 2^-7; fp16: 2^-10). An L2 norm sums
    3*H*W squares, and projecting onto the ball rescales by eps / norm, so its rounding grows
    with eps and the image: L2 adds ``L2_RELATIVE_TOLERANCE * eps`` (fp32 lands ~2e-6 over
    eps = 2 at 128 px)."""
    base = NORM_TOLERANCE if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    return base + (L2_RELATIVE_TOLERANCE * eps if norm == "L2" else 0.0)


def check_adversarial(images: torch.Tensor, adv: torch.Tensor, eps: float, norm: str, attack: str) -> None:
    """Refuse adversarial images that leave the threat model (a library bug or misuse)."""
    where = f"attack {attack} at eps {eps:.6g}"
    if not torch.isfinite(adv).all():
        raise ToolError(f"{where} produced NaN/inf pixels; try fewer --steps or another attack")
    if adv.min().item() < 0.0 or adv.max().item() > 1.0:
        raise ToolError(f"{where} produced pixels outside [0, 1] "
                        f"({adv.min().item():.4g}..{adv.max().item():.4g})")
    worst = perturbation_norms(adv - images, norm).max().item() if len(adv) else 0.0
    if worst > eps + budget_tolerance(adv.dtype, norm, eps):
        raise ToolError(f"{where} exceeded its budget: {norm} perturbation {worst:.6g} > eps")


# --------------------------------------------------------------------------- forward passes
def forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``; a batch of one is padded to two, so that a sample's logits do not
    depend on its batch size (CPU kernels take another path for a single image)."""
    if len(images) == 1:
        return model(torch.cat([images, images.detach()]))[:1]
    return model(images)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Argmax of an fp32 forward: the prediction that is counted."""
    return torch.cat([forward(model, chunk).float().argmax(1) for chunk in images.split(batch_size)])


# --------------------------------------------------------------------------- running one attack
class FirstSteps:
    """Each sample's first L-inf step direction, kept from one eps of a sweep to the next.

    Without a random start an untargeted PGD-family attack takes its first gradient at the
    clean image, with a loss that does not depend on eps there (SegPGD's lambda_0 is 0 and
    CosPGD's weights come from the clean logits), so the first step's direction, the sign of
    that gradient, is the same at every eps. It is stored in two bits per value (a quarter of
    the uint8 split) the first time it is computed; at later eps the sample starts at step 1.
    """

    def __init__(self, size: int) -> None:
        self.known = torch.zeros(size, dtype=torch.bool)
        self._shape: tuple[int, ...] = ()
        self._positive = self._negative = np.zeros((0, 0), np.uint8)

    @staticmethod
    def applies(spec: PGDSpec) -> bool:
        return (spec.norm == "Linf" and not spec.random_start and not spec.targeted
                and spec.loss in ("ce", "segpgd", "cospgd"))

    def store(self, index: torch.Tensor, grad: torch.Tensor) -> None:
        """Keep the signs of ``grad`` (N x C x H x W, any memory format) for samples ``index``."""
        values = grad.detach().contiguous().flatten(1).cpu()
        if not self._shape:
            self._shape = tuple(grad.shape[1:])
            width = (values.shape[1] + 7) // 8
            self._positive = np.zeros((len(self.known), width), np.uint8)
            self._negative = np.zeros((len(self.known), width), np.uint8)
        rows = index.numpy()
        self._positive[rows] = np.packbits((values > 0).numpy(), axis=1)
        self._negative[rows] = np.packbits((values < 0).numpy(), axis=1)
        self.known[index] = True

    def signs(self, index: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
        """The stored signs (-1, 0 or 1, float) for samples ``index``, all of them known."""
        count, rows = int(np.prod(self._shape)), index.numpy()
        positive = np.unpackbits(self._positive[rows], axis=1, count=count)
        negative = np.unpackbits(self._negative[rows], axis=1, count=count)
        signs = torch.from_numpy(positive.astype(np.float32) - negative).view(len(rows), *self._shape)
        return signs.to(device).contiguous(memory_format=memory_format)


@dataclass
class Finished:
    """Samples whose attack is over: indices (CPU) and tensors on the engine's device."""

    index: torch.Tensor
    clean: torch.Tensor
    adv: torch.Tensor
    targets: torch.Tensor
    pred: torch.Tensor


@dataclass
class _Pool:
    """The samples under attack in the fast engine, each with its own iteration count."""

    index: torch.Tensor
    clean: torch.Tensor
    adv: torch.Tensor
    targets: torch.Tensor
    goals: torch.Tensor
    step: torch.Tensor
    fields: tuple = field(default=("index", "clean", "adv", "targets", "goals", "step"), repr=False)

    def __len__(self) -> int:
        return len(self.index)

    def select(self, keep: torch.Tensor, memory_format: torch.memory_format) -> _Pool:
        parts = {}
        for name in self.fields:
            value = getattr(self, name)
            part = value[keep.to(value.device)]
            parts[name] = part.contiguous(memory_format=memory_format) if part.dim() == 4 else part
        return _Pool(**parts)

    def extend(self, other: _Pool, memory_format: torch.memory_format) -> _Pool:
        parts = {}
        for name in self.fields:
            joined = torch.cat([getattr(self, name), getattr(other, name)])
            parts[name] = joined.contiguous(memory_format=memory_format) if joined.dim() == 4 else joined
        return _Pool(**parts)


def run_attack(model: nn.Module, source: SplitSource, index: torch.Tensor, atk: Attack, engine: Engine, *,
               goal_fn: Callable[[torch.Tensor], torch.Tensor], emit: Callable[[Finished], None],
               fooled_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               noise_fn: Noise | None = None, first_steps: FirstSteps | None = None) -> None:
    """Attack the samples ``index`` of ``source``; ``emit`` receives them as they finish.

    ``goal_fn`` maps targets to the labels the attack is given (targets when untargeted).
    ``fooled_fn(pred, targets, goals)`` enables the fast engine's early stop; ``noise_fn``
    draws its random starts (default: the global torch stream, as torchattacks does);
    ``first_steps`` (indexed like ``source``, one per attack of a sweep) is read and filled
    where ``FirstSteps.applies`` to the attack and the engine reuses first steps.
    """
    spec = fast_spec(atk) if engine.kind == "fast" else None
    if len(index) == 0:
        return
    if spec is None:
        for chunk in index.split(engine.batch_size):
            clean, targets = source.batch(chunk, engine.device)
            adv = atk(clean, goal_fn(targets)).detach()
            emit(Finished(chunk, clean, adv, targets, predict(model, adv, engine.batch_size)))
        return
    if not (engine.reuse_first_step and FirstSteps.applies(spec)):
        first_steps = None
    _run_fast(model, source, index, spec, engine, goal_fn, emit, fooled_fn if engine.early_stop else None,
              noise_fn or (lambda idx, s, shape: random_start_delta((len(idx), *shape), s)), first_steps)


def _start(source: SplitSource, index: torch.Tensor, spec: PGDSpec, engine: Engine, goal_fn, noise_fn,
           first_steps: FirstSteps | None) -> _Pool:
    clean, targets = source.batch(index, engine.device, engine.memory_format)
    adv = clean.clone()
    if spec.random_start:
        delta = noise_fn(index, spec, tuple(clean.shape[1:])).to(engine.device)
        adv = torch.clamp(adv + delta, min=0, max=1).contiguous(memory_format=engine.memory_format)
    step = torch.zeros(len(index), dtype=torch.long)
    known = first_steps.known[index] if first_steps is not None else step.bool()
    if known.any():  # their first step is the stored one: take it without a forward and backward
        rows = known.to(engine.device)
        signs = first_steps.signs(index[known], engine.device, engine.memory_format)
        adv[rows] = pgd_step(clean[rows], clean[rows], signs, spec)
        step[known] = 1
    return _Pool(index, clean, adv, targets, goal_fn(targets), step)


def _advance(model: nn.Module, pool: _Pool, spec: PGDSpec, engine: Engine, fooled_fn,
             first_steps: FirstSteps | None) -> torch.Tensor:
    """One forward/backward for every pooled sample; step the ones not yet fooled.

    Returns the mask of samples whose attack is over (fooled at their current iterate,
    which is kept, or out of steps).
    """
    adv = pool.adv.detach().requires_grad_(True)
    with torch.autocast(engine.device.type, dtype=engine.autocast, enabled=engine.autocast is not None):
        logits = forward(model, adv)
    fp16 = engine.autocast == torch.float16
    if fp16:
        logits = fp16_safe_logits(logits)
    loss = pgd_loss(logits, pool.goals, spec, pool.step).sum()
    grad = torch.autograd.grad(loss, adv)[0]
    if fp16:  # bf16 has fp32's range: only fp16 can overflow (and this check costs a sync per step)
        grad = _finite_gradient(model, pool, grad, spec)
    stop = torch.zeros(len(pool), dtype=torch.bool)
    if fooled_fn is not None:
        stop = fooled_fn(logits.detach().argmax(1), pool.targets, pool.goals).cpu()
        if engine.autocast is not None and stop.any():
            stop = _fooled_in_fp32(model, pool, stop, fooled_fn, engine.batch_size)
    if first_steps is not None:
        fresh = (pool.step == 0) & ~stop
        if fresh.any():
            first_steps.store(pool.index[fresh], grad[fresh.to(grad.device)])
    if not stop.any():
        pool.adv = pgd_step(pool.adv, pool.clean, grad, spec)
    elif not stop.all():
        move = (~stop).to(adv.device)
        pool.adv = pool.adv.clone()
        pool.adv[move] = pgd_step(pool.adv[move], pool.clean[move], grad[move], spec)
    pool.step = pool.step + (~stop).long()
    return stop | (pool.step >= spec.steps)


def _finite_gradient(model: nn.Module, pool: _Pool, grad: torch.Tensor, spec: PGDSpec) -> torch.Tensor:
    """``grad`` with the samples whose fp16 gradient overflowed (inf/NaN) recomputed in fp32."""
    bad = ~torch.isfinite(grad.flatten(1)).all(1)
    if not bad.any():
        return grad
    adv = pool.adv[bad].detach().requires_grad_(True)
    loss = pgd_loss(forward(model, adv), pool.goals[bad], spec, pool.step[bad.cpu()]).sum()
    grad = grad.clone()
    grad[bad] = torch.autograd.grad(loss, adv)[0].to(grad.dtype)
    return grad


def _fooled_in_fp32(model: nn.Module, pool: _Pool, flagged: torch.Tensor, fooled_fn, batch_size: int) -> torch.Tensor:
    """The flagged samples that are fooled by the counted (fp32) prediction too.

    Autocast logits can flip a prediction near the decision boundary; a sample stopped on
    such a flip would be counted as robust without being attacked further at this eps.
    """
    rows = flagged.nonzero().flatten()
    on = rows.to(pool.adv.device)
    confirmed = flagged.clone()
    confirmed[rows] = fooled_fn(predict(model, pool.adv[on], batch_size), pool.targets[on], pool.goals[on]).cpu()
    return confirmed


def _run_fast(model, source, index, spec, engine, goal_fn, emit, fooled_fn, noise_fn, first_steps) -> None:
    pool: _Pool | None = None
    done: list[_Pool] = []
    position = 0

    def flush() -> None:
        batch = done[0]
        for part in done[1:]:
            batch = batch.extend(part, engine.memory_format)
        done.clear()
        emit(Finished(batch.index, batch.clean, batch.adv, batch.targets,
                      predict(model, batch.adv, engine.batch_size)))

    while position < len(index) or pool is not None:
        room = engine.batch_size - (len(pool) if pool is not None else 0)
        if room > 0 and position < len(index):
            new = _start(source, index[position:position + room], spec, engine, goal_fn, noise_fn, first_steps)
            position += len(new)
            pool = new if pool is None else pool.extend(new, engine.memory_format)
        finished = pool.step >= spec.steps  # a stored first step was the last (FGSM)
        if not finished.any():
            finished = _advance(model, pool, spec, engine, fooled_fn, first_steps)
        if finished.any():
            done.append(pool.select(finished, engine.memory_format))
            pool = pool.select(~finished, engine.memory_format) if not finished.all() else None
        if done and (sum(len(p) for p in done) >= engine.batch_size or pool is None):
            flush()


def predictions_under_attack(model: nn.Module, source: SplitSource, index: torch.Tensor, atk: Attack,
                             engine: Engine, *, classification: bool, noise_fn: Noise | None = None) -> torch.Tensor:
    """The counted predictions (CPU, in the order of ``index``) after an untargeted attack;
    a classification sample stops at the first iterate that fools it."""
    preds: dict[int, torch.Tensor] = {}

    def emit(done: Finished) -> None:
        for position, i in enumerate(done.index.tolist()):
            preds[i] = done.pred[position].cpu()

    fooled = (lambda pred, targets, goals: pred != targets) if classification else None
    run_attack(model, source, index, atk, engine, goal_fn=lambda targets: targets, emit=emit, fooled_fn=fooled,
               noise_fn=noise_fn)
    return torch.stack([preds[i] for i in index.tolist()]) if len(index) else torch.empty(0, dtype=torch.long)
