"""The fast Gram: hooks on the training forward, one partial backward, per-layer Grams as the gradients arrive.

During the training forward, a forward hook on each parametrised module keeps its input (detached: an alias of a
tensor the graph saves anyway), the output's gradient edge (not the output: a norm layer's output is saved by nobody
else) and puts a tensor hook on the output. ONE backward pass of sum_i l_i down to the earliest selected output
(``torch.autograd.grad`` on its gradient edge, ``retain_graph=True`` so the training loop's own backward still works
afterwards) delivers E = d(sum_i l_i)/d(output) to every selected module's hook, which turns (input, E) into that
layer's B x B Gram at once (`rwray.gram.kernels`) and lets E go. Parameter gradients are never computed by this
pass. With BatchNorm in training mode the per-sample gradient is the batch-coupled one (see `rwray.gram`).

The fast path sees the loop's own dropout masks. A module called several times in one forward is fine (its
per-sample gradients are summed over the calls before the Gram); SyncBatchNorm in training mode, one parameter
owned by two modules, modules called with several tensor inputs, and outputs modified in place after the forward are
not supported by the fast path (they raise).
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rwray.gram.kernels import Strategy, module_gram, module_per_sample, own_params
from rwray.gram.reuse import LayerGrads
from rwray.gram.select import parametrised_modules


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
                       ) -> tuple[torch.Tensor, LayerGrads]:
        """Like `gram`, and also keep what rebuilds any weighted sum of the per-sample gradients of EVERY recorded
        module later (`LayerGrads`): the partial backward then reaches every recorded output, whatever `modules`.
        retain_graph=False frees the forward graph as the pass goes (the caller then backpropagates through
        `LayerGrads.surrogate` only), and the records drop what they no longer need as they go."""
        return self._run(losses, modules, keep=True, retain_graph=retain_graph)

    def _run(self, losses: torch.Tensor, modules: Iterable[str] | None, keep: bool, retain_graph: bool
             ) -> tuple[torch.Tensor, LayerGrads]:
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
