"""Every base loss against its formula written out by hand (Python floats, `math`, explicit loops) on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rwray.losses import LOSSES
from rwray.losses.balanced_softmax import BalancedSoftmaxParams
from rwray.losses.ce import CEParams
from rwray.losses.class_balanced import CBCEParams, class_balanced_weights
from rwray.losses.focal import FocalParams
from rwray.losses.ldam import LDAMParams, ldam_margins
from rwray.losses.symmetric import SCEParams
from rwray.losses.truncated_lq import LqParams
from rwray.datainfo import DataInfo

# 4 samples x 4 classes. Sample 0 is confidently right (p_y ~ 0.65), sample 3 is unsure (p_y ~ 0.2).
Z = [
    [2.0, 1.0, 0.1, -1.0],
    [0.5, -0.3, 0.8, 0.0],
    [-1.0, 3.0, 0.0, 1.0],
    [0.2, 0.1, -0.5, -0.2],
]
Y = [0, 2, 1, 3]
COUNTS = (100, 30, 10, 3)


def info(counts=COUNTS) -> DataInfo:
    return DataInfo(num_classes=len(counts), class_counts=tuple(counts), image_shape=(3, 32, 32), num_train=sum(counts))


def logits() -> torch.Tensor:
    return torch.tensor(Z, dtype=torch.float32)


def targets() -> torch.Tensor:
    return torch.tensor(Y)


def build(params):
    return LOSSES.build(params, info())


# ----- hand-written references -------------------------------------------------------------------------------------
def softmax_row(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def ce_row(z: list[float], y: int) -> float:
    return -math.log(softmax_row(z)[y])


def cb_weights_ref(counts, beta) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [r * len(counts) / sum(raw) for r in raw]


def close(got: torch.Tensor, want: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


# ----- CE and the registry's contract --------------------------------------------------------------------------------
def test_ce_matches_hand_formula():
    close(build(CEParams())(logits(), targets()), [ce_row(z, y) for z, y in zip(Z, Y)])


@pytest.mark.parametrize("entry", LOSSES.entries(), ids=lambda e: e.name)
def test_every_loss_is_per_sample_float32_under_bf16(entry):
    out = LOSSES.build(entry.params(), info())(logits().to(torch.bfloat16), targets())
    assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()


# ----- class-balanced CE -------------------------------------------------------------------------------------------
def test_cb_weights_pinned_small_case():
    # beta = 0.5, counts (1, 2): raw = 0.5/0.5 = 1 and 0.5/0.75 = 2/3, sum 5/3; times C/sum = 2 * 3/5 -> (1.2, 0.8).
    close(class_balanced_weights([1, 2], 0.5), [1.2, 0.8], tol=1e-6)


def test_cb_weights_sum_to_c_and_rarer_is_larger():
    w = class_balanced_weights(COUNTS, 0.9999)
    close(w, cb_weights_ref(COUNTS, 0.9999), tol=1e-6)
    assert w.sum().item() == pytest.approx(4.0, abs=1e-5)
    assert w[0] < w[1] < w[2] < w[3]  # counts 100 > 30 > 10 > 3


def test_cb_ce_matches_hand_formula():
    w = cb_weights_ref(COUNTS, 0.9999)
    per_sample = [w[y] * ce_row(z, y) for z, y in zip(Z, Y)]
    close(build(CBCEParams(reduction="mean"))(logits(), targets()), per_sample)
    # the default divides by the batch's mean weight, so that the batch mean is sum w*l / sum w
    mean_w = sum(w[y] for y in Y) / len(Y)
    close(build(CBCEParams())(logits(), targets()), [v / mean_w for v in per_sample])


def weighted_reference(weighted_logits: torch.Tensor, w: list[float]) -> torch.Tensor:
    """The seeds' reduction, by PyTorch: F.cross_entropy(z, y, weight=w) = sum_i w_yi * CE_i / sum_i w_yi."""
    return torch.nn.functional.cross_entropy(weighted_logits, targets(), weight=torch.tensor(w))


