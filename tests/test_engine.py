"""The fast engine (engine.py) against torchattacks, and the in-memory splits it reads."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchattacks

import utils
from attacks import PGDSpec, build_attack
from engine import Engine, Finished, FirstSteps, forward, per_sample_noise, run_attack
from splitdata import DatasetSplit, InMemorySplit, TensorSplit, load_split, preload
from sweep import SweepSpec, run_split
from test_attacks import CLASS_NAMES, SEG_NAMES, segmentation_images, separable_images, tiny_classifier, \
    tiny_segmenter, train
from utils import UsageError

EPS = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]


@pytest.fixture(scope="module")
def classifier():
    images, labels = separable_images(n=48, seed=5)
    return train(tiny_classifier(), *separable_images()), images, labels


@pytest.fixture(scope="module")
def segmenter():
    images, masks = segmentation_images(n=8, seed=2)
    return train(tiny_segmenter(), *segmentation_images(), steps=40), images, masks


def fast_adversarials(model, images, targets, atk, *, noise=None, batch_size=16, fooled=None, autocast=None):
    """Every sample's finished adversarial and counted prediction, in index order."""
    adv, pred = torch.empty_like(images), torch.empty(targets.shape, dtype=torch.long)

    def emit(done: Finished) -> None:
        adv[done.index], pred[done.index] = done.adv.cpu(), done.pred.cpu()

    run_attack(model, TensorSplit(images, targets), torch.arange(len(images)), atk,
               Engine(batch_size=batch_size, autocast=autocast), goal_fn=lambda t: t, emit=emit, fooled_fn=fooled,
               noise_fn=noise)
    return adv, pred


def library_noise(seed):
    """The random start torchattacks draws for a whole batch from the global stream."""
    def draw(index, spec, shape):
        torch.manual_seed(seed)
        return torch.empty((len(index), *shape)).uniform_(-spec.eps, spec.eps)
    return draw


@pytest.mark.parametrize("random_start", [False, True])
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_fast_pgd_without_early_stop_equals_torchattacks_bit_for_bit(task, random_start, classifier, segmenter):
    """Batches of a power of two: the per-sample loss is the batch mean times an exact factor."""
    model, images, targets = classifier if task == "classification" else segmenter
    images, targets = images[:16], targets[:16]
    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5, random_start=random_start)
    torch.manual_seed(7)
    expected = atk(images, targets)
    adv, pred = fast_adversarials(model, images, targets, atk, noise=library_noise(7))
    assert torch.equal(adv, expected)
    with torch.no_grad():
        assert torch.equal(pred, model(expected).argmax(1))


def test_fast_pgdl2_matches_torchattacks(classifier):
    """Not bit for bit: torchattacks adds 1e-10 to the norm of the batch-mean gradient, the
    engine to the norm of the per-sample one (16x larger here)."""
    model, images, labels = classifier
    atk = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=4, random_start=False)
    adv, _ = fast_adversarials(model, images[:16], labels[:16], atk)
    assert (adv - atk(images[:16], labels[:16])).abs().max() <= 1e-6


def test_a_batch_of_one_gives_the_same_logits_as_a_larger_batch(classifier):
    model, images, _ = classifier
    with torch.no_grad():
        assert torch.equal(forward(model, images[3:4]), forward(model, images[:8])[3:4])


def sweep_rows(model, source, engine, *, attack="pgd", task="classification", eps_list=EPS, random_start=True):
    names = CLASS_NAMES if task == "classification" else SEG_NAMES
    spec = SweepSpec(task=task, class_names=names, eps_list=eps_list, attacks=(attack,))
    rows = []
    run_split(model, source, spec, engine, split="test", on_row=rows.append,
              make_attack=lambda n, eps: build_attack(n, model, eps, steps=5, alpha=2.5 * eps / 5,
                                                      random_start=random_start, num_classes=len(names)))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.parametrize("attack", ["pgd", "bim", "fgsm", "pgdl2"])
def test_early_stop_is_never_weaker_than_the_library(attack, classifier):
    model, images, labels = classifier
    source = TensorSplit(images, labels)
    eps_list = [0.0, 0.5, 1.0, 2.0, 4.0] if attack == "pgdl2" else EPS
    # without random start both follow the same iterates until a sample stops (with it, the two
    # draw their starts differently and agree only in distribution)
    fast = sweep_rows(model, source, Engine(batch_size=16), attack=attack, eps_list=eps_list, random_start=False)
    library = sweep_rows(model, source, Engine(kind="library", batch_size=16), attack=attack, eps_list=eps_list,
                         random_start=False)
    for mine, theirs in zip(fast, library):
        assert mine["accuracy"] <= theirs["accuracy"] + 1e-12, (mine["eps"], mine["accuracy"], theirs["accuracy"])
    assert fast[-1]["accuracy"] < fast[0]["accuracy"]


