"""Batch reweighting: the pure cosine / p-score / weight functions, then the method: a 4-sample case worked out by
hand, the weight options, the score table and its files, state round-trip, training steps through the registry
(GroupNorm and BatchNorm ResNet-32), gradient reuse (same training gradient, refused where samples are coupled, bf16
autocast), and two gloo workers (the `gloo` fixture, no Ray): the epoch-end gather and gradient reuse under DDP."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.gram import gram
from rwray.methods import METHODS, StepInputs, weighted_loss
from rwray.methods.batch_reweight import (BatchReweightParams, batch_reweight_weights, class_pscore_spearman, cosine,
                                          pscore_weights, pscores)
from rwray.models.resnet_cifar import ResNet32Params, resnet32
from rwray.models.small_cnn import SmallCNN, SmallCNNParams

E = math.e
INFO = DataInfo(num_classes=2, class_counts=(30, 10), image_shape=(2, 1, 1), num_train=40)


# ----- pure functions: cosine, p-scores, weights -------------------------------------------------------------------
def test_hand_four_samples_gram_cosine_pscores_weights():
    # l_i = <w, x_i>: g_i = x_i exactly. x = (1,0), (1,0.1), (0,1), (-1,0):
    # S_12 = 1/sqrt(1.01) = 0.995, S_14 = -1, S_24 = -0.995, S_13 = S_34 = 0, S_23 = 0.1/sqrt(1.01) = 0.0995.
    lin = nn.Linear(2, 1, bias=False).double()
    X = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    G = gram(lin, X, torch.zeros(4, dtype=torch.long), lambda out, _: out[:, 0])
    torch.testing.assert_close(G, X @ X.T, rtol=0, atol=1e-15)
    S = cosine(G)
    c = 1 / math.sqrt(1.01)
    want_S = torch.tensor([[1, c, 0, -1], [c, 1, 0.1 * c, -c], [0, 0.1 * c, 1, 0], [-1, -c, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(S, want_S, rtol=0, atol=1e-12)
    p = pscores(S, 0.7)
    assert p.tolist() == [2, 2, 1, 1]
    e = math.e
    w = pscore_weights(p, 1.0, "softmax")  # 4 e^-p / sum e^-p
    torch.testing.assert_close(w, torch.tensor([2 / (1 + e), 2 / (1 + e), 2 * e / (1 + e), 2 * e / (1 + e)], dtype=torch.float64))
    torch.testing.assert_close(pscore_weights(p, 1.0, "inverse"), torch.tensor([2 / 3, 2 / 3, 4 / 3, 4 / 3], dtype=torch.float64))
    assert pscores(S, -1.0).tolist() == [4, 4, 4, 4]
    assert pscores(S, 0.0).tolist() == [3, 3, 4, 2]  # cosine 0 >= 0 counts


def test_pscore_bounds_on_random_grams():
    g = torch.Generator().manual_seed(14)
    for B, gamma in [(1, 0.7), (7, 0.7), (16, 0.0), (16, 0.999), (33, -0.2)]:
        V = torch.randn(B, 5, generator=g, dtype=torch.float64)
        V[B // 2] = 0  # one zero gradient: cosine 0 with everyone, still its own neighbour
        S = cosine(V @ V.T)
        assert S.diagonal().eq(1).all() and S.abs().le(1).all()
        p = pscores(S, gamma)
        assert p.dtype == torch.int64 and p.shape == (B,)
        assert p.min() >= 1 and p.max() <= B
        brute = [(S[i] >= gamma).sum().item() + (0 if S[i, i] >= gamma else 1) for i in range(B)]
        assert p.tolist() == brute
    # Identical gradients: everyone is everyone's neighbour.
    V = torch.ones(5, 3, dtype=torch.float64)
    assert pscores(cosine(V @ V.T), 0.7).tolist() == [5] * 5


def test_weight_formulas_and_the_infinite_temperature():
    p = torch.tensor([1, 2, 2, 5, 9])
    for temp in [0.5, 1.0, 3.0]:
        soft = pscore_weights(p, temp, "softmax")
        want = torch.exp(-p.double() / temp)
        torch.testing.assert_close(soft, 5 * want / want.sum())
        inv = pscore_weights(p, temp, "inverse")
        want = p.double() ** (-1 / temp)
        torch.testing.assert_close(inv, want / want.mean())
        for w in (soft, inv):
            assert w.mean().item() == pytest.approx(1.0, abs=1e-12)
            assert (w[:-1] >= w[1:]).all()  # fewer neighbours, more weight
    for fn in ("softmax", "inverse"):
        assert pscore_weights(p, math.inf, fn).tolist() == [1.0] * 5
        assert (pscore_weights(p, 1e9, fn) - 1).abs().max() < 1e-7
    with pytest.raises(ValueError):
        pscore_weights(p, 0.0)


# ----- the method ------------------------------------------------------------------------------------------------
class Lin(nn.Module):
    """logits = W x, W = 0 at start; the models' forward signature."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x, return_features: bool = False):
        f = x.flatten(1)  # [B, 2]
        logits = self.fc(f)  # [B, 2]
        return (logits, f) if return_features else logits


