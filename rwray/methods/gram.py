"""Gram matrices of per-sample gradients, G_ij = <g_i, g_j>, without materialising B x d for the whole model.

g_i is the gradient of sample i's loss l_i with respect to a chosen set of parameters. Parameters are selected by
*module*: a "parametrised module" is any module with trainable parameters of its own (``recurse=False``): Linear,
Conv2d, the affine weight/bias of BatchNorm/GroupNorm, a cosine head, ... Selecting a module selects all of its own
trainable parameters, in both implementations, so a subset means the same thing everywhere. Norm layers' affine
parameters are *included* whenever their module is selected (``modules=None`` selects every parametrised module).

Two implementations of the same quantity:

* ``impl="reference"`` (`reference_gram`): ``torch.func.vmap(grad(l_i))`` over ``functional_call`` of the whole model
  on one sample at a time; it materialises every per-sample gradient (B x d) and multiplies. Simple, slow, memory
  hungry: the yardstick the tests compare against.
* ``impl="fast"`` (`GramCapture`): during the training forward, a forward hook on each parametrised module keeps
  its input (detached: an alias of a tensor the graph saves anyway), the output's gradient edge (not the output:
  a norm layer's output is saved by nobody else) and puts a tensor hook on the output. ONE backward pass of
  sum_i l_i down to the earliest selected output (``torch.autograd.grad`` on its gradient edge,
  ``retain_graph=True`` so the training loop's own backward still works afterwards) delivers
  E = d(sum_i l_i)/d(output) to every selected module's hook, which turns (input, E) into that layer's B x B Gram
  at once and lets E go. Parameter gradients are never computed by this pass. Per layer, with A the layer's input rows and E its output gradients
  (T positions per sample: 1 for a plain Linear, H_out*W_out for a conv):

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

What "per-sample gradient" means with BatchNorm
-----------------------------------------------
With BatchNorm in training mode the samples are coupled through the batch statistics, and d l_i / d theta through
a one-sample forward is not what training uses. The fast path computes, for every sample i,

      g_i = sum over layers of (sample i's activations) x (d(sum_j l_j) / d(sample i's layer output)),

the *contribution of sample i's own activations to the batch gradient*, through the batch-coupled graph exactly as
the training step sees it. Equivalently, g_i = d(sum_j l_j)/d(theta_i) where theta_i is a private copy of the
parameters that only sample i's activations use (the batch statistics stay shared); the tests build exactly that
network by hand and compare. The g_i sum to the batch gradient of sum_j l_j (1ᵀ G 1 = |grad|^2), and
without coupling (GroupNorm, no norm, BatchNorm in eval mode) g_i is exactly grad l_i, which is what both
implementations compute and the tests compare. The vmap reference cannot express the coupled quantity (one sample
per call has no batch), so it refuses a model with BatchNorm using batch statistics rather than silently computing
something else (per-sample statistics); compare on GroupNorm or on BatchNorm in eval mode.

`GramCapture.gram_and_grads` additionally keeps, per module call, what rebuilds any weighted sum sum_i c_i g_i
(`LayerGrads`), so a caller can skip the second walk of the graph for the training gradient; see
`rwray.methods.batch_reweight` for when that is exact and how it is verified.

Also: the reference needs a deterministic forward (dropout active raises via vmap's ``randomness="error"``); the fast
path sees the loop's own dropout masks. A module called several times in one forward is fine (its per-sample
gradients are summed over the calls before the Gram); SyncBatchNorm in training mode, one parameter owned by two
modules, modules called with several tensor inputs, and outputs modified in place after the forward are not
supported by the fast path (they raise).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Impl = Literal["fast", "reference"]
Strategy = Literal["auto", "pairwise", "materialise"]
Which = Literal["all", "head", "last_k"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [B, K], targets [B]) -> [B]

_PAIRWISE_MAX_ELEMS = 2**24  # cap on a (BT)^2 pairwise Gram (64 MiB in float32)

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


# ----- selecting parameters ------------------------------------------------------------------------------------------
def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own trainable parameters (not its children's), in registration order."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def parametrised_modules(model: nn.Module) -> list[str]:
    """Qualified names of modules with trainable parameters of their own, in registration order."""
    return [name for name, m in model.named_modules() if own_params(m)]


def forward_order(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """Parametrised modules in the order the forward first calls them (registration order can differ).

    Runs one forward under no_grad; modules the forward never calls are left out.
    """
    names = set(parametrised_modules(model))
    order: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if name in names:
            handles.append(m.register_forward_hook(lambda mod, a, o, name=name: order.append(name) if name not in order else None))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def select_modules(order: Sequence[str], which: Which = "all", last_k: int = 1) -> list[str]:
    """Subset of forward-ordered parametrised modules: all of them, the last one (the classifier head), or the last k
    (norm layers count as modules: last_k = 2 on a ResNet is the last block's second norm layer + the head)."""
    if which == "all":
        return list(order)
    if which == "head":
        return list(order[-1:])
    if which == "last_k":
        if last_k < 1:
            raise ValueError(f"last_k must be >= 1, got {last_k}")
        return list(order[-last_k:])
    raise ValueError(f"unknown parameter subset {which!r}; choose all, head or last_k")


def module_param_names(model: nn.Module, modules: Iterable[str] | None) -> list[str]:
    """Qualified names of the trainable parameters owned by `modules` (None: every parametrised module)."""
    table = dict(model.named_modules())
    mods = parametrised_modules(model) if modules is None else list(modules)
    out: list[str] = []
    for m in mods:
        if m not in table:
            raise KeyError(f"no module named {m!r} in the model")
        out += [f"{m}.{n}" if m else n for n, _ in own_params(table[m])]
    return out


# ----- from Gram to p-scores to weights (pure) --------------------------------------------------------------------------
def cosine(G: torch.Tensor) -> torch.Tensor:
    """[B, B] Gram -> [B, B] cosine similarities S_ij = G_ij / (|g_i| |g_j|).

    A zero gradient (e.g. a sample whose loss is flat) has cosine 0 with every other sample; the diagonal is 1 by
    definition (a sample is always its own neighbour), so p-scores stay in [1, B].
    """
    n = G.diagonal().clamp_min(0).sqrt()  # [B] gradient norms
    denom = n[:, None] * n[None, :]  # [B, B]
    S = torch.where(denom > 0, G / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(G))
    S = S.clamp(-1.0, 1.0)
    S.diagonal().fill_(1.0)
    return S


def pscores(S: torch.Tensor, gamma: float) -> torch.Tensor:
    """[B, B] cosines -> [B] int64 p_i = #{j : S_ij >= gamma}, the diagonal always counted (1 <= p_i <= B)."""
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    return ((S >= gamma) | eye).sum(dim=1)


def pscore_weights(p: torch.Tensor, temp: float = 1.0, weight_fn: Literal["softmax", "inverse"] = "softmax") -> torch.Tensor:
    """[B] p-scores -> [B] float64 weights with mean 1 (relative to ERM).

    softmax: w = B * softmax(-p / temp): samples with few gradient-neighbours (rare, atypical) weigh more, one unit
             of p costs a factor e^(1/temp).
    inverse: w ∝ p^(-1/temp), normalised to mean 1; temp = 1 is plain 1/p.
    Both tend to uniform weights as temp -> inf (temp = inf gives exactly 1).
    """
    if not temp > 0:
        raise ValueError(f"temperature must be > 0, got {temp}")
    pf = p.to(torch.float64)
    if pf.numel() == 0:
        return pf
    if weight_fn == "softmax":
        return torch.softmax(-pf / temp, dim=0) * pf.numel()
    if weight_fn == "inverse":
        w = pf.pow(-1.0 / temp)
        return w / w.mean()
    raise ValueError(f"unknown weight_fn {weight_fn!r}; choose softmax or inverse")


# ----- per-layer Gram building blocks (pure) ----------------------------------------------------------------------------
def _work_dtype(t: torch.Tensor) -> torch.dtype:
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


def linear_per_sample(module: nn.Linear, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[B, *, in], [B, *, out] -> [B, d] per-sample gradients (weight rows then bias), in the parameters' layouts."""
    B = x.shape[0]
    dt = _work_dtype(x)
    A, E = x.reshape(B, -1, x.shape[-1]).to(dt), e.reshape(B, -1, e.shape[-1]).to(dt)  # [B, T, in], [B, T, out]
    parts = []
    if module.weight.requires_grad:
        parts.append(torch.matmul(E.transpose(1, 2), A).reshape(B, -1))  # [B, out*in]
    if module.bias is not None and module.bias.requires_grad:
        parts.append(E.sum(1))  # [B, out]
    return _cat(parts)


def linear_gram(module: nn.Linear, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    B = x.shape[0]
    dt = _work_dtype(x)
    A, E = x.reshape(B, -1, x.shape[-1]).to(dt), e.reshape(B, -1, e.shape[-1]).to(dt)  # [B, T, in], [B, T, out]
    G = outer_gram(A, E, strategy) if module.weight.requires_grad else A.new_zeros(B, B)
    if module.bias is not None and module.bias.requires_grad:
        b = E.sum(1)  # [B, out]
        G = G + b @ b.T
    return G


def _conv_supported(module: nn.Conv2d) -> bool:
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
    dt = _work_dtype(x)
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
        parts.append(e.to(_work_dtype(x)).sum(dim=(2, 3)))  # [B, Cout]
    return _cat(parts)


def conv2d_gram(module: nn.Conv2d, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    B = x.shape[0]
    dt = _work_dtype(x)
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


def _batch_stats(module: nn.Module) -> bool:
    """Does this BatchNorm normalise with the batch's statistics (training mode, or no running stats)?"""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None)


def norm_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """BatchNorm/GroupNorm affine parameters. x, e [B, C, *] -> [B, 2C] (weight: sum_space e*x̂, bias: sum_space e).

    x̂ is recomputed from the captured input exactly as the module normalised it: GroupNorm per sample; BatchNorm with
    the batch statistics in training mode (the coupled quantity, see the module docstring), running ones in eval.
    """
    dt = _work_dtype(x)
    x, e = x.to(dt), e.to(dt)
    dims = tuple(range(2, x.dim()))
    parts = []
    if module.weight is not None and module.weight.requires_grad:
        if isinstance(module, nn.GroupNorm):
            xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        elif _batch_stats(module):
            if isinstance(module, nn.SyncBatchNorm):
                raise NotImplementedError("fast Gram: SyncBatchNorm in training mode normalises with global statistics")
            xhat = F.batch_norm(x, None, None, training=True, eps=module.eps)  # no running-stat update
        else:
            xhat = F.batch_norm(x, module.running_mean.to(dt), module.running_var.to(dt), training=False, eps=module.eps)
        parts.append((e * xhat).sum(dim=dims) if dims else e * xhat)  # [B, C]
    if module.bias is not None and module.bias.requires_grad:
        parts.append(e.sum(dim=dims) if dims else e)  # [B, C]
    return _cat(parts)


def generic_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Any module that maps samples independently: vmap over i of the vjp of the module alone at (x_i, e_i).
    [B, ...], [B, ...] -> [B, d_module] (own trainable parameters, registration order)."""
    names = [n for n, _ in own_params(module)]
    params = {n: p.detach() for n, p in own_params(module)}

    def one(xi: torch.Tensor, ei: torch.Tensor) -> dict[str, torch.Tensor]:
        out, pull = torch.func.vjp(lambda ps: torch.func.functional_call(module, ps, (xi.unsqueeze(0),)), params)
        return pull(ei.unsqueeze(0).to(out.dtype))[0]  # (AMP: e may be bf16 while this recompute is not)

    g = torch.func.vmap(one)(x, e)  # {name: [B, *shape]}
    return torch.cat([g[n].reshape(x.shape[0], -1).to(_work_dtype(x)) for n in names], 1)


def module_per_sample(module: nn.Module, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    if type(module) is nn.Linear:
        return linear_per_sample(module, x, e)
    if type(module) is nn.Conv2d and _conv_supported(module):
        return conv2d_per_sample(module, x, e)
    if isinstance(module, _NORMS):
        return norm_per_sample(module, x, e)
    return generic_per_sample(module, x, e)


def module_gram(module: nn.Module, x: torch.Tensor, e: torch.Tensor, strategy: Strategy = "auto") -> torch.Tensor:
    """One call of one module: captured input x [B, ...] and output gradient e [B, ...] -> its [B, B] Gram."""
    if type(module) is nn.Linear:
        return linear_gram(module, x, e, strategy)
    if type(module) is nn.Conv2d and _conv_supported(module):
        return conv2d_gram(module, x, e, strategy)
    M = module_per_sample(module, x, e)  # [B, d_module]: small for norms; per-module for the fallback
    return M @ M.T


# ----- the fast path: hooks on the training forward ---------------------------------------------------------------------
@dataclass
class _Call:
    name: str
    module: nn.Module
    x: torch.Tensor | None  # [B, ...] detached input (None: the call had no single tensor input); aliases a tensor
    #                         the graph saves anyway for Linear/Conv/norm layers, so it costs no memory of its own
    edge: Any  # GradientEdge of the output: what the partial backward asks for, without holding the output itself
    out_ref: Any  # weakref to the output [B, ...]: the capture never keeps an output alive (a norm layer's output
    #               is saved by nobody else, so holding it would add a whole activation per layer)
    batch: int  # out.shape[0]
    version: int  # out._version at capture: an in-place change afterwards would make its gradient the wrong one
    handle: Any  # the tensor hook on the output, registered in the forward, acting only while a Gram pass runs


@dataclass
class _Pending:
    remaining: int
    acc: torch.Tensor | None = None  # [B, d_module] summed per-sample gradients of a module called several times


def _on_grad(cap_ref: Any, i: int, e: torch.Tensor) -> None:
    """Tensor hook on a recorded output: hands d(sum l)/d(out) to the running Gram pass, if any; returns None, so
    propagation is untouched. Holds the capture weakly: the graph never keeps the capture (and its records) alive."""
    cap = cap_ref()
    if cap is not None and cap._consumer is not None:
        cap._consumer(i, e)


@dataclass
class GramCapture:
    """Forward hooks on every parametrised module of `model` (unwrapped: not the DDP wrapper) that keep what the
    fast Gram needs from the most recent forward with grad enabled. Each root forward starts a fresh record.

        cap = GramCapture(model)
        logits = model(x); losses = loss_fn(logits, y)   # [B]
        G = cap.gram(losses)                              # [B, B] float64; the graph is kept for losses' backward
        cap.clear()                                       # before the training backward: drops records and hooks
    """

    model: nn.Module
    strategy: Strategy = "auto"
    calls: list[_Call] = field(default_factory=list)
    _paused: bool = False
    _consumer: Callable[[int, torch.Tensor], None] | None = None
    _handles: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = set(parametrised_modules(self.model))
        self._handles.append(self.model.register_forward_pre_hook(self._start))
        for name, m in self.model.named_modules():
            if name in names:
                self._handles.append(m.register_forward_hook(self._hook(name)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No recording (nor clearing) inside: for forwards that are not the training forward (vmap, fallbacks)."""
        old, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = old

    def _start(self, module: nn.Module, args: Any) -> None:
        if not self._paused:
            self.clear()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if self._paused or not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) or not out.requires_grad:
                return
            x = args[0].detach() if len(args) == 1 and isinstance(args[0], torch.Tensor) else None
            i = len(self.calls)
            handle = out.register_hook(functools.partial(_on_grad, weakref.ref(self), i))
            self.calls.append(_Call(name, module, x, torch.autograd.graph.get_gradient_edge(out), weakref.ref(out),
                                    out.shape[0] if out.dim() else -1, out._version, handle))

        return hook

    def order(self) -> list[str]:
        """Parametrised modules of the last recorded forward, in the order they were first called."""
        return list(dict.fromkeys(c.name for c in self.calls))

    def clear(self) -> None:
        """Drop the records and remove their tensor hooks (call it before the training backward)."""
        for c in self.calls:
            c.handle.remove()
        self.calls.clear()

    def gram(self, losses: torch.Tensor, modules: Iterable[str] | None = None) -> torch.Tensor:
        """[B] per-sample losses (from the recorded forward) -> [B, B] float64 Gram over the selected modules' own
        parameters (None: all). One partial backward, parameter gradients untouched, graph retained."""
        return self._run(losses, modules, keep=False, retain_graph=True)[0]

    def gram_and_grads(self, losses: torch.Tensor, modules: Iterable[str] | None = None, retain_graph: bool = True
                       ) -> tuple[torch.Tensor, "LayerGrads"]:
        """Like `gram`, and also keep what rebuilds any weighted sum of the per-sample gradients of EVERY recorded
        module later (`LayerGrads`): the partial backward then reaches every recorded output, whatever `modules`.
        retain_graph=False frees the forward graph as the pass goes (the caller then backpropagates through
        `LayerGrads.surrogate` only), and the records drop what they no longer need as they go."""
        return self._run(losses, modules, keep=True, retain_graph=retain_graph)

    def _run(self, losses: torch.Tensor, modules: Iterable[str] | None, keep: bool, retain_graph: bool
             ) -> tuple[torch.Tensor, "LayerGrads"]:
        B = losses.shape[0]
        G = torch.zeros(B, B, dtype=torch.float64, device=losses.device)
        chosen = None if modules is None else set(modules)
        active = {i for i, c in enumerate(self.calls) if keep or chosen is None or c.name in chosen}
        kept = LayerGrads(B)
        if not active or B == 0:
            return G, kept
        calls = self.calls
        self._check([calls[i] for i in sorted(active)], B)
        count: dict[str, int] = {}
        for i in active:
            count[calls[i].name] = count.get(calls[i].name, 0) + 1
        pending = {n: _Pending(k) for n, k in count.items() if k > 1}  # shared modules: sum per-sample grads first
        fired: set[int] = set()

        def consume(i: int, e: torch.Tensor) -> None:
            if i not in active or i in fired:
                return
            fired.add(i)
            nonlocal G
            c = calls[i]
            m = kept.add(c.module, c.x, e) if keep else None  # [B, d_module] when kept as per-sample gradients
            if keep and not retain_graph and m is not None:
                c.x = None  # this input is not needed any more: let the engine free it
            if chosen is not None and c.name not in chosen:
                return
            if c.name not in pending:
                G += (m @ m.T if m is not None else module_gram(c.module, c.x, e, self.strategy)).to(torch.float64)
                return
            pend = pending[c.name]
            m = module_per_sample(c.module, c.x, e) if m is None else m
            pend.acc = m if pend.acc is None else pend.acc + m
            pend.remaining -= 1

        first = min(active)
        self._consumer = consume
        try:
            with self.paused():
                total = losses.sum()
                # Only the earliest output is asked for: the engine walks loss -> it, passing every later output.
                torch.autograd.grad(total, [calls[first].edge], retain_graph=retain_graph, allow_unused=True)
                rest = [calls[i].edge for i in sorted(active - fired)]
                if rest and retain_graph:  # outputs not upstream of the earliest one (parallel branches): rarer
                    torch.autograd.grad(total, rest, retain_graph=True, allow_unused=True)
                kept.complete = not rest  # every recorded output reached by the first (single) pass
        finally:
            self._consumer = None
        for pend in pending.values():
            if pend.acc is not None:
                G += (pend.acc @ pend.acc.T).to(torch.float64)
        return G, kept

    def _check(self, calls: list[_Call], B: int) -> None:
        owners: dict[int, str] = {}
        for c in calls:
            if c.x is None:
                raise NotImplementedError(f"fast Gram: module {c.name!r} was not called with a single tensor input")
            out = c.out_ref()
            if out is not None and out._version != c.version:
                raise RuntimeError(f"fast Gram: the output of {c.name!r} was modified in place after the forward "
                                   "(e.g. ReLU(inplace=True)); its captured gradient would be the wrong one")
            if c.x.shape[0] != B or c.batch != B:
                raise ValueError(f"fast Gram: module {c.name!r} does not keep the batch in dim 0")
            for _, p in own_params(c.module):
                if owners.setdefault(id(p), c.name) != c.name:
                    raise NotImplementedError(f"fast Gram: a parameter is shared by {owners[id(p)]!r} and {c.name!r}")


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
            dt = _work_dtype(x)
            ec = e.to(dt) * c.to(dt).reshape(-1, *[1] * (e.dim() - 1))  # [B, ...] the output gradient of sum c_i l_i
            if type(module) is nn.Linear:
                A, Ec = x.to(dt).reshape(-1, x.shape[-1]), ec.reshape(-1, ec.shape[-1])  # [B*T, in], [B*T, out]
                if module.weight.requires_grad:
                    put(module.weight, Ec.T @ A)
                if module.bias is not None and module.bias.requires_grad:
                    put(module.bias, Ec.sum(0))
            elif type(module) is nn.Conv2d and _conv_supported(module):
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


# ----- the reference: torch.func over the whole model -------------------------------------------------------------------
def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                     modules: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """{parameter name: [B, *shape]} per-sample gradients by vmap(grad) over functional_call, one sample per call."""
    for name, m in model.named_modules():
        if _batch_stats(m):
            raise ValueError(
                f"reference Gram: {name!r} is a BatchNorm using batch statistics (training mode); a one-sample "
                "functional call cannot reproduce the batch-coupled gradient. Use model.eval() for BatchNorm or GroupNorm.")
    wanted = module_param_names(model, modules)
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in wanted}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    fixed.update(dict(model.named_buffers()))

    def loss_i(ps: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {**fixed, **ps}, (xi.unsqueeze(0),))
        logits = out[0] if isinstance(out, tuple) else out  # models may return (logits, features)
        return loss_fn(logits, yi.unsqueeze(0)).sum()

    return torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0), randomness="error")(params, x, y)