def test_early_stop_runs_fewer_forward_passes_and_keeps_a_fooling_iterate(classifier):
    model, images, labels = classifier
    atk = torchattacks.PGD(model, eps=16 / 255, alpha=4 / 255, steps=8, random_start=False)
    seen = []
    handle = model.register_forward_hook(lambda module, inputs, output: seen.append(len(inputs[0])))
    try:
        adv_all, _ = fast_adversarials(model, images, labels, atk)
        without = sum(seen)
        seen.clear()
        adv, pred = fast_adversarials(model, images, labels, atk, fooled=lambda p, t, g: p != t)
        with_stop = sum(seen)
    finally:
        handle.remove()
    assert with_stop < without
    stopped = (adv != adv_all).flatten(1).any(1)
    assert stopped.any() and (pred[stopped] != labels[stopped]).all()
    assert (adv - images).abs().max() <= 16 / 255 + 1e-6


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_tables_do_not_depend_on_the_batch_size(task, classifier, segmenter):
    """Per-sample random starts and per-sample losses: any packing gives the same table."""
    model, images, targets = classifier if task == "classification" else segmenter
    source = TensorSplit(images, targets)
    tables = [sweep_rows(model, source, Engine(batch_size=size), task=task) for size in (16, 5, 3)]
    assert tables[0] == tables[1] == tables[2]


def gradient_passes(model, run):
    """``run()`` and the number of samples ``model`` saw with gradients on."""
    seen = []
    handle = model.register_forward_hook(
        lambda module, inputs, output: seen.append(len(inputs[0]) if torch.is_grad_enabled() else 0))
    try:
        result = run()
    finally:
        handle.remove()
    return result, sum(seen)


@pytest.mark.parametrize("task, attack", [("classification", "pgd"), ("classification", "fgsm"),
                                          ("segmentation", "segpgd"), ("segmentation", "cospgd")])
def test_reusing_the_first_step_keeps_the_table_and_saves_gradient_passes(task, attack, classifier, segmenter):
    model, images, targets = classifier if task == "classification" else segmenter
    source = TensorSplit(images, targets)
    runs = {reuse: gradient_passes(model, lambda reuse=reuse: sweep_rows(
        model, source, Engine(batch_size=16, reuse_first_step=reuse), attack=attack, task=task, random_start=False))
        for reuse in (False, True)}
    (table, passes), (table_reused, passes_reused) = runs[False], runs[True]
    assert table_reused == table
    assert passes_reused < passes
    if attack == "fgsm":  # one step: only the first attacked eps (every clean-correct sample) computes gradients
        assert passes_reused == round(table[0]["accuracy"] * len(images))


def test_first_steps_keep_every_sign_whatever_the_memory_format():
    grad = torch.randn(4, 3, 5, 7)
    grad[0, 0, 0, :3] = 0
    steps = FirstSteps(10)
    steps.store(torch.tensor([7, 2, 9, 0]), grad.contiguous(memory_format=torch.channels_last))
    assert steps.known.nonzero().flatten().tolist() == [0, 2, 7, 9]
    signs = steps.signs(torch.tensor([7, 0]), torch.device("cpu"), torch.channels_last)
    assert signs.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(signs, grad[[0, 3]].sign())


def test_first_steps_apply_only_where_the_first_gradient_does_not_depend_on_eps():
    base = PGDSpec("Linf", eps=8 / 255, alpha=2 / 255, steps=10)
    assert all(FirstSteps.applies(replace(base, loss=loss)) for loss in ("ce", "segpgd", "cospgd"))
    for other in (replace(base, random_start=True), replace(base, targeted=True), replace(base, norm="L2"),
                  replace(base, loss="kl")):
        assert not FirstSteps.applies(other), other


