"""Batch reweighting: weight each sample by how few samples of its batch have a similar gradient.

Per step, on each worker's local batch of B samples:

    g_i  = gradient of l_i w.r.t. the selected parameters (`grads`: all | head | last_k), L2-normalised
    S    = Ĝ Ĝᵀ                                   [B, B] cosine similarities (S_ii = 1)
    p_i  = #{j : S_ij >= gamma}                   1 <= p_i <= B ("p-score": the sample's gradient-neighbourhood size)
    w    = weight_fn(p, temp), mean 1             relative to ERM (the loop takes mean_i(w_i l_i))

The seed README never defines the weights from p (only "softmax inside" and `weights/temp`). Ours:

* ``weight_fn="softmax"`` (default): w = B * softmax(-p / temp). Samples with few gradient-neighbours (rare or
  atypical ones: tail classes, hard or mislabelled samples) weigh more; each extra neighbour divides the weight by
  e^(1/temp). With temp = 1 and many p_i = 1 in a batch the weight mass concentrates on those samples.
* ``weight_fn="inverse"``: w ∝ p^(-1/temp), normalised to mean 1; temp = 1 is plain 1/p (a sample in a cluster of
  p similar samples counts 1/p, so each cluster counts about once).
Both tend to uniform weights (ERM) as temp -> inf; temp = inf is exactly ERM.

Gradients and Gram: `rwray.gram` (``impl="fast"``: hooks on the loop's own forward and one partial backward
that keeps the graph for the loop's backward; ``impl="reference"``: torch.func vmap, for checking). Norm layers'
affine parameters are part of "all"; "head" is the last parametrised module the forward calls (the classifier);
"last_k" the last k of them, norm layers counted. With BatchNorm in training mode the "per-sample gradient" is
sample i's contribution to the batch gradient through the batch-coupled graph (see `rwray.gram`); the
reference implementation refuses that case.

Gradient reuse (``grad_reuse``, on by default): the Gram pass already walks the graph once and sees every layer's
input and output gradient e_i = dl_i/d(out_i). When samples meet only through the parameters, the loop's weighted
gradient is sum_i (w_i/B) g_i, which those records give directly without a second walk of the graph: per layer,
the Gram pass keeps whichever is smaller per sample, the layer's per-sample gradients (then the weighted gradient
is a vector-matrix product: norm layers and ResNet-32's first two conv stages) or its input and output gradient
(then one weighted weight-gradient: the last stage's convs, Linear layers). The step returns `losses` wrapped in
an autograd Function (same values) whose backward does exactly that, and the Gram pass frees the forward graph as
it goes (retain_graph=False), so the records replace the graph in memory rather than add to it. It applies only with
the fast Gram over all parameters, never with BatchNorm using batch statistics (coupled samples), and only after
the first eligible step has checked the records' weighted gradient against autograd's, parameter by parameter
(relative 1e-3; 5e-2 under bf16/fp16 autocast, where autograd's own weight gradients are low precision and the
records' are float32); that step trains on the ordinary graph, and a failed check switches reuse off for good.
`grad_reuse=false` always keeps the graph (retain_graph=True) for the loop's own backward.

Distributed: the Gram, p-scores and weights are over each worker's LOCAL batch (B per worker, not the global
batch: a global Gram would need every worker's per-sample gradients). The weights have mean 1 on every worker, so
DDP's gradient average stays the ERM scale. p-scores are collected per step by sample `index` and gathered
(`rwray.dist.all_gather_cat`) at every epoch end, so every rank holds the same global table:

    per sample: sum of p-scores, number of times scored, class (the label it was trained with, possibly noisy)

The mean p-score of a sample is its p averaged over the epochs (times) it was scored. Each epoch end also logs
``pscore/spearman_vs_class_count``: the Spearman correlation, over classes, of the class's mean p-score (samples'
means, all epochs so far) with its training count (`class_pscore_spearman`). `artifacts` writes
``pscores.parquet`` (index, pscore, class, n_scored), ``score.npy`` [N, 3] float64 = (index, mean p-score, class)
for the N samples scored at least once, sorted by index, as the seed does, and ``pscore_per_class.png``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from rwray import dist, tables
from rwray.datainfo import DataInfo
from rwray.gram.capture import GramCapture
from rwray.gram.kernels import batch_stats, own_params
from rwray.gram.reference import reference_gram
from rwray.gram.reuse import LayerGrads
from rwray.gram.select import select_modules
from rwray.losses import LOSSES, LossConfig
from rwray.losses.ce import CEParams
from rwray.methods.base import Method, Prepare, StepInputs, StepOutput
from rwray.registry import Params


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


def batch_reweight_weights(G: torch.Tensor, gamma: float, temp: float, weight_fn: Literal["softmax", "inverse"]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The method as a pure function: [B, B] Gram of per-sample gradients -> ([B] float64 weights (mean 1),
    [B] int64 p-scores)."""
    p = pscores(cosine(G), gamma)
    return pscore_weights(p, temp, weight_fn), p


