"""The attack registry: one table, one line per attack, shared by main.py, train.py and the tests.

Each line of :data:`ATTACKS` holds an attack's metadata and its ``atk`` line, the call that
builds the attack object. To change how an attack is configured, edit its line; to add an
attack, add a line. Every attack object is called as ``atk(images, labels)`` on [0, 1]
images and returns adversarial images (``labels`` are the targets when ``targeted``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
import torchattacks
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


Builder = Callable[[nn.Module, AttackParams], Attack]


@dataclass(frozen=True)
class AttackInfo:
    """What the sweep needs to know about an attack, and how to build it."""

    norm: str                 # "Linf" or "L2": the norm that eps bounds
    segmentation: bool        # works on (N,C,H,W) logits with (N,H,W) targets
    build: Builder            # the atk line: (model, params) -> attack object
    eps_bounded: bool = True  # False: a minimum-norm attack, run once and filtered by eps
    targeted: bool = True     # supports --targeted


#: The attack table. ``m`` is the model, ``p`` the :class:`AttackParams` of one eps.
#: CW ignores ``eps`` (a minimum-norm attack, filtered by the sweep); Square uses ``steps``
#: as its number of queries.
ATTACKS: Mapping[str, AttackInfo] = MappingProxyType({
    # name          norm    segm.  atk line
    "fgsm": AttackInfo("Linf", True, lambda m, p: torchattacks.FGSM(m, eps=p.eps)),
    "pgd": AttackInfo("Linf", True, lambda m, p: torchattacks.PGD(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start)),  # noqa: E501
    "pgdl2": AttackInfo("L2", True, lambda m, p: torchattacks.PGDL2(m, eps=p.eps, alpha=p.alpha, steps=p.steps, random_start=p.random_start)),  # noqa: E501
    "bim": AttackInfo("Linf", True, lambda m, p: torchattacks.BIM(m, eps=p.eps, alpha=p.alpha, steps=p.steps)),
    "cw": AttackInfo("L2", False, lambda m, p: torchattacks.CW(m, c=1.0, kappa=0.0, steps=p.steps, lr=0.01), eps_bounded=False),  # noqa: E501
    "apgd": AttackInfo("Linf", False, lambda m, p: torchattacks.APGD(m, norm="Linf", eps=p.eps, steps=p.steps, seed=p.seed), targeted=False),  # noqa: E501
    "autoattack": AttackInfo("Linf", False, lambda m, p: torchattacks.AutoAttack(m, norm="Linf", eps=p.eps, n_classes=p.num_classes, seed=p.seed), targeted=False),  # noqa: E501
    "square": AttackInfo("Linf", False, lambda m, p: torchattacks.Square(m, norm="Linf", eps=p.eps, n_queries=p.steps, seed=p.seed)),  # noqa: E501
    "ch-fgm": AttackInfo("Linf", True, lambda m, p: CleverhansAttack(m, eps=p.eps, targeted=p.targeted)),
    "ch-pgd": AttackInfo("Linf", True, lambda m, p: CleverhansAttack(m, eps=p.eps, targeted=p.targeted, steps=p.steps, alpha=p.alpha, rand_init=p.random_start)),  # noqa: E501
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