# With W = 0, softmax = (1/2, 1/2), so the CE gradient of sample i is g_i = r_i x_iᵀ with r_i = ±(-1/2, 1/2) (sign by
# class): G_ij = s_ij (x_i . x_j) / 2, s_ij = +1 for the same class, -1 otherwise, so S_ij = s_ij cos(x_i, x_j):
#   x = (1,0) c0, (1,.1) c0, (1,.2) c1, (0,1) c1
#   S_12 = +.995, S_13 = -.981, S_14 = 0, S_23 = -.999, S_24 = -.0995, S_34 = +.196  ->  p = (2, 2, 1, 1) at gamma .7
HAND_X = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0]])
HAND_Y = torch.tensor([0, 0, 1, 1])
HAND_P = [2, 2, 1, 1]
SOFTMAX_W = [2 / (1 + E), 2 / (1 + E), 2 * E / (1 + E), 2 * E / (1 + E)]  # 4 e^-p / sum e^-p


def build(model: nn.Module, info: DataInfo = INFO, **kw):
    method = METHODS.build(BatchReweightParams(**kw), info)
    method.attach(model, prepare=lambda m: m, device=torch.device("cpu"))
    return method


def step(method, model, x, y, index, epoch=0):
    logits, feats = model(x, return_features=True)
    return method.step(StepInputs(model=model, x=x, y=y, index=index, logits=logits, features=feats, epoch=epoch, step=0))


def test_defaults_and_validation():
    p = BatchReweightParams()
    assert (p.gamma, p.temp, p.weight_fn, p.grads, p.impl, p.loss.name) == (0.7, 1.0, "softmax", "all", "fast", "ce")
    for bad in [{"gamma": 1.5}, {"temp": 0.0}, {"temp": -1.0}, {"weight_fn": "exp"}, {"grads": "body"}, {"last_k": 0}]:
        with pytest.raises(ValidationError):
            BatchReweightParams(**bad)


def test_hand_computed_four_samples():
    model = Lin()
    method = build(model)
    x = HAND_X.view(4, 2, 1, 1)
    out = step(method, model, x, HAND_Y, torch.arange(4))
    torch.testing.assert_close(out.weights, torch.tensor(SOFTMAX_W), rtol=1e-6, atol=1e-6)
    assert out.metrics["br/pscore_mean"] == pytest.approx(1.5)
    assert out.metrics["br/frac_p1"] == pytest.approx(0.5)
    torch.testing.assert_close(out.losses, torch.full((4,), math.log(2)))
    # The pure function on the hand-written Gram gives the same.
    s = torch.tensor([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]], dtype=torch.float64)
    X = HAND_X.double()
    w, p = batch_reweight_weights(s * (X @ X.T) / 2, 0.7, 1.0, "softmax")
    assert p.tolist() == HAND_P
    torch.testing.assert_close(w, torch.tensor(SOFTMAX_W, dtype=torch.float64))
    # The loop's backward on the retained graph is the weighted CE gradient: mean_i w_i r_i x_iᵀ.
    weighted_loss(out).backward()
    r = torch.softmax(torch.zeros(4, 2), 1) - F.one_hot(HAND_Y, 2).float()  # [4, 2]
    want = (out.weights[:, None, None] * r[:, :, None] * HAND_X[:, None, :]).mean(0)  # [2, 2]
    torch.testing.assert_close(model.fc.weight.grad, want)


