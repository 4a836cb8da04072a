"""Per-layer per-sample gradients and Grams, from one module call's input and output gradient (pure tensor maths).

Per layer, with A the layer's input rows and E its output gradients (T positions per sample: 1 for a plain Linear,
H_out*W_out for a conv):

    g_i(W) = sum_t e_it a_itᵀ   ->  G_ij = sum_{t,s} (a_it . a_js)(e_it . e_js)          ("pairwise": two BT x BT
                                                                                           Grams; for T = 1 this
                                                                                           is (A Aᵀ) ∘ (E Eᵀ))
    or materialise the layer's [B, out*in] per-sample gradients and multiply            ("materialise": B x d_layer)

whichever costs fewer flops: pairwise is (BT)^2 (in + out), materialise is BT*in*out + B^2*in*out. Linear layers
(T = 1) always go pairwise; ResNet convs (T = 64..1024) always materialise, with one weight-gradient convolution
whose groups hold the batch (no unfolded input). Bias: g_i(b) = sum_t e_it. Norm layers: g_i(weight) = sum_space
e_i * x̂_i, g_i(bias) = sum_space e_i, with x̂ recomputed from the captured input. Any other parametrised module
(e.g. the cosine head `NormedLinear`) goes through a per-module fallback: vmap over samples of the vjp of that
module alone at (x_i, e_i), which materialises only that module's per-sample gradients.

A module's per-sample gradients [B, d_module] are laid out as its own trainable parameters (`own_params`: not its
children's), in registration order, each flattened in the parameter's layout. A leaf: imports nothing from rwray.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Strategy = Literal["auto", "pairwise", "materialise"]

_PAIRWISE_MAX_ELEMS = 2**24  # cap on a (BT)^2 pairwise Gram (64 MiB in float32)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own trainable parameters (not its children's), in registration order."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # bf16/fp16 activations (AMP) are multiplied in float32


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # no copy of a lone [B, d] block


def outer_gram(A: torch.Tensor, E: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    """Gram of per-sample gradients g_i = sum_t e_it a_itᵀ. A [B, T, p], E [B, T, q] -> [B, B].

    pairwise: G = sum_{t,s} (A_t A_sᵀ) ∘ (E_t E_sᵀ) from two [BT, BT] Grams, cost (BT)^2 (p + q);
    materialise: M_i = E_iᵀ A_i [q, p], G = M Mᵀ, cost BT p q + B^2 p q.
    """
    B, T, p = A.shape
    q = E.shape[2]
    if strategy == "auto":
        pair, mat = (B * T) ** 2 * (p + q), B * T * p * q + B * B * p * q
        strategy = "pairwise" if pair <= mat and (B * T) ** 2 <= _PAIRWISE_MAX_ELEMS else "materialise"
    if strategy == "pairwise":
        if T == 1:
            a, e = A[:, 0], E[:, 0]  # [B, p], [B, q]
            return (a @ a.T) * (e @ e.T)
        a, e = A.reshape(B * T, p), E.reshape(B * T, q)
        return ((a @ a.T) * (e @ e.T)).view(B, T, B, T).sum(dim=(1, 3))
    M = torch.matmul(E.transpose(1, 2), A).reshape(B, q * p)  # [B, q*p] this layer's per-sample gradients
    return M @ M.T


# ----- Linear -----------------------------------------------------------------------------------------------------
def linear_per_sample(module: nn.Linear, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[B, *, in], [B, *, out] -> [B, d] per-sample gradients (weight rows then bias), in the parameters' layouts."""
    B = x.shape[0]
    dt = work_dtype(x)
    A, E = x.reshape(B, -1, x.shape[-1]).to(dt), e.reshape(B, -1, e.shape[-1]).to(dt)  # [B, T, in], [B, T, out]
    parts = []
    if module.weight.requires_grad:
        parts.append(torch.matmul(E.transpose(1, 2), A).reshape(B, -1))  # [B, out*in]
    if module.bias is not None and module.bias.requires_grad:
        parts.append(E.sum(1))  # [B, out]
    return _cat(parts)


