"""Long-tail counts pinned to the CIFAR-LT reference numbers, and the seeded per-class selection."""

import numpy as np
import pytest

from rwray.data.longtail import longtail_counts, select_per_class


def test_cifar10_exp_counts_match_the_reference_repos():
    assert longtail_counts(5000, 10, "exp", 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert longtail_counts(5000, 10, "exp", 200) == [5000, 2775, 1540, 854, 474, 263, 146, 81, 45, 25]
    assert sum(longtail_counts(5000, 10, "exp", 100)) == 12406  # the CIFAR-10-LT size quoted in LDAM-DRW


def test_cifar100_exp_totals_match_the_reference_repos():
    c100 = longtail_counts(500, 100, "exp", 100)
    assert len(c100) == 100 and c100[0] == 500 and c100[-1] == 5
    assert sum(c100) == 10847
    assert sum(longtail_counts(500, 100, "exp", 200)) == 9502


def test_step_counts_by_hand():
    # 5 head classes keep 5000, 5 tail classes get int(5000 / 10) = 500.
    assert longtail_counts(5000, 10, "step", 10) == [5000] * 5 + [500] * 5
    # odd C: C // 2 = 2 head classes; int(7 / 3) = 2 (truncation, not rounding).
    assert longtail_counts(7, 5, "step", 3) == [7, 7, 2, 2, 2]


def test_none_and_edge_cases():
    assert longtail_counts(123, 4, "none", 50) == [123] * 4
    assert longtail_counts(10, 3, "exp", 1) == [10, 10, 10]  # factor 1 = balanced
    assert longtail_counts(10, 1, "exp", 100) == [10]  # one class: no division by C - 1 = 0
    with pytest.raises(ValueError, match="factor"):
        longtail_counts(10, 3, "exp", 0.5)
    with pytest.raises(ValueError, match="unknown imbalance"):
        longtail_counts(10, 3, "linear", 2)  # type: ignore[arg-type]


def test_exp_counts_are_non_increasing_and_end_at_n_max_over_factor():
    for c, f in [(10, 10), (10, 50), (100, 10), (37, 3.5)]:
        counts = longtail_counts(1000, c, "exp", f)
        assert all(a >= b for a, b in zip(counts, counts[1:]))
        assert counts[0] == 1000 and counts[-1] == int(1000 / f + 1e-9)


def test_select_per_class_counts_sorted_and_deterministic():
    labels = np.repeat(np.arange(4), 50)[np.random.default_rng(1).permutation(200)]  # [200], 50 per class, shuffled
    counts = [50, 20, 5, 0]
    a = select_per_class(labels, counts, np.random.default_rng(7))
    b = select_per_class(labels, counts, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and np.all(np.diff(a) > 0)  # sorted, unique
    np.testing.assert_array_equal(np.bincount(labels[a], minlength=4), counts)
    c = select_per_class(labels, counts, np.random.default_rng(8))
    assert not np.array_equal(a, c)  # another seed, another subset (of the classes that are subsampled)


def test_select_per_class_takes_all_when_a_class_is_short():
    labels = np.array([0, 0, 0, 1, 1, 2])
    idx = select_per_class(labels, [2, 10, 10], np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=3), [2, 2, 1])  # capped at what exists
    assert set(idx[labels[idx] == 1]) == {3, 4}


def test_select_per_class_ignores_labels_beyond_counts_and_rejects_bad_input():
    labels = np.array([0, 1, 2, 2])
    idx = select_per_class(labels, [1, 1], np.random.default_rng(0))  # class 2 has no count: never chosen
    np.testing.assert_array_equal(idx, [0, 1])
    with pytest.raises(ValueError, match="negative"):
        select_per_class(labels, [1, -1], np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        select_per_class(labels.reshape(2, 2), [1], np.random.default_rng(0))
