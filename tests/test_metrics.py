"""Metrics against hand-computed cases and an independent (set-based, per-class loop) computation."""
import math

import numpy as np
import pytest
import torch

from files import atomic_write_json
from utils import (ConfusionMatrix, UsageError, classification_metrics, confusion_matrix, eps_text,
                   parse_fraction, parse_step_size, segmentation_metrics, step_size)

CLASSES = ["a", "b", "c"]


def test_confusion_matrix_hand_case():
    target = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 2])
    expected = torch.tensor([[1, 1, 0], [0, 2, 1], [0, 0, 1]])
    assert torch.equal(confusion_matrix(target, pred, 3), expected)


def test_classification_metrics_hand_case():
    # class a: 1/2 recalled, b: 2/3, c: 1/1 -> accuracy 4/6, balanced (1/2 + 2/3 + 1) / 3
    cm = torch.tensor([[1, 1, 0], [0, 2, 1], [0, 0, 1]])
    m = classification_metrics(cm, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_a"] == pytest.approx(0.5)
    assert m["recall_b"] == pytest.approx(2 / 3)


def test_balanced_accuracy_ignores_absent_classes_and_marks_them_nan():
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])
    m = classification_metrics(cm, CLASSES)
    assert math.isnan(m["recall_b"])
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_segmentation_metrics_hand_case():
    # 1x2x3 masks: target [[0,1,2],[2,2,1]], pred [[0,1,1],[2,0,1]]
    target = torch.tensor([[[0, 1, 2], [2, 2, 1]]])
    pred = torch.tensor([[[0, 1, 1], [2, 0, 1]]])
    m = segmentation_metrics(confusion_matrix(target, pred, 3))
    # cytoplasm: TP 2, FP 1, FN 0 -> Dice 4/5, IoU 2/3 ; nucleus: TP 1, FP 0, FN 2 -> Dice 2/4, IoU 1/3
    assert m["pixel_accuracy"] == pytest.approx(4 / 6)
    assert m["dice_cytoplasm"] == pytest.approx(4 / 5)
    assert m["iou_cytoplasm"] == pytest.approx(2 / 3)
    assert m["dice_nucleus"] == pytest.approx(0.5)
    assert m["iou_nucleus"] == pytest.approx(1 / 3)
    assert m["dice_mean"] == pytest.approx((4 / 5 + 0.5) / 2)
    assert m["iou_mean"] == pytest.approx((2 / 3 + 1 / 3) / 2)


def _independent_dice_iou(target: np.ndarray, pred: np.ndarray, cls: int) -> tuple[float, float]:
    t, p = target == cls, pred == cls
    inter, union = np.logical_and(t, p).sum(), np.logical_or(t, p).sum()
    return 2 * inter / (t.sum() + p.sum()), inter / union


def test_split_level_accumulation_matches_independent_computation_not_batch_average():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, size=(7, 9, 11))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 3, size=target.shape))
    pred[0] = 0  # a batch that is very different from the others
    cm = ConfusionMatrix(3)
    for start in range(0, 7, 3):  # batches of 3, 3, 1
        cm.update(torch.from_numpy(target[start:start + 3]), torch.from_numpy(pred[start:start + 3]))
    m = segmentation_metrics(cm.mat)
    for cls, name in [(1, "cytoplasm"), (2, "nucleus")]:
        dice, iou = _independent_dice_iou(target, pred, cls)
        assert m[f"dice_{name}"] == pytest.approx(dice)
        assert m[f"iou_{name}"] == pytest.approx(iou)
    assert m["pixel_accuracy"] == pytest.approx((target == pred).mean())
    batch_mean = np.mean([_independent_dice_iou(target[s:s + 3], pred[s:s + 3], 2)[0] for s in (0, 3, 6)])
    assert m["dice_nucleus"] != pytest.approx(batch_mean)


def test_classification_matches_per_class_loop():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 5, size=200)
    pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, 5, size=200))
    names = list("vwxyz")
    m = classification_metrics(confusion_matrix(torch.from_numpy(target), torch.from_numpy(pred), 5), names)
    recalls = [(pred[target == c] == c).mean() for c in range(5)]
    assert m["accuracy"] == pytest.approx((pred == target).mean())
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    for name, recall in zip(names, recalls):
        assert m[f"recall_{name}"] == pytest.approx(recall)


def test_ignore_index_is_skipped():
    cm = confusion_matrix(torch.tensor([0, 255, 1]), torch.tensor([0, 1, 1]), 3)
    assert cm.sum() == 2


def test_absent_class_dice_is_nan_not_zero():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = 1
    m = segmentation_metrics(confusion_matrix(target, target, 3))
    assert m["dice_cytoplasm"] == 1.0
    assert math.isnan(m["dice_nucleus"])
    assert m["dice_mean"] == 1.0


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.03", 0.03), ("0", 0.0), (" 1/2 ", 0.5)])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("eps,norm,text", [(8 / 255, "Linf", "8/255"), (0.5 / 255, "Linf", "0.5/255"),
                                           (0.0, "Linf", "0/255"), (0.5, "L2", "0.5"), (1e-3, "L2", "0.001")])
def test_eps_text_reads_back_as_the_eps(eps, norm, text):
    assert eps_text(eps, norm) == text
    assert parse_fraction(text) == pytest.approx(eps)