@pytest.mark.parametrize("make, ref_logits", [
    (lambda: build(CBCEParams(drw_epoch=2)), lambda z: z),
    (lambda: build(LDAMParams(s=30.0, drw_epoch=2)),
     lambda z: 30.0 * (z - ldam_margins(torch.tensor(COUNTS), 0.5)[targets()][:, None]
                       * torch.nn.functional.one_hot(targets(), 4))),
])
def test_the_weighted_mean_reduction_is_cross_entropy_with_weight_through_the_loop(make, ref_logits):
    """ERM's one weighted reduction (the loop's) of the default reduction: exactly F.cross_entropy(weight=w), value
    and gradient, once DRW has switched the weights on; before, the plain mean."""
    from rwray.methods import StepOutput, weighted_loss

    loss = make()
    w = cb_weights_ref(COUNTS, 0.9999)
    for epoch, weights in ((0, [1.0] * 4), (2, w)):
        loss.begin_epoch(epoch)
        z = logits().requires_grad_()
        ours = weighted_loss(StepOutput(losses=(per := loss(z, targets())), weights=torch.ones_like(per)))
        (grad,) = torch.autograd.grad(ours, z)
        z_ref = logits().requires_grad_()
        want = weighted_reference(ref_logits(z_ref), weights)
        (grad_ref,) = torch.autograd.grad(want, z_ref)
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_cb_ce_drw_switches_exactly_at_drw_epoch():
    loss = build(CBCEParams(drw_epoch=3, reduction="mean"))
    w = cb_weights_ref(COUNTS, 0.9999)
    plain = [ce_row(z, y) for z, y in zip(Z, Y)]
    weighted = [w[y] * ce_row(z, y) for z, y in zip(Z, Y)]
    close(loss(logits(), targets()), plain)  # before any begin_epoch: the epoch-0 state
    loss.begin_epoch(2)
    close(loss(logits(), targets()), plain)
    loss.begin_epoch(3)
    close(loss(logits(), targets()), weighted)
    loss.begin_epoch(10)
    close(loss(logits(), targets()), weighted)


def test_cb_ce_max_count_caps_the_counts_as_the_absgd_iwildcam_recipe():
    """Counts above max_count weigh as max_count (the seed sets counts >= 10 to 10): with COUNTS (100, 30, 10, 3)
    and cap 10, the three larger classes share one weight and only the 3-sample class weighs more."""
    w = cb_weights_ref([10, 10, 10, 3], 0.9999)
    per_sample = [w[y] * ce_row(z, y) for z, y in zip(Z, Y)]
    close(build(CBCEParams(reduction="mean", max_count=10))(logits(), targets()), per_sample)
    assert w[0] == w[1] == w[2] < w[3]


def test_zero_count_class_is_counted_as_one():
    w = class_balanced_weights([0, 5], 0.9)
    close(w, cb_weights_ref([1, 5], 0.9), tol=1e-6)


# ----- focal -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_focal_matches_hand_formula(gamma):
    want = [(1 - softmax_row(z)[y]) ** gamma * ce_row(z, y) for z, y in zip(Z, Y)]
    close(build(FocalParams(gamma=gamma))(logits(), targets()), want)


def test_focal_gamma_zero_is_ce_exactly_with_gradient():
    a, b = logits().requires_grad_(), logits().requires_grad_()
    fl = build(FocalParams(gamma=0.0))(a, targets())
    ce = build(CEParams())(b, targets())
    assert torch.equal(fl, ce)
    fl.sum().backward()
    ce.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_focal_gradient_finite_when_confident_and_gamma_below_one():
    z = torch.tensor([[40.0, 0.0, 0.0, 0.0]], requires_grad=True)  # p_t rounds to 1 in float32
    build(FocalParams(gamma=0.5))(z, torch.tensor([0])).sum().backward()
    assert torch.isfinite(z.grad).all()


# ----- LDAM --------------------------------------------------------------------------------------------------------
def test_ldam_margins_pinned_and_proportional():
    # counts (16, 1): n^(-1/4) = (0.5, 1); scaled so the max is 0.5 -> (0.25, 0.5).
    close(ldam_margins(torch.tensor([16.0, 1.0]), 0.5), [0.25, 0.5], tol=1e-7)
    m = ldam_margins(torch.tensor(COUNTS, dtype=torch.float64), 0.5)
    assert m.max().item() == pytest.approx(0.5, abs=1e-7)
    close(m, [0.5 * (n / 3) ** -0.25 for n in COUNTS], tol=1e-6)  # rarest class (3) gets max_m


def ldam_ref(s: float, max_m: float, class_w=None) -> list[float]:
    margins = [max_m * n**-0.25 / min(COUNTS) ** -0.25 for n in COUNTS]
    out = []
    for z, y in zip(Z, Y):
        shifted = [s * (v - (margins[y] if k == y else 0.0)) for k, v in enumerate(z)]
        out.append((1.0 if class_w is None else class_w[y]) * ce_row(shifted, y))
    return out


