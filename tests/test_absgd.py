"""ABSGD: the log-space weights against the plain recursion written by hand, stages, state, and 1 vs 2 workers."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from rwray.datainfo import DataInfo
from rwray.methods import METHODS, StepInputs, weighted_loss
from rwray.losses.class_balanced import CBCEParams  # noqa: E402
from rwray.methods.absgd import ABSGDParams, absgd_weights

COUNTS = (50, 20, 5)
INFO = DataInfo(num_classes=3, class_counts=COUNTS, image_shape=(3, 8, 8), num_train=sum(COUNTS))
NEG_INF = torch.tensor(-math.inf, dtype=torch.float64)


def plain_recursion(steps: list[list[float]], lam: float, gamma: float, alpha: float, floor: bool) -> list[list[float]]:
    """The reference estimator verbatim, in ordinary (not log) space: u = 0; per step
    e_i = exp(l_i/lam); u = (1-gamma) u + gamma alpha mean(e); p_i = e_i/(u B); w_i = B p_i (+1 with the floor)."""
    u, out = 0.0, []
    for losses in steps:
        e = [math.exp(v / lam) for v in losses]
        u = (1 - gamma) * u + gamma * alpha * sum(e) / len(e)
        out.append([len(e) * (ei / (u * len(e))) + (1.0 if floor else 0.0) for ei in e])
    return out


def run_pure(steps, lam, gamma, alpha, floor):
    log_u, out = NEG_INF, []
    for losses in steps:
        w, log_u = absgd_weights(torch.tensor(losses), log_u, lam, gamma, alpha, floor)
        out.append(w)
    return out, log_u


def close(got: torch.Tensor, want: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=tol, atol=tol)


STEPS = [[0.3, 1.2, 2.5, 0.1], [0.8, 0.2, 1.9, 3.0], [1.1, 0.4, 0.05, 2.2], [0.6, 0.6, 0.6, 0.6]]


# ----- the pure function -------------------------------------------------------------------------------------------
def test_pinned_single_step():
    # losses (1, 2), lam = gamma = alpha = 1: u = (e + e^2)/2, w = e^l/u -> (2/(1+e), 2e/(1+e)).
    w, log_u = absgd_weights(torch.tensor([1.0, 2.0]), NEG_INF, 1.0, 1.0, 1.0, False)
    close(w, [2 / (1 + math.e), 2 * math.e / (1 + math.e)])
    assert log_u.item() == pytest.approx(math.log((math.e + math.e**2) / 2), abs=1e-12)


@pytest.mark.parametrize("lam,gamma,alpha,floor", [(1.0, 0.9, 1.0, False), (5.0, 0.7, 0.5, False), (3.0, 0.45, 0.3, False), (-5.0, 0.9, 1.0, True), (-1.0, 0.5, 2.0, False)])
def test_matches_plain_recursion_over_steps(lam, gamma, alpha, floor):
    got, _ = run_pure(STEPS, lam, gamma, alpha, floor)
    for g, want in zip(got, plain_recursion(STEPS, lam, gamma, alpha, floor)):
        close(g, want)


def test_large_lambda_tends_to_erm():
    # lam -> inf: e_i -> 1, so u_t = alpha (1 - (1-gamma)^t) and w_t = 1/u_t: 1 for gamma = alpha = 1, and the
    # un-bias-corrected start-up 1/(1 - 0.1^t) for gamma = 0.9.
    for w in run_pure(STEPS, 1e6, 1.0, 1.0, False)[0]:
        close(w, [1.0] * 4, tol=1e-4)
    for t, w in enumerate(run_pure(STEPS, 1e6, 0.9, 1.0, False)[0], start=1):
        close(w, [1 / (1 - 0.1**t)] * 4, tol=1e-4)


def test_negative_lambda_downweights_the_high_loss_sample():
    losses = [0.2, 0.5, 4.0, 1.0]
    w, _ = absgd_weights(torch.tensor(losses), NEG_INF, -1.0, 0.9, 1.0, True)
    assert int(w.argmin()) == 2 and int(w.argmax()) == 0
    assert (w > 1.0).all()  # the floor p += 1/B is w += 1
    close(w, plain_recursion([losses], -1.0, 0.9, 1.0, True)[0])


def test_small_lambda_with_huge_losses_stays_finite():
    # exp(100 / 0.05) = e^2000 overflows float64; in log space all-equal losses give w = 1/(gamma alpha) exactly.
    w, log_u = absgd_weights(torch.full((4,), 100.0), NEG_INF, 0.05, 0.9, 1.0, False)
    close(w, [1 / 0.9] * 4)
    assert log_u.item() == pytest.approx(2000 + math.log(0.9), rel=1e-12)
    log_u = NEG_INF
    for losses in ([100.0, 0.1, 50.0, 99.0], [100.0, 100.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]):
        w, log_u = absgd_weights(torch.tensor(losses), log_u, 0.05, 0.9, 1.0, False)
        assert torch.isfinite(w).all() and torch.isfinite(log_u)
    # lam > 0: w_i = e_i / u <= B e_i / (gamma alpha sum e) <= B / (gamma alpha)
    assert w.max().item() <= 4 / 0.9 + 1e-6


def test_weights_are_detached():
    losses = torch.tensor([0.5, 1.5], requires_grad=True)
    w, log_u = absgd_weights(losses * 2, NEG_INF, 1.0, 0.9, 1.0, False)
    assert not w.requires_grad and not log_u.requires_grad


# ----- params -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"lam": 0.0}, {"lam": 1.0, "init_lam": 0, "lam_epoch": 3}])
def test_lambda_zero_rejected_with_clear_message(kwargs):
    with pytest.raises(ValidationError, match="lambda must be a nonzero number"):
        ABSGDParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"gamma": 0.0}, {"gamma": 1.5}, {"alpha": 0.0}, {"init_lam": 5.0}, {"lam": float("nan")}, {"lam_epoch": -1}])
def test_other_invalid_params_rejected(kwargs):
    with pytest.raises(ValidationError):
        ABSGDParams(**kwargs)


def test_params_accept_any_registered_base_loss():
    p = ABSGDParams.model_validate({"lam": 1.0, "loss": {"name": "focal", "gamma": 2.0}})
    assert p.loss.name == "focal" and p.loss.gamma == 2.0


# ----- the Method ---------------------------------------------------------------------------------------------------
def make_inputs(logits: torch.Tensor, y: torch.Tensor, epoch: int = 0, step: int = 0) -> StepInputs:
    b = logits.shape[0]
    return StepInputs(
        model=torch.nn.Identity(), x=torch.zeros(b, 3, 8, 8), y=y, index=torch.arange(b),
        logits=logits, features=torch.zeros(b, 2), epoch=epoch, step=step,
    )


def batch(seed: int, b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, generator=g) * 2, torch.randint(0, 3, (b,), generator=g)


def ce_values(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    out = []
    for row, t in zip(logits.tolist(), y.tolist()):
        m = max(row)
        out.append(-(row[t] - m - math.log(sum(math.exp(v - m) for v in row))))
    return out


def test_method_matches_hand_recursion_on_ce_and_end_epoch_means():
    method = METHODS.build(ABSGDParams(lam=2.0, gamma=0.7, alpha=0.5), INFO)
    method.begin_epoch(0)
    batches = [batch(s) for s in range(3)]
    want = plain_recursion([ce_values(z, y) for z, y in batches], 2.0, 0.7, 0.5, False)
    sums, counts = [0.0] * 3, [0] * 3
    for (z, y), w_ref in zip(batches, want):
        z = z.clone().requires_grad_()
        out = method.step(make_inputs(z, y))
        close(out.weights, w_ref, tol=1e-5)
        assert out.losses.requires_grad and not out.weights.requires_grad
        assert out.metrics["absgd/weight_max"] == pytest.approx(max(w_ref), rel=1e-5)
        weighted_loss(out).backward()  # the contract's reduction accepts the output
        for c, w in zip(y.tolist(), w_ref):
            sums[c] += w
            counts[c] += 1
    metrics = method.end_epoch(0)
    for c in range(3):
        if counts[c]:
            assert metrics[f"weight/class_{c}"] == pytest.approx(sums[c] / counts[c], rel=1e-5)
        else:
            assert f"weight/class_{c}" not in metrics


def test_method_stacks_on_class_weighted_base_loss():
    # ABSGD sees the base loss's per-sample value, class weight included: l_i = w_{y_i} CE_i.
    method = METHODS.build(ABSGDParams(lam=1.0, gamma=1.0, loss=CBCEParams(beta=0.9)), INFO)
    raw = [(1 - 0.9) / (1 - 0.9**n) for n in COUNTS]
    cb = [r * 3 / sum(raw) for r in raw]
    z, y = batch(7)
    losses = [cb[t] * c for t, c in zip(y.tolist(), ce_values(z, y))]
    close(method.step(make_inputs(z, y)).weights, plain_recursion([losses], 1.0, 1.0, 1.0, False)[0], tol=1e-5)


@pytest.mark.parametrize("lam", [None, 200.0, 1000.0])
def test_unset_or_large_lambda_is_exactly_erm(lam):
    method = METHODS.build(ABSGDParams(lam=lam), INFO)
    for s in range(2):
        out = method.step(make_inputs(*batch(s)))
        assert torch.equal(out.weights, torch.ones(6))
    assert method.log_u.item() == -math.inf  # the estimator does not run in the ERM stage


def test_two_stage_switch_at_lam_epoch_with_fresh_u():
    method = METHODS.build(ABSGDParams(init_lam=200.0, lam=1.5, lam_epoch=3), INFO)
    for epoch in range(3):
        method.begin_epoch(epoch)
        assert torch.equal(method.step(make_inputs(*batch(epoch))).weights, torch.ones(6))
    method.begin_epoch(3)
    z, y = batch(10)
    close(method.step(make_inputs(z, y)).weights, plain_recursion([ce_values(z, y)], 1.5, 0.9, 1.0, False)[0], tol=1e-5)


def test_lambda_change_resets_u_but_same_stage_does_not():
    method = METHODS.build(ABSGDParams(init_lam=5.0, lam=1.0, lam_epoch=2), INFO)
    method.begin_epoch(0)
    method.step(make_inputs(*batch(0)))
    method.begin_epoch(1)  # same stage (lambda 5): u carries on
    assert math.isfinite(method.log_u.item())
    method.begin_epoch(2)  # lambda 5 -> 1: u starts again from 0
    assert method.log_u.item() == -math.inf
    z, y = batch(1)
    close(method.step(make_inputs(z, y)).weights, plain_recursion([ce_values(z, y)], 1.0, 0.9, 1.0, False)[0], tol=1e-5)
    u = method.log_u.item()
    method.begin_epoch(2)  # e.g. a resumed run re-entering the epoch: no reset
    assert method.log_u.item() == u


def test_negative_lambda_turns_floor_on_unless_overridden():
    z, y = batch(3)
    ce = ce_values(z, y)
    auto = METHODS.build(ABSGDParams(lam=-2.0), INFO)
    close(auto.step(make_inputs(z, y)).weights, plain_recursion([ce], -2.0, 0.9, 1.0, True)[0], tol=1e-5)
    off = METHODS.build(ABSGDParams(lam=-2.0, floor=False), INFO)
    close(off.step(make_inputs(z, y)).weights, plain_recursion([ce], -2.0, 0.9, 1.0, False)[0], tol=1e-5)
    on = METHODS.build(ABSGDParams(lam=2.0, floor=True), INFO)
    close(on.step(make_inputs(z, y)).weights, plain_recursion([ce], 2.0, 0.9, 1.0, True)[0], tol=1e-5)


def test_state_dict_round_trip_continues_identically(tmp_path):
    params = ABSGDParams(lam=0.7, gamma=0.6, alpha=0.8)
    a = METHODS.build(params, INFO)
    a.begin_epoch(0)
    for s in range(2):
        a.step(make_inputs(*batch(s)))
    a.end_epoch(0)
    a.begin_epoch(1)
    a.step(make_inputs(*batch(2)))  # mid-epoch: the per-class accumulators are part of the state too
    torch.save(a.state_dict(), tmp_path / "m.pt")
    b = METHODS.build(params, INFO)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    b.begin_epoch(1)
    for s in range(3, 5):
        wa, wb = a.step(make_inputs(*batch(s))).weights, b.step(make_inputs(*batch(s))).weights
        assert torch.equal(wa, wb)
    assert a.end_epoch(1) == b.end_epoch(1)
    assert a.history == b.history


def test_artifacts_writes_a_png(tmp_path):
    method = METHODS.build(ABSGDParams(lam=1.0), INFO)
    assert method.artifacts(str(tmp_path)) == []  # nothing seen yet
    for epoch in range(2):
        method.begin_epoch(epoch)
        method.step(make_inputs(*batch(epoch, b=12)))
        method.end_epoch(epoch)
    paths = method.artifacts(str(tmp_path / "plots"))
    assert len(paths) == 1 and paths[0].endswith(".png")
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----- 1 worker vs 2 workers, for real (gloo on 127.0.0.1) ----------------------------------------------------------
GLOBAL_BATCHES = [8, 8, 6]  # global batch per step; each worker holds one half


def global_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(100 + s, b) for s, b in enumerate(GLOBAL_BATCHES)]


def _rank(rank: int, world: int) -> dict:
    pure, method_w = [], []
    method = METHODS.build(ABSGDParams(lam=0.5, gamma=0.7, alpha=0.5), INFO)
    method.begin_epoch(0)
    log_u = NEG_INF
    for z, y in global_data():
        half = slice(rank * (len(y) // world), (rank + 1) * (len(y) // world))
        losses = torch.tensor(ce_values(z[half], y[half]), dtype=torch.float32)
        w, log_u = absgd_weights(losses, log_u, 0.5, 0.7, 0.5, False)
        pure.append(w)
        method_w.append(method.step(make_inputs(z[half], y[half])).weights)
    return {"pure": pure, "method": method_w, "end": method.end_epoch(0)}


def test_two_workers_equal_one_worker(gloo):
    ranks = gloo(_rank)

    # The single process on the whole global batch.
    single = METHODS.build(ABSGDParams(lam=0.5, gamma=0.7, alpha=0.5), INFO)
    single.begin_epoch(0)
    log_u = NEG_INF
    for s, (z, y) in enumerate(global_data()):
        w, log_u = absgd_weights(torch.tensor(ce_values(z, y), dtype=torch.float32), log_u, 0.5, 0.7, 0.5, False)
        torch.testing.assert_close(torch.cat([r["pure"][s] for r in ranks]), w, rtol=1e-6, atol=1e-6)
        w_method = single.step(make_inputs(z, y)).weights
        torch.testing.assert_close(torch.cat([r["method"][s] for r in ranks]), w_method, rtol=1e-6, atol=1e-6)
    # The test has teeth: a worker using only its own half (no all-reduce) would get different weights.
    z, y = global_data()[0]
    alone, _ = absgd_weights(torch.tensor(ce_values(z[:4], y[:4]), dtype=torch.float32), NEG_INF, 0.5, 0.7, 0.5, False)
    assert (alone - ranks[0]["pure"][0]).abs().max() > 1e-2
    end = single.end_epoch(0)
    for r in ranks:  # the per-class means are all-reduced: every worker reports the global ones
        assert r["end"].keys() == end.keys()
        for k, v in end.items():
            assert r["end"][k] == pytest.approx(v, rel=1e-6)


def test_a_class_weighted_base_loss_is_reduced_per_sample_under_absgd_unless_set():
    """ABSGD weighs each sample's own w_y * loss (its seed's reduction='none'); ERM keeps the seeds'
    F.cross_entropy(weight=w) reduction. An explicit choice is kept either way, and survives a round trip."""
    from rwray.methods.erm import ERMParams

    assert ABSGDParams(lam=5.0, loss={"name": "cb_ce"}).loss.reduction == "mean"
    assert ABSGDParams(lam=5.0, loss={"name": "ldam", "drw_epoch": 3}).loss.reduction == "mean"
    kept = ABSGDParams(lam=5.0, loss={"name": "ldam", "reduction": "weighted_mean"})
    assert kept.loss.reduction == "weighted_mean"
    assert ABSGDParams.model_validate(kept.model_dump()).loss.reduction == "weighted_mean"
    assert ERMParams(loss={"name": "cb_ce"}).loss.reduction == "weighted_mean"