def test_per_sample_noise_depends_on_the_sample_not_its_batch():
    draw = per_sample_noise(0, "test", "pgd")
    spec = PGDSpec("Linf", 8 / 255, 2 / 255, 3, random_start=True)
    together = draw(torch.tensor([4, 9, 2]), spec, (3, 4, 4))
    alone = draw(torch.tensor([9]), spec, (3, 4, 4))
    assert torch.equal(together[1], alone[0]) and not torch.equal(together[0], together[1])
    assert together.abs().max() <= 8 / 255


def test_bf16_autocast_keeps_the_budget_and_counts_an_fp32_prediction(classifier):
    model, images, labels = classifier
    atk = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)
    adv, pred = fast_adversarials(model, images, labels, atk, autocast=torch.bfloat16)
    assert adv.dtype == torch.float32 and (adv - images).abs().max() <= 8 / 255 + 1e-6
    with torch.no_grad():
        assert torch.equal(pred, model(adv).argmax(1))


class NearTie(torch.nn.Module):
    """Label 1 iff the first pixel is above 0.5; its logits, 1 + (1 - x) / 4 and 1 + x / 4, go
    through a matmul that autocast runs in bf16, where x = 0.505 rounds them to a tie."""

    def forward(self, x):
        v = x[:, 0, 0, 0:1]
        logits = torch.cat([1 + 0.25 * (1 - v), 1 + 0.25 * v], 1)
        return logits @ torch.eye(2, dtype=x.dtype)


def test_bf16_early_stop_trusts_only_the_fp32_prediction():
    """A bf16 tie flags the clean image as fooled; the fp32 prediction is still right, so the
    attack must go on (and then fools it) rather than stop and count it as robust."""
    model = NearTie().eval()
    images = torch.full((1, 3, 2, 2), 0.5)
    images[:, 0, 0, 0] = 0.505
    labels = torch.ones(1, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).argmax(1).item() != 1  # the tie this test is about
    atk = torchattacks.PGD(model, eps=0.03, alpha=0.003, steps=10, random_start=False)
    adv, pred = fast_adversarials(model, images, labels, atk, fooled=lambda p, t, g: p != t,
                                  autocast=torch.bfloat16)
    assert pred.item() == 0 and model(adv).argmax(1).item() == 0
    assert 0.005 < (images - adv).abs().max().item() <= 0.03 + 1e-6  # stepped past 0.5


def confident_copy(model, factor):
    """``model`` with its last layer scaled: the same predictions, far more confident."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model[-1].weight.mul_(factor)
        model[-1].bias.mul_(factor)
    return model


def test_fp16_autocast_keeps_a_confident_samples_gradient(classifier, monkeypatch):
    """A confidently classified sample's input gradient underflows fp16 (sign 0: no step)
    unless each sample's gradient is rescaled at the fp32 logits before it enters the model."""
    import engine

    model, images, labels = classifier
    model = confident_copy(model, 10)
    atk = torchattacks.PGD(model, eps=4 / 255, alpha=4 / 255, steps=1, random_start=False)
    fp32, _ = fast_adversarials(model, images, labels, atk)
    fp16, _ = fast_adversarials(model, images, labels, atk, autocast=torch.float16)
    assert (fp32 == images).float().mean() < 0.01, "fp32 moves (nearly) every pixel"
    assert (fp16 == images).float().mean() < 0.01
    assert (fp16 != fp32).float().mean() < 0.02, "the same steps up to fp16 rounding"
    monkeypatch.setattr(engine, "fp16_safe_logits", lambda logits: logits)
    unscaled, _ = fast_adversarials(model, images, labels, atk, autocast=torch.float16)
    assert (unscaled == images).float().mean() > 0.5, "without the rescaling most pixels would not move"


def test_an_overflowing_fp16_gradient_is_recomputed_in_fp32(classifier, monkeypatch):
    import attacks

    model, images, labels = classifier
    atk = torchattacks.PGD(model, eps=4 / 255, alpha=4 / 255, steps=1, random_start=False)
    fp32, _ = fast_adversarials(model, images, labels, atk)
    monkeypatch.setattr(attacks, "FP16_GRADIENT_PEAK", 1e30)  # inf once cast to fp16
    fp16, _ = fast_adversarials(model, images, labels, atk, autocast=torch.float16)
    assert torch.equal(fp16, fp32)