@pytest.mark.parametrize("s", [30.0, 1.0])
def test_ldam_matches_hand_formula(s):
    close(build(LDAMParams(s=s))(logits(), targets()), ldam_ref(s, 0.5), tol=1e-4)


def test_ldam_drw_switches_exactly_at_drw_epoch_and_none_never_reweights():
    loss = build(LDAMParams(s=1.0, drw_epoch=3, reduction="mean"))
    cb = cb_weights_ref(COUNTS, 0.9999)
    close(loss(logits(), targets()), ldam_ref(1.0, 0.5))
    loss.begin_epoch(2)
    close(loss(logits(), targets()), ldam_ref(1.0, 0.5))
    loss.begin_epoch(3)
    close(loss(logits(), targets()), ldam_ref(1.0, 0.5, cb))
    plain = build(LDAMParams(s=1.0))  # drw_epoch=None: plain LDAM forever
    plain.begin_epoch(1000)
    close(plain(logits(), targets()), ldam_ref(1.0, 0.5))


# ----- Balanced Softmax ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_balanced_softmax_matches_hand_formula(tau):
    want = [ce_row([v + tau * math.log(n) for v, n in zip(z, COUNTS)], y) for z, y in zip(Z, Y)]
    close(build(BalancedSoftmaxParams(tau=tau))(logits(), targets()), want)


def test_balanced_softmax_uniform_prior_is_ce_exactly_and_predicts_raw_logits():
    uniform = LOSSES.build(BalancedSoftmaxParams(), info((7, 7, 7, 7)))
    ce = build(CEParams())(logits(), targets())
    assert torch.equal(uniform(logits(), targets()), ce)
    assert torch.equal(build(BalancedSoftmaxParams(tau=0.0))(logits(), targets()), ce)
    z = logits()
    assert build(BalancedSoftmaxParams()).predict_logits(z) is z


# ----- symmetric CE ------------------------------------------------------------------------------------------------
def sce_ref(rows, ys, alpha, beta) -> list[float]:
    out = []
    for z, y in zip(rows, ys):
        p = [min(max(v, 1e-7), 1.0) for v in softmax_row(z)]
        rce = -sum(p[k] * (0.0 if k == y else math.log(1e-4)) for k in range(len(z)))
        out.append(alpha * ce_row(z, y) + beta * rce)
    return out


@pytest.mark.parametrize("alpha,beta", [(0.1, 1.0), (6.0, 0.1)])
def test_sce_matches_hand_formula(alpha, beta):
    close(build(SCEParams(alpha=alpha, beta=beta))(logits(), targets()), sce_ref(Z, Y, alpha, beta))


def test_sce_clamps_tiny_probabilities():
    # p_1 = p_2 ~ 2e-9 and p_3 ~ 1e-11, all < 1e-7: each is clamped up, so RCE = -log(1e-4) * 3e-7 ~ 2.763e-6
    # (unclamped it would be ~4e-8), and CE = -log p_0 ~ 4e-9.
    rows = [[20.0, 0.0, 0.0, -5.0]]
    got = build(SCEParams())(torch.tensor(rows), torch.tensor([0]))
    p = softmax_row(rows[0])
    assert max(p[1:]) < 1e-7
    want = 0.1 * ce_row(rows[0], 0) + 1.0 * -math.log(1e-4) * 3e-7
    assert got.item() == pytest.approx(want, abs=1e-9)  # float32 CE cannot resolve 4e-9 (it rounds to 0)


# ----- truncated Lq ------------------------------------------------------------------------------------------------
def lq_ref(q, k, truncate) -> list[float]:
    out = []
    for z, y in zip(Z, Y):
        p = softmax_row(z)[y]
        out.append((1 - k**q) / q if truncate and p <= k else (1 - p**q) / q)
    return out


def test_lq_plain_before_truncate_epoch_and_truncated_from_it_on():
    loss = build(LqParams())  # q = 0.7, k = 0.5, truncate_epoch = 40
    p_y = [softmax_row(z)[y] for z, y in zip(Z, Y)]
    assert p_y[0] > 0.5 and min(p_y) < 0.5  # the example exercises both branches
    close(loss(logits(), targets()), lq_ref(0.7, 0.5, truncate=False))
    loss.begin_epoch(39)
    close(loss(logits(), targets()), lq_ref(0.7, 0.5, truncate=False))
    loss.begin_epoch(40)
    close(loss(logits(), targets()), lq_ref(0.7, 0.5, truncate=True))


