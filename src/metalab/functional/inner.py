"""The inner loop of gradient-based meta-learning (Finn et al. 2017) on ``torch.func``.

Parameters are a dict of tensors and a network is a plain ``nn.Module`` called through
``functional_call``. :func:`adapt` takes ``steps`` gradient steps on a task's support set, written
with ``torch.func.grad`` so that it composes under ``vmap`` and under an outer ``grad``.
:func:`meta_gradient` differentiates the query loss after adaptation with respect to the initial
parameters (and to the inner learning rates when they are learnable, Li et al. 2017, Meta-SGD) for
a batch of tasks, either vmapped over the tasks or one task at a time.

The meta-gradient of each task is taken *inside* the vmap (``vmap(grad(task_loss))``) and then
averaged. Differentiating *through* a vmapped task loss (``grad(vmap(task_loss))``, or
``.backward()`` on its mean) is never done here: with the native batch norm inside, torch returns
silently wrong second-order meta-gradients (about 5e-3 relative in float64 after one inner step,
3e-2 after five; pytorch/functorch#534), while the per-task form is exact (tested in tests/test_functional.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

Params = dict[str, torch.Tensor]
# loss_fn(params, x, y) -> (scalar loss, {name: scalar metric}); the metrics ride along as aux.
LossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]

BACKENDS = ("vmap", "loop")


def adapt(
    params: Params,
    loss_fn: Callable[..., torch.Tensor],
    support: tuple[torch.Tensor, ...],
    steps: int,
    lr: float | Params,
    first_order: bool = False,
    keys: Collection[str] | None = None,
) -> Params:
    """``steps`` steps of gradient descent on ``loss_fn(params, *support)`` (a scalar).

    Args:
        params: the initial parameters.
        loss_fn: the support loss, a scalar function of the parameters and the support tensors.
        support: the task's support tensors, e.g. ``(x, y)`` without a task dimension.
        steps: inner gradient steps.
        lr: the inner learning rate, or one tensor per parameter (same keys, broadcastable shapes)
            for learnable per-parameter rates.
        first_order: detach each inner gradient, so that no second derivatives reach the initial
            parameters (Finn et al. 2017, Sec. 5.2). The adapted values are unchanged.
        keys: adapt only these parameters (e.g. a head on a fixed encoder, Yin et al. 2020);
            the others are passed to ``loss_fn`` unchanged, and the outer gradient still reaches
            them through the adapted ones. None: all.

    Returns:
        The adapted parameters, differentiable with respect to ``params`` and a dict ``lr``.
    """
    if keys is not None:
        unknown = sorted(set(keys) - params.keys())
        if unknown:
            raise ValueError(f"keys {unknown} are not parameters: use some of {sorted(params)}")
        fixed = {name: p for name, p in params.items() if name not in keys}
        inner = {name: p for name, p in params.items() if name in keys}

        def inner_loss(adapted: Params, *data: torch.Tensor) -> torch.Tensor:
            return loss_fn({**fixed, **adapted}, *data)

        rates = {n: lr[n] for n in inner} if isinstance(lr, dict) else lr
        return {**params, **adapt(inner, inner_loss, support, steps, rates, first_order)}
    for _ in range(steps):
        grads = grad(loss_fn)(params, *support)
        if first_order:
            grads = {name: g.detach() for name, g in grads.items()}
        params = {
            name: p - (lr[name] if isinstance(lr, dict) else lr) * grads[name]
            for name, p in params.items()
        }
    return params


class MetaGradient(NamedTuple):
    """What :func:`meta_gradient` returns; plain tensors without an autograd graph.

    Attributes:
        loss: the query loss after adaptation, averaged over the tasks, ``()``.
        grads: its gradient with respect to each initial parameter.
        lr_grads: its gradient with respect to each inner learning rate when ``lr`` is a dict.
        metrics: each metric of ``loss_fn`` per task, ``(T,)``.
    """

    loss: torch.Tensor
    grads: Params
    lr_grads: Params | None
    metrics: dict[str, torch.Tensor]


def _task_loss(
    loss_fn: LossFn,
    steps: int,
    first_order: bool,
    keys: Collection[str] | None,
    query_loss_fn: LossFn,
    params: Params,
    lr: float | Params,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One task's query loss (and metrics) after adapting ``params`` on its support set."""
    inner = lambda p, *data: loss_fn(p, *data)[0]  # noqa: E731
    adapted = adapt(params, inner, support, steps, lr, first_order, keys)
    return query_loss_fn(adapted, *query)


