"""Hilbert-Schmidt Independence Criterion (HSIC) with RBF kernels: pure tensor functions, no state, no collectives.

For samples X = (x_1..x_m) [m, dx] and Y = (y_1..y_m) [m, dy] with kernel matrices K_ij = k(x_i, x_j) and
L_ij = l(y_i, y_j) [m, m]:

* biased estimator (Gretton et al. 2005):     HSIC_0 = tr(K H L H) / (m − 1)²,   H = I − 11ᵀ/m
* unbiased estimator (Song et al. 2012):      with K̃, L̃ = K, L with their diagonals set to 0,
      HSIC_1 = [ tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((m−1)(m−2)) − 2/(m−2) · 1ᵀK̃L̃1 ] / (m(m−3))

Both are computed in O(m²) time and memory (never an m×m matrix product):
  tr(AB) = Σ_ij A_ij B_ji = Σ A ∘ Bᵀ,   1ᵀAB1 = (Aᵀ1) · (B1),   tr(KHLH) = tr((HKH) L) with HKH the double-centred K.
The diagonals are zeroed with a mask (K̃ = K with diag := 0). The reference code subtracts a broadcast diagonal instead,
which equals this only when the diagonal is constant (RBF: all ones); the functions here take any kernel matrices.

The kernel is RBF: k(x, x') = exp(−‖x − x'‖² / (2σ²)); σ is fixed or the median heuristic (`median_sigma`).
The unbiased estimator has expectation HSIC exactly (0 for independent X, Y) and needs m ≥ 4; the biased one is
always ≥ 0, has an O(1/m) positive bias, and needs m ≥ 2.
"""

from __future__ import annotations

from typing import Literal

import torch

Estimator = Literal["unbiased", "biased"]
MIN_SAMPLES: dict[str, int] = {"unbiased": 4, "biased": 2}  # m(m−3) and (m−2) in the unbiased denominators


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """[m, d] -> [m, m] squared Euclidean distances, diagonal exactly 0, every entry ≥ 0.

    Uses ‖a−b‖² = ‖a‖² + ‖b‖² − 2a·b (one matmul, no [m, m, d] intermediate). The rows are centred first: distances
    do not change, but the cancellation error of the expansion (∝ ‖x‖²) does, which matters for features far from the
    origin (post-ReLU features are all positive).
    """
    x = x.flatten(1)
    x = x - x.mean(dim=0, keepdim=True)  # [m, d]
    sq = (x * x).sum(dim=1)  # [m]
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)  # [m, m]
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.clamp_min(0.0).masked_fill(eye, 0.0)


def rbf_kernel(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """[m, d] -> [m, m] with K_ij = exp(−‖x_i − x_j‖² / (2σ²)); K_ii = 1 exactly."""
    return torch.exp(pairwise_sq_dists(x) / (-2.0 * float(sigma) ** 2))


def _check_square_pair(k: torch.Tensor, l: torch.Tensor, estimator: str) -> int:
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"HSIC needs two [m, m] kernel matrices of the same size, got {tuple(k.shape)} and "
                         f"{tuple(l.shape)}")
    m = k.shape[0]
    if m < MIN_SAMPLES[estimator]:
        raise ValueError(f"the {estimator} HSIC estimator needs at least {MIN_SAMPLES[estimator]} samples, got {m}")
    return m


def hsic_unbiased_from_kernels(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC of two [m, m] kernel matrices (m ≥ 4), O(m²). Returns a scalar."""
    m = _check_square_pair(k, l, "unbiased")
    eye = torch.eye(m, dtype=torch.bool, device=k.device)
    kt = k.masked_fill(eye, 0.0)  # K̃ [m, m]: diagonal set to 0 (not K − diag broadcast)
    lt = l.masked_fill(eye, 0.0)  # L̃ [m, m]
    trace_kl = (kt * lt.T).sum()  # tr(K̃L̃)
    sum_k, sum_l = kt.sum(), lt.sum()  # 1ᵀK̃1, 1ᵀL̃1
    ones_kl_ones = (kt.sum(dim=0) * lt.sum(dim=1)).sum()  # 1ᵀK̃L̃1 = (K̃ᵀ1)·(L̃1)
    return (trace_kl + sum_k * sum_l / ((m - 1) * (m - 2)) - 2.0 * ones_kl_ones / (m - 2)) / (m * (m - 3))


def hsic_biased_from_kernels(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """tr(K H L H) / (m − 1)² of two [m, m] kernel matrices (m ≥ 2), O(m²). Returns a scalar."""
    m = _check_square_pair(k, l, "biased")
    kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()  # H K H [m, m]
    return (kc * l.T).sum() / (m - 1) ** 2  # tr((HKH) L)


def hsic(
    x: torch.Tensor,
    y: torch.Tensor,
    sigma_x: float | torch.Tensor = 1.0,
    sigma_y: float | torch.Tensor = 1.0,
    estimator: Estimator = "unbiased",
) -> torch.Tensor:
    """HSIC between paired samples x [m, dx] and y [m, dy] with RBF kernels of widths sigma_x, sigma_y. Scalar.

    Differentiable in x and y. Computed in the inputs' dtype (pass float32 or float64; half precision loses the
    small differences between kernel entries the estimator is made of).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"HSIC needs paired samples, got {x.shape[0]} and {y.shape[0]} rows")
    k, l = rbf_kernel(x, sigma_x), rbf_kernel(y, sigma_y)
    if estimator == "unbiased":
        return hsic_unbiased_from_kernels(k, l)
    if estimator == "biased":
        return hsic_biased_from_kernels(k, l)
    raise ValueError(f"unknown HSIC estimator {estimator!r}; choose 'unbiased' or 'biased'")


def median_sigma(x: torch.Tensor, max_samples: int | None = None, generator: torch.Generator | None = None) -> float:
    """The median heuristic: median of ‖x_i − x_j‖ over distinct pairs i < j of the rows of x [n, d].

    With more than ``max_samples`` rows a uniformly random subset of that many rows is used (``generator`` makes the
    choice reproducible), so the cost is bounded by max_samples²/2 distances. ``torch.median`` returns the lower of
    the two middle values for an even number of pairs. Returns nan when there are fewer than 2 rows.
    """
    x = x.detach().flatten(1).to(torch.float64)  # float64: many near-equal distances, exact ordering is cheap here
    if max_samples is not None and x.shape[0] > max_samples:
        pick = torch.randperm(x.shape[0], generator=generator)[:max_samples].to(x.device)
        x = x[pick]
    if x.shape[0] < 2:
        return float("nan")
    return float(torch.pdist(x).median())  # pdist: the n(n−1)/2 distances i < j
