"""Gram matrices of per-sample gradients, G_ij = <g_i, g_j>, without materialising B x d for the whole model.

g_i is the gradient of sample i's loss l_i with respect to a chosen set of parameters, selected by *module*
(`rwray.gram.select`: a module's own trainable parameters; norm layers' affine parameters included).

Two implementations of the same quantity:

* ``impl="reference"`` (`rwray.gram.reference`): ``torch.func.vmap(grad(l_i))`` over ``functional_call`` of the
  whole model on one sample at a time; it materialises every per-sample gradient (B x d) and multiplies. Simple,
  slow, memory hungry: the yardstick the tests compare against.
* ``impl="fast"`` (`rwray.gram.capture.GramCapture`): hooks on the training forward keep each parametrised module's
  input and output gradient edge; ONE partial backward of sum_i l_i delivers every selected module's output
  gradient, which the per-layer kernels (`rwray.gram.kernels`) turn into that layer's B x B Gram at once, choosing
  per layer between pairwise products and materialising the layer's per-sample gradients, whichever costs fewer
  flops. Parameter gradients are never computed by this pass, and the graph is kept for the loop's own backward.

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
(`rwray.gram.reuse.LayerGrads`), so a caller can skip the second walk of the graph for the training gradient.

Files: `select` (which parameters), `kernels` (per-layer per-sample gradients and Grams; a leaf), `capture` (the fast
path's hooks and partial backward), `reuse` (gradient reuse), `reference` (the vmap yardstick); `gram` below is the
one entry point.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

from rwray.gram.capture import GramCapture
from rwray.gram.kernels import Strategy, module_gram, module_per_sample, outer_gram, own_params
from rwray.gram.reference import LossFn, per_sample_grads, reference_gram
from rwray.gram.reuse import LayerGrads
from rwray.gram.select import Which, forward_order, module_param_names, parametrised_modules, select_modules

Impl = Literal["fast", "reference"]


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
    "GramCapture", "Impl", "LayerGrads", "LossFn", "Strategy", "Which", "forward_order", "gram", "module_gram",
    "module_param_names", "module_per_sample", "outer_gram", "own_params", "parametrised_modules", "per_sample_grads",
    "reference_gram", "select_modules",
]
