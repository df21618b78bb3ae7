"""Uncertainty of the sweep's numbers: 95 % intervals of one row (Wilson for accuracy, a
bootstrap over images for Dice) and, for two runs on the same images, of their difference
(Newcombe's paired interval and McNemar's mid-p test for accuracy, a paired bootstrap and a
paired permutation test for Dice), and Holm's adjustment of a family of such p-values."""
from __future__ import annotations

import math

import numpy as np
import torch

from utils import per_image_dice

#: The two-sided 95 % normal quantile, for the intervals of the sweep's tables.
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion: a 95 % interval for accuracy that
    stays inside [0, 1] and keeps its coverage at small n and near 0 or 1, where the normal
    interval does not (Brown, Cai and DasGupta, Statistical Science 2001)."""
    if n <= 0:
        return math.nan, math.nan
    p, z2 = successes / n, z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # p inside, also after rounding


def _resample_counts(n: int, resamples: int, seed: int):
    """Bootstrap resamples of ``n`` images as counts (one multinomial draw of n per resample),
    in chunks of 100 resamples, from a fixed seed."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 100):
        yield torch.from_numpy(rng.multinomial(n, np.full(n, 1 / n), size=min(100, resamples - start))).double()


def _dice_mean(pooled: torch.Tensor) -> torch.Tensor:
    """``dice_mean`` of each of a stack of pooled matrices; NaN where one has no foreground."""
    scored = (pooled.sum(1)[:, 1:] + pooled.sum(2)[:, 1:]).sum(1) > 0  # dice_mean is NaN without foreground
    return torch.where(scored, per_image_dice(pooled), torch.nan)


def _pooled_dice(counts: torch.Tensor, flat_cms: torch.Tensor, classes: int) -> torch.Tensor:
    """``dice_mean`` of each resample, given as counts of the images (rows of ``counts``)."""
    return _dice_mean((counts @ flat_cms).reshape(-1, classes, classes))


