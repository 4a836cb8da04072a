"""Label noise: realised rates, the exact asymmetric map, determinism, no mutation of the input."""

import numpy as np
import pytest

from rwray.data.noise import asymmetric_map, corrupt_labels

N = 20000


def _labels(num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, size=N)  # [N] int64


def _tolerance(rate: float, n: int) -> float:
    # Flips are Bernoulli(rate) per sample, so the realised fraction has std sqrt(rate(1-rate)/n) (0.0032 for
    # rate 0.3, n 20000). 5 std: a correct implementation fails with probability < 1e-6 for any seed, while a
    # biased one (e.g. a symmetric flip that may land on the same class, realising rate * (C-1)/C = 0.27) fails.
    return 5 * np.sqrt(rate * (1 - rate) / n)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.6])
def test_symmetric_rate_and_never_self(rate):
    y = _labels(10)
    noisy = corrupt_labels(y, 10, "symmetric", rate, np.random.default_rng(1))
    flipped = noisy != y
    assert abs(flipped.mean() - rate) < _tolerance(rate, N)
    # Flipped samples spread over the 9 other classes: every (true, noisy) off-diagonal pair occurs.
    pairs = np.zeros((10, 10), dtype=int)
    np.add.at(pairs, (y[flipped], noisy[flipped]), 1)
    assert np.all(pairs[~np.eye(10, dtype=bool)] > 0) and np.all(np.diag(pairs) == 0)
    assert noisy.min() >= 0 and noisy.max() < 10


def test_symmetric_never_maps_to_itself_even_at_rate_one():
    y = _labels(3)
    noisy = corrupt_labels(y, 3, "symmetric", 1.0, np.random.default_rng(0))
    assert np.all(noisy != y)


def test_asymmetric_cifar10_map_is_exact():
    table = asymmetric_map(10)
    expected = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3, 0: 0, 1: 1, 6: 6, 7: 7, 8: 8}
    assert {c: int(table[c]) for c in range(10)} == expected
    y = _labels(10)
    noisy = corrupt_labels(y, 10, "asymmetric", 0.4, np.random.default_rng(2))
    changed = noisy != y
    # every change follows the table, and the unmapped classes never change
    np.testing.assert_array_equal(noisy[changed], table[y[changed]])
    assert not np.any(changed & np.isin(y, [0, 1, 6, 7, 8]))
    mapped = np.isin(y, list(range(2, 6)) + [9])
    assert abs(changed[mapped].mean() - 0.4) < _tolerance(0.4, int(mapped.sum()))


def test_asymmetric_other_class_counts_shift_by_one():
    np.testing.assert_array_equal(asymmetric_map(4), [1, 2, 3, 0])
    y = _labels(7)
    noisy = corrupt_labels(y, 7, "asymmetric", 0.25, np.random.default_rng(3))
    changed = noisy != y
    np.testing.assert_array_equal(noisy[changed], (y[changed] + 1) % 7)
    assert abs(changed.mean() - 0.25) < _tolerance(0.25, N)


@pytest.mark.parametrize("kind", ["symmetric", "asymmetric"])
def test_seeded_determinism_and_input_untouched(kind):
    y = _labels(10)
    before = y.copy()
    a = corrupt_labels(y, 10, kind, 0.3, np.random.default_rng(5))
    b = corrupt_labels(y, 10, kind, 0.3, np.random.default_rng(5))
    c = corrupt_labels(y, 10, kind, 0.3, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(y, before)
    assert a is not y and a.dtype == np.int64


def test_rate_zero_is_identity_and_bad_inputs_raise():
    y = _labels(10)
    np.testing.assert_array_equal(corrupt_labels(y, 10, "symmetric", 0.0, np.random.default_rng(0)), y)
    with pytest.raises(ValueError, match="rate"):
        corrupt_labels(y, 10, "symmetric", 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="labels must lie"):
        corrupt_labels(np.array([0, 10]), 10, "symmetric", 0.1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown label noise"):
        corrupt_labels(y, 10, "pairflip", 0.1, np.random.default_rng(0))  # type: ignore[arg-type]
