"""The functional inner loop in float64: the two backends agree, the second-order meta-gradient is
the true derivative (finite differences, plain autograd), first order is what it says, and the
batch-norm trap of differentiating through vmap (pytorch/functorch#534) stays out of reach."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metalab.functional import (
    adapt,
    classification_loss,
    meta_gradient,
    regression_loss,
    write_grads,
)
from metalab.nets.classifier import Conv4Classifier
from metalab.nets.mlp import MLP

TASKS, WAYS, QUERIES = 3, 5, 2  # 5-way 1-shot, 2 queries per class
INNER_LR = 0.4  # Finn et al. 2017's Omniglot inner learning rate


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def conv():
    """A small Conv4 classifier (8 filters, batch norm on batch statistics) and 28x28 tasks."""
    torch.manual_seed(0)
    model = Conv4Classifier(WAYS, hidden=8).double()
    gen = torch.Generator().manual_seed(0)
    support = (
        torch.rand(TASKS, WAYS, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(WAYS).repeat(TASKS, 1),  # (T, N*K)
    )
    query = (
        torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=gen, dtype=torch.float64),
        torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1),
    )
    return model, support, query


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """``|a - b| / |b|`` over all entries of all tensors."""
    diff = torch.cat([(a[k] - b[k]).flatten() for k in b])
    return (diff.norm() / torch.cat([v.flatten() for v in b.values()]).norm()).item()


def task(tensors: tuple[torch.Tensor, ...], t: int) -> tuple[torch.Tensor, ...]:
    return tuple(x[t] for x in tensors)


def meta_loss(model, params, support, query, steps, lr) -> torch.Tensor:
    """The mean query loss after adaptation, one task at a time."""
    loss_fn = classification_loss(model)

    def inner(p, x, y):
        return loss_fn(p, x, y)[0]

    losses = [
        loss_fn(adapt(params, inner, task(support, t), steps, lr), *task(query, t))[0]
        for t in range(TASKS)
    ]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 5])
def test_vmap_and_loop_agree_with_batch_norm(conv, steps, first_order):
    model, support, query = conv
    loss_fn, params = classification_loss(model), params_of(model)
    args = (loss_fn, params, support, query, steps, INNER_LR, first_order)
    vmapped, looped = meta_gradient(*args, backend="vmap"), meta_gradient(*args, backend="loop")
    assert rel_err(vmapped.grads, looped.grads) < 1e-10
    assert torch.allclose(vmapped.loss, looped.loss, rtol=1e-12, atol=0)
    assert torch.equal(vmapped.metrics["acc"], looped.metrics["acc"])
    assert vmapped.metrics["acc"].shape == (TASKS,)


def test_second_order_matches_plain_autograd(conv):
    """The textbook recipe without torch.func: autograd.grad(create_graph=True) per task."""
    model, support, query = conv
    steps, names = 2, [name for name, _ in model.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in model.parameters()]
    total = 0
    for t in range(TASKS):
        (xs, ys), (xq, yq), weights = task(support, t), task(query, t), theta
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xs,)), ys)
            g = torch.autograd.grad(loss, weights, create_graph=True)
            weights = [w - INNER_LR * gw for w, gw in zip(weights, g)]
        total = total + F.cross_entropy(
            functional_call(model, dict(zip(names, weights)), (xq,)), yq
        )
    expected = dict(zip(names, torch.autograd.grad(total / TASKS, theta)))
    ours = meta_gradient(
        classification_loss(model), params_of(model), support, query, steps, INNER_LR
    )
    assert rel_err(ours.grads, expected) < 1e-10


@pytest.mark.parametrize("steps", [1, 5])
def test_second_order_matches_finite_differences(conv, steps):
    model, support, query = conv
    params = params_of(model)
    grads = meta_gradient(classification_loss(model), params, support, query, steps, INNER_LR).grads
    norm = math.sqrt(sum(g.square().sum().item() for g in grads.values()))
    # With ReLUs the inner gradient jumps wherever a pre-activation crosses zero, so the adapted
    # parameters, and the meta-loss, jump by O(INNER_LR) there. Along a unit direction such
    # crossings lie about 1e-4 apart here (measured: eps = 1e-4 fails by up to 4e2 relative with
    # 5 steps), so the central difference must fit between two of them: eps = 1e-6 on a unit
    # direction, whose rounding error is about 1e-10. Measured: within 5e-11 |grad| (5e-9 of the
    # directional derivative); the bound 1e-7 |grad| is far below the batch-norm trap (~5e-3).
    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
        scale = math.sqrt(sum(x.square().sum().item() for x in v.values()))
        v = {k: x / scale for k, x in v.items()}
        plus = {k: p + eps * v[k] for k, p in params.items()}
        minus = {k: p - eps * v[k] for k, p in params.items()}
        difference = meta_loss(model, plus, support, query, steps, INNER_LR) - meta_loss(
            model, minus, support, query, steps, INNER_LR
        )
        analytic = sum((grads[k] * v[k]).sum() for k in grads).item()
        assert abs(difference.item() / (2 * eps) - analytic) < 1e-7 * norm


HEAD = ("features.blocks.3.0.weight", "features.blocks.3.0.bias", "head.weight", "head.bias")


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_adapting_a_subset_matches_plain_autograd(conv, backend):
    """keys=HEAD (Yin et al. 2020's adapted head on a fixed encoder): only the head moves in the
    inner loop, and the meta-gradient of every parameter, the encoder's through the head's
    steps, is the textbook per-task autograd's, in float64."""
    model, support, query = conv
    steps, names = 2, [name for name, _ in model.named_parameters()]
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    total = 0
    for t in range(TASKS):
        (xs, ys), (xq, yq), weights = task(support, t), task(query, t), dict(theta)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, weights, (xs,)), ys)
            g = torch.autograd.grad(loss, [weights[n] for n in HEAD], create_graph=True)
            weights.update({n: weights[n] - INNER_LR * gn for n, gn in zip(HEAD, g)})
        total = total + F.cross_entropy(functional_call(model, weights, (xq,)), yq)
    expected = dict(zip(names, torch.autograd.grad(total / TASKS, list(theta.values()))))
    ours = meta_gradient(
        classification_loss(model), params_of(model), support, query, steps, INNER_LR,
        backend=backend, keys=HEAD,
    )  # fmt: skip
    assert rel_err(ours.grads, expected) < 1e-10
    full = meta_gradient(
        classification_loss(model), params_of(model), support, query, steps, INNER_LR
    )
    assert rel_err(ours.grads, full.grads) > 1e-3  # adapting less is a different meta-gradient