def test_lq_truncated_samples_get_no_gradient_and_q1_is_mae():
    z = logits().requires_grad_()
    loss = build(LqParams(truncate_epoch=0))
    loss(z, targets()).sum().backward()
    for i, (row, y) in enumerate(zip(Z, Y)):
        if softmax_row(row)[y] <= 0.5:
            assert torch.equal(z.grad[i], torch.zeros(4))
        else:
            assert z.grad[i].abs().sum() > 0
    mae = build(LqParams(q=1.0, truncate_epoch=None))
    close(mae(logits(), targets()), [1 - softmax_row(r)[y] for r, y in zip(Z, Y)])


# ----- parameter validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (CBCEParams, {"beta": 1.0}),
        (CBCEParams, {"beta": 0.0}),
        (CBCEParams, {"drw_epoch": -1}),
        (FocalParams, {"gamma": -0.1}),
        (LDAMParams, {"s": 0.0}),
        (LDAMParams, {"max_m": 0.0}),
        (BalancedSoftmaxParams, {"tau": -1.0}),
        (SCEParams, {"alpha": 0.0, "beta": 0.0}),
        (SCEParams, {"beta": -1.0}),
        (LqParams, {"q": 0.0}),
        (LqParams, {"q": 1.5}),
        (LqParams, {"k": 1.0}),
        (CBCEParams, {"bogus": 1}),
    ],
)
def test_params_reject_out_of_range(cls, kwargs):
    with pytest.raises(ValidationError):
        cls(**kwargs)


# ----- the weighted mean over 2 workers, for real (gloo on 127.0.0.1) ------------------------------------------------
# 8 samples x 4 classes: two workers hold 4 each, with different class mixes (so their local sums of w_y differ).
Z8 = Z + [[0.3, -0.2, 1.5, 0.4], [1.1, 0.0, -0.7, 2.2], [-0.4, 0.9, 0.3, 0.1], [0.0, 0.5, -1.2, 0.8]]
Y8 = Y + [3, 3, 2, 3]


def _weighted_mean_rank(rank: int, world: int, loss_name: str) -> dict:
    from rwray.methods import StepOutput, weighted_loss

    params = CBCEParams(drw_epoch=0) if loss_name == "cb_ce" else LDAMParams(s=30.0, drw_epoch=0)
    loss = build(params)
    loss.begin_epoch(0)
    half = slice(rank * 4, rank * 4 + 4)
    z = torch.tensor(Z8, dtype=torch.float32)[half].requires_grad_()
    per = loss(z, torch.tensor(Y8)[half])
    local = weighted_loss(StepOutput(losses=per, weights=torch.ones_like(per)))
    local.backward()
    return {"loss": local.detach(), "grad": z.grad}


@pytest.mark.parametrize("loss_name", ["cb_ce", "ldam"])
def test_the_weighted_mean_over_two_workers_is_cross_entropy_with_weight_on_the_global_batch(gloo, loss_name):
    """Each worker reduces its half with the loop's mean; DDP averages the workers' gradients. With the global
    mean weight all-reduced, that is F.cross_entropy(weight=w) of one process holding all 8 samples."""
    ranks = gloo(_weighted_mean_rank, loss_name)
    z, y = torch.tensor(Z8, dtype=torch.float32).requires_grad_(), torch.tensor(Y8)
    w = torch.tensor(cb_weights_ref(COUNTS, 0.9999))
    margins = ldam_margins(torch.tensor(COUNTS), 0.5)[y]
    onehot = torch.nn.functional.one_hot(y, 4)
    scored = 30.0 * (z - margins[:, None] * onehot) if loss_name == "ldam" else z  # [8, 4] what CE is taken of
    want = torch.nn.functional.cross_entropy(scored, y, weight=w)
    want.backward()
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, want.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, z.grad, rtol=1e-5, atol=1e-7)
    # each half's own weighted mean, averaged, is another number: the normaliser really is the global one
    halves = [torch.nn.functional.cross_entropy(scored.detach()[h], y[h], weight=w) for h in (slice(0, 4), slice(4, 8))]
    assert abs(float(sum(halves) / 2) - want.item()) > 1e-3
