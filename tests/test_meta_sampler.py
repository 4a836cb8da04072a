"""BALMS Meta Sampler as class weights (rwray.methods.meta_sampler): the initial rates, the weights' equivalence to
sampling, the look-ahead gradient against finite differences, the per-class feature bank, the direction of
learning on a long-tailed toy problem, world-size invariance over a real gloo group, and the frozen-features rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwray.datainfo import DataInfo
from rwray.methods import METHODS, StepInputs
from rwray.methods.meta_sampler import (MetaSamplerParams, bank_write, class_weights, initial_logits,
                                        lookahead_meta_loss)


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def test_initial_rates_follow_the_reference_formula():
    counts = torch.tensor([500.0, 100.0, 20.0, 4.0])
    pi = counts.double() / counts.sum()
    for p in (0.0, 0.3, 1.0):
        s = pi.pow(-p)
        expect = s / (s.min() + s.max())
        assert torch.allclose(torch.sigmoid(initial_logits(counts, p)).double(), expect, atol=1e-6)
    assert torch.equal(initial_logits(counts, 0.0), torch.zeros(4))  # pow 0: every rate 1/2, instance-balanced


def test_weighted_uniform_batches_have_the_expected_loss_of_sampling_at_the_rates():
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * 50 + [1] * 10 + [2] * 3)  # the whole training split, N = 63
    counts = torch.bincount(y).float()
    theta = torch.randn(3, generator=g)
    losses = torch.rand(len(y), generator=g, dtype=torch.float64)
    v = class_weights(theta.double(), counts.double())
    rates = torch.sigmoid(theta.double())[y]
    sampled = (rates / rates.sum() * losses).sum()  # E over draws p_i ∝ w_{y_i}
    weighted = (v[y] * losses).mean()  # E over uniform draws, weighted
    assert torch.allclose(weighted, sampled, rtol=1e-12)
    assert torch.allclose(v[y].mean(), torch.tensor(1.0, dtype=torch.float64))  # mean weight over an epoch


def _toy(seed=0, b=24, c=4, d=5):
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, c).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
        head.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    feats = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (b,), generator=g)
    bank = torch.randn(c, 2, d, generator=g, dtype=torch.float64)
    filled = torch.tensor([[True, True], [True, False], [False, False], [True, True]])
    return head, feats, y, bank, filled


def test_the_look_ahead_gradient_matches_finite_differences():
    head, feats, y, bank, filled = _toy()
    counts = torch.tensor([40.0, 20.0, 5.0, 1.0], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    lr = 0.7

    def meta(t):
        return lookahead_meta_loss(head, t, counts, feats, y, ce, lr, bank, filled)

    (grad,) = torch.autograd.grad(meta(theta), theta)
    eps = 1e-6
    numeric = torch.stack([(meta(theta.detach() + eps * e) - meta(theta.detach() - eps * e)) / (2 * eps)
                           for e in torch.eye(4, dtype=torch.float64)])
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-9)
    assert grad.abs().sum() > 0
    # no look-ahead step (α = 0): the meta loss does not depend on θ
    (flat,) = torch.autograd.grad(lookahead_meta_loss(head, theta, counts, feats, y, ce, 0.0, bank, filled), theta,
                                  allow_unused=True)
    assert flat is None or torch.equal(flat, torch.zeros(4, dtype=torch.float64))
    # the meta loss is the class-balanced CE of the bank's filled slots under the stepped head
    assert head.weight.grad is None  # the virtual step never touches the real classifier


def test_the_meta_loss_is_balanced_over_the_filled_slots():
    head, feats, y, bank, filled = _toy(1)
    counts = torch.ones(4, dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64)
    got = lookahead_meta_loss(head, theta, counts, feats, y, ce, 0.0, bank, filled)
    per_class = []
    for c in range(4):
        rows = bank[c][filled[c]]
        if len(rows):
            per_class.append(ce(head(rows), torch.full((len(rows),), c)).mean())
    assert torch.allclose(got, torch.stack(per_class).mean())


def test_the_bank_keeps_the_last_slots_features_of_each_class():
    bank = torch.zeros(3, 2, 1)
    filled = torch.zeros(3, 2, dtype=torch.bool)
    seen = torch.zeros(3, dtype=torch.int64)
    bank_write(bank, filled, seen, torch.tensor([[1.0], [2.0], [3.0], [4.0]]), torch.tensor([0, 1, 0, 0]))
    # class 0 saw 1, 3, 4: with two slots the ring holds 3 and 4 (4 in slot 0, 3 in slot 1); class 1 has 2
    assert bank[0].flatten().tolist() == [4.0, 3.0] and bank[1, 0, 0] == 2.0
    assert seen.tolist() == [3, 1, 0] and filled.tolist() == [[True, True], [True, False], [False, False]]
    bank_write(bank, filled, seen, torch.tensor([[5.0], [6.0]]), torch.tensor([1, 0]))
    assert bank[0].flatten().tolist() == [4.0, 6.0] and bank[1].flatten().tolist() == [2.0, 5.0]
    assert seen.tolist() == [4, 2, 0]


class Net(nn.Module):
    """A frozen 'encoder' (the identity) and a linear classifier `fc`, the shape the method expects."""

    def __init__(self, d, c):
        super().__init__()
        self.fc = nn.Linear(d, c)

    def forward(self, x):
        return self.fc(x)


def _steps(method, net, feats, y, lr, steps):
    for s in range(steps):
        logits = net(feats[s])
        method.step(StepInputs(net, feats[s], y[s], torch.arange(len(y[s])), logits, feats[s], 0, s, lr=lr))


def test_on_a_long_tailed_toy_the_tail_class_gains_weight():
    """Class 1 is rare and the classifier favours class 0 (a large bias): the balanced meta loss falls when the tail
    class counts more, so its rate rises against the head class's."""
    torch.manual_seed(0)
    counts = (90, 10)
    info = DataInfo(2, counts, (1, 1, 1), sum(counts))
    method = METHODS.build(MetaSamplerParams(meta_lr=0.05, loss={"name": "ce"}), info)
    net = Net(2, 2)
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(2))
        net.fc.bias.copy_(torch.tensor([2.0, -2.0]))
    method.attach(net, lambda m: m, torch.device("cpu"))
    centres = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    ys = [torch.tensor([0] * 14 + [1] * 2)[torch.randperm(16)] for _ in range(20)]
    feats = [centres[y] + 0.3 * torch.randn(16, 2) for y in ys]
    v0 = class_weights(method.theta.detach(), method.counts)
    _steps(method, net, feats, ys, lr=0.5, steps=20)
    v = class_weights(method.theta.detach(), method.counts)
    assert v[1] / v[0] > v0[1] / v0[0] * 1.05