def linear_gram(module: nn.Linear, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    B = x.shape[0]
    dt = work_dtype(x)
    A, E = x.reshape(B, -1, x.shape[-1]).to(dt), e.reshape(B, -1, e.shape[-1]).to(dt)  # [B, T, in], [B, T, out]
    G = outer_gram(A, E, strategy) if module.weight.requires_grad else A.new_zeros(B, B)
    if module.bias is not None and module.bias.requires_grad:
        b = E.sum(1)  # [B, out]
        G = G + b @ b.T
    return G


# ----- Conv2d -----------------------------------------------------------------------------------------------------
def conv_supported(module: nn.Conv2d) -> bool:
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_dims(module: nn.Conv2d) -> tuple[int, int, int]:
    g = module.groups
    kh, kw = module.kernel_size
    return g, module.in_channels // g * kh * kw, module.out_channels // g  # groups, per-group in*k*k, per-group out


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[b, Cin, H, W] -> [b, Cin*kh*kw, T]: the conv's input patches, T = H_out * W_out."""
    return F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def conv2d_weight_per_sample(module: nn.Conv2d, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[B, Cin, H, W], [B, Cout, Ho, Wo] -> [B, Cout * Cin/g * kh * kw] per-sample weight gradients (weight's layout).

    One weight-gradient convolution with the batch folded into the groups: input [1, B*Cin, H, W], output gradient
    [1, B*Cout, Ho, Wo], groups B*g, so group b*g + k is sample b's group k and the result [B*Cout, Cin/g, kh, kw]
    is every sample's own weight gradient. Same flops as the batched weight gradient, and no unfolded input.
    """
    B, cin, H, W = x.shape
    dt = work_dtype(x)
    cout, ho, wo = e.shape[1:]
    w_shape = (B * cout, cin // module.groups, *module.kernel_size)
    grad_w = torch.ops.aten.convolution_backward(
        e.to(dt).reshape(1, B * cout, ho, wo), x.to(dt).reshape(1, B * cin, H, W),
        x.new_empty((), dtype=dt).expand(w_shape),  # only its shape is read
        None, list(module.stride), list(module.padding), list(module.dilation), False, [0, 0], B * module.groups,
        [False, True, False])[1]  # [B*Cout, Cin/g, kh, kw]
    return grad_w.reshape(B, -1)


def conv2d_per_sample(module: nn.Conv2d, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    parts = []
    if module.weight.requires_grad:
        parts.append(conv2d_weight_per_sample(module, x, e))
    if module.bias is not None and module.bias.requires_grad:
        parts.append(e.to(work_dtype(x)).sum(dim=(2, 3)))  # [B, Cout]
    return _cat(parts)


def conv2d_gram(module: nn.Conv2d, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    B = x.shape[0]
    dt = work_dtype(x)
    g, p, q = _conv_dims(module)
    T = e.shape[2] * e.shape[3]
    G = torch.zeros(B, B, dtype=dt, device=x.device)
    if module.weight.requires_grad:
        choice = strategy
        if choice == "auto":
            pair, mat = (B * T) ** 2 * (p + q) * g, B * T * p * q * g + B * B * p * q * g
            choice = "pairwise" if pair <= mat and (B * T) ** 2 <= _PAIRWISE_MAX_ELEMS else "materialise"
        if choice == "pairwise":  # small T: the unfolded input is small too
            U = _unfold(module, x.to(dt)).view(B, g, p, T)  # [B, g, p, T]
            Eg = e.to(dt).reshape(B, g, q, T)  # [B, g, q, T]
            for k in range(g):
                G = G + outer_gram(U[:, k].transpose(1, 2), Eg[:, k].transpose(1, 2), "pairwise")
        else:
            M = conv2d_weight_per_sample(module, x, e)  # [B, d_layer]
            G = G + M @ M.T
    if module.bias is not None and module.bias.requires_grad:
        b = e.to(dt).sum(dim=(2, 3))  # [B, Cout]
        G = G + b @ b.T
    return G


# ----- norm layers ------------------------------------------------------------------------------------------------
def batch_stats(module: nn.Module) -> bool:
    """Does this BatchNorm normalise with the batch's statistics (training mode, or no running stats)?"""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def norm_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """BatchNorm/GroupNorm affine parameters. x, e [B, C, *] -> [B, 2C] (weight: sum_space e*x̂, bias: sum_space e).

    x̂ is recomputed from the captured input exactly as the module normalised it: GroupNorm per sample; BatchNorm with
    the batch statistics in training mode (the coupled quantity, see `rwray.gram`), running ones in eval.
    """
    dt = work_dtype(x)
    x, e = x.to(dt), e.to(dt)
    dims = tuple(range(2, x.dim()))
    parts = []
    if module.weight is not None and module.weight.requires_grad:
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        elif batch_stats(module):
            if isinstance(module, nn.SyncBatchNorm):
                raise NotImplementedError("fast Gram: SyncBatchNorm in training mode normalises with global statistics")
            xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)  # no running-stat update
        else:
            xhat = F.batch_norm(x, module.running_mean.to(dt), module.running_var.to(dt), training=False, eps=module.eps)
        parts.append((e * xhat).sum(dim=dims) if dims else e * xhat)  # [B, C]
    if module.bias is not None and module.bias.requires_grad:
        parts.append(e.sum(dim=dims) if dims else e)  # [B, C]
    return _cat(parts)


# ----- any other module, and the dispatch -------------------------------------------------------------------------
def generic_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Any module that maps samples independently: vmap over i of the vjp of the module alone at (x_i, e_i).
    [B, ...], [B, ...] -> [B, d_module] (own trainable parameters, registration order)."""
    names = [n for n, _ in own_params(module)]
    params = {n: p.detach() for n, p in own_params(module)}

    def one(xi: torch.Tensor, ei: torch.Tensor) -> dict[str, torch.Tensor]:
        out, pull = torch.func.vjp(lambda ps: torch.func.functional_call(module, ps, (xi.unsqueeze(0),)), params)
        return pull(ei.unsqueeze(0).to(out.dtype))[0]  # (AMP: e may be bf16 while this recompute is not)

    g = torch.func.vmap(one)(x, e)  # {name: [B, *shape]}
    return torch.cat([g[n].reshape(x.shape[0], -1).to(work_dtype(x)) for n in names], 1)


def module_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Linear:
        return linear_per_sample(module, x, e)
    if type(module) is nn.Conv2d and conv_supported(module):
        return conv2d_per_sample(module, x, e)
    if isinstance(module, _NORMS):
        return norm_per_sample(module, x, e)
    return generic_per_sample(module, x, e)


def module_gram(module: nn.Module, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    """One call of one module: captured input x [B, ...] and output gradient e [B, ...] -> its [B, B] Gram."""
    if type(module) is nn.Linear:
        return linear_gram(module, x, e, strategy)
    if type(module) is nn.Conv2d and conv_supported(module):
        return conv2d_gram(module, x, e, strategy)
    M = module_per_sample(module, x, e)  # [B, d_module]: small for norms; per-module for the fallback
    return M @ M.T
