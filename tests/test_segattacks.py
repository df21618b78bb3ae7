"""SegPGD and CosPGD: their loss weighting by hand, their budgets, and their strength."""
from __future__ import annotations

import math

import pytest
import torch

from attacks import ATTACKS, PGDSpec, build_attack, pgd_loss
from engine import Engine
from splitdata import TensorSplit
from sweep import SweepSpec, run_split
from test_attacks import SEG_NAMES, segmentation_images, tiny_segmenter, train

#: One image, two classes, 2x2 pixels: logits per pixel (row-major) and the goal of each pixel.
LOGITS = [(2.0, 0.0), (0.0, 1.0), (0.5, 0.0), (-1.0, 1.0)]
GOALS = [0, 0, 1, 1]  # pixels 0 and 3 are predicted right, 1 and 2 wrong


def hand_terms() -> list[tuple[float, list[float], bool]]:
    """(cross-entropy, softmax, predicted right) of every pixel, computed with math only."""
    terms = []
    for logits, goal in zip(LOGITS, GOALS):
        exps = [math.exp(v) for v in logits]
        softmax = [e / sum(exps) for e in exps]
        terms.append((-math.log(softmax[goal]), softmax, logits.index(max(logits)) == goal))
    return terms


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor(LOGITS).T.reshape(1, 2, 2, 2)
    return logits, torch.tensor(GOALS).reshape(1, 2, 2)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("iteration, steps", [(0, 4), (1, 4), (3, 4), (5, 10)])
def test_segpgd_weighting_on_a_hand_made_2x2_image(iteration, steps, targeted):
    lam = iteration / (2 * steps)
    expected = 0.0
    for ce, _, right in hand_terms():
        weight = (1 - lam if right else lam) if not targeted else (lam if right else 1 - lam)
        expected += weight * ce / 4
    spec = PGDSpec("Linf", 8 / 255, 2 / 255, steps, targeted=targeted, loss="segpgd")
    loss = pgd_loss(*tensors(), spec, iteration)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(-expected if targeted else expected, rel=1e-6)


@pytest.mark.parametrize("targeted", [False, True])
def test_cospgd_weighting_on_a_hand_made_2x2_image(targeted):
    expected = 0.0
    for (ce, softmax, _), goal in zip(hand_terms(), GOALS):
        cosine = softmax[goal] / math.sqrt(sum(p * p for p in softmax))
        expected += (1 - cosine if targeted else cosine) * ce / 4
    spec = PGDSpec("Linf", 8 / 255, 2 / 255, 5, targeted=targeted, loss="cospgd")
    assert pgd_loss(*tensors(), spec).item() == pytest.approx(-expected if targeted else expected, rel=1e-6)


def test_cospgd_weights_carry_no_gradient():
    """The cosine is a detached weight: the gradient is cos * d(CE), not d(cos * CE)."""
    logits, goals = tensors()
    logits.requires_grad_(True)
    spec = PGDSpec("Linf", 8 / 255, 2 / 255, 5, loss="cospgd")
    grad = torch.autograd.grad(pgd_loss(logits, goals, spec).sum(), logits)[0]
    onehot = torch.nn.functional.one_hot(goals, 2).permute(0, 3, 1, 2).float()
    cosine = torch.nn.functional.cosine_similarity(logits.softmax(1), onehot, dim=1).unsqueeze(1)
    assert torch.allclose(grad, (cosine * (logits.softmax(1) - onehot) / 4).detach(), atol=1e-7)


@pytest.fixture(scope="module")
def segmenter():
    images, masks = segmentation_images(n=16, seed=3)
    return train(tiny_segmenter(), *segmentation_images(n=24), steps=60), images, masks


@pytest.mark.parametrize("name", ["segpgd", "segpgdl2", "cospgd", "cospgdl2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_the_budget_holds(name, random_start, segmenter):
    model, images, masks = segmenter
    eps = 0.5 if ATTACKS[name].norm == "L2" else 4 / 255
    for targeted in (False, True):
        atk = build_attack(name, model, eps, steps=4, alpha=2.5 * eps / 4, random_start=random_start,
                           targeted=targeted, num_classes=3)
        adv = atk(images, torch.tensor([2, 0, 1])[masks] if targeted else masks)
        delta = (adv - images).flatten(1)
        norm = delta.abs().amax(1) if ATTACKS[name].norm == "Linf" else delta.norm(dim=1)
        assert norm.max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def dice_under(name, model, images, masks, eps, steps=10, engine=Engine(batch_size=8)):
    spec = SweepSpec(task="segmentation", class_names=SEG_NAMES, eps_list=[eps], attacks=(name,))
    rows = []
    run_split(model, TensorSplit(images, masks), spec, engine, split="test", on_row=rows.append,
              make_attack=lambda n, e: build_attack(n, model, e, steps=steps, alpha=2.5 * e / steps, num_classes=3))
    return rows[0]["dice_mean"]


@pytest.mark.parametrize("name", ["segpgd", "cospgd"])
def test_segmentation_attacks_are_at_least_as_strong_as_pgd(name, segmenter):
    model, images, masks = segmenter
    for eps in (2 / 255, 4 / 255):
        pgd = dice_under("pgd", model, images, masks, eps)
        assert dice_under(name, model, images, masks, eps) <= pgd + 1e-9, eps
    assert pgd < dice_under("pgd", model, images, masks, 0.0)


def test_library_and_fast_engine_run_the_same_segpgd(segmenter):
    model, images, masks = segmenter
    fast = dice_under("segpgd", model, images, masks, 4 / 255)
    library = dice_under("segpgd", model, images, masks, 4 / 255, engine=Engine(kind="library", batch_size=8))
    assert fast == pytest.approx(library, abs=1e-6)