def reference_gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                   modules: Iterable[str] | None = None) -> torch.Tensor:
    """[B, B] float64 Gram from the materialised per-sample gradients (B x d held at once)."""
    grads = per_sample_grads(model, x, y, loss_fn, modules)
    G = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for g in grads.values():
        flat = g.reshape(g.shape[0], -1)  # [B, numel]
        G += (flat @ flat.T).to(torch.float64)
    return G


# ----- one entry point ----------------------------------------------------------------------------------------------
def gram(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, impl: Impl = "fast",
         modules: Iterable[str] | None = None, strategy: Strategy = "auto") -> torch.Tensor:
    """Gram of per-sample gradients of loss_fn(model(x), y) [B] w.r.t. the own parameters of `modules`
    (qualified module names; None: every parametrised module). x [B, ...], y [B] -> [B, B] float64.

    `impl="fast"` runs its own forward with hooks (inside training, use `GramCapture` on the loop's forward instead);
    `impl="reference"` is the vmap yardstick. Both leave parameter .grad untouched.
    """
    if impl == "reference":
        return reference_gram(model, x, y, loss_fn, modules)
    if impl != "fast":
        raise ValueError(f"unknown Gram implementation {impl!r}; choose fast or reference")
    cap = GramCapture(model, strategy=strategy)
    try:
        out = model(x)
        logits = out[0] if isinstance(out, tuple) else out
        return cap.gram(loss_fn(logits, y), modules)
    finally:
        cap.close()


__all__ = [
    "GramCapture", "LayerGrads", "cosine", "forward_order", "gram", "module_param_names", "outer_gram", "parametrised_modules",
    "per_sample_grads", "pscore_weights", "pscores", "reference_gram", "select_modules",
]
