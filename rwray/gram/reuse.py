"""Gradient reuse: what the Gram pass saw, kept to rebuild any weighted sum of the per-sample gradients.

`GramCapture.gram_and_grads` additionally keeps, per module call, what rebuilds any weighted sum sum_i c_i g_i
(`LayerGrads`), so a caller can skip the second walk of the graph for the training gradient; see
`rwray.methods.batch_reweight` for when that is exact and how it is verified. `LayerGrads.surrogate` hands that sum
to the parameters through an ordinary backward (`_FromLayerGrads`).
"""

from __future__ import annotations

import torch
from torch import nn

from rwray.gram.kernels import conv_supported, module_per_sample, own_params, work_dtype


class LayerGrads:
    """Per recorded module call, what rebuilds sum_i c_i g_i for any coefficients c [B] without the forward graph,
    whichever is smaller per sample: the module's per-sample gradients [B, d_module] (then sum_i c_i g_i = c @ M:
    norm layers, and convs with many positions and few weights, e.g. ResNet-32's first two stages), or its input
    and output gradient (then one weighted weight-gradient later: Linear, convs with many weights per position).

    Exact when each sample's loss depends on the other samples only through the parameters (no BatchNorm with
    batch statistics, no other batch-mixing op): then d(sum_j c_j l_j)/d(out_i) = c_i e_i at every layer. The method
    verifies this against autograd before relying on it (`BatchReweight`).
    """

    def __init__(self, batch: int):
        self.batch = batch
        self.entries: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = []
        self.complete = True  # the single partial backward reached every recorded output

    def add(self, module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
        """Keep one module call. Returns its per-sample gradients [B, d_module] when it keeps those (the caller's
        Gram can use them), else None."""
        d_module = sum(p.numel() for _, p in own_params(module))
        if d_module <= x[0].numel() + e[0].numel():
            per_sample = module_per_sample(module, x, e)  # [B, d_module], own parameters in registration order
            self.entries.append((module, None, None, per_sample))
            return per_sample
        self.entries.append((module, x, e, None))
        return None

    def params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module, *_ in self.entries:
            for _, p in own_params(module):
                seen.setdefault(id(p), p)
        return list(seen.values())

    def weighted(self, c: torch.Tensor) -> dict[int, torch.Tensor]:
        """{id(parameter): sum_i c_i g_i} for every parameter of the recorded modules. c [B]."""
        out: dict[int, torch.Tensor] = {}

        def put(p: nn.Parameter, g: torch.Tensor) -> None:
            g = g.to(p.dtype).reshape(p.shape)
            out[id(p)] = g if id(p) not in out else out[id(p)] + g

        for module, x, e, per_sample in self.entries:
            if per_sample is not None:  # c @ [B, d_module], split in registration order (as *_per_sample lay out)
                flat = c.to(per_sample.dtype) @ per_sample
                k = 0
                for _, p in own_params(module):
                    put(p, flat[k : k + p.numel()])
                    k += p.numel()
                continue
            dt = work_dtype(x)
            ec = e.to(dt) * c.to(dt).reshape(-1, *[1] * (e.dim() - 1))  # [B, ...] the output gradient of sum c_i l_i
            if type(module) is nn.Linear:
                A, Ec = x.to(dt).reshape(-1, x.shape[-1]), ec.reshape(-1, ec.shape[-1])  # [B*T, in], [B*T, out]
                if module.weight.requires_grad:
                    put(module.weight, Ec.T @ A)
                if module.bias is not None and module.bias.requires_grad:
                    put(module.bias, Ec.sum(0))
            elif type(module) is nn.Conv2d and conv_supported(module):
                wants_b = module.bias is not None and module.bias.requires_grad
                _, gw, gb = torch.ops.aten.convolution_backward(
                    ec, x.to(dt), module.weight.to(dt), [module.out_channels] if wants_b else None, list(module.stride),
                    list(module.padding), list(module.dilation), False, [0, 0], module.groups,
                    [False, module.weight.requires_grad, wants_b])
                if module.weight.requires_grad:
                    put(module.weight, gw)
                if wants_b:
                    put(module.bias, gb)
            else:  # any other module: one batched vjp of the module alone
                named = own_params(module)
                ps = {n: p.detach() for n, p in named}
                y, pull = torch.func.vjp(lambda q: torch.func.functional_call(module, q, (x,)), ps)
                grads = pull(ec.to(y.dtype))[0]
                for n, p in named:
                    put(p, grads[n])
        return out

    def surrogate(self, losses: torch.Tensor) -> torch.Tensor:
        """[B] tensor equal to `losses` whose backward hands each parameter sum_i (dL/dl_i) g_i from these records,
        instead of walking the forward graph again (which `gram_and_grads(retain_graph=False)` has freed)."""
        params = self.params()
        return _FromLayerGrads.apply(losses.detach(), self, *params)


class _FromLayerGrads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, grads: LayerGrads, *params: nn.Parameter) -> torch.Tensor:
        ctx.grads = grads
        ctx.param_ids = [id(p) for p in params]
        return values.clone()  # [B]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out [B] = dL/dl_i, e.g. w_i / B from weighted_loss
        if ctx.grads is None:
            raise RuntimeError("batch reweighting: the layer gradients were already used by an earlier backward")
        w = ctx.grads.weighted(grad_out)
        ctx.grads = None  # one backward: free the kept inputs and output gradients now
        return (None, None, *[w.get(i) for i in ctx.param_ids])
