"""HSIC estimators against the textbook O(m³) formulas with explicit matrices, their null behaviour, invariances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rwray.hsic import (
    hsic,
    hsic_biased_from_kernels,
    hsic_unbiased_from_kernels,
    median_sigma,
    pairwise_sq_dists,
    rbf_kernel,
)

D64 = torch.float64


def rbf_by_loops(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """K_ij = exp(−Σ_a (x_ia − x_ja)² / (2σ²)), one entry at a time."""
    m = x.shape[0]
    k = torch.empty(m, m, dtype=D64)
    for i in range(m):
        for j in range(m):
            k[i, j] = math.exp(-float(((x[i] - x[j]) ** 2).sum()) / (2 * sigma**2))
    return k


def unbiased_cubic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012), eq. (5), with explicit matrices and matrix products."""
    m = k.shape[0]
    off = 1 - torch.eye(m, dtype=D64)
    kt, lt = k * off, l * off  # diagonals set to zero
    one = torch.ones(m, 1, dtype=D64)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one) * (one.T @ lt @ one) / ((m - 1) * (m - 2))
    term3 = 2.0 / (m - 2) * (one.T @ kt @ lt @ one)
    return ((term1 + term2 - term3) / (m * (m - 3))).reshape(())


def biased_cubic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    h = torch.eye(m, dtype=D64) - torch.ones(m, m, dtype=D64) / m
    return torch.trace(k @ h @ l @ h) / (m - 1) ** 2


def sample(m: int, seed: int, dependent: bool = False, dx: int = 3, dy: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, dx, generator=g, dtype=D64)
    if dependent:  # y a noisy function of x (one linear, one non-linear coordinate)
        y = torch.stack([x[:, 0], torch.sin(2 * x[:, 1])], dim=1)[:, :dy] + 0.1 * torch.randn(m, dy, generator=g, dtype=D64)
    else:
        y = torch.randn(m, dy, generator=g, dtype=D64)
    return x, y


# ------------------------------------------------------------------------------------------------- exact values


@pytest.mark.parametrize("m,sx,sy", [(4, 1.0, 1.0), (9, 0.7, 2.5), (16, 1.0, 1.0)])
def test_rbf_estimators_match_cubic_formulas(m, sx, sy):
    x, y = sample(m, seed=m, dependent=True)
    k, l = rbf_by_loops(x, sx), rbf_by_loops(y, sy)
    torch.testing.assert_close(rbf_kernel(x, sx), k, rtol=0, atol=1e-14)
    torch.testing.assert_close(hsic(x, y, sx, sy, "unbiased"), unbiased_cubic(k, l), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hsic(x, y, sx, sy, "biased"), biased_cubic(k, l), rtol=1e-12, atol=1e-15)