def meta_gradient(
    loss_fn: LossFn,
    params: Params,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
    steps: int,
    lr: float | Params,
    first_order: bool = False,
    backend: str = "vmap",
    chunk_size: int | None = None,
    keys: Collection[str] | None = None,
    query_loss_fn: LossFn | None = None,
) -> MetaGradient:
    """The meta-gradient of a batch of tasks: the mean over tasks of d(query loss after
    :func:`adapt`)/d(initial parameters), and d/d(lr) when ``lr`` is a dict.

    Args:
        loss_fn: ``loss_fn(params, x, y) -> (loss, metrics)``, used on support and query sets
            (see :func:`classification_loss`, :func:`regression_loss`).
        params: the initial parameters (detached here; write the result with :func:`write_grads`).
        support: the support tensors with a leading task dimension, e.g. ``(T, N*K, C, H, W)`` and
            ``(T, N*K)``.
        query: the query tensors with the same leading ``T``.
        steps, lr, first_order: as in :func:`adapt`.
        backend: ``"vmap"`` runs all tasks at once (``vmap(grad(task_loss))``); ``"loop"`` one at
            a time with plain autograd, holding one task's graph in memory (the same result to
            1e-10 in float64).
        chunk_size: with ``"vmap"``, at most this many tasks at once, to cap memory.
        keys: adapt only these parameters in the inner loop (:func:`adapt`); the meta-gradient
            still covers every parameter.
        query_loss_fn: the loss after adaptation when it is another callable of the same loss,
            e.g. ``torch.compile(loss_fn)`` (the query pass, which is first-order, compiles; the
            inner loop's double backward does not). None: ``loss_fn``.

    Returns:
        A :class:`MetaGradient`: mean loss, gradients, lr gradients, per-task metrics.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"backend={backend!r}: use 'vmap' (per-task meta-gradients inside vmap) or 'loop'. "
            "Differentiating through a vmapped task loss is not offered: with the native batch "
            "norm its second-order meta-gradients are wrong (pytorch/functorch#534)"
        )
    learn_lr = isinstance(lr, dict)
    if learn_lr and lr.keys() != params.keys():
        raise ValueError(f"lr has keys {sorted(lr)}; it needs exactly those of params")
    tasks = {t.shape[0] for t in (*support, *query)}
    if len(tasks) != 1:
        raise ValueError(f"support and query disagree on the number of tasks: {sorted(tasks)}")
    # The result is returned as plain tensors, so no autograd graph may grow back to the module.
    params = {name: p.detach() for name, p in params.items()}
    if learn_lr:
        lr = {name: r.detach() for name, r in lr.items()}

    query_loss_fn = query_loss_fn or loss_fn
    if backend == "loop":
        grads, lr_grads, losses, metrics = _loop(
            loss_fn, params, lr, support, query, steps, first_order, keys, query_loss_fn
        )
        return MetaGradient(losses.mean(), grads, lr_grads, metrics)
    # argnums is a tuple even for one argument, so the gradients are always a tuple of dicts.
    task_grad = grad_and_value(
        partial(_task_loss, loss_fn, steps, first_order, keys, query_loss_fn),
        argnums=(0, 1) if learn_lr else (0,),
        has_aux=True,
    )
    batched = vmap(task_grad, in_dims=(None, None, 0, 0), chunk_size=chunk_size)
    grads, (losses, metrics) = batched(params, lr, support, query)
    grads = tuple({name: g.mean(0) for name, g in part.items()} for part in grads)
    return MetaGradient(losses.mean(), grads[0], grads[1] if learn_lr else None, metrics)


def _loop(
    loss_fn: LossFn,
    params: Params,
    lr: float | Params,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
    steps: int,
    first_order: bool,
    keys: Collection[str] | None,
    query_loss_fn: LossFn,
) -> tuple[Params, Params | None, torch.Tensor, dict[str, torch.Tensor]]:
    """The "loop" backend: one task at a time with plain autograd (``autograd.grad`` with
    ``create_graph`` in the inner loop, ``backward`` of the query loss into leaf copies of the
    parameters), so only one task's graph is alive at a time. The same derivatives as
    :func:`adapt` under ``torch.func.grad`` (checked to 1e-10 in float64), without the
    transforms' per-operation overhead (measured 17% faster on a CPU, benchmarks/RESULTS.md)."""
    tasks = support[0].shape[0]
    theta = {name: p.detach().requires_grad_() for name, p in params.items()}
    rates = (
        {name: r.detach().requires_grad_() for name, r in lr.items()}
        if isinstance(lr, dict)
        else lr
    )
    losses, metrics = [], []
    with torch.enable_grad():
        for t in range(tasks):
            fast = theta
            adapted = list(theta if keys is None else keys)
            for _ in range(steps):
                inner = loss_fn(fast, *(s[t] for s in support))[0]
                grads = torch.autograd.grad(
                    inner, [fast[n] for n in adapted], create_graph=not first_order,
                    allow_unused=True,
                )  # fmt: skip
                step = dict(zip(adapted, grads))
                fast = {
                    name: p
                    if step.get(name) is None
                    else p - (rates[name] if isinstance(rates, dict) else rates) * step[name]
                    for name, p in fast.items()
                }
            loss, task_metrics = query_loss_fn(fast, *(q[t] for q in query))
            (loss / tasks).backward()
            losses.append(loss.detach())
            metrics.append({name: m.detach() for name, m in task_metrics.items()})

    def grads_of(leaves: Params) -> Params:
        return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in leaves.items()}

    stacked = {name: torch.stack([m[name] for m in metrics]) for name in metrics[0]}
    lr_grads = grads_of(rates) if isinstance(rates, dict) else None
    return grads_of(theta), lr_grads, torch.stack(losses), stacked


def write_grads(parameters: Mapping[str, torch.Tensor], grads: Params) -> None:
    """Add ``grads`` into the ``.grad`` of the matching parameters, as ``backward()`` would, so a
    plain ``torch.optim`` step follows (and other loss terms may still be backpropagated)."""
    for name, p in parameters.items():
        g = grads[name].to(p.dtype)
        p.grad = g.clone() if p.grad is None else p.grad + g


def classification_loss(model: nn.Module) -> LossFn:
    """``loss_fn(params, x, y)``: cross-entropy of ``model``'s logits ``(n, ways)`` for labels
    ``(n,)``, with the accuracy as the metric ``"acc"``."""

    def loss_fn(
        params: Params, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = functional_call(model, (params, dict(model.named_buffers())), (x,))
        acc = (logits.argmax(-1) == y).to(logits.dtype).mean()
        return F.cross_entropy(logits, y), {"acc": acc}

    return loss_fn


def regression_loss(model: nn.Module) -> LossFn:
    """``loss_fn(params, x, y)``: mean squared error of ``model``'s outputs against ``y``; no
    metrics."""

    def loss_fn(
        params: Params, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = functional_call(model, (params, dict(model.named_buffers())), (x,))
        return F.mse_loss(out, y), {}

    return loss_fn
