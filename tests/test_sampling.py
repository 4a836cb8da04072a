"""Samplers: class probabilities against Kang et al.'s formulas, exact quotas, and epoch lists that are a function of
(seed, epoch) dealt to any number of workers."""

from __future__ import annotations

import math

import pytest
import torch

from rwray.train.batches import _order_seed, epoch_order, global_order
from rwray.train.sampling import class_probabilities, class_quotas, epoch_positions

COUNTS = [100, 30, 10, 0, 3]  # class 3 has no training sample
LABELS = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])[torch.randperm(143, generator=torch.Generator().manual_seed(0))]


def probs(sampler, epoch=0, epochs=1):
    return class_probabilities(torch.tensor(COUNTS), sampler, epoch, epochs).tolist()


def test_class_probabilities_are_kangs_formulas():
    n, present = sum(COUNTS), [c > 0 for c in COUNTS]
    assert probs("uniform") == pytest.approx([c / n for c in COUNTS])
    assert probs("class_balanced") == pytest.approx([p / 4 for p in present])
    root = [math.sqrt(c) for c in COUNTS]
    assert probs("sqrt") == pytest.approx([r / sum(root) for r in root])
    for t, big_t in ((0, 10), (3, 10), (9, 10)):  # (1 - t/T) * n_c / N + t/T * 1/C over the present classes
        want = [(1 - t / big_t) * c / n + t / big_t * p / 4 for c, p in zip(COUNTS, present)]
        assert probs("progressive", t, big_t) == pytest.approx(want)
    assert probs("progressive", 0, 10) == pytest.approx(probs("uniform"))
    with pytest.raises(ValueError, match="unknown sampler"):
        probs("square")


def test_quotas_are_largest_remainders_summing_to_the_total():
    # 10 * [0.25, 0.25, 0.25, 0.25] = 2.5 each: the two remainders go to the lowest class ids
    assert class_quotas(torch.tensor([0.25] * 4), 10).tolist() == [3, 3, 2, 2]
    # 7 * [0.5, 0.3, 0.2] = 3.5, 2.1, 1.4 -> floors 3, 2, 1 and one more to the largest remainder (class 0)
    assert class_quotas(torch.tensor([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    q = class_quotas(class_probabilities(torch.tensor(COUNTS), "sqrt"), 143)
    assert int(q.sum()) == 143 and q[3] == 0


@pytest.mark.parametrize("sampler", ["class_balanced", "sqrt", "progressive"])
def test_an_epoch_fills_its_quotas_exactly_and_repeats_members_evenly(sampler):
    g = torch.Generator().manual_seed(1)
    pos = epoch_positions(LABELS, 5, sampler, g, epoch=4, epochs=10)
    assert len(pos) == len(LABELS)
    quota = class_quotas(class_probabilities(torch.tensor(COUNTS), sampler, 4, 10), len(LABELS))
    assert torch.bincount(LABELS[pos], minlength=5).tolist() == quota.tolist()
    for c, n in enumerate(COUNTS):  # a class drawn q times repeats each of its n members floor or ceil(q / n) times
        if n == 0:
            continue
        seen = torch.bincount(pos[LABELS[pos] == c], minlength=len(LABELS))[LABELS == c]
        q = int(quota[c])
        assert int(seen.min()) >= q // n and int(seen.max()) <= -(-q // n)


def test_uniform_is_the_permutation_rwray_always_drew():
    """The uniform order is torch.randperm(N) of the (seed, epoch) generator, cut to the workers: runs made before
    samplers existed keep their data order."""
    for world in (1, 2, 3):
        want = torch.randperm(143, generator=torch.Generator().manual_seed(_order_seed(7, 2)))[:(143 // world) * world]
        assert torch.equal(global_order(LABELS, 7, 2, world), want)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_workers_split_one_epoch_list_disjointly_with_exact_quotas(world):
    parts = [epoch_order(LABELS, 7, 2, r, world, "class_balanced", 10, 5) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # the same number of steps on every rank
    dealt = torch.stack(parts, 1).flatten()  # rank r took entries r, r + world, ...
    assert torch.equal(dealt, global_order(LABELS, 7, 2, world, "class_balanced", 10, 5))
    total = (143 // world) * world
    quota = class_quotas(class_probabilities(torch.tensor(COUNTS), "class_balanced"), total)
    assert torch.bincount(LABELS[dealt], minlength=5).tolist() == quota.tolist()


def test_the_epoch_list_is_a_function_of_seed_and_epoch():
    a = global_order(LABELS, 7, 2, 2, "sqrt", 10, 5)
    assert torch.equal(a, global_order(LABELS, 7, 2, 2, "sqrt", 10, 5))  # a restarted epoch replays
    assert not torch.equal(a, global_order(LABELS, 7, 3, 2, "sqrt", 10, 5))
    assert not torch.equal(a, global_order(LABELS, 8, 2, 2, "sqrt", 10, 5))
