"""Long-tailed class counts and the seeded per-class subsampling that realises them (pure numpy).

The counts follow the CIFAR-LT convention of the LDAM-DRW / BBN / ABSGD reference code, so that "CIFAR-10-LT with
imbalance factor 100" means the same 12406 training images here as in the papers being reproduced.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

ImbalanceKind = Literal["none", "exp", "step"]


def longtail_counts(n_max: int, num_classes: int, kind: ImbalanceKind, factor: float) -> list[int]:
    """Training samples per class for a long-tailed split; class 0 is the head, class C-1 the tail.

    - ``exp``:  n_c = int(n_max * factor ** (-c / (C - 1)))  — geometric decay from n_max down to n_max / factor.
    - ``step``: the first C // 2 classes keep n_max, the rest get int(n_max / factor).
    - ``none``: n_max for every class.

    ``factor`` is the imbalance factor n_max / n_min (>= 1). ``int`` truncates (not rounds), as the reference code
    does; that is what makes CIFAR-10 IF=100 end at exactly 50.
    """
    if n_max < 0:
        raise ValueError(f"n_max must be >= 0, got {n_max}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if factor < 1:
        raise ValueError(f"imbalance factor must be >= 1 (n_max / n_min), got {factor}")
    if kind == "none":
        return [int(n_max)] * num_classes
    if kind == "exp":
        if num_classes == 1:  # C - 1 == 0: a single class is its own head
            return [int(n_max)]
        return [int(n_max * factor ** (-c / (num_classes - 1))) for c in range(num_classes)]
    if kind == "step":
        head = num_classes // 2
        return [int(n_max)] * head + [int(n_max / factor)] * (num_classes - head)
    raise ValueError(f"unknown imbalance kind {kind!r}; choose one of: none, exp, step")


def select_per_class(labels: np.ndarray, counts: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Indices into ``labels`` keeping ``counts[c]`` samples of every class c, sorted ascending.

    labels: [N] integer class ids. Each class's indices are shuffled with ``rng`` (one permutation per class, in
    class order, so the result is a pure function of the generator's seed) and the first counts[c] are kept.

    If class c has fewer than counts[c] samples available, all of them are kept (the count is a cap, not a
    promise); callers that need exact counts compare ``np.bincount(labels[result])`` with ``counts``.
    Samples whose label is not in [0, len(counts)) are never selected.
    Returns: [sum_c min(counts[c], available_c)] int64, sorted ascending.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    picked: list[np.ndarray] = []
    for c, want in enumerate(counts):
        if want < 0:
            raise ValueError(f"counts[{c}] is negative ({want})")
        members = np.flatnonzero(labels == c)  # [n_c] ascending positions of class c
        # Always draw the permutation (even when want covers the whole class) so the generator advances the same way
        # whatever the counts are: class c's choice then depends only on the seed, not on earlier classes' counts.
        shuffled = rng.permutation(members)
        picked.append(shuffled[: int(want)])
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64, copy=False)
