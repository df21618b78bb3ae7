"""The attack registry: one table, one line per attack, shared by main.py, train.py and the tests.

Each line of :data:`ATTACKS` holds an attack's metadata and its ``atk`` line, the call that
builds the attack object. To change how an attack is configured, edit its line; to add an
attack, add a line. Every attack object is called as ``atk(images, labels)`` on [0, 1]
images and returns adversarial images (``labels`` are the targets when ``targeted``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from cospgd import Attack as CosPGDWeights
from cleverhans.torch.attacks.fast_gradient_method import fast_gradient_method
from cleverhans.torch.attacks.projected_gradient_descent import projected_gradient_descent
from torch import nn

from utils import UsageError

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AttackParams:
    """The settings an ``atk`` line may use (from the command line, per eps)."""

    eps: float
    steps: int
    alpha: float
    random_start: bool = False
    num_classes: int = 5
    targeted: bool = False
    seed: int = 0


class CleverhansAttack:
    """Gives cleverhans' functional FGM/PGD the torchattacks ``attack(images, labels)`` call.

    ``labels`` are the target labels when ``targeted`` is set, as for torchattacks.
    """

    def __init__(self, model: nn.Module, *, eps: float, targeted: bool, steps: int | None = None,
                 alpha: float | None = None, rand_init: bool = False) -> None:
        self.model, self.eps, self.targeted = model, eps, targeted
        self.steps, self.alpha, self.rand_init = steps, alpha, rand_init

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        common = dict(clip_min=0.0, clip_max=1.0, y=labels, targeted=self.targeted)
        was_training = self.model.training
        self.model.eval()
        try:
            if self.steps is None:
                adv = fast_gradient_method(self.model, images, self.eps, np.inf, **common)
            else:  # cleverhans asserts step <= eps
                adv = projected_gradient_descent(self.model, images, self.eps, min(self.alpha, self.eps),
                                                 self.steps, np.inf, rand_init=self.rand_init,
                                                 sanity_checks=False, **common)
        finally:
            self.model.zero_grad(set_to_none=True)
            self.model.train(was_training)
        return adv.detach()


# --------------------------------------------------------------------------- the PGD family
#: Losses of the PGD family: plain cross-entropy, SegPGD's and CosPGD's weightings, and
#: TRADES' KL divergence from reference probabilities (its ``goals``).
LOSSES = ("ce", "segpgd", "cospgd", "kl")
#: torchattacks adds this to the L2 norm of the gradient before dividing by it.
L2_DIVISION_EPS = 1e-10


@dataclass(frozen=True)
class PGDSpec:
    """One projected-gradient attack: what the library classes and the fast engine both run.

    ``loss`` weights the per-pixel (or per-image) cross-entropy: ``ce`` not at all, ``segpgd``
    by SegPGD's lambda_t schedule, ``cospgd`` by CosPGD's cosine similarity (Gu et al., ECCV
    2022; Agnihotri et al., ICML 2024), both through the authors' ``cospgd`` package.
    """

    norm: str
    eps: float
    alpha: float
    steps: int
    random_start: bool = False
    targeted: bool = False
    loss: str = "ce"


def random_start_delta(shape: Sequence[int], spec: PGDSpec,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A random start inside the eps ball, drawn as torchattacks PGD/PGDL2 draw it.

    ``shape`` is (N, C, H, W). With ``generator`` the draw is a function of that generator
    only (the sweep gives every sample its own); without it the global torch stream is used.
    """
    if spec.norm == "Linf":
        return torch.empty(shape).uniform_(-spec.eps, spec.eps, generator=generator)
    delta = torch.empty(shape).normal_(generator=generator)
    norms = delta.view(shape[0], -1).norm(p=2, dim=1).view(-1, 1, 1, 1)
    radius = torch.zeros_like(norms).uniform_(0, 1, generator=generator)
    return delta * (radius / norms * spec.eps)


def pgd_loss(logits: torch.Tensor, goals: torch.Tensor, spec: PGDSpec,
             iteration: int | torch.Tensor = 0) -> torch.Tensor:
    """Per-sample attack loss (shape N) whose gradient the attack ascends.

    Per-pixel losses are averaged over the pixels of each image and never over the batch,
    so a sample's gradient does not depend on which samples share its batch. Targeted
    attacks ascend the negative loss towards ``goals``.
    """
    logits = logits.float()
    if spec.loss == "kl":  # goals: the clean prediction's probabilities (N, C)
        return F.kl_div(F.log_softmax(logits, dim=1), goals, reduction="none").sum(1)
    pixel_ce = F.cross_entropy(logits, goals, reduction="none")
    if spec.loss == "segpgd":
        loss = _segpgd_per_image(logits, goals, pixel_ce, spec, iteration)
    else:
        if spec.loss == "cospgd":
            pixel_ce = CosPGDWeights.cospgd_scale(logits, goals, pixel_ce, num_classes=logits.shape[1],
                                                  targeted=spec.targeted)
        loss = pixel_ce.flatten(1).mean(1) if pixel_ce.dim() > 1 else pixel_ce
    return -loss if spec.targeted else loss