def class_pscore_spearman(scores: torch.Tensor, class_counts: tuple[int, ...]) -> float:
    """Spearman rank correlation between each class's mean p-score and its training count.

    scores: [N, 3] (index, mean p-score over epochs, class), as `BatchReweight.scores`. A class's mean p-score is
    the mean over its scored samples. Classes never scored are left out; ties get average ranks. NaN when fewer
    than 2 classes are left or either side is constant. Positive: head classes have larger gradient-neighbourhoods
    (so lower weights) than tail classes, which is what the method relies on.
    """
    from scipy.stats import spearmanr

    cls = scores[:, 2].long()
    k = len(class_counts)
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, cls, scores[:, 1].double())
    n = torch.zeros(k, dtype=torch.float64).index_add_(0, cls, torch.ones(len(cls), dtype=torch.float64))
    seen = n > 0
    mean_p = (sums[seen] / n[seen]).numpy()
    counts = torch.tensor(class_counts, dtype=torch.float64)[seen].numpy()
    if len(mean_p) < 2 or mean_p.min() == mean_p.max() or counts.min() == counts.max():
        return math.nan
    return float(spearmanr(mean_p, counts).statistic)


class BatchReweightParams(Params):
    name: Literal["batch_reweight"] = "batch_reweight"
    loss: LossConfig = CEParams()
    gamma: float = Field(0.7, ge=-1.0, le=1.0, description="cosine threshold: j is i's neighbour when S_ij >= gamma")
    temp: float = Field(1.0, gt=0.0, description="temperature of the weight function; inf gives ERM")
    weight_fn: Literal["softmax", "inverse"] = Field("softmax", description="softmax(-p/temp) or p^(-1/temp)")
    grads: Literal["all", "head", "last_k"] = Field("all", description="parameters whose per-sample gradients count")
    last_k: int = Field(1, ge=1, description="with grads=last_k: the last k parametrised modules of the forward")
    impl: Literal["fast", "reference"] = Field("fast", description="Gram implementation (reference: vmap, for checks)")
    grad_reuse: bool = Field(True, description="rebuild the weighted gradient from the Gram pass's layer gradients "
                             "instead of a second walk of the graph, where verified exact (see the module docstring)")


def _same_gradient(kept: LayerGrads, losses: torch.Tensor, w: torch.Tensor, rtol: float = 1e-3) -> bool:
    """Does the records' weighted gradient equal autograd's gradient of mean_i(w_i l_i), parameter by parameter
    (|mine - true| <= rtol |true| + 1e-6 |whole gradient|)? One extra backward, on the first eligible step only."""
    params = kept.params()
    true = torch.autograd.grad((w * losses).mean(), params, retain_graph=True, allow_unused=True)
    mine = kept.weighted(w / len(w))
    scale = torch.sqrt(sum((t.double() ** 2).sum() for t in true if t is not None))
    for p, t in zip(params, true):
        m = mine.get(id(p))
        t = torch.zeros_like(p) if t is None else t
        m = torch.zeros_like(p) if m is None else m
        if (m.double() - t.double()).norm() > rtol * t.double().norm() + 1e-6 * scale + 1e-30:
            return False
    return True