def _rank_run(rank, world, feats, ys):
    torch.manual_seed(0)
    info = DataInfo(3, (30, 10, 4), (1, 1, 1), 44)
    method = METHODS.build(MetaSamplerParams(meta_lr=0.05), info)
    net = Net(4, 3)
    method.attach(net, lambda m: m, torch.device("cpu"))
    part = len(ys[0]) // world
    mine = slice(rank * part, (rank + 1) * part)
    _steps(method, net, [f[mine] for f in feats], [y[mine] for y in ys], lr=0.3, steps=len(ys))
    return method.theta.detach()


def test_two_workers_learn_the_rates_one_worker_learns_from_the_whole_batch(gloo):
    g = torch.Generator().manual_seed(1)
    ys = [torch.randint(0, 3, (12,), generator=g) for _ in range(4)]
    feats = [torch.randn(12, 4, generator=g) for _ in range(4)]
    ranks, alone = gloo(_rank_run, feats, ys, world=2, meanwhile=lambda: _rank_run(0, 1, feats, ys))
    assert torch.allclose(ranks[0], ranks[1]) and torch.allclose(ranks[0], alone, atol=1e-6)
    assert not torch.equal(alone, torch.zeros(3))  # it learned something


def test_checkpointed_state_resumes_the_same_rates():
    info = DataInfo(3, (30, 10, 4), (1, 1, 1), 44)
    g = torch.Generator().manual_seed(2)
    ys = [torch.randint(0, 3, (8,), generator=g) for _ in range(6)]
    feats = [torch.randn(8, 4, generator=g) for _ in range(6)]

    def fresh():
        torch.manual_seed(0)
        m, net = METHODS.build(MetaSamplerParams(meta_lr=0.05), info), Net(4, 3)
        m.attach(net, lambda x: x, torch.device("cpu"))
        return m, net

    straight, net = fresh()
    _steps(straight, net, feats, ys, 0.3, 6)
    first, net = fresh()
    _steps(first, net, feats[:3], ys[:3], 0.3, 3)
    resumed, net = fresh()
    resumed.load_state_dict(first.state_dict())
    _steps(resumed, net, feats[3:], ys[3:], 0.3, 3)
    assert torch.equal(resumed.theta, straight.theta)


def test_the_method_is_refused_unless_the_features_are_frozen(tmp_path, digits_dir):
    from conftest import job
    from rwray.errors import ConfigError
    from rwray.train.preflight import ensure_data

    with pytest.raises(ConfigError, match="train.trainable=classifier with train.init_from"):
        ensure_data(job(tmp_path, digits_dir, method={"name": "meta_sampler"}))