def _segpgd_per_image(logits: torch.Tensor, goals: torch.Tensor, pixel_ce: torch.Tensor, spec: PGDSpec,
                      iteration: int | torch.Tensor) -> torch.Tensor:
    """SegPGD's weighted mean per image, from ``cospgd.segpgd_scale`` (lambda_t = t / 2T).

    The package sums over its batch, so it is called image by image: that keeps the loss per
    image and lets every image of the fast engine's packed batches have its own iteration.
    """
    iterations = torch.as_tensor(iteration).expand(len(logits)).tolist()
    return torch.stack([CosPGDWeights.segpgd_scale(logits[i:i + 1], goals[i:i + 1], pixel_ce[i:i + 1], t,
                                                   spec.steps, targeted=spec.targeted)
                        for i, t in enumerate(iterations)])


FP16_GRADIENT_PEAK = 2.0 ** 6  # input gradients of the real UResNet18 reach ~47x this; fp16 overflows at 65504


class _PerSampleGradientScale(torch.autograd.Function):
    """Identity forward; backward rescales each sample's gradient so its largest entry is ``peak``."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, peak: float) -> torch.Tensor:  # noqa: D102
        ctx.peak = peak
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        largest = grad.flatten(1).abs().amax(1)
        factor = torch.where(largest > 0, ctx.peak / largest, torch.zeros_like(largest))
        return grad * factor.view(-1, *[1] * (grad.dim() - 1)), None


def fp16_safe_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in fp32, passing each sample's loss gradient back at a fixed size.

    fp16's smallest normal number is 6e-5. The input gradient of a confidently classified
    sample, or of a per-pixel loss averaged over 16k pixels, lies far below it, flushes to zero
    and gives a zero sign: no step, a weaker attack (on the real 128 px models: 3 % of the
    input gradient zero, 31 % of one image). A sample's adversarial depends only on the
    direction of its own gradient (sign or L2-normalised steps; samples never interact in eval
    mode), so rescaling each sample's gradient at the logits, before it enters the fp16 model,
    changes nothing but the rounding. bf16 has fp32's exponent range and needs none."""
    return _PerSampleGradientScale.apply(logits.float(), FP16_GRADIENT_PEAK)


