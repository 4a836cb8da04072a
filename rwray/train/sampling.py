"""Which training samples an epoch visits: the samplers of the long-tail literature, as pure functions of
(labels, seed, epoch), so that every worker computes the same epoch list and a restarted epoch replays it.

Kang et al. ("Decoupling representation and classifier", ICLR 2020) write them as class probabilities
p_c ∝ n_c^q: q = 1 instance-balanced (``uniform``: every sample once), q = 0 ``class_balanced``, q = 1/2
``sqrt``; ``progressive`` moves from instance- to class-balanced over training, p_c(t) = (1 − t/T)·n_c/N + t/T·1/C
for epoch t = 0 … T − 1 of T (their formula, t counted from 0).

An epoch keeps the split's length N (cut to a multiple of the worker count). Class c gets exactly its quota
round(N·p_c) (largest remainders, summing to N): no sampling noise in the class mix, whatever the number of
workers. Within a class its members are taken in seeded permutations, one after another (so a class sampled more
than its size repeats each member as evenly as possible), and the whole list is shuffled. The loop deals it to
workers round-robin (`batches.epoch_order`).

A leaf: imports nothing from rwray.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Sampler = Literal["uniform", "class_balanced", "sqrt", "progressive"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)


def class_probabilities(counts: torch.Tensor, sampler: Sampler, epoch: int = 0, epochs: int = 1) -> torch.Tensor:
    """[C] class counts -> [C] float64 probabilities of drawing each class (0 for a class with no sample)."""
    n = counts.to(torch.float64)
    present = (n > 0).to(torch.float64)  # [C]
    if sampler == "uniform":
        p = n
    elif sampler == "class_balanced":
        p = present
    elif sampler == "sqrt":
        p = n.sqrt()
    elif sampler == "progressive":
        t = epoch / max(epochs, 1)  # 0 at the first epoch, (T − 1)/T at the last
        p = (1 - t) * n / n.sum() + t * present / present.sum()
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return p / p.sum()


def class_quotas(probs: torch.Tensor, total: int) -> torch.Tensor:
    """[C] probabilities, N -> [C] int64 sample counts summing to N: floor(N·p_c), the remainder to the largest
    fractional parts (ties to the lower class id)."""
    exact = probs.to(torch.float64) * total  # [C]
    quota = exact.floor().to(torch.int64)
    short = total - int(quota.sum())
    if short > 0:
        frac = exact - quota
        order = sorted(range(len(frac)), key=lambda c: (-float(frac[c]), c))
        quota[order[:short]] += 1
    return quota


def epoch_positions(labels: torch.Tensor, num_classes: int, sampler: Sampler, generator: torch.Generator,
                    epoch: int = 0, epochs: int = 1, total: int | None = None) -> torch.Tensor:
    """[N] labels of the rows (canonical order) -> [total] int64 row positions to train on this epoch, in order
    (total: N by default; the loop asks for a multiple of its worker count). ``uniform`` is the first ``total`` of
    a permutation of all rows (the draw `torch.randperm(N, generator)` makes); the other samplers fill exactly
    their class quotas of ``total``."""
    n = len(labels)
    total = n if total is None else total
    if sampler == "uniform":
        return torch.randperm(n, generator=generator)[:total]
    counts = torch.bincount(labels, minlength=num_classes)  # [C]
    quota = class_quotas(class_probabilities(counts, sampler, epoch, epochs), total)  # [C]
    parts = []
    for c in range(num_classes):
        q = int(quota[c])
        if q == 0:
            continue
        members = torch.nonzero(labels == c).flatten()  # [n_c] positions of class c
        rounds = -(-q // len(members))
        picks = torch.cat([members[torch.randperm(len(members), generator=generator)] for _ in range(rounds)])
        parts.append(picks[:q])
    everything = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # [total]
    return everything[torch.randperm(total, generator=generator)]