def _percentiles(drawn: np.ndarray, level: float) -> tuple[float, float]:
    drawn = drawn[np.isfinite(drawn)]
    if not len(drawn):
        return math.nan, math.nan
    low, high = np.quantile(drawn, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _as_cms(per_image_cms: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(per_image_cms), dtype=torch.float64)


def _paired_cms(first_cms: torch.Tensor | np.ndarray,
                second_cms: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Two runs' per-image matrices, which must be of the same images."""
    first, second = _as_cms(first_cms), _as_cms(second_cms)
    if first.shape != second.shape:
        raise ValueError(f"paired runs need matrices of the same images, got shapes {tuple(first.shape)} "
                         f"and {tuple(second.shape)}")
    return first, second


def bootstrap_dice_interval(per_image_cms: torch.Tensor | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """A percentile-bootstrap interval of ``dice_mean`` over the images of a split.

    Each resample draws the split's images with replacement (as counts, from a multinomial)
    and pools their confusion matrices, exactly as the split's own Dice pools every pixel, so
    the interval is that of the reported number; the images, not the pixels, are the unit,
    since pixels of one image are not independent. ``seed`` fixes the draws, so the interval
    depends on the per-image matrices alone (not on the number of processes). One image says
    nothing about the spread between images: its interval is NaN, not a point.
    """
    cms = _as_cms(per_image_cms)
    n, classes = len(cms), cms.shape[-1]
    if n < 2:
        return math.nan, math.nan
    flat = cms.reshape(n, -1)
    drawn = [_pooled_dice(counts, flat, classes).numpy() for counts in _resample_counts(n, resamples, seed)]
    return _percentiles(np.concatenate(drawn), level)


def paired_dice_difference_interval(first_cms: torch.Tensor | np.ndarray, second_cms: torch.Tensor | np.ndarray,
                                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                                    level: float = 0.95) -> tuple[float, float]:
    """A paired percentile-bootstrap interval of ``dice_mean(second) - dice_mean(first)``.

    ``first_cms`` and ``second_cms`` are the per-image confusion matrices of two runs on the
    same images in the same order. Each resample draws the images once and pools both runs'
    matrices of those images, so what the images share (a hard cell is hard for both models)
    cancels, and the interval is that of the difference, not of two independent numbers.
    """
    first, second = _paired_cms(first_cms, second_cms)
    n, classes = len(first), first.shape[-1]
    if n < 2:
        return math.nan, math.nan
    flat_first, flat_second = first.reshape(n, -1), second.reshape(n, -1)
    drawn = [(_pooled_dice(counts, flat_second, classes) - _pooled_dice(counts, flat_first, classes)).numpy()
             for counts in _resample_counts(n, resamples, seed)]
    return _percentiles(np.concatenate(drawn), level)


def paired_dice_permutation_p(first_cms: torch.Tensor | np.ndarray, second_cms: torch.Tensor | np.ndarray,
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """A two-sided paired permutation test of ``dice_mean(second) - dice_mean(first)``.

    Under the null hypothesis that the runs do not differ, each image's two confusion matrices
    are exchangeable: each resample swaps them on a random half of the images, pools as
    ``dice_mean`` does and takes the difference. The p-value is the share of resamples at least
    as far from 0 as the observed difference, counting the observed one (Phipson and Smyth,
    Stat Appl Genet Mol Biol 2010), so it is never 0.
    """
    first, second = _paired_cms(first_cms, second_cms)
    n, classes = len(first), first.shape[-1]
    if n == 0:
        return math.nan
    observed = (_dice_mean(second.sum(0, keepdim=True)) - _dice_mean(first.sum(0, keepdim=True))).item()
    if not math.isfinite(observed):
        return math.nan
    flat_first, flat_second = first.reshape(n, -1), second.reshape(n, -1)
    rng, extreme = np.random.default_rng(seed), 0
    for start in range(0, resamples, 100):
        swap = torch.from_numpy(rng.integers(0, 2, size=(min(100, resamples - start), n))).double()
        pooled_first = swap @ flat_second + (1 - swap) @ flat_first  # the "first" run with swapped images
        pooled_second = swap @ flat_first + (1 - swap) @ flat_second
        difference = (_dice_mean(pooled_second.reshape(-1, classes, classes))
                      - _dice_mean(pooled_first.reshape(-1, classes, classes)))
        extreme += int((difference.abs() >= abs(observed) * (1 - 1e-9)).sum())
    return (1 + extreme) / (1 + resamples)


def metric_interval(task: str, split_cm: torch.Tensor, per_image_cms: torch.Tensor | None = None) -> dict:
    """The 95 % interval of a split's primary metric, as the sweep's tables and train.py's
    ``metrics.json`` give it: Wilson for accuracy (from the split's confusion matrix), the
    bootstrap over images for ``dice_mean`` (from every image's matrix, in split order)."""
    if task == "classification":
        low, high = wilson_interval(int(split_cm.trace()), int(split_cm.sum()))
        return {"accuracy_ci95_low": low, "accuracy_ci95_high": high}
    if per_image_cms is None:
        raise ValueError("a Dice interval needs the per-image confusion matrices")
    low, high = bootstrap_dice_interval(per_image_cms)
    return {"dice_mean_ci95_low": low, "dice_mean_ci95_high": high}


def mcnemar_mid_p(only_first: int, only_second: int) -> float:
    """The two-sided mid-p McNemar test of two classifiers on the same samples.

    Only the samples exactly one of them gets right say anything about which is better: under
    the null hypothesis each of those is equally likely to fall either way, so their split is
    Binomial(only_first + only_second, 1/2). The exact conditional test doubles the smaller
    tail; it is conservative (below 5 % false positives by a wide margin at small counts), and
    its p-value can exceed 0.05 where Newcombe's interval already excludes 0. The mid-p value
    counts the observed split at half weight; Fagerland, Lydersen and Laake (BMC Medical Research
    Methodology 2013; 13: 91) recommend it. Summed in exact integers, since the counts are often
    in single digits, where the chi-squared approximation is poor. Each binomial coefficient comes
    from the one before it, so 10,000 discordant samples cost milliseconds, not seconds.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be non-negative, got {only_first} and {only_second}")
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    below, term = 0, 1
    for i in range(k):
        below += term
        term = term * (n - i) // (i + 1)
    return min(1.0, (2 * below + term) / 2**n)


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               z: float = Z95) -> tuple[float, float]:
    """A 95 % interval of ``accuracy(second) - accuracy(first)`` on the same samples.

    Newcombe's paired score interval (method 10 of Newcombe, Statistics in Medicine 1998;
    17: 2635-2650): the Wilson interval of each accuracy, combined through the correlation phi
    of the two runs' per-sample outcomes, with no continuity correction. The counts are the
    paired table: samples both runs get right, only the first, only the second, neither.
    """
    counts = (both, only_first, only_second, neither)
    if min(counts) < 0:
        raise ValueError(f"paired counts must be non-negative, got {counts}")
    n = sum(counts)
    if n == 0:
        return math.nan, math.nan
    # Newcombe's notation: proportion 1 is the second run, so theta = p1 - p2 is second - first.
    p1, p2 = (both + only_second) / n, (both + only_first) / n
    (l1, u1), (l2, u2) = wilson_interval(both + only_second, n, z), wilson_interval(both + only_first, n, z)
    margins = (both + only_second) * (only_first + neither) * (both + only_first) * (only_second + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    below = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    above = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    theta = p1 - p2
    return max(-1.0, theta - below), min(1.0, theta + above)


def holm_adjusted(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their given order.

    Rejecting every hypothesis whose adjusted p is at most alpha keeps the chance of any false
    rejection in the family at most alpha, whatever the dependence between the tests (Holm,
    Scandinavian Journal of Statistics 1979). The rows of one comparison are strongly dependent
    (the same samples at nested budgets), which Holm allows for at the price of some power.
    """
    m, order = len(p_values), sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [math.nan] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
