"""Per-sample-gradient Gram matrices (`rwray.gram`): the hook-based fast path against the torch.func reference
(float64), against Grams written out by hand, and the per-layer kernels. No Ray; every model is tiny. The p-score /
weight functions of batch reweighting are tested in tests/test_batch_reweight.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwray.datainfo import DataInfo
from rwray.gram.kernels import outer_gram
import rwray.gram as gm
from rwray.models.layers import NormedLinear
from rwray.models.resnet_cifar import ResNet32Params, resnet32
from rwray.methods.batch_reweight import cosine
from rwray.models.small_cnn import SmallCNN, SmallCNNParams

TOL = dict(rtol=1e-5, atol=1e-5)


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")  # [B]


def both(model, x, y, modules=None, strategy="auto"):
    fast = gm.gram(model, x, y, ce, impl="fast", modules=modules, strategy=strategy)
    ref = gm.gram(model, x, y, ce, impl="reference", modules=modules)
    return fast, ref


def assert_gram_close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    # 1e-5 relative to the Gram's scale (entries reach ~1e3 on ResNet-32), and the cosines too.
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(fast / scale, ref / scale, **TOL)
    torch.testing.assert_close(cosine(fast), cosine(ref), **TOL)


# ----- MLPs -------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 6, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # [B, 5] -> [B, 3]
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


@pytest.mark.parametrize("strategy", ["auto", "pairwise", "materialise"])
def test_mlp_fast_equals_reference(strategy):
    torch.manual_seed(0)
    model, x, y = MLP().double(), torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 1])
    fast, ref = both(model, x, y, strategy=strategy)
    assert_gram_close(fast, ref)
    # The Gram is really the per-sample gradients': its diagonal is |grad l_i|^2 from plain autograd.
    for i in range(6):
        g = torch.autograd.grad(ce(model(x[i : i + 1]), y[i : i + 1]).sum(), list(model.parameters()))
        assert fast[i, i].item() == pytest.approx(sum((t**2).sum() for t in g).item(), rel=1e-10)


@pytest.mark.parametrize("which,k,expect", [("head", 1, ["head"]), ("last_k", 2, ["fc2", "head"]), ("all", 1, ["fc1", "fc2", "head"])])
def test_mlp_subsets_mean_the_same_in_both(which, k, expect):
    torch.manual_seed(1)
    model, x, y = MLP().double(), torch.randn(6, 5, dtype=torch.float64), torch.tensor([2, 1, 2, 0, 1, 0])
    order = gm.forward_order(model, x)
    assert order == ["fc1", "fc2", "head"]
    modules = gm.select_modules(order, which, k)
    assert modules == expect
    fast, ref = both(model, x, y, modules)
    assert_gram_close(fast, ref)
    if which != "all":  # a strict subset really is smaller
        assert (fast.diagonal() < gm.gram(model, x, y, ce).diagonal()).all()


class TokenMLP(nn.Module):
    """A Linear applied at T = 4 positions per sample (T > 1 exercises the BT x BT pairwise Gram), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # [B, 4, 3] -> [B, 2]
        return self.head(torch.relu(self.mix(x)).mean(1))


@pytest.mark.parametrize("strategy", ["pairwise", "materialise"])
def test_linear_with_positions_both_strategies(strategy):
    torch.manual_seed(2)
    model, x, y = TokenMLP().double(), torch.randn(5, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    assert_gram_close(*both(model, x, y, strategy=strategy))


def test_hand_computed_linear_ce_gram():
    # logits = W x + b, CE: g_i(W) = r_i x_iᵀ, g_i(b) = r_i with r_i = softmax(W x_i + b) - onehot(y_i), so
    # G_ij = (r_i . r_j)(x_i . x_j + 1). Written out here with plain tensor algebra, no autograd.
    torch.manual_seed(3)
    lin = nn.Linear(3, 4).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 3, 3, 1])
    r = torch.softmax(x @ lin.weight.detach().T + lin.bias.detach(), 1) - F.one_hot(y, 4).double()  # [4, 4]
    want = (r @ r.T) * (x @ x.T + 1)
    torch.testing.assert_close(gm.gram(lin, x, y, ce), want, rtol=1e-12, atol=1e-12)


