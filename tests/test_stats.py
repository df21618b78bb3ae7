"""95 % intervals against hand-computed cases and independent computations."""
import math

import numpy as np
import pytest

from stats import Z95, bootstrap_dice_interval, wilson_interval
from utils import segmentation_metrics


# --------------------------------------------------------------------------- 95 % intervals
@pytest.mark.parametrize("successes, n, low, high", [
    (8, 10, 0.4902, 0.9433),  # by hand: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (26, 45, 0.4330, 0.7103),  # the real ResNet18 at 4/255: 0.578 (0.433-0.710)
])
def test_wilson_interval_hand_cases(successes, n, low, high):
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("successes, n", [(1, 7), (26, 45), (449, 500), (3, 1000)])
def test_wilson_bounds_are_where_the_score_test_just_accepts(successes, n):
    """Independently: the Wilson interval is {p : |p_hat - p| <= z sqrt(p (1 - p) / n)}, so an
    endpoint inside (0, 1) solves that with equality, and points just beyond it are rejected."""
    p_hat = successes / n

    def score(p):
        return abs(p_hat - p) - Z95 * math.sqrt(p * (1 - p) / n)

    for bound, outward in zip(wilson_interval(successes, n), (-1e-6, 1e-6)):
        assert score(bound) == pytest.approx(0, abs=1e-9)
        assert score(bound + outward) > 0 > score(bound - outward)
    assert math.isnan(wilson_interval(0, 0)[0])


@pytest.mark.parametrize("n", [1, 3, 45, 1000])
def test_wilson_interval_holds_the_estimate_exactly_at_0_and_1(n):
    assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def _image_cms(sizes, nucleus_hits, seed=0):
    """Per-image 3-class confusion matrices: image i has ``sizes[i]`` nucleus pixels, of which
    ``nucleus_hits[i]`` are found; the rest is background predicted as cytoplasm and back."""
    rng = np.random.default_rng(seed)
    cms = np.zeros((len(sizes), 3, 3))
    for i, (size, hit) in enumerate(zip(sizes, nucleus_hits)):
        cytoplasm = int(rng.integers(50, 80))
        cms[i] = [[400, 5, 0], [5, cytoplasm, 3], [size - hit, 0, hit]]
    return cms


def test_bootstrap_interval_of_one_image_is_undefined_not_a_point():
    assert all(math.isnan(bound) for bound in bootstrap_dice_interval(_image_cms([100], [70])))
    assert all(math.isnan(bound) for bound in bootstrap_dice_interval(np.zeros((0, 3, 3))))


def test_bootstrap_interval_of_identical_images_is_their_dice():
    cms = _image_cms([100] * 12, [70] * 12)
    cms[:] = cms[0]
    dice = segmentation_metrics(cms.sum(0))["dice_mean"]
    assert bootstrap_dice_interval(cms) == pytest.approx((dice, dice), abs=1e-12)


def test_bootstrap_interval_matches_an_index_resampling_of_the_pooled_dice():
    """An independent bootstrap (explicit index draws, the table's own metric on each resample)
    agrees; the mean of per-image Dice, which weights a small cell like a large one, does not."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(20, 400, size=40)
    cms = _image_cms(sizes, (sizes * np.where(sizes < 100, 0.2, 0.9)).astype(int))
    pooled, per_image = [], []
    for _ in range(3000):
        pick = rng.integers(0, len(cms), size=len(cms))
        pooled.append(segmentation_metrics(cms[pick].sum(0))["dice_mean"])
        per_image.append(np.mean([segmentation_metrics(cms[i])["dice_mean"] for i in pick]))
    low, high = bootstrap_dice_interval(cms, resamples=3000)
    assert (low, high) == pytest.approx(tuple(np.quantile(pooled, [0.025, 0.975])), abs=0.006)
    assert abs(low - np.quantile(per_image, 0.025)) > 0.03
    assert low < segmentation_metrics(cms.sum(0))["dice_mean"] < high
    assert bootstrap_dice_interval(cms) == bootstrap_dice_interval(cms), "the draws are seeded"