@pytest.mark.parametrize("text", ["abc", "1/0", "nan", "", "8/"])
def test_parse_fraction_rejects_junk(text):
    with pytest.raises((ValueError, ZeroDivisionError)):
        parse_fraction(text)


@pytest.mark.parametrize("text,rule,step_at_8", [
    ("0.01", 0.01, 0.01), ("2/255", 2 / 255, 2 / 255), ("eps/4", "eps/4", 2 / 255),
    (" eps / 2.5 ", "eps/2.5", 3.2 / 255),
    ("2.5*eps/steps", None, 2.5 * 8 / 255 / 10),
])
def test_step_size_rules(text, rule, step_at_8):
    """A fixed step, a fraction of each eps, or the default rule (written as results.json records it)."""
    assert parse_step_size("--alpha", text) == rule
    assert parse_step_size("--alpha", rule) == rule, "a parsed value parses to itself"
    assert step_size(parse_step_size("--alpha", text), 8 / 255, 10) == pytest.approx(step_at_8, rel=1e-12)


def test_a_fraction_of_eps_gives_exactly_the_fixed_step_at_each_eps():
    """eps/4 at 4/255 and 8/255 is bit for bit --alpha 1/255 and 2/255 (the 50-step reruns)."""
    assert step_size("eps/4", 4 / 255, 50) == parse_step_size("--alpha", "1/255")
    assert step_size("eps/4", 8 / 255, 50) == parse_step_size("--alpha", "2/255")


@pytest.mark.parametrize("text", ["abc", "eps", "eps/", "eps/0", "eps/-4", "0", "-1/255", "nan", "inf", "1/0", "4*eps"])
def test_bad_step_sizes_are_rejected(text):
    with pytest.raises(UsageError, match="--adv-alpha"):
        parse_step_size("--adv-alpha", text)


def test_undefined_scores_are_written_as_json_null(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"recall_basophil": float("nan"), "accuracy": 0.5, "rows": [float("inf")]})
    assert path.read_text().count("null") == 2
    import json
    assert json.loads(path.read_text()) == {"recall_basophil": None, "accuracy": 0.5, "rows": [None]}


def test_lowest_dice_choice_picks_each_images_worst_attack_and_the_first_on_ties():
    from utils import lowest_dice_choice
    perfect = torch.tensor([[[5, 0], [0, 5]]])          # Dice 1
    half = torch.tensor([[[0, 5], [0, 5]]])             # foreground Dice 2*5/(5+10) = 2/3
    first = torch.cat([perfect, half, half])
    second = torch.cat([half, perfect, half])
    assert lowest_dice_choice([first, second]).tolist() == [1, 0, 0]


def image_cm(cytoplasm_hit, cytoplasm_miss, nucleus_hit, nucleus_miss):
    """One image's confusion matrix (rows: truth, columns: prediction; misses go to background)."""
    return torch.tensor([[100, 0, 0], [cytoplasm_miss, cytoplasm_hit, 0], [nucleus_miss, 0, nucleus_hit]])


def test_worst_case_choice_lowers_the_split_dice_where_the_per_image_rule_does_not():
    """Attack a loses image 0's one-pixel nucleus (per-image Dice 0.5), attack b 30 of its 60
    cytoplasm pixels (0.83): the per-image rule takes a, yet b lowers the pooled Dice far more."""
    from utils import lowest_dice_choice, worst_case_choice

    other = image_cm(30, 0, 50, 0)
    attack_a = torch.stack([image_cm(60, 0, 0, 1), other])
    attack_b = torch.stack([image_cm(30, 30, 1, 0), other])

    def split_dice(choice):
        total = torch.stack([(attack_a, attack_b)[a][i] for i, a in enumerate(choice.tolist())]).sum(0)
        return segmentation_metrics(total)["dice_mean"]

    assert lowest_dice_choice([attack_a, attack_b]).tolist() == [0, 0]
    per_image, only_b = split_dice(torch.tensor([0, 0])), split_dice(torch.tensor([1, 1]))
    assert per_image > only_b  # the old rule's "worst" was above attack b's own row
    choice = worst_case_choice([attack_a, attack_b])
    assert choice[0] == 1 and split_dice(choice) == pytest.approx(only_b)


def test_worst_case_choice_is_a_local_optimum_below_every_start_on_random_splits():
    import itertools

    from utils import lowest_dice_choice, worst_case_choice

    gen = torch.Generator().manual_seed(0)
    reached_optimum = 0
    for _ in range(40):
        cms = [torch.randint(0, 6, (6, 3, 3), generator=gen) for _ in range(3)]

        def split_dice(choice):
            return segmentation_metrics(sum(cms[a][i] for i, a in enumerate(choice)))["dice_mean"]

        choice = tuple(worst_case_choice(cms).tolist())
        value = split_dice(choice)
        starts = [(a,) * 6 for a in range(3)] + [tuple(lowest_dice_choice(cms).tolist())]
        assert value <= min(split_dice(start) for start in starts) + 1e-12
        for i, a in itertools.product(range(6), range(3)):
            assert split_dice(choice[:i] + (a,) + choice[i + 1:]) >= value - 1e-12
        optimum = min(split_dice(c) for c in itertools.product(range(3), repeat=6))
        reached_optimum += value == pytest.approx(optimum, abs=1e-12)
    assert reached_optimum >= 30  # a local search, yet it finds the brute-force optimum mostly
