"""The streaming epoch plan (rwray.train.plan): a pure function of (seed, epoch, row groups, world size) whose ranks
are disjoint, equal and cover the epoch, and whose resume — same world size or another — neither loses nor repeats
a row."""

from __future__ import annotations

import numpy as np
import pytest

from rwray.train import plan

GROUPS = [8, 8, 8, 8, 8, 8, 8, 5, 8, 8, 3]  # rows per row group, as files end with a short group


def test_same_inputs_same_plan_and_epochs_differ():
    a = plan.epoch_plan(0, 3, GROUPS, 2)
    b = plan.epoch_plan(0, 3, GROUPS, 2)
    assert all((x == y).all() for x, y in zip(a, b))
    c = plan.epoch_plan(0, 4, GROUPS, 2)
    assert not all((x == y).all() for x, y in zip(a, c))
    assert not all((x == y).all() for x, y in zip(a, plan.epoch_plan(1, 3, GROUPS, 2)))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_ranks_are_disjoint_equal_and_cover_all_but_world_minus_one(world):
    total = sum(GROUPS)
    p = plan.epoch_plan(5, 0, GROUPS, world)
    lengths = {len(x) for x in p}
    assert lengths == {total // world}  # equal steps on every rank (DDP)
    ids = np.concatenate(p)
    assert len(np.unique(ids)) == len(ids)  # disjoint
    assert total - len(ids) == total % world <= world - 1  # at most world - 1 rows left out
    assert ids.min() >= 0 and ids.max() < total


def test_ranks_read_whole_groups_in_a_seeded_order():
    """Rank r's rows come group by group: every group but the ones cut to balance ranks is read by one rank, whole,
    in an order within the group drawn from (seed, epoch, group)."""
    off = plan.offsets(GROUPS)
    p = plan.epoch_plan(2, 1, GROUPS, 2)
    readers: dict[int, set[int]] = {}
    for r, ids in enumerate(p):
        for g, rows in plan.pieces(ids, off):
            readers.setdefault(g, set()).add(r)
            assert (rows < GROUPS[g]).all()
    assert sum(len(v) > 1 for v in readers.values()) <= 1  # at most the balancing cut is shared
    (first_group, first_rows), *_ = plan.pieces(p[0], off)
    expect = np.random.default_rng((2, 1, first_group)).permutation(GROUPS[first_group])
    assert (first_rows == expect[:len(first_rows)]).all()


def test_pieces_round_trip():
    off = plan.offsets(GROUPS)
    ids = plan.epoch_plan(0, 0, GROUPS, 1)[0]
    back = np.concatenate([off[g] + rows for g, rows in plan.pieces(ids, off)])
    assert (back == ids).all()
    assert list(plan.pieces(np.zeros(0, np.int64), off)) == []


def test_same_world_resume_continues_each_ranks_order():
    p = plan.epoch_plan(0, 2, GROUPS, 2)
    left = plan.current(lambda w: plan.epoch_plan(0, 2, GROUPS, w), plan.resume_stages([(2, 10)], 2))
    assert all((l == x[10:]).all() for l, x in zip(left, p))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_changed_world_resume_loses_and_repeats_nothing(before, after):
    """Rows consumed before the change + rows after it = the uninterrupted epoch, no row twice; only the rows that
    do not divide by the new world size (< after) may be left out."""
    plan_for = lambda w: plan.epoch_plan(0, 2, GROUPS, w)  # noqa: E731
    full = np.concatenate(plan_for(before))
    consumed = 8
    done = np.concatenate([x[:consumed] for x in plan_for(before)])
    left = plan.current(plan_for, plan.resume_stages([(before, consumed)], after))
    assert {len(x) for x in left} == {(len(full) - len(done)) // after}
    seen = np.concatenate([done, *left])
    assert len(np.unique(seen)) == len(seen)
    assert set(full) - set(seen) == set() if (len(full) - len(done)) % after == 0 else \
        len(set(full) - set(seen)) < after


def test_resume_of_a_resume_2_1_2():
    plan_for = lambda w: plan.epoch_plan(7, 0, GROUPS, w)  # noqa: E731
    full = set(np.concatenate(plan_for(2)).tolist())
    first = [x[:6] for x in plan_for(2)]
    stages = plan.resume_stages([(2, 6)], 1)  # continued on one worker, which consumed 10 more rows
    second = plan.current(plan_for, stages)[0][:10]
    stages = plan.resume_stages([*stages[:-1], (1, 10)], 2)  # then on two again
    rest = plan.current(plan_for, stages)
    seen = np.concatenate([*first, second, *rest])
    assert len(np.unique(seen)) == len(seen)
    assert set(seen.tolist()) == full  # here every split divides: nothing left out


def test_eval_groups_partition():
    for world in (1, 2, 3):
        got = sorted(g for r in range(world) for g in plan.eval_groups(10, r, world))
        assert got == list(range(10))