class Fp16SafeModel(nn.Module):
    """``model`` whose outputs go through :func:`fp16_safe_logits`, for attacks that build their
    loss themselves (torchattacks, TRADES) inside an fp16 autocast region."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return fp16_safe_logits(self.model(images))


def for_autocast(model: nn.Module, device_type: str) -> nn.Module:
    """``model`` as an attack should see it inside the current autocast region: wrapped in
    :class:`Fp16SafeModel` when that region is fp16, else unchanged."""
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    return Fp16SafeModel(model) if fp16 else model


def pgd_step(adv: torch.Tensor, images: torch.Tensor, grad: torch.Tensor, spec: PGDSpec) -> torch.Tensor:
    """One ascent step then the projection onto the eps ball and [0, 1], as torchattacks does."""
    if spec.norm == "Linf":
        adv = adv.detach() + spec.alpha * grad.sign()
        delta = torch.clamp(adv - images, min=-spec.eps, max=spec.eps)
        return torch.clamp(images + delta, min=0, max=1).detach()
    n = len(grad)
    grad_norms = torch.norm(grad.reshape(n, -1), p=2, dim=1) + L2_DIVISION_EPS
    adv = adv.detach() + spec.alpha * (grad / grad_norms.view(n, 1, 1, 1))
    delta = adv - images
    factor = torch.min(spec.eps / torch.norm(delta.reshape(n, -1), p=2, dim=1), torch.ones(n, device=adv.device))
    return torch.clamp(images + delta * factor.view(-1, 1, 1, 1), min=0, max=1).detach()


class PGDFamily(torchattacks.attack.Attack):
    """A torchattacks attack running :class:`PGDSpec` (SegPGD, CosPGD, L-inf or L2).

    The fast engine in engine.py runs the same spec with packed batches and early stops.
    """

    def __init__(self, name: str, model: nn.Module, *, eps: float, alpha: float, steps: int, norm: str = "Linf",
                 loss: str = "ce", random_start: bool = False) -> None:
        super().__init__(name, model)
        self.eps, self.alpha, self.steps, self.norm = eps, alpha, steps, norm
        self.loss, self.random_start = loss, random_start
        self.supported_mode = ["default", "targeted"]

    def spec(self) -> PGDSpec:
        return PGDSpec(self.norm, self.eps, self.alpha, self.steps, self.random_start, self.targeted, self.loss)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spec = self.spec()
        images = images.clone().detach().to(self.device)
        goals = labels.clone().detach().to(self.device)
        adv = images.clone()
        if spec.random_start:
            adv = torch.clamp(adv + random_start_delta(adv.shape, spec).to(adv.device), 0, 1)
        for iteration in range(spec.steps):
            adv.requires_grad_(True)
            loss = pgd_loss(self.get_logits(adv), goals, spec, iteration).sum()
            grad = torch.autograd.grad(loss, adv)[0]
            adv = pgd_step(adv, images, grad, spec)
        return adv


class TRADES(PGDFamily):
    """TRADES' inner maximisation (Zhang et al., ICML 2019): ascend KL(f(x) || f(x')) from
    x + 0.001 * N(0, 1), with L-inf sign steps, as the reference code does."""

    def __init__(self, model: nn.Module, *, eps: float, alpha: float, steps: int) -> None:
        super().__init__("TRADES", model, eps=eps, alpha=alpha, steps=steps, loss="kl")

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        spec = self.spec()
        images = images.clone().detach().to(self.device)
        with torch.no_grad():
            clean = F.softmax(self.get_logits(images).float(), dim=1)
        adv = images + 0.001 * torch.randn_like(images)
        for iteration in range(spec.steps):
            adv.requires_grad_(True)
            loss = pgd_loss(self.get_logits(adv), clean, spec, iteration).sum()
            adv = pgd_step(adv, images, torch.autograd.grad(loss, adv)[0], spec)
        return adv


def SegPGD(model: nn.Module, **kwargs) -> PGDFamily:  # noqa: N802  (named like the other attack classes)
    """SegPGD (Gu et al., ECCV 2022): correct pixels weigh 1 - lambda_t, wrong ones lambda_t."""
    return PGDFamily("SegPGD", model, loss="segpgd", **kwargs)


def CosPGD(model: nn.Module, **kwargs) -> PGDFamily:  # noqa: N802
    """CosPGD (Agnihotri et al., ICML 2024): pixels weigh cos(softmax, one-hot target), detached."""
    return PGDFamily("CosPGD", model, loss="cospgd", **kwargs)


def StandardAutoAttack(model: nn.Module, eps: float, n_classes: int, seed: int = 0) -> Attack:  # noqa: N802
    """AutoAttack's standard L-inf version with the settings of Croce and Hein (ICML 2020;
    fra31/auto-attack, ``version='standard'``): APGD-CE, APGD-T and FAB-T at 100 iterations,
    then Square with 5000 queries, each on the samples the ones before left robust.

    torchattacks' ``AutoAttack(version='standard')`` builds the same four attacks but leaves
    APGD, APGD-T and FAB at their classes' default of 10 iterations, a weaker attack than the one
    papers report as AutoAttack. With five classes the targeted attacks try all four others.
    """
    common = {"norm": "Linf", "eps": eps, "seed": seed, "n_restarts": 1}
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, loss="ce", steps=100, **common),
        torchattacks.APGDT(model, n_classes=n_classes, steps=100, **common),
        torchattacks.FAB(model, multi_targeted=True, n_classes=n_classes, steps=100, **common),
        torchattacks.Square(model, n_queries=5000, **common),
    ])


def fast_spec(atk: object) -> PGDSpec | None:
    """The :class:`PGDSpec` that the fast engine runs for ``atk``, or None (no fast path).

    Only the exact torchattacks classes whose algorithm is a projected-gradient iteration
    are recognised, with the settings of their ``atk`` line, so editing that line changes
    what the fast engine runs too.
    """
    kind = type(atk)
    targeted = bool(getattr(atk, "targeted", False))
    if kind is PGDFamily:
        return atk.spec()
    if kind is torchattacks.PGD:
        return PGDSpec("Linf", atk.eps, atk.alpha, atk.steps, atk.random_start, targeted)
    if kind is torchattacks.PGDL2:
        return PGDSpec("L2", atk.eps, atk.alpha, atk.steps, atk.random_start, targeted)
    if kind is torchattacks.BIM:
        return PGDSpec("Linf", atk.eps, atk.alpha, atk.steps, False, targeted)
    if kind is torchattacks.FGSM:
        return PGDSpec("Linf", atk.eps, atk.eps, 1, False, targeted)
    return None


Builder = Callable[[nn.Module, AttackParams], Attack]


@dataclass(frozen=True)
class AttackInfo:
    """What the sweep needs to know about an attack, and how to build it."""

    norm: str                    # "Linf" or "L2": the norm that eps bounds
    segmentation: bool           # works on (N,C,H,W) logits with (N,H,W) targets
    build: Builder               # the atk line: (model, params) -> attack object
    eps_bounded: bool = True     # False: a minimum-norm attack, run once and filtered by eps
    targeted: bool = True        # supports --targeted
    classification: bool = True  # works on (N,C) logits with (N,) labels

    def supports(self, task: str) -> bool:
        return self.segmentation if task == "segmentation" else self.classification


#: The attack table. ``m`` is the model, ``p`` the :class:`AttackParams` of one eps.
#: CW ignores ``eps`` (a minimum-norm attack, filtered by the sweep) and runs 10x ``steps``
#: Adam steps (100 by default: at 10 it fooled a third of a standard model's samples);
#: Square uses ``steps`` as its number of queries.
ATTACKS: Mapping[str, AttackInfo] = MappingProxyType({
    # name          norm    segm.  atk line
    "fgsm": AttackInfo("Linf", True, lambda m, p: torchattacks.FGSM(m, eps=p.eps)),
    "pgd": AttackInfo("Linf", True, lambda m, p: torchattacks.PGD(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start)),  # noqa: E501
    "pgdl2": AttackInfo("L2", True, lambda m, p: torchattacks.PGDL2(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start)),  # noqa: E501
    "bim": AttackInfo("Linf", True, lambda m, p: torchattacks.BIM(m, eps=p.eps, alpha=p.alpha, steps=p.steps)),
    "cw": AttackInfo("L2", False, lambda m, p: torchattacks.CW(m, c=1.0, kappa=0.0, steps=10 * p.steps, lr=0.01), eps_bounded=False),  # noqa: E501
    "apgd": AttackInfo("Linf", False, lambda m, p: torchattacks.APGD(m, norm="Linf", eps=p.eps, steps=p.steps, seed=p.seed), targeted=False),  # noqa: E501
    "autoattack": AttackInfo("Linf", False, lambda m, p: StandardAutoAttack(m, eps=p.eps, n_classes=p.num_classes, seed=p.seed), targeted=False),  # noqa: E501
    "square": AttackInfo("Linf", False, lambda m, p: torchattacks.Square(m, norm="Linf", eps=p.eps, n_queries=p.steps, seed=p.seed)),  # noqa: E501
    "ch-fgm": AttackInfo("Linf", True, lambda m, p: CleverhansAttack(m, eps=p.eps, targeted=p.targeted)),
    "ch-pgd": AttackInfo("Linf", True, lambda m, p: CleverhansAttack(m, eps=p.eps, targeted=p.targeted, steps=p.steps, alpha=p.alpha, rand_init=p.random_start)),  # noqa: E501
    "segpgd": AttackInfo("Linf", True, lambda m, p: SegPGD(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start), classification=False),  # noqa: E501
    "segpgdl2": AttackInfo("L2", True, lambda m, p: SegPGD(m, norm="L2", eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start), classification=False),  # noqa: E501
    "cospgd": AttackInfo("Linf", True, lambda m, p: CosPGD(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start), classification=False),  # noqa: E501
    "cospgdl2": AttackInfo("L2", True, lambda m, p: CosPGD(m, norm="L2", eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start), classification=False),  # noqa: E501
})


def attack_info(name: str) -> AttackInfo:
    """The registry entry of ``name``; an unknown name is a usage error listing the valid ones."""
    if name not in ATTACKS:
        raise UsageError(f"--attack {name!r} is unknown; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]


def build_attack(name: str, model: nn.Module, eps: float, *, steps: int, alpha: float,
                 random_start: bool = False, num_classes: int = 5, targeted: bool = False,
                 seed: int = 0) -> Attack:
    """Build the attack ``name`` for one eps from its ``atk`` line (set to targeted mode if asked)."""
    params = AttackParams(eps=eps, steps=steps, alpha=alpha, random_start=random_start,
                          num_classes=num_classes, targeted=targeted, seed=seed)
    atk = attack_info(name).build(model, params)
    if targeted and isinstance(atk, torchattacks.attack.Attack):
        atk.set_mode_targeted_by_label(quiet=True)
    return atk