@pytest.mark.parametrize("kw,want", [
    ({"weight_fn": "inverse"}, [2 / 3, 2 / 3, 4 / 3, 4 / 3]),  # 1/p over mean(1/p) = 3/4
    ({"temp": 2.0}, [2 / (1 + E**0.5)] * 2 + [2 * E**0.5 / (1 + E**0.5)] * 2),
    ({"temp": math.inf}, [1.0] * 4),
    ({"temp": math.inf, "weight_fn": "inverse"}, [1.0] * 4),
    ({"gamma": -1.0}, [1.0] * 4),  # everyone is a neighbour: p = 4 for all
    ({"gamma": 0.99}, [2 / (1 + E)] * 2 + [2 * E / (1 + E)] * 2),  # .995 still counts
    ({"gamma": 0.999}, [1.0] * 4),  # only the diagonal: p = 1 for all
])
def test_weight_options_on_the_hand_case(kw, want):
    model = Lin()
    out = step(build(model, **kw), model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.arange(4))
    torch.testing.assert_close(out.weights, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert not out.weights.requires_grad


def test_large_temperature_tends_to_uniform():
    model = Lin()
    for temp, tol in [(10.0, 0.2), (1e3, 2e-3), (1e6, 2e-6)]:
        w = step(build(model, temp=temp), model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.arange(4)).weights
        assert (w - 1).abs().max().item() < tol


def run_two_epochs(method, model) -> tuple[dict, dict]:
    """Epoch 0 sees samples 3, 7, 11, 20 (the hand case: p = 2, 2, 1, 1). Epoch 1 sees 3, 7, 11 with x_11 moved
    between x_3 and x_7 but still labelled 1, so its gradient points away from theirs: p = 2, 2, 1 again."""
    method.begin_epoch(0)
    step(method, model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.tensor([3, 7, 11, 20]))
    e0 = method.end_epoch(0)
    method.begin_epoch(1)
    x1 = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.05]]).view(3, 2, 1, 1)
    step(method, model, x1, torch.tensor([0, 0, 1]), torch.tensor([3, 7, 11]), epoch=1)
    return e0, method.end_epoch(1)


