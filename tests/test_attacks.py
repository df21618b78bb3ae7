"""The attack registry and argument checks of main.py, on tiny models (no checkpoint needed)."""
from __future__ import annotations

import argparse

import pytest
import torch
import torchattacks
from torch import nn
from attacks import ATTACKS, build_attack
from engine import Engine, perturbation_norms
from main import get_args_parser, parse_target_map, validate_args
from splitdata import TensorSplit
from sweep import SweepSpec, run_split
from utils import UsageError, parse_eps_list

NUM_CLASSES = 5
CLASS_NAMES = ["Basophil", "Eosinophil", "Lymphocyte", "Monocyte", "Neutrophil"]
SEG_NAMES = ["background", "cytoplasm", "nucleus"]


# --------------------------------------------------------------------------- tiny models and data
def separable_images(n: int = 120, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes differ by their mean colour (a few grey levels apart), plus pixel noise."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    colours = torch.rand(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(42)) * 0.5 + 0.25
    images = colours[labels][:, :, None, None] + 0.06 * torch.randn(n, 3, size, size, generator=gen)
    return images.clamp(0, 1), labels


def tiny_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, NUM_CLASSES))


def tiny_segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))


def segmentation_images(n: int = 12, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A nucleus disk inside a cytoplasm disk on a light background, with noise."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = []
    for i in range(n):
        dist = ((yy - size / 2 - i % 3 + 1) ** 2 + (xx - size / 2 + i % 2) ** 2).float().sqrt()
        mask = torch.zeros(size, size, dtype=torch.long)
        mask[dist < 0.4 * size] = 1
        mask[dist < 0.2 * size] = 2
        masks.append(mask)
    masks = torch.stack(masks)
    colours = torch.tensor([[0.9, 0.85, 0.6], [0.75, 0.5, 0.75], [0.35, 0.15, 0.5]])
    images = colours[masks].permute(0, 3, 1, 2) + 0.04 * torch.randn(n, 3, size, size, generator=gen)
    return images.clamp(0, 1).contiguous(), masks


def train(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int = 80) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), targets).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def classifier_and_data():
    images, labels = separable_images()
    return train(tiny_classifier(), images, labels), images, labels


@pytest.fixture(scope="module")
def segmenter_and_data():
    images, masks = segmentation_images()
    return train(tiny_segmenter(), images, masks, steps=40), images, masks


def parse(*argv: str) -> argparse.Namespace:
    return get_args_parser().parse_args(list(argv))


# --------------------------------------------------------------------------- argument checks
def test_eps_list_parses_fractions_sorts_and_deduplicates():
    assert parse_eps_list(["8/255", "0.03", "0", "8/255"]) == [0.0, 0.03, 8 / 255]
    assert parse_eps_list(["1"]) == [1.0]


def test_l2_budgets_may_exceed_one_but_linf_budgets_may_not():
    assert parse_eps_list(["0", "0.5", "2"], norm="L2") == [0.0, 0.5, 2.0]
    with pytest.raises(UsageError, match="outside"):
        parse_eps_list(["2"], norm="Linf")
    with pytest.raises(UsageError, match="outside"):
        parse_eps_list(["-1"], norm="L2")


@pytest.mark.parametrize("text, fragment", [("junk", "not a number"), ("1/0", "not a number"),
                                            ("-0.1", "outside [0, 1]"), ("2", "outside [0, 1]"),
                                            ("300/255", "outside [0, 1]"), ("nan", "not a number")])
def test_bad_eps_values_are_usage_errors(text, fragment):
    with pytest.raises(UsageError, match="--eps-list") as err:
        parse_eps_list(["0", text])
    assert fragment in str(err.value)


def test_default_arguments():
    args = parse()
    validate_args(args)
    assert args.attack == "pgd" and args.steps == 10 and args.splits == ["val", "test"]
    assert args.eps_values == sorted(args.eps_values) and args.eps_values[0] == 0 and args.eps_values[-1] == 128 / 255


@pytest.mark.parametrize("attack", ["pgdl2", "cw"])
def test_an_l2_attack_defaults_to_l2_budgets(attack):
    """The L-inf defaults read as L2 norms over 3*H*W values would end at 0.5: hardly a budget."""
    args = parse("--attack", attack)
    validate_args(args)
    assert args.eps_values == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    given = parse("--attack", attack, "--eps-list", "0", "3")
    validate_args(given)
    assert given.eps_values == [0.0, 3.0]