class BatchReweight(Method):
    supports_compile = False  # hooks into the model; not checked under torch.compile

    def __init__(self, params: BatchReweightParams, info: DataInfo):
        super().__init__(params, info)
        self.loss = LOSSES.build(params.loss, info)
        self.capture: GramCapture | None = None
        n = info.num_train
        # The global table, identical on every rank after each end_epoch; grows if an index is >= num_train.
        self._sum = torch.zeros(n, dtype=torch.float64)  # [N] sum of p-scores
        self._count = torch.zeros(n, dtype=torch.int64)  # [N] times scored
        self._cls = torch.full((n,), -1, dtype=torch.int64)  # [N] class (-1: never scored)
        self._pending: list[torch.Tensor] = []  # this epoch's [b, 3] int64 (index, p, class) rows of this worker
        self.epochs = 0
        self.reuse_ok: bool | None = None  # gradient reuse: None until verified on a step, then on or off for good

    # ----- wiring -----------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module, prepare: Prepare, device: torch.device) -> None:
        if self.capture is not None:
            self.capture.close()
        self.capture = GramCapture(dist.unwrap(model))
        self.reuse_ok = None  # a new model is verified afresh

    def close(self) -> None:
        """Remove the hooks (the method keeps working only after a new attach)."""
        if self.capture is not None:
            self.capture.close()
            self.capture = None

    def begin_epoch(self, epoch: int) -> None:
        self.loss.begin_epoch(epoch)

    # ----- step -------------------------------------------------------------------------------------------------
    def step(self, inputs: StepInputs) -> StepOutput:
        losses = self.loss(inputs.logits, inputs.y)  # [B] with graph
        B = losses.shape[0]
        if B == 0:
            return StepOutput(losses=losses, weights=losses.detach().new_ones(0))
        cap = self.capture
        if cap is None or cap.model is not dist.unwrap(inputs.model):
            raise RuntimeError("batch_reweight: call attach(model, ...) with the model of the step before training")
        order = cap.order()
        modules = select_modules(order, self.params.grads, self.params.last_k)
        out_losses = losses
        reuse = self._reuse_eligible(modules, order)
        if reuse and self.reuse_ok:  # verified: free the graph during the Gram pass, backward through the records
            G, kept = cap.gram_and_grads(losses, modules, retain_graph=False)
            if not kept.complete:
                raise RuntimeError("batch_reweight grad_reuse: this forward has outputs the single Gram pass did not "
                                   "reach (the model's structure changed since it was verified); set grad_reuse=false")
            out_losses = kept.surrogate(losses)
        elif reuse:  # first eligible step: plain path for the update, and check the records against autograd
            G, kept = cap.gram_and_grads(losses, modules, retain_graph=True)
        elif self.params.impl == "fast":
            G = cap.gram(losses, modules)  # [B, B] float64; graph retained for the loop's backward
        else:
            with cap.paused():
                G = reference_gram(cap.model, inputs.x, inputs.y, self.loss, modules)
        cap.clear()  # drop the records and their tensor hooks before the loop's backward
        w, p = batch_reweight_weights(G, self.params.gamma, self.params.temp, self.params.weight_fn)
        if reuse and self.reuse_ok is None:
            # Under AMP autograd's own weight gradients are bf16/fp16 (~1 % off); the records' are float32.
            low = inputs.logits.dtype in (torch.bfloat16, torch.float16)
            self.reuse_ok = kept.complete and _same_gradient(kept, losses, w.to(losses.dtype), 5e-2 if low else 1e-3)
        self._pending.append(torch.stack([inputs.index.long(), p.to(inputs.index.device), inputs.y.long()], 1).cpu())
        stats = torch.stack([p.double().mean(), (p == 1).double().mean(), w.max(), w.min()]).tolist()
        metrics = {"br/pscore_mean": stats[0], "br/frac_p1": stats[1], "br/weight_max": stats[2], "br/weight_min": stats[3],
                   "br/grad_reuse": float(out_losses is not losses)}
        return StepOutput(losses=out_losses, weights=w.to(losses.dtype), metrics=metrics)

    def _reuse_eligible(self, modules: list[str], order: list[str]) -> bool:
        """Gradient reuse needs the fast path over every module (so every parameter's records exist), and samples
        that meet only through the parameters: BatchNorm with batch statistics rules it out at once; anything else
        is caught by the one-time comparison with autograd."""
        if not self.params.grad_reuse or self.params.impl != "fast" or self.reuse_ok is False or modules != order:
            return False
        model = self.capture.model
        if any(batch_stats(m) for m in model.modules()):
            self.reuse_ok = False
            return False
        called = set(order)
        covered = {id(p) for name, m in model.named_modules() if name in called for _, p in own_params(m)}
        return all(id(p) in covered for p in model.parameters() if p.requires_grad)

    # ----- epoch-level ------------------------------------------------------------------------------------------
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Gather this epoch's p-scores from all workers into the table (collective); per-class mean p of the epoch."""
        local = torch.cat(self._pending) if self._pending else torch.zeros(0, 3, dtype=torch.int64)
        self._pending = []
        device = self._device_for_collectives()
        rows = dist.all_gather_cat(local.to(device)).cpu()  # [n_global, 3] (index, p, class)
        self._add(rows)
        self.epochs += 1
        idx, p, cls = rows.unbind(1)
        out: dict[str, float] = {}
        if len(rows):
            out["pscore/mean"] = float(p.double().mean())
        c = self.info.num_classes
        sums = torch.zeros(c, dtype=torch.float64).index_add_(0, cls, p.double())
        counts = torch.zeros(c, dtype=torch.float64).index_add_(0, cls, torch.ones_like(p, dtype=torch.float64))
        for k in range(c):
            if counts[k] > 0:
                out[f"pscore/class_{k}"] = float(sums[k] / counts[k])
        rho = class_pscore_spearman(self.scores(), self.info.class_counts)  # over every epoch so far
        if not math.isnan(rho):
            out["pscore/spearman_vs_class_count"] = rho
        return out

    def _device_for_collectives(self) -> torch.device:
        # NCCL needs CUDA tensors; gloo (CPU) takes CPU ones. The model's device is the process group's device.
        if self.capture is not None:
            for p in self.capture.model.parameters():
                return p.device
        return torch.device("cpu")

    def _add(self, rows: torch.Tensor) -> None:
        if not len(rows):
            return
        idx, p, cls = rows.unbind(1)
        need = int(idx.max()) + 1
        if need > len(self._sum):  # ids beyond num_train: grow the table
            grow = need - len(self._sum)
            self._sum = torch.cat([self._sum, torch.zeros(grow, dtype=torch.float64)])
            self._count = torch.cat([self._count, torch.zeros(grow, dtype=torch.int64)])
            self._cls = torch.cat([self._cls, torch.full((grow,), -1, dtype=torch.int64)])
        self._sum.index_add_(0, idx, p.double())
        self._count.index_add_(0, idx, torch.ones_like(idx))
        self._cls[idx] = cls

    def scores(self) -> torch.Tensor:
        """[N, 3] float64 (index, mean p-score, class) of every sample scored at least once, sorted by index."""
        seen = (self._count > 0).nonzero().squeeze(1)  # [N] ascending
        mean = self._sum[seen] / self._count[seen].double()
        return torch.stack([seen.double(), mean, self._cls[seen].double()], 1)

    def artifacts(self, out_dir: str) -> list[str]:
        from rwray import plots  # matplotlib (~0.5 s): imported by the worker that draws, not by every process

        table = self.scores()
        if not len(table):
            return []
        os.makedirs(out_dir, exist_ok=True)
        seen = table[:, 0].long()  # [N] int64
        npy = tables.write_array(os.path.join(out_dir, "score.npy"), table.numpy())  # [N, 3] float64
        pqt = tables.write_columns(os.path.join(out_dir, "pscores.parquet"), {
            "index": seen.numpy(),  # int64
            "pscore": table[:, 1].numpy(),  # float64
            "class": self._cls[seen].numpy(),  # int64
            "n_scored": self._count[seen].numpy(),  # int64
        })
        png = plots.score_boxes_per_class(
            table[:, 1].numpy(), table[:, 2].long().numpy(), self.info.class_counts,
            f"batch reweighting p-scores (gamma={self.params.gamma}), {self.epochs} epoch(s)",
            "p-score averaged over epochs", os.path.join(out_dir, "pscore_per_class.png"))
        return [str(pqt), str(npy), str(png)]

    # ----- checkpointing ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The global table only: the loop checkpoints after end_epoch, when this epoch's rows are already in it.
        return {"sum": self._sum.clone(), "count": self._count.clone(), "cls": self._cls.clone(), "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sum = state["sum"].to(torch.float64).cpu().clone()
        self._count = state["count"].to(torch.int64).cpu().clone()
        self._cls = state["cls"].to(torch.int64).cpu().clone()
        self.epochs = int(state["epochs"])
        self._pending = []