def test_end_epoch_metrics_and_score_files(tmp_path):
    model = Lin()
    method = build(model)
    assert method.artifacts(str(tmp_path)) == []  # nothing scored yet
    e0, e1 = run_two_epochs(method, model)
    # class 0 (30 training samples) has the larger mean p-score (2 vs 1): rank correlation +1 with the counts
    assert e0 == {"pscore/mean": pytest.approx(1.5), "pscore/class_0": pytest.approx(2.0), "pscore/class_1": pytest.approx(1.0),
                  "pscore/spearman_vs_class_count": pytest.approx(1.0)}
    assert e1 == {"pscore/mean": pytest.approx(5 / 3), "pscore/class_0": pytest.approx(2.0), "pscore/class_1": pytest.approx(1.0),
                  "pscore/spearman_vs_class_count": pytest.approx(1.0)}
    want = np.array([[3, 2.0, 0], [7, 2.0, 0], [11, 1.0, 1], [20, 1.0, 1]])
    np.testing.assert_allclose(method.scores().numpy(), want)

    paths = method.artifacts(str(tmp_path / "out"))
    assert [os.path.basename(p) for p in paths] == ["pscores.parquet", "score.npy", "pscore_per_class.png"]
    score = np.load(tmp_path / "out" / "score.npy")
    assert score.shape == (4, 3) and score.dtype == np.float64
    np.testing.assert_allclose(score, want)
    table = pq.read_table(tmp_path / "out" / "pscores.parquet").to_pydict()
    assert table == {"index": [3, 7, 11, 20], "pscore": [2.0, 2.0, 1.0, 1.0], "class": [0, 0, 1, 1], "n_scored": [2, 2, 2, 1]}
    png = (tmp_path / "out" / "pscore_per_class.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_class_spearman_by_hand():
    # rows: (index, mean p-score, class). Class means (samples averaged): c0 = 5, c1 = 3, c2 = 1, counts 30 > 20 > 10.
    rows = torch.tensor([[0, 4.0, 0], [1, 6.0, 0], [2, 3.0, 1], [3, 1.0, 2]], dtype=torch.float64)
    assert class_pscore_spearman(rows, (30, 20, 10)) == pytest.approx(1.0)
    assert class_pscore_spearman(rows, (10, 20, 30)) == pytest.approx(-1.0)
    # ties get average ranks: means (2, 2, 1) -> ranks (2.5, 2.5, 1) against (3, 2, 1): 1.5 / sqrt(1.5 * 2)
    tied = torch.tensor([[0, 2.0, 0], [1, 2.0, 1], [2, 1.0, 2]], dtype=torch.float64)
    assert class_pscore_spearman(tied, (30, 20, 10)) == pytest.approx(1.5 / math.sqrt(3.0))
    # a class never scored is left out: (c0, c2) alone is a perfect order
    assert class_pscore_spearman(tied[[0, 2]], (30, 20, 10)) == pytest.approx(1.0)
    assert math.isnan(class_pscore_spearman(tied[:1], (30, 20, 10)))  # one class: undefined
    assert math.isnan(class_pscore_spearman(tied, (5, 5, 5)))  # constant counts: undefined


def test_mean_over_epochs_differs_per_sample():
    # Epoch 1 moves sample 11 next to the class-1 sample 20's direction: p changes, the table averages it.
    model = Lin()
    method = build(model)
    step(method, model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.tensor([3, 7, 11, 20]))
    method.end_epoch(0)
    x1 = torch.tensor([[1.0, 0.0], [0.1, 1.0], [0.0, 1.0]]).view(3, 2, 1, 1)  # 11 now at (0.1, 1), close to 20
    step(method, model, x1, torch.tensor([0, 1, 1]), torch.tensor([3, 11, 20]), epoch=1)  # p = 1, 2, 2
    method.end_epoch(1)
    got = {int(i): (m, int(c)) for i, m, c in method.scores().tolist()}
    assert got == {3: (1.5, 0), 7: (2.0, 0), 11: (1.5, 1), 20: (1.5, 1)}


def test_state_round_trip_through_weights_only_checkpoint(tmp_path):
    model = Lin()
    a = build(model)
    step(a, model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.tensor([3, 7, 11, 60]))  # index 60 >= num_train: grows
    a.end_epoch(0)
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = build(Lin())
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(b.scores(), a.scores())
    assert b.epochs == a.epochs == 1
    for m in (a, b):  # both continue identically
        mdl = m.capture.model
        step(m, mdl, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.tensor([3, 7, 11, 60]))
        m.end_epoch(1)
    torch.testing.assert_close(b.scores(), a.scores())
    assert a.scores()[:, 0].tolist() == [3, 7, 11, 60]


def resnet_case(norm: str, seed: int = 0):
    torch.manual_seed(seed)
    info = DataInfo(num_classes=4, class_counts=(10, 6, 3, 1), image_shape=(3, 8, 8), num_train=20)
    model = resnet32(ResNet32Params(norm=norm), info)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 3])
    return info, model, x, y


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_resnet32_trains_two_steps_through_the_registry(norm):
    info, model, x, y = resnet_case(norm)
    method = build(model, info, gamma=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(2):
        method.begin_epoch(epoch)
        out = step(method, model, x, y, torch.arange(6) + 6 * epoch, epoch)
        assert out.weights.shape == (6,) and out.weights.mean().item() == pytest.approx(1.0, abs=1e-6)
        opt.zero_grad()
        weighted_loss(out).backward()
        opt.step()
        metrics = method.end_epoch(epoch)
        rho = class_pscore_spearman(method.scores(), info.class_counts)  # NaN (so not logged) when p is constant
        assert set(metrics) == {"pscore/mean", "pscore/class_0", "pscore/class_1", "pscore/class_2", "pscore/class_3",
                                *(() if math.isnan(rho) else ("pscore/spearman_vs_class_count",))}
        assert math.isnan(rho) or metrics["pscore/spearman_vs_class_count"] == rho
        assert 1 <= metrics["pscore/mean"] <= 6
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
    assert len(method.scores()) == 12
    assert method.capture.calls == []  # the records (and the graph they reach) are dropped after each step


def test_fast_and_reference_give_the_same_weights_and_subsets_work():
    # SmallCNN with GroupNorm (ResNet-32 equality is in test_gram). Cosines in this case: the two same-class pairs
    # are at .79 over all parameters and .99 over the head, so gamma = .9 separates "all" from "head"/"last_k".
    torch.manual_seed(2)
    info = DataInfo(num_classes=4, class_counts=(10, 6, 3, 1), image_shape=(3, 8, 8), num_train=20)
    model = SmallCNN(SmallCNNParams(width=4, norm="group"), info).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 3])
    weights = {}
    for impl in ("fast", "reference"):
        for which, k in (("all", 1), ("head", 1), ("last_k", 2)):
            method = build(model, info, impl=impl, grads=which, last_k=k, gamma=0.9)
            out = step(method, model, x, y, torch.arange(6))
            weights[impl, which] = out.weights
            out.losses.sum().backward()  # the graph is still intact after either implementation
            model.zero_grad()
            method.close()
    for which in ("all", "head", "last_k"):
        torch.testing.assert_close(weights["fast", which], weights["reference", which], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(weights["fast", "all"], torch.ones(6))  # p = 1 for all (CE works in float32)
    near = 6 / (4 + 2 * E)  # p = (2, 2, 2, 2, 1, 1): 6 e^-p / sum e^-p
    torch.testing.assert_close(weights["fast", "head"], torch.tensor([near] * 4 + [near * E] * 2))
    torch.testing.assert_close(weights["fast", "last_k"], weights["fast", "head"])


def train_grads(model, params: BatchReweightParams, info, x, y, steps=3):
    """Parameter gradients of `steps` loop steps (fresh copy of the model, no update), and the reuse flags."""
    model = copy.deepcopy(model)
    method = METHODS.build(params, info)
    method.attach(model, prepare=lambda m: m, device=torch.device("cpu"))
    grads, flags = [], []
    for s in range(steps):
        out = step(method, model, x, y, torch.arange(len(y)))
        weighted_loss(out).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        flags.append(out.metrics["br/grad_reuse"])
        model.zero_grad()
    return grads, flags, method


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_grad_reuse_gives_the_same_training_gradient(norm):
    info, model, x, y = resnet_case(norm, seed=3)
    model, x = model.double(), x.double()
    on, flags_on, m_on = train_grads(model, BatchReweightParams(gamma=0.3), info, x, y)
    off, flags_off, _ = train_grads(model, BatchReweightParams(gamma=0.3, grad_reuse=False), info, x, y)
    if norm == "group":  # step 0 checks against autograd on the ordinary graph, later steps reuse
        assert flags_on == [0.0, 1.0, 1.0] and m_on.reuse_ok is True
    else:  # BatchNorm with batch statistics couples the samples: never reused
        assert flags_on == [0.0, 0.0, 0.0] and m_on.reuse_ok is False
    assert flags_off == [0.0, 0.0, 0.0]
    for a, b in zip(on, off):
        for ga, gb in zip(a, b):
            # The loss is computed in float32 (CE casts), so w_i * dl_i/dlogits rounds in float32 in one path.
            torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7 * gb.abs().max().item())


