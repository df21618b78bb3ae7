"""Uncertainty of the sweep's numbers: 95 % intervals of one row (Wilson for accuracy, a
bootstrap over images for Dice)."""
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
    cms = torch.as_tensor(np.asarray(per_image_cms), dtype=torch.float64)
    n, classes = len(cms), cms.shape[-1]
    if n < 2:
        return math.nan, math.nan
    flat, rng, values = cms.reshape(n, -1), np.random.default_rng(seed), []
    for start in range(0, resamples, 100):
        counts = torch.from_numpy(rng.multinomial(n, np.full(n, 1 / n), size=min(100, resamples - start)))
        pooled = (counts.double() @ flat).reshape(-1, classes, classes)
        scored = (pooled.sum(1)[:, 1:] + pooled.sum(2)[:, 1:]).sum(1) > 0  # dice_mean is NaN without foreground
        values.append(per_image_dice(pooled)[scored].numpy())
    drawn = np.concatenate(values)
    if not len(drawn):
        return math.nan, math.nan
    low, high = np.quantile(drawn, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