def test_adapt_moves_only_the_keys(conv):
    model, support, _ = conv
    params = params_of(model)
    loss = lambda p, x, y: classification_loss(model)(p, x, y)[0]  # noqa: E731
    adapted = adapt(params, loss, task(support, 0), 3, INNER_LR, keys=HEAD)
    for name, p in params.items():
        assert torch.equal(adapted[name], p) == (name not in HEAD), name
    every = adapt(params, loss, task(support, 0), 3, INNER_LR, keys=list(params))
    plain = adapt(params, loss, task(support, 0), 3, INNER_LR)
    assert rel_err(every, plain) < 1e-14
    with pytest.raises(ValueError, match="not parameters"):
        adapt(params, loss, task(support, 0), 1, INNER_LR, keys=["encoder.weight"])


@pytest.mark.parametrize("steps", [1, 5])
def test_first_order_is_the_query_gradient_at_the_adapted_params(conv, steps):
    model, support, query = conv
    loss_fn, params = classification_loss(model), params_of(model)
    first = meta_gradient(loss_fn, params, support, query, steps, INNER_LR, first_order=True)
    second = meta_gradient(loss_fn, params, support, query, steps, INNER_LR, first_order=False)
    assert rel_err(first.grads, second.grads) > 1e-3  # the switch does something
    assert torch.allclose(first.loss, second.loss, rtol=1e-12, atol=0)  # and nothing else

    # By hand: adapt with plain autograd, then the query gradient at the adapted values as leaves.
    names = [name for name, _ in model.named_parameters()]

    def ce_grad(weights, x, y):
        leaves = [w.detach().requires_grad_() for w in weights]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, leaves)), (x,)), y)
        return torch.autograd.grad(loss, leaves)

    expected = dict.fromkeys(names, 0)
    for t in range(TASKS):
        (xs, ys), (xq, yq) = task(support, t), task(query, t)
        weights = [p.detach() for p in model.parameters()]
        for _ in range(steps):
            weights = [w - INNER_LR * g for w, g in zip(weights, ce_grad(weights, xs, ys))]
        for name, g in zip(names, ce_grad(weights, xq, yq)):
            expected[name] = expected[name] + g / TASKS
    assert rel_err(first.grads, expected) < 1e-10


def test_differentiating_through_vmap_is_refused(conv):
    model, support, query = conv
    with pytest.raises(ValueError, match="functorch#534"):
        meta_gradient(
            classification_loss(model),
            params_of(model),
            support,
            query,
            1,
            INNER_LR,
            backend="grad_vmap",
        )