def test_from_kernels_truly_zero_the_diagonal_for_any_kernel():
    # Linear kernels have a non-constant diagonal: zeroing it and subtracting a broadcast diagonal now differ.
    x, y = sample(10, seed=1, dependent=True)
    k, l = x @ x.T, y @ y.T  # [10, 10]
    want = unbiased_cubic(k, l)
    torch.testing.assert_close(hsic_unbiased_from_kernels(k, l), want, rtol=1e-12, atol=1e-14)
    broadcast = unbiased_cubic(k - torch.diag(k)[None, :], l - torch.diag(l)[None, :])  # the reference's K − diag(K)
    assert abs(float(broadcast - want)) > 1e-2 * abs(float(want))
    # For RBF (diagonal all ones) the two agree: the unbiased statistic ignores a constant added off the diagonal.
    kr, lr = rbf_by_loops(x, 1.5), rbf_by_loops(y, 1.0)
    torch.testing.assert_close(unbiased_cubic(kr - torch.diag(kr)[None, :], lr - torch.diag(lr)[None, :]),
                               hsic_unbiased_from_kernels(kr, lr), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(hsic_unbiased_from_kernels(k + 3.0, l), hsic_unbiased_from_kernels(k, l), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hsic_biased_from_kernels(k, l), biased_cubic(k, l), rtol=1e-12, atol=1e-14)


def test_biased_linear_kernel_is_squared_cross_covariance():
    # tr(K H L H)/(m−1)² with K = XXᵀ, L = YYᵀ is Σ_ab cov(X_a, Y_b)² (sample covariance, m − 1 denominator).
    x, y = sample(30, seed=2, dependent=True)
    cov = np.cov(x.numpy().T, y.numpy().T)[:3, 3:]  # [3, 2] cross block
    assert float(hsic_biased_from_kernels(x @ x.T, y @ y.T)) == pytest.approx(float((cov**2).sum()), rel=1e-12)


def test_pairwise_distances_and_median_heuristic_by_hand():
    x, _ = sample(7, seed=3)
    d2 = pairwise_sq_dists(x)
    for i in range(7):
        for j in range(7):
            assert float(d2[i, j]) == pytest.approx(float(((x[i] - x[j]) ** 2).sum()), abs=1e-12)
    assert torch.all(d2.diagonal() == 0)
    for m in (7, 5):  # 21 pairs (odd), 10 pairs (even: the lower middle value)
        pairs = sorted(math.dist(x[i].tolist(), x[j].tolist()) for i in range(m) for j in range(i + 1, m))
        assert median_sigma(x[:m]) == pytest.approx(pairs[(len(pairs) - 1) // 2], rel=1e-12)
    big, _ = sample(500, seed=4)
    a = median_sigma(big, max_samples=50, generator=torch.Generator().manual_seed(0))
    b = median_sigma(big, max_samples=50, generator=torch.Generator().manual_seed(0))
    assert a == b and abs(a - median_sigma(big)) < 0.25 * median_sigma(big)  # a subsample estimates the same median
    assert math.isnan(median_sigma(big[:1]))


# ------------------------------------------------------------------------------------------- null and dependence


def test_unbiased_is_centred_at_zero_under_independence_and_large_under_dependence():
    """R = 200 independent draws of m = 64 pairs with X ⟂ Y. The unbiased estimator has mean exactly 0 under
    independence, so its sample mean must lie within 4 standard errors (sd/√R) of 0 (a z-test at the 6e-5 level; the
    draws are seeded, so the outcome is fixed). The biased estimator, at the same m, has a positive O(1/m) bias and
    fails that z-test by a wide margin: the test can tell the two apart. A dependent pair gives a value far outside
    the null spread."""
    r, m = 200, 64
    ub, bi = [], []
    for s in range(r):
        x, y = sample(m, seed=1000 + s)
        sx, sy = median_sigma(x), median_sigma(y)
        ub.append(float(hsic(x, y, sx, sy, "unbiased")))
        bi.append(float(hsic(x, y, sx, sy, "biased")))
    ub, bi = np.array(ub), np.array(bi)
    se = ub.std(ddof=1) / math.sqrt(r)
    assert abs(ub.mean()) < 4 * se
    assert (bi > 0).all() and bi.mean() > 20 * se  # biased: positive bias, far beyond the sampling error
    assert np.abs(ub).max() < 6 * ub.std(ddof=1)  # no single null draw is an outlier
    x, y = sample(m, seed=7, dependent=True)
    dep = float(hsic(x, y, median_sigma(x), median_sigma(y), "unbiased"))
    assert dep > 20 * ub.std(ddof=1)


# ---------------------------------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_invariances(estimator):
    x, y = sample(20, seed=5, dependent=True)
    base = hsic(x, y, 1.2, 0.8, estimator)
    p = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hsic(x[p], y[p], 1.2, 0.8, estimator), base, rtol=1e-12, atol=1e-15)  # joint permutation
    torch.testing.assert_close(hsic(x + 1e3, y - 7.5, 1.2, 0.8, estimator), base, rtol=1e-9, atol=1e-12)  # translation
    torch.testing.assert_close(hsic(y, x, 0.8, 1.2, estimator), base, rtol=1e-12, atol=1e-15)  # symmetry
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=D64))
    torch.testing.assert_close(hsic(x @ q, y, 1.2, 0.8, estimator), base, rtol=1e-9, atol=1e-12)  # rotation (RBF)
    # the invariance is to JOINT permutations only: shuffling y alone breaks the pairing and the dependence (the
    # biased estimator keeps its positive O(1/m) offset, hence the looser factor)
    assert float(hsic(x, y[p], 1.2, 0.8, estimator)) < {"unbiased": 0.25, "biased": 0.6}[estimator] * float(base)


def test_float32_features_far_from_the_origin_agree_with_float64():
    # Post-ReLU features are all positive; the centred distance expansion keeps float32 accurate at B = 256, D = 128.
    g = torch.Generator().manual_seed(0)
    f = torch.relu(3 * torch.randn(256, 128, generator=g, dtype=D64) + 5)
    h = torch.relu(f[:, :64] + torch.randn(256, 64, generator=g, dtype=D64))
    sf, sh = median_sigma(f), median_sigma(h)
    want = hsic(f, h, sf, sh)
    got = hsic(f.float(), h.float(), sf, sh)
    assert float(want) > 0
    assert float(got) == pytest.approx(float(want), rel=1e-3)


def test_gradients_and_argument_checks():
    x, y = sample(6, seed=6, dependent=True)
    x.requires_grad_(True)
    y.requires_grad_(True)
    for est in ("unbiased", "biased"):
        assert torch.autograd.gradcheck(lambda a, b: hsic(a, b, 1.3, 0.7, est), (x, y))
    with pytest.raises(ValueError, match="at least 4"):
        hsic(x[:3], y[:3], estimator="unbiased")
    assert torch.isfinite(hsic(x[:2], y[:2], estimator="biased"))
    with pytest.raises(ValueError, match="paired"):
        hsic(x, y[:5])
    with pytest.raises(ValueError, match="unknown HSIC estimator"):
        hsic(x, y, estimator="linear")  # type: ignore[arg-type]
