"""Synthetic label noise for the noisy-label experiments (pure numpy).

Both kinds flip each sample independently with probability ``rate`` (a Bernoulli mask, so the realised flip count
is Binomial(N, rate), not exactly rate * N). The clean labels are kept by the caller in a ``clean_label`` column.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

NoiseKind = Literal["symmetric", "asymmetric"]

# The usual CIFAR-10 class-dependent confusions (Patrini et al. 2017): truck -> automobile, bird -> airplane,
# deer -> horse, cat <-> dog. Other classes map to themselves, i.e. are never corrupted.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


def asymmetric_map(num_classes: int) -> np.ndarray:
    """[C] int64 target class for each class under asymmetric noise."""
    if num_classes == 10:
        table = np.arange(10, dtype=np.int64)
        for src, dst in CIFAR10_ASYMMETRIC.items():
            table[src] = dst
        return table
    return (np.arange(num_classes, dtype=np.int64) + 1) % num_classes  # c -> c + 1 (mod C)


def corrupt_labels(
    labels: np.ndarray, num_classes: int, kind: NoiseKind, rate: float, rng: np.random.Generator
) -> np.ndarray:
    """A new [N] int64 array of noisy labels; ``labels`` itself is not modified.

    - symmetric: with probability ``rate`` a sample gets a class drawn uniformly from the C - 1 *other* classes.
    - asymmetric: with probability ``rate`` a sample of class c becomes ``asymmetric_map(C)[c]`` (the CIFAR-10
      pairs when C == 10, else c + 1 mod C).
    """
    y = np.asarray(labels).astype(np.int64, copy=True)  # copy: never write through to the caller's array
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    flip = rng.random(y.shape[0]) < rate  # [N] bool Bernoulli(rate) mask
    if kind == "symmetric":
        # Adding an offset in [1, C-1] modulo C gives each of the other C-1 classes with equal probability and
        # can never land on the original class.
        offsets = rng.integers(1, num_classes, size=int(flip.sum()))  # [n_flip]
        y[flip] = (y[flip] + offsets) % num_classes
        return y
    if kind == "asymmetric":
        table = asymmetric_map(num_classes)  # [C]
        y[flip] = table[y[flip]]
        return y
    raise ValueError(f"unknown label noise kind {kind!r}; choose one of: symmetric, asymmetric")
