"""Colour-biased digits (Biased MNIST of Bahng et al., ICML 2020), seeded.

Each grey digit image is binarised (pixel > threshold: digit) and drawn in white on a coloured background. Class c has
its own colour COLOURS[c]; a fraction ρ of each class's samples get it, and the rest are dealt over the other nine
colours. So the colour predicts the label with probability ≈ ρ, and a network that reads the background instead of
the shape is right on ρ of the training data. ρ = 1 makes the colour a perfect shortcut ("biased" test set); ρ = 0.1
makes every colour equally likely for every class ("unbiased" test set).

Construction per class c with n_c samples (exact, not sampled):
  n_own = round_half_up(ρ · n_c) samples, chosen uniformly at random, get colour c;
  the other n_c − n_own are dealt round-robin over the nine other colours in a random order of those colours, so
  each of them gets ⌊(n_c − n_own)/9⌋ or one more.
The bias attribute (colour index, 0..9) is returned alongside and is stored as the shard column `bias`.
The reference implementation draws colours without a seed; here one numpy Generator drives every choice.
"""

from __future__ import annotations

import math

import numpy as np

from rwray.errors import DataError

# RGB background colour of each class, in class order.
COLOURS = np.array(
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (225, 225, 0), (225, 0, 225),
     (0, 255, 255), (255, 128, 0), (255, 0, 128), (128, 0, 255), (128, 128, 128)],
    dtype=np.uint8,
)  # [10, 3]
NUM_COLOURS = len(COLOURS)
WHITE = 255


def own_colour_count(n: int, rho: float) -> int:
    """round_half_up(ρ·n); the 1e-9 slack keeps e.g. 0.995 · 100 = 99.4999... (binary ρ) at its decimal 99.5 -> 100."""
    return min(n, int(math.floor(rho * n + 0.5 + 1e-9)))


def assign_colours(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """[N] int64 labels in [0, 10) -> [N] int64 colour index per sample (see the module docstring)."""
    if not 0.0 <= rho <= 1.0:
        raise DataError(f"rho must be in [0, 1], got {rho}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_COLOURS):
        raise DataError(f"colour bias needs labels in [0, {NUM_COLOURS}) (one colour per class), got "
                        f"[{labels.min()}, {labels.max()}]")
    colours = np.empty(labels.shape[0], dtype=np.int64)
    for c in range(NUM_COLOURS):
        members = rng.permutation(np.flatnonzero(labels == c))  # [n_c] in random order
        n_own = own_colour_count(members.size, rho)
        colours[members[:n_own]] = c
        others = rng.permutation(np.array([k for k in range(NUM_COLOURS) if k != c], dtype=np.int64))  # [9]
        colours[members[n_own:]] = np.resize(others, members.size - n_own)  # cyclic: counts differ by at most 1
    return colours


def colourise(gray: np.ndarray, colours: np.ndarray, threshold: int = 0) -> np.ndarray:
    """[N, H, W] uint8 grey digits, [N] colour index -> [N, 3, H, W] uint8: white digit on its colour background."""
    if gray.ndim != 3 or gray.dtype != np.uint8:
        raise DataError(f"colourise needs uint8 [N, H, W] grey images, got {gray.dtype} {list(gray.shape)}")
    digit = gray > threshold  # [N, H, W] binarised
    background = COLOURS[colours][:, :, None, None]  # [N, 3, 1, 1]
    return np.where(digit[:, None], np.uint8(WHITE), background).astype(np.uint8)  # [N, 3, H, W]


def biased_sets(
    train_gray: np.ndarray, train_labels: np.ndarray, test_gray: np.ndarray, test_labels: np.ndarray,
    rho: float, unbiased_rho: float, seed: int, threshold: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train": train pool at ρ, "test": biased test set (ρ = 1), "test_unbiased": the same test images at
    unbiased_rho}, each (images [N, 3, H, W] uint8, labels [N] int64, colour [N] int64). Independent random streams
    per set, so changing ρ of training never changes the test sets."""
    train_rng, test_rng, unbiased_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    out = {}
    for name, gray, labels, r, rng in (("train", train_gray, train_labels, rho, train_rng),
                                       ("test", test_gray, test_labels, 1.0, test_rng),
                                       ("test_unbiased", test_gray, test_labels, unbiased_rho, unbiased_rng)):
        labels = labels.astype(np.int64)
        colours = assign_colours(labels, r, rng)
        out[name] = (colourise(gray, colours, threshold), labels, colours)
    return out


def recolour(gray: np.ndarray, labels: np.ndarray, rho: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, H, W] uint8 grey digits of the train pool, [n] labels -> ([n, 3, H, W] images, [n] colour index) at ρ,
    drawn from a fourth stream of ``seed`` (the three of `biased_sets` stay as they are): how a validation split
    carved from train gets the test sets' construction (e.g. ρ = 0.1, unbiased)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])
    colours = assign_colours(labels.astype(np.int64), rho, rng)
    return colourise(gray, colours), colours