def test_precision_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: False)
    assert utils.resolve_precision("auto", cpu) is None and utils.resolve_precision("fp32", cpu) is None
    with pytest.raises(UsageError, match="--precision bf16 is not usable on this CPU"):
        utils.resolve_precision("bf16", cpu)
    with pytest.raises(UsageError, match="--precision fp16 needs a CUDA device"):
        utils.resolve_precision("fp16", cpu)
    monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda: True)
    assert utils.resolve_precision("auto", cpu) is torch.bfloat16 and utils.resolve_precision("bf16", cpu) is torch.bfloat16


# --------------------------------------------------------------------------- in-memory splits
@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_an_in_memory_split_returns_exactly_what_the_dataset_returns(task, tiny_synthetic_root):
    from dataset import build_splits

    dataset = build_splits(task, tiny_synthetic_root / "Train" if task == "classification" else tiny_synthetic_root,
                           image_size=24)["test"]
    source = preload(dataset)
    assert isinstance(source, InMemorySplit) and source.images.dtype == torch.uint8
    index = torch.tensor([2, 0, 1])
    images, targets = source.batch(index, torch.device("cpu"))
    for position, i in enumerate(index.tolist()):
        image, target = dataset[i]
        assert torch.equal(images[position], image) and torch.equal(targets[position], torch.as_tensor(target).long())
    streamed, note = load_split(dataset, task=task, image_size=24, max_bytes=100)
    assert isinstance(streamed, DatasetSplit) and "exceeds --max-memory" in note
    assert all(torch.equal(a, b) for a, b in zip(streamed.batch(index, torch.device("cpu")), (images, targets)))
    none = torch.tensor([], dtype=torch.long)  # e.g. no example to show: both kinds give empty batches alike
    for got, expected in zip(streamed.batch(none, torch.device("cpu")), source.batch(none, torch.device("cpu"))):
        assert got.shape == expected.shape and got.dtype == expected.dtype and len(got) == 0


def test_the_grey_levels_used_off_the_cpu_are_the_datasets_own_floats():
    """Off the CPU an in-memory split looks its floats up, since a CUDA division by 255 is one ulp
    off for about half the levels; the table must hold exactly what the dataset's ToFloat gives."""
    from dataset import build_transform
    from splitdata import GREY_LEVELS

    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.stack([ramp] * 3, axis=-1)
    as_read = build_transform("classification", 16, train=False)(image=image)["image"][0]
    assert torch.equal(GREY_LEVELS[torch.from_numpy(ramp).long()], as_read)
    assert not torch.equal(GREY_LEVELS, torch.arange(256, dtype=torch.float32) * (1 / 255))  # what CUDA computes


def test_the_budget_tolerance_follows_the_dtype():
    from engine import ToolError, budget_tolerance, check_adversarial

    assert budget_tolerance(torch.float32) == 1e-6
    assert budget_tolerance(torch.float16) < budget_tolerance(torch.bfloat16) == 2 ** -7
    images = torch.full((1, 3, 4, 4), 0.5)
    check_adversarial(images, (images + 8 / 255 + 2 ** -9).bfloat16(), 8 / 255, "Linf", "x")
    with pytest.raises(ToolError, match="exceeded its budget"):
        check_adversarial(images, (images + 8 / 255 + 2 ** -6).bfloat16(), 8 / 255, "Linf", "x")
    with pytest.raises(ToolError, match="exceeded its budget"):
        check_adversarial(images, images + 8 / 255 + 2 ** -9, 8 / 255, "Linf", "x")


@pytest.mark.parametrize("eps", [1.0, 2.0, 5.0])
def test_an_l2_attack_on_a_large_image_passes_its_budget_check(eps):
    """fp32 rounding of the L2 projection and norm grows with eps and the image (3 x 128 x 128
    here lands a few 1e-6 above eps); a fixed 1e-6 tolerance refused legitimate sweeps."""
    from engine import ToolError, check_adversarial, perturbation_norms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    images = torch.rand(8, 3, 128, 128) * 0.5 + 0.25
    labels = model(images).argmax(1).detach()
    for kind in ("fast", "library"):
        atk = build_attack("pgdl2", model, eps, steps=5, alpha=eps)
        adv, _ = fast_adversarials(model, images, labels, atk) if kind == "fast" else (atk(images, labels), None)
        check_adversarial(images, adv, eps, "L2", "pgdl2")
        assert perturbation_norms(adv - images, "L2").max() <= eps * (1 + 1e-5)
    with pytest.raises(ToolError, match="exceeded its budget"):
        check_adversarial(images, images + (eps * 1.001) / (3 * 128 * 128) ** 0.5, eps, "L2", "x")
