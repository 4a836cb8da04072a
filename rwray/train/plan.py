"""The epoch plan of the streaming input: which train rows each rank reads, in which order. A pure function of
(seed, epoch, the split's row groups, world size) — no Ray, no files — so every rank computes the same plan, a
restarted worker group computes it again, and a resumed epoch continues it exactly.

Rows are named by their global row id in storage order (row group u holds ids offsets[u] .. offsets[u] + rows[u]).

- Group order: a permutation from ``default_rng((seed, epoch))``; rows inside group u: ``default_rng((seed, epoch,
  u))``. The writer placed samples in groups by a seeded permutation, so a group is a random sample of the split and
  shuffling groups plus rows within them is a shuffle a reader can do one row group at a time.
- Dealing: each group in that order goes to the rank holding the fewest rows so far (ties: the lowest rank), so
  ranks read whole groups and are within one group's size of each other; then every rank is cut to the same
  number of rows (DDP needs equal steps) and the cut rows top up the ranks below that number. Per epoch at most
  world - 1 rows are left out, a different handful each epoch.
- Resume: a checkpoint taken after `consumed` rows of every rank continues with `remaining(...)`: with the same
  world size each rank's rows after its first `consumed`; with another world size the rows nobody consumed,
  re-dealt in contiguous equal shares (at most new_world - 1 left out: none when shrinking 2 -> 1).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

PLAN_VERSION = 1  # bump when the plan a (seed, epoch, groups, world) gives changes: old checkpoints then restart


def offsets(group_rows: Sequence[int]) -> np.ndarray:
    """[G + 1] int64: the first global row id of each row group, then the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(group_rows, dtype=np.int64))])


def epoch_plan(seed: int, epoch: int, group_rows: Sequence[int], world: int) -> list[np.ndarray]:
    """Every rank's global row ids for the epoch, in reading order: ``world`` arrays of equal length."""
    off = offsets(group_rows)
    order = np.random.default_rng((seed, epoch)).permutation(len(group_rows))  # [G]
    held = np.zeros(world, dtype=np.int64)
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    for u in order:
        r = int(np.argmin(held))  # first minimum: ties go to the lowest rank
        rows = np.random.default_rng((seed, epoch, int(u))).permutation(int(group_rows[u]))
        parts[r].append(off[u] + rows)
        held[r] += group_rows[u]
    flat = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
    return balance(flat)


def balance(ranks: list[np.ndarray]) -> list[np.ndarray]:
    """Equal lengths (total // world each): rows past that length on one rank move, in order, to the ends of the
    ranks short of it; the total % world rows left over are dropped."""
    world = len(ranks)
    target = sum(len(r) for r in ranks) // world
    surplus = np.concatenate([r[target:] for r in ranks] + [np.zeros(0, np.int64)])
    out, taken = [], 0
    for r in ranks:
        need = target - min(len(r), target)
        out.append(np.concatenate([r[:target], surplus[taken:taken + need]]).astype(np.int64))
        taken += need
    return out


def remaining(plan: list[np.ndarray], consumed: int, world: int) -> list[np.ndarray]:
    """What is left of an epoch after every rank of ``plan`` consumed its first ``consumed`` rows, for ``world``
    ranks (the same or another number)."""
    if world == len(plan):
        return [p[consumed:] for p in plan]
    rest = np.concatenate([p[consumed:] for p in plan] + [np.zeros(0, np.int64)])
    share = len(rest) // world
    return [rest[r * share:(r + 1) * share] for r in range(world)]


def pieces(ids: np.ndarray, off: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """A rank's row ids -> (row group, rows inside it) in reading order: consecutive ids of one group form a piece."""
    if not len(ids):
        return
    group = np.searchsorted(off, ids, side="right") - 1  # [n] the row group of each id
    cuts = np.flatnonzero(np.diff(group)) + 1
    for chunk, g in zip(np.split(ids, cuts), group[np.concatenate([[0], cuts])]):
        yield int(g), chunk - off[g]


def eval_groups(num_groups: int, rank: int, world: int) -> list[int]:
    """An eval split's row groups this rank scores: u % world == rank, in storage (canonical) order. Disjoint, and
    together every group: each sample is scored exactly once."""
    return list(range(rank, num_groups, world))


# ----------------------------------------------------------------------------------------- where an epoch stands

Stages = list[tuple[int, int]]  # [(world size, rows each rank consumed of that stage's plan)], oldest first


def current(plan_for: Callable[[int], list[np.ndarray]], stages: Stages) -> list[np.ndarray]:
    """Each rank's rows still to read in the latest stage. ``plan_for(world)`` is the epoch's full plan for a world
    size; every later stage is what the one before it left (`remaining`) re-dealt to that stage's world size, so a
    resume of a resume (2 -> 1 -> 2 workers) neither loses nor repeats a row, and a resume with an unchanged world
    size continues every rank's own order."""
    p = plan_for(stages[0][0])
    for (_, consumed), (world, _) in zip(stages, stages[1:]):
        p = remaining(p, consumed, world)
    consumed = stages[-1][1]
    return [x[consumed:] for x in p]


def resume_stages(stages: Stages | None, world: int) -> Stages:
    """The stages an attempt with ``world`` ranks continues from a checkpoint's (None: a fresh epoch)."""
    if not stages:
        return [(world, 0)]
    stages = [(int(w), int(c)) for w, c in stages]
    return stages if stages[-1][0] == world else [*stages, (world, 0)]
