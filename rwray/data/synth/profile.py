"""Per-class image counts of the synthetic datasets (pure numpy, no files): the published long tail, its scaled and
re-classed versions, and evenly spread evaluation splits.

The long tail: with x_c = c / (K - 1) and f(x) = (1 - x)^p,

    n_c = n_min * (n_max / n_min) ** f(x_c)        (n_0 = n_max, n_{K-1} = n_min, decreasing in c)

p > 0 is found by bisection so that sum_c n_c equals the published total; the real-valued counts are then rounded
by largest remainder (the integer sum is exact) and re-sorted (rounding can tie or swap neighbours, sorting cannot
change the sum, the first or the last value). p = 1 is the familiar exponential profile of CIFAR-LT; the published
totals want p < 1 (a fatter head) or p > 1 (a thinner one).
"""

from __future__ import annotations

import math

import numpy as np


def feasible(k: int, total: int, n_max: int, n_min: int) -> str | None:
    """Why no K counts in [n_min, n_max] with one class at each end can sum to ``total`` (None: they can)."""
    if k < 2:
        return f"need at least 2 classes, got {k}"
    if not 1 <= n_min <= n_max:
        return f"need 1 <= min <= max per class, got min {n_min}, max {n_max}"
    lo, hi = n_max + (k - 1) * n_min, n_min + (k - 1) * n_max
    if not lo <= total <= hi:
        return f"{total} images cannot be spread over {k} classes between {n_min} and {n_max} per class " \
               f"(possible totals: {lo}..{hi})"
    return None


def _real_counts(k: int, n_max: int, n_min: int, p: float) -> np.ndarray:
    x = np.arange(k, dtype=np.float64) / (k - 1)
    return n_min * (n_max / n_min) ** ((1.0 - x) ** p)


def tail_exponent(k: int, total: int, n_max: int, n_min: int) -> float:
    """p of the profile whose real-valued counts sum to ``total`` (bisection on log p; the sum falls as p grows)."""
    if (why := feasible(k, total, n_max, n_min)) is not None:
        raise ValueError(why)
    if n_max == n_min:
        return 1.0
    lo, hi = math.log(1e-6), math.log(1e6)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _real_counts(k, n_max, n_min, math.exp(mid)).sum() > total:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def largest_remainder(real: np.ndarray, total: int) -> np.ndarray:
    """[K] int64 counts summing to ``total``: floors of ``real`` plus one for the largest fractional parts (ties by
    index). ``real`` [K] must sum to within K of ``total``."""
    base = np.floor(real).astype(np.int64)
    short = int(total - base.sum())
    if not 0 <= short <= real.size:
        raise ValueError(f"cannot round {real.sum():.1f} to {total}")
    order = np.argsort(-(real - base), kind="stable")
    base[order[:short]] += 1
    return base


def long_tail_counts(k: int, total: int, n_max: int, n_min: int, p: float | None = None) -> np.ndarray:
    """[K] int64, non-increasing, counts[0] == n_max, counts[-1] == n_min, sum == total exactly (class 0 the head).

    ``p`` None: solved from the total (see the module docstring). Raises ValueError when no such counts exist."""
    if (why := feasible(k, total, n_max, n_min)) is not None:
        raise ValueError(why)
    if p is None:
        p = tail_exponent(k, total, n_max, n_min)
    real = _real_counts(k, n_max, n_min, p)
    real *= total / real.sum()  # the bisection leaves a residue far below one image; scale it away
    real[0], real[-1] = n_max, n_min  # pinned ends (the rescale moved them by a hair)
    counts = largest_remainder(real, total)
    counts = np.sort(counts)[::-1].copy()
    # Interior reals lie strictly between the ends, so their floors plus one stay within [n_min, n_max]; the ends are
    # whole numbers and are never rounded up. A violation here is a bug, not bad input.
    if counts[0] != n_max or counts[-1] != n_min or counts.sum() != total:
        raise RuntimeError(f"long tail rounding failed: {counts[0]}..{counts[-1]}, sum {counts.sum()}")
    return counts


def scaled(n: int, scale: float, floor: int = 1) -> int:
    """``n * scale`` rounded half up, at least ``floor`` (a split never vanishes)."""
    return max(floor, int(math.floor(n * scale + 0.5)))


def train_profile(k_published: int, total: int, n_max: int, n_min: int, scale: float = 1.0,
                  classes: int | None = None) -> np.ndarray:
    """[K] sorted train counts (head first) of a published long tail at ``scale`` over ``classes`` classes.

    scale: total, max and min are multiplied by it; every class keeps at least one image (so the total is at least
    K), and max shrinks if the total cannot hold it; when the scaled total is below K, each class's own count is
    scaled instead (at least one), so the head keeps its shape. classes: K' classes share the same total; the published ratio
    n_max / n_min and the tail exponent p are kept, the minimum chosen so the profile sums to the total (clamped to
    1 and the ratio narrowed where it does not fit)."""
    k = classes or k_published
    ratio = n_max / n_min
    p = tail_exponent(k_published, total, n_max, n_min)
    if (classes is None or classes == k_published) and scaled(total, scale) < k:
        # Fewer images than classes: an exact total would be one image per class, no tail left (and nothing for a
        # reader that carves val from train, like iNaturalist's). Each class's count is scaled on its own instead,
        # at least one: the head keeps its shape and the total exceeds the scaled figure.
        published = long_tail_counts(k, total, n_max, n_min, p)
        return np.maximum(1, np.floor(published * scale + 0.5)).astype(np.int64)
    t = scaled(total, scale, floor=k)
    if classes is None or classes == k_published:
        lo = max(1, int(math.floor(n_min * scale + 0.5)))
        hi = max(lo, int(math.floor(n_max * scale + 0.5)))
    else:  # same shape: n_min * sum_c ratio^f(x_c) = t
        per_min = t / _real_counts(k, ratio, 1.0, p).sum()
        if per_min >= 1:
            lo = int(math.floor(per_min + 0.5))
            hi = max(lo, int(math.floor(lo * ratio + 0.5)))
        else:  # the ratio does not fit above one image per class: narrow it until sum_c r^f(x_c) = t
            lo, r_lo, r_hi = 1, 1.0, ratio
            for _ in range(100):
                mid = 0.5 * (r_lo + r_hi)
                r_lo, r_hi = (mid, r_hi) if _real_counts(k, mid, 1.0, p).sum() < t else (r_lo, mid)
            hi = max(1, int(math.floor(r_lo + 0.5)))
    hi = min(hi, t - (k - 1) * lo)  # room for every other class at the minimum
    if hi < lo:  # not even the minimum fits everywhere: one image per class, the rest on top
        lo = max(1, t // k)
        hi = min(t - (k - 1) * lo, max(lo, hi))
    if lo + (k - 1) * hi < t:  # a flat profile at max still falls short (ratio too narrow): widen the head
        hi = -(-(t - lo) // (k - 1))
    return long_tail_counts(k, t, hi, lo)


def spread(total: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[K] int64 counts summing to ``total`` as evenly as possible: total // K each, and the remainder (or, with
    fewer images than classes, every image) one per class on evenly spaced classes from a seeded offset."""
    counts = np.full(k, total // k, dtype=np.int64)
    extra = total % k
    if extra:
        offset = rng.random()
        picks = np.floor((np.arange(extra) + offset) * k / extra).astype(np.int64)
        counts[np.minimum(picks, k - 1)] += 1
    return counts


def proportional(total: int, weights: np.ndarray) -> np.ndarray:
    """[K] int64 counts summing to ``total`` in proportion to ``weights`` [K] (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    return largest_remainder(w * (total / w.sum()), total)
