"""95 % intervals against hand-computed cases and independent computations."""
import math

import numpy as np
import pytest

from stats import (Z95, bootstrap_dice_interval, holm_adjusted, mcnemar_mid_p, paired_dice_difference_interval,
                   paired_dice_permutation_p, paired_difference_interval, wilson_interval)
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


# --------------------------------------------------------------------------- two runs on the same samples
@pytest.mark.parametrize("only_first, only_second, p", [
    (1, 7, 10 / 256),  # by hand: 2 (C(8,0) + C(8,1) / 2) / 2^8 (the exact test: 18 / 256)
    (1, 8, 11 / 512),
    (0, 5, 1 / 32),
    (3, 3, 1.0),
    (0, 0, 1.0),
    (2, 0, 0.25),
])
def test_mcnemar_mid_p_hand_cases(only_first, only_second, p):
    assert mcnemar_mid_p(only_first, only_second) == pytest.approx(p, abs=1e-15)


def test_mcnemar_mid_p_is_scipys_exact_test_less_the_observed_point():
    stats = pytest.importorskip("scipy.stats")
    for only_first, only_second in [(1, 8), (7, 19), (40, 61), (0, 12), (250, 300)]:
        n, k = only_first + only_second, min(only_first, only_second)
        expected = stats.binomtest(k, n, 0.5).pvalue - stats.binom.pmf(k, n, 0.5)
        assert mcnemar_mid_p(only_first, only_second) == pytest.approx(expected, rel=1e-9)
        assert mcnemar_mid_p(only_second, only_first) == mcnemar_mid_p(only_first, only_second)
    with pytest.raises(ValueError):
        mcnemar_mid_p(-1, 3)


@pytest.mark.parametrize("only_first, only_second", [(0, 1), (2, 2), (5, 13), (4950, 5050), (4800, 5200)])
def test_mcnemar_mid_p_matches_the_binomial_sum_in_floats(only_first, only_second):
    """Against an independent sum of Binomial(n, 1/2) probabilities from log-gamma, up to the
    10,000 discordant samples a Raabin-sized test split can hold."""
    n, k = only_first + only_second, min(only_first, only_second)

    def pmf(i: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))

    expected = min(1.0, 2 * math.fsum(pmf(i) for i in range(k)) + pmf(k))
    assert mcnemar_mid_p(only_first, only_second) == pytest.approx(expected, rel=1e-8, abs=1e-300)


def test_paired_interval_hand_cases():
    """Both right everywhere: phi is undefined (0) and the interval is the two Wilson half-widths,
    45 / (45 + z^2) = 0.92135 apart from 1, to either side of 0."""
    half = 1 - 45 / (45 + Z95 ** 2)
    assert paired_difference_interval(45, 0, 0, 0) == pytest.approx((-half, half), abs=1e-12)
    # ad = bc, so phi = 0: Newcombe's square-and-add of the two Wilson intervals
    (l2, u2), (l1, u1) = wilson_interval(6, 9), wilson_interval(6, 9)
    assert paired_difference_interval(4, 2, 2, 1) == pytest.approx(
        (-math.sqrt((6 / 9 - l1) ** 2 + (u2 - 6 / 9) ** 2), math.sqrt((u1 - 6 / 9) ** 2 + (6 / 9 - l2) ** 2)))


def test_paired_interval_orientation_and_symmetry():
    low, high = paired_difference_interval(30, 0, 8, 7)
    assert 0 < low < 8 / 45 < high, "the second run is right on 8 more samples"
    swapped = paired_difference_interval(30, 8, 0, 7)
    assert swapped == pytest.approx((-high, -low), abs=1e-12)
    assert all(math.isnan(b) for b in paired_difference_interval(0, 0, 0, 0))
    with pytest.raises(ValueError):
        paired_difference_interval(3, -1, 2, 0)


def _paired_coverage(probabilities, n):
    """The exact coverage of the interval: every paired table of n samples, weighted by its
    multinomial probability, counted where the interval holds the true difference."""
    theta = probabilities[2] - probabilities[1]
    covered = 0.0
    for both in range(n + 1):
        for first in range(n + 1 - both):
            for second in range(n + 1 - both - first):
                table = (both, first, second, n - both - first - second)
                low, high = paired_difference_interval(*table)
                if low <= theta <= high:
                    weight = math.factorial(n) / math.prod(math.factorial(k) for k in table)
                    covered += weight * math.prod(p ** k for p, k in zip(probabilities, table))
    return covered


def test_paired_interval_has_its_nominal_coverage():
    """Independently of the formula: near 95 % coverage on paired tables like two models' (they
    agree on most samples). Ignoring the pairing (phi = 0) over-covers here (about 0.99 on
    average), so this also catches a lost or mis-signed correlation term."""
    points = [((0.6, 0.1, 0.2, 0.1), 30), ((0.8, 0.05, 0.05, 0.1), 30), ((0.3, 0.2, 0.1, 0.4), 20),
              ((0.7, 0.05, 0.15, 0.1), 30)]
    coverages = [_paired_coverage(probabilities, n) for probabilities, n in points]
    assert min(coverages) > 0.92
    assert 0.93 < float(np.mean(coverages)) < 0.965


