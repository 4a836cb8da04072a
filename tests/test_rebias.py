"""ReBias and its baselines against hand-written updates, checkpoints, the bias-cell metric, and 1 vs 2 workers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwray import dist
from rwray.datainfo import DataInfo
from rwray.hsic import median_sigma
from rwray.methods import METHODS, StepInputs, weighted_loss
from rwray.methods.learned_mixin import LearnedMixinParams
from rwray.methods.rebias import ReBiasParams
from rwray.methods.rubi import RUBiParams
from rwray.methods.two_network import AuxOptimParams
from rwray.metrics import bias_cell_accuracy, bias_cell_counts, summarize_bias_cells
from rwray.models import MODELS
from rwray.models.simple_conv import SimpleConvNet, SimpleConvParams


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation, which on a shared, oversubscribed
    machine costs more than the arithmetic. Restored afterwards for other test modules in the same session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


K = 10
INFO = DataInfo(num_classes=K, class_counts=(4,) * K, image_shape=(3, 6, 6), num_train=64)


def unbiased_hsic_explicit(x: torch.Tensor, y: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Song et al. (2012) with explicit [m, m] matrices and products; RBF kernels from explicit differences."""
    m = x.shape[0]
    kx = torch.exp(-((x[:, None, :] - x[None, :, :]) ** 2).sum(-1) / (2 * sx**2))
    ky = torch.exp(-((y[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * sy**2))
    off = 1 - torch.eye(m, dtype=x.dtype)
    kt, lt = kx * off, ky * off
    one = torch.ones(m, 1, dtype=x.dtype)
    val = torch.trace(kt @ lt) + (one.T @ kt @ one) * (one.T @ lt @ one) / ((m - 1) * (m - 2)) \
        - 2.0 / (m - 2) * (one.T @ kt @ lt @ one)
    return (val / (m * (m - 3))).reshape(())


def batch(seed: int, b: int = 12, shape=(3, 6, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randint(0, K, (b,), generator=g)


def f_net(seed: int = 0, kernel: int = 3, norm: str = "batch", info: DataInfo = INFO) -> SimpleConvNet:
    torch.manual_seed(seed)
    return SimpleConvNet(SimpleConvParams(kernel=kernel, norm=norm), info)


def build(params, f: nn.Module, seed: int = 1, info: DataInfo = INFO, prepare=lambda mod: mod):
    torch.manual_seed(seed)  # g's initial weights
    m = METHODS.build(params, info)
    m.attach(f, prepare=prepare, device=torch.device("cpu"))
    return m


def run_step(method, f: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: int = 0, step: int = 0):
    logits, feats = f(x, return_features=True)
    out = method.step(StepInputs(f, x, y, torch.arange(len(y)), logits, feats, epoch, step))
    return out, logits, feats


def adam_copy(module: nn.Module, aux: AuxOptimParams) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=aux.lr, weight_decay=aux.weight_decay)


def params_close(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol, atol=tol, msg=n)


# ------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("kernel", [7, 1])
def test_simple_conv_architecture(kernel):
    net = MODELS.build(MODELS["simple_conv"].params(kernel=kernel), INFO)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128]
    assert all(c.kernel_size == (kernel, kernel) and c.padding == (kernel // 2,) * 2 and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 4
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in net.modules())
    # parameters: convs (no bias) + BN scale/shift + linear head
    chans = [3, 16, 32, 64, 128]
    want = sum(chans[i] * chans[i + 1] * kernel**2 + 2 * chans[i + 1] for i in range(4)) + 128 * K + K
    assert sum(p.numel() for p in net.parameters()) == want
    logits, feats = net(torch.randn(5, 3, 6, 6), return_features=True)
    assert logits.shape == (5, K) and feats.shape == (5, 128) and net.feature_dim == 128
    with pytest.raises(ValueError, match="odd"):
        SimpleConvParams(kernel=4)


# ------------------------------------------------------------------------------------------------------ ReBias


def test_rebias_step_is_g_update_then_f_objective_by_hand():
    """One step against the update written out: g <- Adam step on CE(g) − λ_g·HSIC(g, f.detach()); then the fresh g
    features enter f's penalty λ_f·HSIC(f, g.detach()); f's losses are its per-sample CE with weights 1."""
    torch.set_default_dtype(torch.float64)  # the comparison is to 1e-9, not to float32 rounding
    try:
        params = ReBiasParams(lambda_f=0.7, lambda_g=1.3, sigma=1.5)
        f = f_net()
        method = build(params, f)
        g_ref = copy.deepcopy(method.g)
        opt_ref = adam_copy(g_ref, params.g_optim)
        x, y = batch(0)
        out, logits, feats = run_step(method, f, x, y)

        # the reference update of g
        g_logits, g_feat = g_ref(x, return_features=True)
        g_loss = F.cross_entropy(g_logits, y) - 1.3 * unbiased_hsic_explicit(g_feat, feats.detach(), 1.5, 1.5)
        opt_ref.zero_grad()
        g_loss.backward()
        opt_ref.step()
        params_close(method.g, g_ref, 1e-9)
        with torch.no_grad():
            _, g_new = g_ref(x, return_features=True)  # train mode, as the method's fresh forward
        for (n, a), (_, b) in zip(method.g.named_buffers(), g_ref.named_buffers()):
            torch.testing.assert_close(a, b, msg=n)  # BatchNorm statistics saw the same two forwards

        want_pen = 0.7 * unbiased_hsic_explicit(feats.detach(), g_new, 1.5, 1.5)
        torch.testing.assert_close(out.penalty, want_pen, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out.losses, F.cross_entropy(logits, y, reduction="none"), rtol=0, atol=0)
        assert torch.equal(out.weights, torch.ones(12)) and not out.weights.requires_grad
        assert out.metrics["rebias/hsic"] == pytest.approx(float(want_pen) / 0.7, rel=1e-9)
        # f's gradient is that of CE + penalty; g's features enter as constants
        grads = torch.autograd.grad(weighted_loss(out), list(f.parameters()))
        f2 = f_net()
        l2, fe2 = f2(x, return_features=True)
        ref = F.cross_entropy(l2, y) + 0.7 * unbiased_hsic_explicit(fe2, g_new, 1.5, 1.5)
        for a, b in zip(grads, torch.autograd.grad(ref, list(f2.parameters()))):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        # alternation has teeth: the penalty uses g AFTER its update, not the features g had before it
        with torch.no_grad():
            _, g_before = copy.deepcopy(build(params, f_net()).g)(x, return_features=True)
        assert abs(float(unbiased_hsic_explicit(feats.detach(), g_before, 1.5, 1.5)) - float(want_pen) / 0.7) > 1e-8
    finally:
        torch.set_default_dtype(torch.float32)


def test_pre_update_option_reuses_the_update_forward_features():
    """g_features_for_f=pre_update: g's update is unchanged, and f's penalty is HSIC(f, g's features from the forward
    its update was computed on), so the two HSIC values of the step coincide."""
    f = f_net()
    fresh, pre = build(ReBiasParams(), f), build(ReBiasParams(g_features_for_f="pre_update"), f)
    g0 = copy.deepcopy(pre.g)
    x, y = batch(6)
    out_f, _, _ = run_step(fresh, f, x, y)
    out_p, _, feats = run_step(pre, f, x, y)
    params_close(fresh.g, pre.g, 0.0)
    _, g_before = g0(x, return_features=True)
    want = unbiased_hsic_explicit(feats.detach().double(), g_before.detach().double(), 1.0, 1.0)
    assert float(out_p.penalty.detach()) == pytest.approx(float(want), rel=1e-5)
    assert out_p.metrics["rebias/hsic"] == out_p.metrics["rebias/hsic_g"] != out_f.metrics["rebias/hsic"]


def test_lambda_zero_trains_g_on_ce_and_f_without_penalty():
    params = ReBiasParams(lambda_f=0.0, lambda_g=0.0, n_g_updates=2)
    f = f_net()
    method = build(params, f)
    g_ref = copy.deepcopy(method.g)
    opt_ref = adam_copy(g_ref, params.g_optim)
    x, y = batch(1)
    out, logits, _ = run_step(method, f, x, y)
    for _ in range(2):
        opt_ref.zero_grad()
        F.cross_entropy(g_ref(x), y).backward()
        opt_ref.step()
    params_close(method.g, g_ref)
    assert out.penalty is None and "rebias/hsic" in out.metrics  # still monitored
    assert torch.equal(out.losses, F.cross_entropy(logits, y, reduction="none"))


def test_median_sigma_window_and_epoch_metrics():
    """num_train 64, global batch 8: 8 steps per epoch, a 25 % window = the first 2 steps. Until the run's first window
    closes, σ is the median of the current batch; then σ_f = median pairwise distance of the window's f features."""
    params = ReBiasParams(sigma="median", median_max_samples=10, seed=3)
    f = f_net()
    method = build(params, f)
    fresh: list[torch.Tensor] = []  # g's fresh (no-grad) pooled features, captured from its body
    method.g.body.register_forward_hook(lambda _m, _i, o: None if torch.is_grad_enabled() else fresh.append(o.mean((2, 3))))
    feats_seen, hsics = [], []
    for epoch in range(2):
        method.begin_epoch(epoch)
        for s in range(8):
            x, y = batch(10 * epoch + s, b=8)
            out, _, feats = run_step(method, f, x, y, epoch, s)
            feats_seen.append(feats.detach())
            hsics.append(out.metrics["rebias/hsic"])
            if epoch == 0 and s == 0:
                assert method.sigma_f is None  # window open, first of the run: per-batch median in use
                assert out.metrics["rebias/hsic"] == pytest.approx(float(unbiased_hsic_explicit(
                    feats.detach().double(), fresh[-1].double(), median_sigma(feats), median_sigma(fresh[-1]))), rel=1e-4)
            if s == 1:  # the window closes after its 2nd step
                gen = torch.Generator().manual_seed(3 * 1_000_003 + epoch)
                want_f = median_sigma(torch.cat(feats_seen[-2:]), 10, gen)
                want_g = median_sigma(torch.cat(fresh[-2:]), 10, gen)
                assert method.sigma_f == pytest.approx(want_f, rel=1e-6)
                assert method.sigma_g == pytest.approx(want_g, rel=1e-6)
                sig_after_window = (method.sigma_f, method.sigma_g)
            if s == 7:
                assert (method.sigma_f, method.sigma_g) == sig_after_window  # fixed for the rest of the epoch
        end = method.end_epoch(epoch)
        assert end["rebias/sigma_f"] == method.sigma_f and end["rebias/sigma_g"] == method.sigma_g
        assert end["rebias/hsic"] == pytest.approx(sum(hsics[-8:]) / 8, rel=1e-12)
    with pytest.raises(ValueError, match="sigma"):
        ReBiasParams(sigma=0.0)
    with pytest.raises(ValueError):
        ReBiasParams(sigma="mean")


# ------------------------------------------------------------------------------------------------------- RUBi


def test_rubi_matches_the_joint_objective():
    params = RUBiParams(question_loss_weight=0.5)
    f = f_net()
    method = build(params, f)
    g_ref, fc_ref = copy.deepcopy(method.g), copy.deepcopy(method.heads["fc"])
    opt_g, opt_fc = adam_copy(g_ref, params.g_optim), adam_copy(fc_ref, params.g_optim)
    x, y = batch(2)
    f0 = copy.deepcopy(f)
    out, logits, _ = run_step(method, f, x, y)

    opt_g.zero_grad()
    F.cross_entropy(g_ref(x), y).backward()  # g: its own CE only
    opt_g.step()
    params_close(method.g, g_ref)
    with torch.no_grad():
        _, g_feat = g_ref(x, return_features=True)
    # the joint objective of f and fc: fused CE + question loss on fc's logits; g_feat enters as a constant
    l0 = f0(x)
    mask_logits = fc_ref(g_feat)
    joint = F.cross_entropy(l0 * torch.sigmoid(mask_logits), y) + 0.5 * F.cross_entropy(mask_logits, y)
    f_grads = torch.autograd.grad(joint, list(f0.parameters()), retain_graph=True)
    opt_fc.zero_grad()
    joint.backward()
    opt_fc.step()
    params_close(method.heads["fc"], fc_ref)
    torch.testing.assert_close(out.losses, F.cross_entropy(logits * torch.sigmoid(mask_logits), y, reduction="none"))
    for a, b in zip(torch.autograd.grad(weighted_loss(out), list(f.parameters())), f_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ LearnedMixin+H


def test_learned_mixin_objective_fc_update_and_frozen_g():
    params = LearnedMixinParams(g_pretrain_epochs=1)
    f = f_net()
    method = build(params, f)
    fc_ref = copy.deepcopy(method.heads["fc"])
    opt_fc = adam_copy(fc_ref, params.g_optim)
    x, y = batch(3)
    method.begin_epoch(0)
    f0 = copy.deepcopy(f)
    g_before = copy.deepcopy(method.g)
    out, logits, feats = run_step(method, f, x, y)
    assert not all(torch.equal(p, q) for p, q in zip(method.g.parameters(), g_before.parameters()))  # g pre-trains
    with torch.no_grad():
        g_lp = F.log_softmax(method.g(x), dim=1)  # train mode, after its update: what f's loss used

    def objective(f_logits, f_feat, fc):
        scale = F.softplus(fc(f_feat))  # [B, 1]
        bias = scale * g_lp
        ent = -(F.softmax(bias, 1) * F.log_softmax(bias, 1)).sum(1)
        return F.cross_entropy(f_logits + bias, y, reduction="none") + 0.36 * ent

    l0, fe0 = f0(x, return_features=True)
    want = objective(l0, fe0, fc_ref)
    torch.testing.assert_close(out.losses, want, rtol=1e-5, atol=1e-6)
    f_grads = torch.autograd.grad(want.mean(), list(f0.parameters()), retain_graph=True)
    opt_fc.zero_grad()
    want.mean().backward()
    opt_fc.step()
    params_close(method.heads["fc"], fc_ref)
    for a, b in zip(torch.autograd.grad(weighted_loss(out), list(f.parameters())), f_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert method.end_epoch(0) == {"learned_mixin/g_frozen": 0.0}

    # epoch 1 >= g_pretrain_epochs: g is a fixed function (no update, eval-mode BatchNorm, statistics untouched)
    method.begin_epoch(1)
    frozen = copy.deepcopy(method.g.state_dict())
    out, logits, _ = run_step(method, f, *batch(4), epoch=1)
    assert all(torch.equal(v, method.g.state_dict()[k]) for k, v in frozen.items())
    assert not method.g.training and "learned_mixin/g_ce" not in out.metrics
    assert method.end_epoch(1) == {"learned_mixin/g_frozen": 1.0}


def test_learned_mixin_g_pretrain_first_trains_g_alone_then_f():
    """g_pretrain first (the ReBias code's pretrain()): during the first g_pretrain_epochs the loop's epoch moves g
    only: f's weights and BatchNorm statistics and the scale head stay bit-for-bit, although f's optimizer has weight
    decay; from the next epoch f trains and g is frozen."""
    from rwray.train.batches import Batch
    from rwray.train.epoch import train_epoch

    params = LearnedMixinParams(g_pretrain_epochs=1, g_pretrain="first")
    f = f_net()
    method = build(params, f)
    opt = torch.optim.Adam(f.parameters(), lr=1e-2, weight_decay=1e-4)
    data = [Batch(*batch(30 + i), torch.arange(12)) for i in range(2)]
    f0, fc0, g0 = (copy.deepcopy(m.state_dict()) for m in (f, method.heads["fc"], method.g))
    assert not method.trains_model(0) and method.trains_model(1)
    method.begin_epoch(0)
    out0 = train_epoch(f, method, opt, data, 0)
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in f0.items())  # running stats too
    assert all(torch.equal(v, method.heads["fc"].state_dict()[k]) for k, v in fc0.items())
    assert not all(torch.equal(v, method.g.state_dict()[k]) for k, v in g0.items())
    with torch.no_grad():  # the recorded train loss is f's plain CE (mean over both batches, f unchanged)
        want = torch.cat([F.cross_entropy(f.eval()(b.x), b.y, reduction="none") for b in data]).mean()
    assert out0["train/loss"] == pytest.approx(float(want), rel=1e-5)
    method.begin_epoch(1)
    g1 = copy.deepcopy(method.g.state_dict())
    train_epoch(f, method, opt, data, 1)
    assert not all(torch.equal(v, f.state_dict()[k]) for k, v in f0.items())
    assert all(torch.equal(v, method.g.state_dict()[k]) for k, v in g1.items())


# ------------------------------------------------------------------------------------------ f-only baselines


def test_vanilla_and_biased():
    x, y = batch(5)
    f = f_net(kernel=1)
    for name in ("vanilla", "biased"):
        m = build(METHODS[name].params(), f)
        out, logits, _ = run_step(m, f, x, y)
        assert torch.equal(out.losses, F.cross_entropy(logits, y, reduction="none")) and out.penalty is None
    with pytest.raises(ValueError, match="kernel=1"):
        build(METHODS["biased"].params(), f_net(kernel=7))


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("params", [
    ReBiasParams(sigma="median", g_optim=AuxOptimParams(lr=0.05, milestones=[1])),
    RUBiParams(),
    LearnedMixinParams(g_pretrain_epochs=1),
], ids=["rebias-median-milestone", "rubi", "learned_mixin"])
def test_checkpoint_round_trip_resumes_identically(params, tmp_path):
    f = f_net()
    a = build(params, f)
    a.begin_epoch(0)
    for s in range(2):
        run_step(a, f, *batch(20 + s), epoch=0, step=s)
    end_a = a.end_epoch(0)
    path = tmp_path / "state.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)  # tensors and plain containers only
    assert {"g", "heads", "opts"} <= set(state)
    assert set(state["opts"]) == ({"g", "heads"} if params.name != "rebias" else {"g"})
    assert "running_mean" in "".join(state["g"])  # BatchNorm buffers travel too
    if params.name == "rebias" and params.sigma == "median":
        assert state["sigma_f"] == end_a["rebias/sigma_f"]

    f_b = copy.deepcopy(f)
    b = build(params, f_b, seed=99)  # different initial g: everything must come from the state
    b.load_state_dict(state)
    late = METHODS.build(params, INFO)  # a state loaded before attach is applied by attach
    late.load_state_dict(state)
    f_c = copy.deepcopy(f)
    late.attach(f_c, prepare=lambda mod: mod, device=torch.device("cpu"))
    for m in (a, b, late):
        m.begin_epoch(1)
    for s in range(2):
        x, y = batch(30 + s)
        outs = [run_step(m, net, x, y, epoch=1, step=s)[0] for m, net in ((a, f), (b, f_b), (late, f_c))]
        for o in outs[1:]:
            assert torch.equal(o.losses, outs[0].losses)
            assert (o.penalty is None) == (outs[0].penalty is None)
            if o.penalty is not None:
                assert torch.equal(o.penalty, outs[0].penalty)
            assert o.metrics == outs[0].metrics
    for m in (b, late):
        for (n, p), (_, q) in zip(a.g.state_dict().items(), m.g.state_dict().items()):
            assert torch.equal(p, q), n
        for k in a.opts:
            assert a.opts[k].param_groups[0]["lr"] == m.opts[k].param_groups[0]["lr"]
    assert a.end_epoch(1) == b.end_epoch(1)
    if params.g_optim.milestones:
        assert a.opts["g"].param_groups[0]["lr"] == pytest.approx(0.005)  # x gamma from epoch 1


# ------------------------------------------------------------------------------------------- bias-cell metric


def test_bias_cell_counts_by_hand_and_additive():
    g = torch.Generator().manual_seed(0)
    preds, labels, bias = (torch.randint(0, 3, (50,), generator=g) for _ in range(3))
    counts = bias_cell_counts(preds, labels, bias, 3, 3)
    assert counts.shape == (2, 3, 3) and counts.dtype == torch.int64
    for c in range(3):
        for b in range(3):
            cell = (labels == c) & (bias == b)
            assert counts[1, c, b] == cell.sum() and counts[0, c, b] == (cell & (preds == labels)).sum()
    halves = bias_cell_counts(preds[:20], labels[:20], bias[:20], 3, 3) + bias_cell_counts(preds[20:], labels[20:], bias[20:], 3, 3)
    assert torch.equal(halves, counts)  # sums over batches / workers (all_reduce_sum) are exact

    # 2 classes x 2 colours, written out: cell (0,0): 2/2, (0,1): 0/1, (1,0): 1/3, (1,1): empty
    p = torch.tensor([0, 0, 1, 1, 0, 0])
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    b = torch.tensor([0, 0, 1, 0, 0, 0])
    c = bias_cell_counts(p, y, b, 2, 2)
    acc = bias_cell_accuracy(c)
    assert acc[0, 0] == 1.0 and acc[0, 1] == 0.0 and acc[1, 0] == pytest.approx(1 / 3) and math.isnan(acc[1, 1])
    s = summarize_bias_cells(c)
    assert s["cell_mean_acc"] == pytest.approx((1 + 0 + 1 / 3) / 3) and s["worst_cell_acc"] == 0.0
    assert s["aligned_acc"] == 1.0  # cells (0,0), (1,1): 2 of 2
    assert s["conflicting_acc"] == pytest.approx(1 / 4)  # cells (0,1), (1,0): 1 of 4
    with pytest.raises(ValueError, match="outside"):
        bias_cell_counts(p, y, b + 1, 2, 2)


# ------------------------------------------------------------------------------- 1 vs 2 workers, for real (gloo)

DIST_INFO = DataInfo(num_classes=K, class_counts=(4,) * K, image_shape=(3, 4, 4), num_train=32)
GLOBAL_B, STEPS = 8, 3


def dist_params() -> ReBiasParams:
    # SGD (not Adam) so a wrong gradient scale (e.g. a missing world-size factor) changes the parameters visibly.
    return ReBiasParams(sigma="median", g=SimpleConvParams(kernel=1, norm="group"),
                        g_optim=AuxOptimParams(name="sgd", lr=0.2, momentum=0.0, weight_decay=0.0))


def dist_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(200 + s, b=GLOBAL_B, shape=(3, 4, 4)) for s in range(STEPS)]


def train(prepare, rank: int, world: int) -> dict:
    """STEPS loop iterations (f forward, method.step, weighted loss, backward, SGD on f) on this worker's rows.

    In float64, so that what remains of a difference between 1 and 2 workers is summation order (~1e-15), and the
    comparison can be tight: HSIC values are differences of O(1) kernel sums, which float32 resolves only to ~1e-7.
    """
    torch.set_default_dtype(torch.float64)
    try:
        return _train(prepare, rank, world)
    finally:
        torch.set_default_dtype(torch.float32)


def _train(prepare, rank: int, world: int) -> dict:
    f = f_net(seed=0, kernel=3, norm="group", info=DIST_INFO)  # GroupNorm: every sample's forward is independent
    model = prepare(f)
    method = build(dist_params(), model, info=DIST_INFO, prepare=prepare)  # g wrapped in DDP too when world = 2
    opt = torch.optim.SGD(f.parameters(), lr=0.2)
    method.begin_epoch(0)
    hsic, sigmas = [], []
    for s, (x, y) in enumerate(dist_batches()):
        rows = slice(rank * GLOBAL_B // world, (rank + 1) * GLOBAL_B // world)
        logits, feats = model(x[rows], return_features=True)
        out = method.step(StepInputs(model, x[rows], y[rows], torch.arange(GLOBAL_B)[rows], logits, feats, 0, s))
        opt.zero_grad()
        weighted_loss(out).backward()
        opt.step()
        hsic.append(out.metrics["rebias/hsic"])
        sigmas.append((method.sigma_f, method.sigma_g))
    g = dist.unwrap(method.g)
    return {"f": {k: v.clone() for k, v in f.state_dict().items()}, "g": {k: v.clone() for k, v in g.state_dict().items()},
            "hsic": hsic, "sigmas": sigmas}


def _rank(rank: int, world: int) -> dict:
    """One of the two gloo workers: f and g wrapped in DDP."""
    return train(nn.parallel.DistributedDataParallel, rank, world)


def test_two_workers_equal_one_worker_on_the_global_batch(gloo):
    """What the all-gather design guarantees: with per-sample normalisation, 2 workers x 4 samples give the same HSIC
    values, the same median σ and the same f and g parameters as 1 worker x 8 samples (float rounding aside)."""
    # meanwhile, the single process on the whole global batch
    ranks, single = gloo(_rank, meanwhile=lambda: train(lambda m: m, 0, 1))
    for r in ranks:
        assert r["hsic"] == pytest.approx(single["hsic"], rel=1e-9, abs=1e-12)
        for (a, b), (c, d) in zip(r["sigmas"], single["sigmas"]):
            assert (a is None) == (c is None) and (a is None or a == pytest.approx(c, rel=1e-9))
            assert (b is None) == (d is None) and (b is None or b == pytest.approx(d, rel=1e-9))
        for net in ("f", "g"):
            for k, v in single[net].items():
                torch.testing.assert_close(r[net][k], v, rtol=1e-9, atol=1e-12, msg=f"{net}.{k}")
    assert single["sigmas"][0][0] is not None  # the median window (1 step of 4) closed at the first step
    # teeth: HSIC of one worker's half batch alone is a different number
    torch.set_default_dtype(torch.float64)
    try:
        f = f_net(seed=0, kernel=3, norm="group", info=DIST_INFO)
        x, y = dist_batches()[0]
        local = build(dist_params(), f, info=DIST_INFO)
        out, _, _ = run_step(local, f, x[:4], y[:4])
    finally:
        torch.set_default_dtype(torch.float32)
    assert abs(out.metrics["rebias/hsic"] - single["hsic"][0]) > 0.05 * abs(single["hsic"][0])


def test_g_cosine_schedule_follows_the_formula_and_is_validated():
    import math

    from pydantic import ValidationError

    aux = AuxOptimParams(lr=1e-3, schedule="cosine", epochs=120)
    assert [aux.lr_at(e) for e in (0, 60)] == [pytest.approx(1e-3), pytest.approx(0.5e-3)]
    assert aux.lr_at(119) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 119 / 120)))
    step = AuxOptimParams(lr=1e-3, milestones=[2, 4], gamma=0.1)
    assert [step.lr_at(e) for e in (1, 2, 4)] == [pytest.approx(1e-3), pytest.approx(1e-4), pytest.approx(1e-5)]
    with pytest.raises(ValidationError, match="set it"):
        AuxOptimParams(schedule="cosine")
    with pytest.raises(ValidationError, match="milestones belong to schedule=step"):
        AuxOptimParams(schedule="cosine", epochs=10, milestones=[5])
    # the method applies it at every epoch start
    m = build(ReBiasParams(g_optim=AuxOptimParams(lr=1e-3, schedule="cosine", epochs=4)), f_net())
    m.begin_epoch(2)
    assert m.opts["g"].param_groups[0]["lr"] == pytest.approx(0.5e-3)