class BatchCentering(nn.Module):
    """Mixes the samples without BatchNorm (x - batch mean): static checks cannot see it, the autograd check must."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 5), nn.Linear(5, 2)

    def forward(self, x, return_features: bool = False):
        f = torch.tanh(self.a(x.flatten(1)))
        f = f - f.mean(0, keepdim=True)  # [B, 5] coupled across the batch
        logits = self.b(f)
        return (logits, f) if return_features else logits


def test_grad_reuse_is_refused_when_the_check_against_autograd_fails():
    torch.manual_seed(5)
    model = BatchCentering().double()
    x, y = torch.randn(6, 2, 1, 1, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    on, flags, method = train_grads(model, BatchReweightParams(gamma=0.5), INFO, x, y)
    off, _, _ = train_grads(model, BatchReweightParams(gamma=0.5, grad_reuse=False), INFO, x, y)
    assert flags == [0.0, 0.0, 0.0] and method.reuse_ok is False
    for a, b in zip(on, off):
        for ga, gb in zip(a, b):
            torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)


def test_grad_reuse_under_bf16_autocast():
    # Autocast makes autograd's own weight gradients bf16 (~1 % off); the records' are float32 from bf16 output
    # gradients. The check uses a bf16-sized tolerance there, and the two training gradients agree to it.
    info, model, x, y = resnet_case("group", seed=6)
    grads = {}
    for reuse in (True, False):
        m = copy.deepcopy(model)
        method = build(m, info, gamma=0.3, grad_reuse=reuse)
        grads[reuse] = []
        for s in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, feats = m(x, return_features=True)
            out = method.step(StepInputs(m, x, y, torch.arange(6), logits, feats, 0, s))
            weighted_loss(out).backward()
            grads[reuse].append(torch.cat([p.grad.flatten() for p in m.parameters()]))
            m.zero_grad()
        assert method.reuse_ok is (True if reuse else None)
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=0, atol=0)  # step 0: the ordinary graph
    assert (grads[True][1] - grads[False][1]).norm() < 0.03 * grads[False][1].norm()


def test_grad_reuse_only_for_all_parameters():
    info, model, x, y = resnet_case("group", seed=4)
    _, flags, method = train_grads(model, BatchReweightParams(grads="head"), info, x, y, steps=2)
    assert flags == [0.0, 0.0] and method.reuse_ok is None  # never even tried


def test_step_without_attach_is_a_clear_error():
    method = METHODS.build(BatchReweightParams(), INFO)
    model = Lin()
    with pytest.raises(RuntimeError, match="attach"):
        step(method, model, HAND_X.view(4, 2, 1, 1), HAND_Y, torch.arange(4))


# ----- two workers ------------------------------------------------------------------------------------------------
class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 2)

    def forward(self, x, return_features: bool = False):
        f = torch.tanh(self.a(x.flatten(1)))  # [B, 4]
        logits = self.b(f)
        return (logits, f) if return_features else logits


def _rank(rank: int, world: int) -> dict:
    assert dist.world_size() == world == 2
    model = Lin()
    method = build(model)
    # Each worker scores its own local batch of 2 (the Gram is per worker): rank 0 gets samples 3 and 7 (same
    # class, cosine .995: p = 2, 2), rank 1 gets 11 and 20 (same class, cosine .196: p = 1, 1).
    half = slice(2 * rank, 2 * rank + 2)
    out = step(method, model, HAND_X[half].view(2, 2, 1, 1), HAND_Y[half], torch.tensor([3, 7, 11, 20])[half])
    end = method.end_epoch(0)
    # Gradient reuse under DDP: the surrogate's parameter gradients go through AccumulateGrad, so DDP's
    # all-reduce hooks fire as usual; reuse on and off must give the same averaged gradients.
    ddp_grads = {}
    for reuse in (True, False):
        torch.manual_seed(0)
        net = nn.parallel.DistributedDataParallel(TwoLayer().double())
        m = build(net, grad_reuse=reuse)
        g = torch.Generator().manual_seed(10 + rank)
        xs, ys = torch.randn(3, 6, 2, 1, 1, generator=g, dtype=torch.float64), torch.randint(0, 2, (3, 6), generator=g)
        grads = []
        for s in range(3):
            o = step(m, net, xs[s], ys[s], torch.arange(6) + 6 * rank)
            weighted_loss(o).backward()
            grads.append([p.grad.clone() for p in net.parameters()])
            net.zero_grad()
        ddp_grads[reuse] = (grads, m.reuse_ok)
    return {"weights": out.weights, "end": end, "scores": method.scores(), "ddp": ddp_grads}


def test_two_workers_gather_the_global_table(gloo):
    ranks = gloo(_rank)
    want = torch.tensor([[3, 2.0, 0], [7, 2.0, 0], [11, 1.0, 1], [20, 1.0, 1]], dtype=torch.float64)
    for r in ranks:  # every rank holds the whole table and the global per-class means
        torch.testing.assert_close(r["scores"], want)
        assert r["end"] == {"pscore/mean": pytest.approx(1.5), "pscore/class_0": pytest.approx(2.0), "pscore/class_1": pytest.approx(1.0),
                            "pscore/spearman_vs_class_count": pytest.approx(1.0)}
        torch.testing.assert_close(r["weights"], torch.ones(2))  # equal p within each local batch: uniform
        (on, ok_on), (off, ok_off) = r["ddp"][True], r["ddp"][False]
        assert ok_on is True and ok_off is None
        for a, b in zip(on, off):
            for ga, gb in zip(a, b):
                torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-9)
    for ga, gb in zip(ranks[0]["ddp"][True][0][-1], ranks[1]["ddp"][True][0][-1]):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)  # DDP averaged: both ranks hold the same gradient