def test_paired_dice_interval_of_one_run_against_itself_is_zero():
    cms = _image_cms(np.full(20, 200), np.linspace(60, 190, 20).astype(int))
    assert paired_dice_difference_interval(cms, cms) == (0.0, 0.0)
    assert all(math.isnan(b) for b in paired_dice_difference_interval(cms[:1], cms[:1]))
    with pytest.raises(ValueError):
        paired_dice_difference_interval(cms, cms[:5])


def test_paired_dice_interval_matches_an_index_resampling_and_is_narrower_than_unpaired():
    """An explicit index bootstrap of the pooled Dice difference agrees; and since the images
    differ far more from each other than the two runs differ on one image, the paired interval
    is much narrower than one that treats the runs as independent."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(50, 400, size=40)
    first = _image_cms(sizes, (sizes * rng.uniform(0.3, 0.95, size=40)).astype(int))
    second = first.copy()
    second[:, 2, 2] += np.minimum(5, first[:, 2, 0])  # the second run finds 5 more nucleus pixels per image
    second[:, 2, 0] -= np.minimum(5, first[:, 2, 0])
    drawn = []
    for _ in range(3000):
        pick = rng.integers(0, len(first), size=len(first))
        drawn.append(segmentation_metrics(second[pick].sum(0))["dice_mean"]
                     - segmentation_metrics(first[pick].sum(0))["dice_mean"])
    low, high = paired_dice_difference_interval(first, second, resamples=3000)
    assert (low, high) == pytest.approx(tuple(np.quantile(drawn, [0.025, 0.975])), abs=0.002)
    assert 0 < low < high
    unpaired = math.hypot(*(np.diff(bootstrap_dice_interval(cms))[0] / 2 for cms in (first, second)))
    assert (high - low) / 2 < unpaired / 5
    assert paired_dice_difference_interval(second, first, resamples=3000) == pytest.approx((-high, -low), abs=1e-12)


def _gained(seed, n=8, low=-3, high=12):
    """Two runs on n images: the second finds a few more (or fewer) nucleus pixels per image."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(50, 300, size=n)
    first = _image_cms(sizes, (sizes * rng.uniform(0.3, 0.9, size=n)).astype(int))
    second, gain = first.copy(), rng.integers(low, high, size=n)
    second[:, 2, 2] += gain
    second[:, 2, 0] -= gain
    return first, second


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_permutation_p_matches_the_exact_enumeration(seed):
    """All 2^8 ways to swap the two runs' matrices image by image, each pooled with the table's
    own metric: the share at least as extreme as the observed difference."""
    import itertools

    first, second = _gained(seed)

    def difference(a, b):
        return segmentation_metrics(b.sum(0))["dice_mean"] - segmentation_metrics(a.sum(0))["dice_mean"]

    observed, extreme = difference(first, second), 0
    for signs in itertools.product([False, True], repeat=len(first)):
        swap = np.array(signs)[:, None, None]
        swapped = difference(np.where(swap, second, first), np.where(swap, first, second))
        extreme += abs(swapped) >= abs(observed) * (1 - 1e-9)
    exact = extreme / 2 ** len(first)
    assert paired_dice_permutation_p(first, second, resamples=20000) == pytest.approx(exact, abs=0.004)
    assert paired_dice_permutation_p(second, first) == paired_dice_permutation_p(first, second)


def test_dice_permutation_p_of_identical_runs_is_1_and_of_a_gain_on_every_image_small():
    first, second = _gained(4, n=12, low=3, high=12)
    assert paired_dice_permutation_p(first, first) == 1.0
    assert paired_dice_permutation_p(first, second) < 0.01  # every image gains: few swaps are as extreme
    assert paired_dice_permutation_p(first, second) >= 1 / 1001, "counting the observed split, never 0"
    with pytest.raises(ValueError):
        paired_dice_permutation_p(first, second[:3])


def test_holm_adjustment_hand_case():
    # sorted 0.01, 0.02, 0.04, 0.30 times 4, 3, 2, 1: 0.04, 0.06, 0.08, 0.30, already monotone
    assert holm_adjusted([0.04, 0.30, 0.01, 0.02]) == pytest.approx([0.08, 0.30, 0.04, 0.06])
    # the running maximum: 0.01 * 3 = 0.03, then 0.012 * 2 = 0.024 is raised to 0.03; capped at 1
    assert holm_adjusted([0.012, 0.01, 0.9]) == pytest.approx([0.03, 0.03, 0.9])
    assert holm_adjusted([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm_adjusted([]) == []


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_p_rejects_what_the_step_down_procedure_rejects(seed):
    """Holm's procedure as he wrote it: test the sorted p-values against alpha/m, alpha/(m-1), ...
    and stop at the first that fails. An adjusted p at most alpha must mark exactly that set."""
    rng = np.random.default_rng(seed)
    p = list(np.concatenate([rng.uniform(0, 0.02, 6), rng.uniform(0, 1, 10)]))
    adjusted = holm_adjusted(p)
    assert all(a >= q for a, q in zip(adjusted, p))
    for alpha in (0.01, 0.05, 0.1, 0.2):
        rejected = set()
        for rank, i in enumerate(sorted(range(len(p)), key=lambda i: p[i])):
            if p[i] > alpha / (len(p) - rank):
                break
            rejected.add(i)
        assert {i for i, a in enumerate(adjusted) if a <= alpha} == rejected