# ----- ResNet-32 with GroupNorm, BatchNorm in eval mode, BatchNorm in training mode ----------------------------------
def small_resnet(norm: str) -> nn.Module:
    torch.manual_seed(4)
    info = DataInfo(num_classes=5, class_counts=(1,) * 5, image_shape=(3, 8, 8), num_train=5)
    model = resnet32(ResNet32Params(norm=norm), info).double()
    with torch.no_grad():  # non-trivial affine parameters, so the norm layers' gradients are not special
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def data(b=6, shape=(3, 8, 8), classes=5, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=torch.float64), torch.randint(0, classes, (b,), generator=g)


def test_resnet32_groupnorm_fast_equals_reference_all_params():
    model = small_resnet("group")
    x, y = data()
    fast, ref = both(model, x, y)
    assert_gram_close(fast, ref)
    # The other strategy for the conv layers (unfold + BT x BT products) agrees as well.
    assert_gram_close(gm.gram(model, x, y, ce, strategy="pairwise"), ref)
    order = gm.forward_order(model, x)
    assert len(order) == 31 + 31 + 1 and order[0] == "stem.0" and order[-1] == "fc"  # convs, norms, head


def test_resnet32_groupnorm_last_k_subset():
    model = small_resnet("group")
    x, y = data(seed=6)
    modules = gm.select_modules(gm.forward_order(model, x), "last_k", 3)
    assert modules == ["layers.14.conv2", "layers.14.bn2", "fc"]
    assert_gram_close(*both(model, x, y, modules))


def test_batchnorm_eval_mode_fast_equals_reference():
    torch.manual_seed(7)
    info = DataInfo(num_classes=3, class_counts=(1,) * 3, image_shape=(2, 6, 6), num_train=3)
    model = SmallCNN(SmallCNNParams(width=4, norm="batch"), info).double()
    x, y = data(5, (2, 6, 6), 3, seed=8)
    model.train()
    model(x * 2 + 1)  # move the running statistics away from (0, 1)
    model.eval()
    assert_gram_close(*both(model, x, y))


def test_batchnorm_training_mode_reference_refuses():
    model = small_resnet("batch")
    x, y = data()
    with pytest.raises(ValueError, match="batch statistics"):
        gm.gram(model, x, y, ce, impl="reference")


class PrivateCopyNet(nn.Module):
    """conv -> BatchNorm (batch statistics) -> relu -> mean pool -> linear, as nn modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def private_copy_grads(net: PrivateCopyNet, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The same network written by hand with one private parameter copy per sample ([B, *shape] each) and shared
    batch statistics: d(sum l)/d(copy_i) is sample i's contribution to the batch gradient."""
    B = x.shape[0]
    copies = [p.detach().unsqueeze(0).repeat(B, *[1] * p.dim()).requires_grad_() for p in net.parameters()]
    cw, cb, gw, gb, fw, fb = copies
    h = F.conv2d(x.reshape(1, -1, *x.shape[2:]), cw.reshape(-1, *cw.shape[2:]), padding=1, groups=B)
    h = h.reshape(B, 3, *x.shape[2:]) + cb[:, :, None, None]  # [B, 3, H, W] each sample with its own conv
    h = F.batch_norm(h, None, None, training=True, eps=net.bn.eps)  # shared batch statistics
    h = torch.relu(h * gw[:, :, None, None] + gb[:, :, None, None]).mean(dim=(2, 3))  # [B, 3]
    logits = torch.einsum("bi,boi->bo", h, fw) + fb  # [B, 4]
    return list(torch.autograd.grad(ce(logits, y).sum(), copies))


def test_batchnorm_training_mode_is_the_private_copy_gradient():
    torch.manual_seed(9)
    net = PrivateCopyNet().double()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.3, 0.3)
    x, y = data(5, (2, 4, 4), 4, seed=10)
    flat = torch.cat([g.reshape(5, -1) for g in private_copy_grads(net, x, y)], 1)  # [B, d]
    want = flat @ flat.T
    got = gm.gram(net, x, y, ce)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # ... so the per-sample contributions sum to the batch gradient: 1ᵀ G 1 = |grad sum_i l_i|^2.
    full = torch.autograd.grad(ce(net(x), y).sum(), list(net.parameters()))
    assert got.sum().item() == pytest.approx(sum((t**2).sum() for t in full).item(), rel=1e-10)
    # ... and differ from the one-sample-forward gradients (the coupling is real in this example).
    one = torch.autograd.grad(ce(net(x[:2]), y[:2]).sum(), list(net.parameters()))  # batch of 2: other stats
    assert got.sum().item() != pytest.approx(sum((t**2).sum() for t in one).item(), rel=1e-3)