def test_the_batch_norm_trap_in_this_torch(conv):
    """Documents the trap rather than relying on it: grad(vmap(task_loss)) with the native batch
    norm is either still wrong (> 1e-6 relative) or fixed upstream (< 1e-10); anything between
    would be a new behaviour to look at. When it is fixed, the guard could go."""
    model, support, query = conv
    loss_fn, params, steps = classification_loss(model), params_of(model), 1

    def task_loss(p, xs, ys, xq, yq):
        adapted = adapt(p, lambda q, x, y: loss_fn(q, x, y)[0], (xs, ys), steps, INNER_LR)
        return loss_fn(adapted, xq, yq)[0]

    def mean_loss(p):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, *support, *query).mean()

    through_vmap = grad(mean_loss)(params)
    looped = meta_gradient(loss_fn, params, support, query, steps, INNER_LR, backend="loop")
    error = rel_err(through_vmap, looped.grads)
    print(f"grad(vmap(task_loss)) with native batch norm, torch {torch.__version__}: {error:.1e}")
    assert error < 1e-10 or error > 1e-6
    if error < 1e-10:
        warnings.warn(f"the batch-norm trap is fixed in torch {torch.__version__}", stacklevel=1)


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_learnable_inner_lr(conv, backend):
    model, support, query = conv
    loss_fn, params, steps = classification_loss(model), params_of(model), 2
    lr = {k: torch.full_like(p, INNER_LR) for k, p in params.items()}  # Meta-SGD: one per weight
    learned = meta_gradient(loss_fn, params, support, query, steps, lr, backend=backend)
    fixed = meta_gradient(loss_fn, params, support, query, steps, INNER_LR, backend=backend)
    assert fixed.lr_grads is None
    assert rel_err(learned.grads, fixed.grads) < 1e-12
    assert learned.lr_grads.keys() == params.keys()
    assert all(g.abs().sum() > 0 and g.isfinite().all() for g in learned.lr_grads.values())
    # Raising every rate together by eps moves the meta-loss by eps times the summed lr gradient.
    eps = 1e-6
    plus = meta_loss(model, params, support, query, steps, INNER_LR + eps)
    minus = meta_loss(model, params, support, query, steps, INNER_LR - eps)
    summed = sum(g.sum() for g in learned.lr_grads.values()).item()
    assert abs((plus - minus).item() / (2 * eps) - summed) < 1e-6 * abs(summed)


def test_sinusoid_mlp_vmap_and_loop_agree():
    torch.manual_seed(0)
    model = MLP((1, 40, 40, 1)).double()
    gen = torch.Generator().manual_seed(0)
    amplitude = 0.1 + 4.9 * torch.rand(4, 1, 1, generator=gen, dtype=torch.float64)
    phase = math.pi * torch.rand(4, 1, 1, generator=gen, dtype=torch.float64)
    x = 10 * torch.rand(4, 20, 1, generator=gen, dtype=torch.float64) - 5  # (T, 2*K, 1)
    y = amplitude * torch.sin(x - phase)
    support, query = (x[:, :10], y[:, :10]), (x[:, 10:], y[:, 10:])
    for steps, first_order in [(1, False), (5, False), (5, True)]:
        args = (regression_loss(model), params_of(model), support, query, steps, 0.01, first_order)
        vmapped, looped = meta_gradient(*args, backend="vmap"), meta_gradient(*args, backend="loop")
        assert rel_err(vmapped.grads, looped.grads) < 1e-10
        assert vmapped.metrics == looped.metrics == {}


def test_chunking_changes_nothing(conv):
    model, support, query = conv
    args = (classification_loss(model), params_of(model), support, query, 2, INNER_LR)
    whole, chunked = meta_gradient(*args), meta_gradient(*args, chunk_size=2)  # chunks of 2 and 1
    assert rel_err(chunked.grads, whole.grads) < 1e-12
    assert torch.equal(chunked.metrics["acc"], whole.metrics["acc"])


def test_write_grads_then_a_plain_optimizer_step(conv):
    model, support, query = copy.deepcopy(conv[0]), *conv[1:]
    params = dict(model.named_parameters())
    out = meta_gradient(classification_loss(model), params, support, query, 1, INNER_LR)
    before = {name: p.clone() for name, p in params_of(model).items()}
    write_grads(params, out.grads)
    write_grads(params, out.grads)  # accumulates, as backward() does
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for name, p in model.named_parameters():
        assert torch.allclose(p, before[name] - out.grads[name], rtol=0, atol=1e-14)


def test_bad_arguments_are_named(conv):
    model, support, query = conv
    loss_fn, params = classification_loss(model), params_of(model)
    with pytest.raises(ValueError, match="keys"):
        meta_gradient(loss_fn, params, support, query, 1, {"head.bias": torch.tensor(0.4)})
    with pytest.raises(ValueError, match="number of tasks"):
        meta_gradient(loss_fn, params, support, task(query, slice(0, 2)), 1, INNER_LR)


def test_classifier_geometry():
    """Finn et al.'s Omniglot net: 28 -> 14 -> 7 -> 4 -> 2, averaged to ``hidden`` features; no
    running statistics anywhere."""
    model = Conv4Classifier(WAYS, hidden=8)
    assert model.features.blocks(torch.zeros(2, 1, 28, 28)).shape == (2, 8, 2, 2)
    assert model.head.in_features == 8
    assert list(model.buffers()) == []
    mini = Conv4Classifier(WAYS, in_channels=3, hidden=4, pool="max", image_size=84)
    assert mini.head.in_features == 4 * 5 * 5
    assert mini(torch.zeros(2, 3, 84, 84)).shape == (2, WAYS)