@pytest.mark.parametrize("argv, fragment", [
    (["--attack", "nope"], "--attack 'nope' is unknown; choose one of fgsm, pgd"),
    (["--steps", "0"], "--steps"),
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "-1"], "--alpha"),
    (["--batch-size", "0"], "--batch-size"),
    (["--task", "segmentation", "--attack", "cw"], "does not support segmentation"),
    (["--task", "segmentation", "--attack", "square"], "does not support segmentation"),
    (["--attack", "apgd", "--targeted"], "no targeted mode"),
    (["--target-class", "1"], "--target-class needs --targeted"),
    (["--targeted", "--target-map", "2,0,1"], "--target-map needs"),
])
def test_bad_arguments_are_one_line_usage_errors(argv, fragment):
    with pytest.raises(UsageError) as err:
        validate_args(parse(*argv))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_target_map_parsing():
    assert parse_target_map(None, 3) == [2, 0, 1]
    assert parse_target_map("1,2,0", 3) == [1, 2, 0]
    for bad in ("1,2", "a,b,c", "0,1,3"):
        with pytest.raises(UsageError, match="--target-map"):
            parse_target_map(bad, 3)


def test_registry_declares_norm_and_capabilities():
    assert {"fgsm", "pgd", "pgdl2", "bim", "cw", "apgd", "autoattack", "square", "ch-fgm", "ch-pgd"} <= set(ATTACKS)
    assert {n for n, info in ATTACKS.items() if info.segmentation} == {
        "fgsm", "pgd", "pgdl2", "bim", "ch-fgm", "ch-pgd", "segpgd", "segpgdl2", "cospgd", "cospgdl2"}
    assert {n for n, info in ATTACKS.items() if not info.classification} == {"segpgd", "segpgdl2", "cospgd", "cospgdl2"}
    assert all(info.norm in ("Linf", "L2") for info in ATTACKS.values())
    assert not ATTACKS["cw"].eps_bounded and ATTACKS["pgdl2"].norm == "L2"
    assert all(callable(info.build) for info in ATTACKS.values())


def test_main_uses_the_shared_registry():
    import main

    assert main.ATTACKS is ATTACKS and main.build_attack is build_attack


# --------------------------------------------------------------------------- every attack runs
def _run(name, model, images, labels, eps, targeted=False, random_start=False):
    atk = build_attack(name, model, eps, steps=3, alpha=eps / 2, random_start=random_start,
                       num_classes=NUM_CLASSES if images.dim() == 4 and labels.dim() == 1 else 3,
                       targeted=targeted, seed=0)
    return atk(images, labels)


@pytest.mark.parametrize("name", [n for n, info in ATTACKS.items() if info.classification])
def test_every_attack_runs_one_batch_on_a_classifier(name, classifier_and_data):
    model, images, labels = classifier_and_data
    eps = 0.5 if ATTACKS[name].norm == "L2" else 8 / 255
    if name == "autoattack":  # a budget that APGD wins at once: Square's 5000 queries are slow
        eps = 128 / 255
    adv = _run(name, model, images[:6], labels[:6], eps)
    assert adv.shape == images[:6].shape and torch.isfinite(adv).all()
    assert adv.min() >= 0 and adv.max() <= 1
    if ATTACKS[name].eps_bounded:
        assert perturbation_norms(adv - images[:6], ATTACKS[name].norm).max() <= eps + 1e-6


def test_autoattack_has_the_standard_versions_settings(classifier_and_data):
    """Croce and Hein's standard AutoAttack: APGD-CE, APGD-T and FAB-T at 100 iterations, then
    Square at 5000 queries; torchattacks' own AutoAttack leaves the first three at 10."""
    model, _, _ = classifier_and_data
    atk = build_attack("autoattack", model, 8 / 255, steps=3, alpha=1 / 255, num_classes=NUM_CLASSES, seed=7)
    apgd, apgdt, fab, square = atk.attacks
    assert [type(a) for a in atk.attacks] == [torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB,
                                              torchattacks.Square]
    assert apgd.loss == "ce" and apgd.steps == apgdt.steps == fab.steps == 100, "--steps must not shorten it"
    assert apgdt.n_target_classes == fab.n_target_classes == NUM_CLASSES - 1 and fab.multi_targeted
    assert square.n_queries == 5000
    assert all(a.eps == 8 / 255 and a.norm == "Linf" and a.seed == 7 and a.n_restarts == 1 for a in atk.attacks)