# ----- module kinds beyond Linear / Conv2d / norms -----------------------------------------------------------------
class Mixed(nn.Module):
    """Grouped, strided, dilated conv with bias; a module called twice (shared weights); the cosine head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2)
        self.gn = nn.GroupNorm(3, 6)
        self.shared = nn.Linear(6, 6)
        self.head = NormedLinear(6, 3)

    def forward(self, x):  # [B, 4, 7, 7] -> [B, 3]
        f = torch.relu(self.gn(self.conv(x))).mean(dim=(2, 3))  # [B, 6]
        f = self.shared(torch.tanh(self.shared(f)))  # the same Linear twice
        return self.head(f)


@pytest.mark.parametrize("strategy", ["auto", "pairwise", "materialise"])
def test_grouped_conv_shared_module_and_cosine_head(strategy):
    torch.manual_seed(11)
    model = Mixed().double()
    x, y = data(5, (4, 7, 7), 3, seed=12)
    assert_gram_close(*both(model, x, y, strategy=strategy))


def test_layer_grads_rebuild_any_weighted_gradient():
    # Grouped/strided/dilated conv with bias, GroupNorm, a Linear called twice, the cosine head (generic fallback):
    # sum_i c_i g_i from the records equals autograd's gradient of sum_i c_i l_i, and the surrogate hands exactly
    # that to .grad through an ordinary backward (the forward graph already freed).
    torch.manual_seed(16)
    model = Mixed().double()
    x, y = data(5, (4, 7, 7), 3, seed=17)
    c = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.1], dtype=torch.float64)
    want = torch.autograd.grad((c * ce(model(x), y)).sum(), list(model.parameters()))
    cap = gm.GramCapture(model)
    losses = ce(model(x), y)
    G, kept = cap.gram_and_grads(losses, retain_graph=False)
    cap.clear()
    assert kept.complete
    torch.testing.assert_close(G, gm.gram(model, x, y, ce), rtol=1e-12, atol=1e-12)
    got = kept.weighted(c)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(got[id(p)], w, rtol=1e-10, atol=1e-12)
    (c * kept.surrogate(losses)).sum().backward()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError):
        losses.sum().backward()  # the forward graph really was freed by the Gram pass


# ----- the capture inside a training step --------------------------------------------------------------------------
def test_capture_keeps_the_loops_backward_exact_and_leaves_grads_alone():
    model = small_resnet("group")
    x, y = data(seed=13)
    plain = torch.autograd.grad(ce(model(x), y).mean(), list(model.parameters()))
    cap = gm.GramCapture(model)
    losses = ce(model(x), y)
    G = cap.gram(losses)
    # The tensor hooks are gone after each pass: a second Gram on the same forward is the same, not doubled.
    torch.testing.assert_close(cap.gram(losses), G, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # the Gram passes computed no parameter gradient
    losses.mean().backward()  # the loop's backward on the retained graph
    for p, want in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-12)
    cap.close()


def test_capture_records_only_training_forwards():
    model = MLP().double()
    cap = gm.GramCapture(model)
    x = torch.randn(3, 5, dtype=torch.float64)
    model(x)
    assert cap.order() == ["fc1", "fc2", "head"]
    with torch.no_grad():  # evaluation clears the record and adds nothing
        model(x)
    assert cap.calls == []
    cap.close()
    model(x)
    assert cap.calls == []  # closed: no hooks left


def test_inplace_change_of_a_captured_output_is_refused():
    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu_(self.a(x)))

    model = Inplace().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(RuntimeError, match="in place"):
        gm.gram(model, x, y, ce)


# ----- per-layer kernels ------------------------------------------------------------------------------------------
def test_outer_gram_strategies_against_brute_force():
    g = torch.Generator().manual_seed(15)
    A, E = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    M = torch.stack([sum(torch.outer(E[i, t], A[i, t]) for t in range(3)).flatten() for i in range(4)])  # [4, 10]
    for strategy in ("auto", "pairwise", "materialise"):
        torch.testing.assert_close(outer_gram(A, E, strategy), M @ M.T, rtol=1e-12, atol=1e-12)