@pytest.mark.parametrize("name", [n for n, info in ATTACKS.items() if info.targeted and info.classification])
def test_targeted_attacks_run(name, classifier_and_data):
    model, images, labels = classifier_and_data
    eps = 2.0 if ATTACKS[name].norm == "L2" else 32 / 255
    adv = _run(name, model, images[:6], (labels[:6] + 1) % NUM_CLASSES, eps, targeted=True)
    assert adv.shape == images[:6].shape and torch.isfinite(adv).all()


@pytest.mark.parametrize("name", [n for n, info in ATTACKS.items() if info.segmentation])
def test_segmentation_attacks_run_on_a_segmenter(name, segmenter_and_data):
    model, images, masks = segmenter_and_data
    eps = 0.5 if ATTACKS[name].norm == "L2" else 8 / 255
    adv = _run(name, model, images[:4], masks[:4], eps, random_start=True)
    assert adv.shape == images[:4].shape and adv.min() >= 0 and adv.max() <= 1
    assert perturbation_norms(adv - images[:4], ATTACKS[name].norm).max() <= eps + 1e-6
    with torch.no_grad():
        assert (model(adv).argmax(1) != model(images[:4]).argmax(1)).any()
    targeted = _run(name, model, images[:4], torch.tensor([2, 0, 1])[masks[:4]], eps, targeted=True)
    assert targeted.shape == images[:4].shape


@pytest.mark.parametrize("name", [n for n, info in ATTACKS.items() if not info.segmentation])
def test_attacks_without_segmentation_support_are_refused(name):
    with pytest.raises(UsageError, match="does not support segmentation"):
        validate_args(parse("--task", "segmentation", "--attack", name))


@pytest.mark.parametrize("name", [n for n, info in ATTACKS.items() if not info.classification])
def test_segmentation_only_attacks_are_refused_for_classification(name):
    with pytest.raises(UsageError, match="does not support classification; use one of fgsm"):
        validate_args(parse("--attack", f"pgd,{name}"))


def test_cleverhans_pgd_accepts_a_step_larger_than_eps(classifier_and_data):
    model, images, labels = classifier_and_data
    atk = build_attack("ch-pgd", model, 1 / 255, steps=1, alpha=2.5 / 255, random_start=False, num_classes=5)
    adv = atk(images[:4], labels[:4])
    assert (adv - images[:4]).abs().max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("name", ["ch-fgm", "ch-pgd", "pgd"])
@pytest.mark.parametrize("training", [True, False])
def test_attacks_restore_the_callers_model_mode(name, training, classifier_and_data):
    model, images, labels = classifier_and_data
    model.train(training)
    try:
        build_attack(name, model, 4 / 255, steps=2, alpha=2 / 255)(images[:4], labels[:4])
        assert model.training is training
    finally:
        model.eval()


def test_torchattacks_and_cleverhans_pgd_agree(classifier_and_data):
    model, images, labels = classifier_and_data
    source = TensorSplit(images, labels)
    accuracies = {}
    for name in ("pgd", "ch-pgd"):
        spec = SweepSpec(task="classification", class_names=CLASS_NAMES, eps_list=[0.0, 4 / 255, 16 / 255],
                         attacks=(name,))
        rows = []
        run_split(model, source, spec, Engine(kind="library", batch_size=40), split="val", on_row=rows.append,
                  make_attack=lambda n, eps: build_attack(
                      n, model, eps, steps=5, alpha=2.5 * eps / 5, random_start=False, num_classes=5))
        accuracies[name] = [row["accuracy"] for row in rows]
    assert accuracies["pgd"][0] > 0.9, "the tiny model must be accurate for the comparison to mean anything"
    assert 0 < accuracies["pgd"][-1] < accuracies["pgd"][0]
    for a, b in zip(accuracies["pgd"], accuracies["ch-pgd"]):
        assert abs(a - b) <= 0.01


def test_cw_defaults_fool_nearly_every_eligible_sample_at_an_unbounded_budget(classifier_and_data):
    model, images, labels = classifier_and_data
    images, labels = images[:30], labels[:30]
    spec = SweepSpec(task="classification", class_names=CLASS_NAMES, eps_list=[0.0, 1000.0], attacks=("cw",),
                     norm="L2", min_norm=("cw",))
    rows = []
    run_split(model, TensorSplit(images, labels), spec, split="val", on_row=rows.append,
              make_attack=lambda n, eps: build_attack(n, model, eps, steps=10, alpha=0.1))
    assert rows[0]["accuracy"] > 0.9, "the tiny model must be accurate for the test to mean anything"
    assert rows[1]["attack_success_rate"] >= 0.9
