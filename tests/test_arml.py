"""ARML in float64 and on its tasks: the 2-D regression family keeps the official code's
invariants; the meta-knowledge graph's adjacency is row-normalised and its assignment a softmax;
gates lie in (0, 1); the meta-gradient (per-task inside vmap, or a loop) matches a written-out
per-task autograd loop and finite differences, and is MAML's when the gates are 1; ARML learns
the 2-D regression and Omniglot episodes; `metalab eval` writes its tables, graph and figure."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab import functional
from metalab.cli import main
from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import evaluate, evaluate_regression
from metalab.evaluate.regression import regression_errors
from metalab.methods import get_method
from metalab.methods.arml import (
    ARML,
    GRUAutoencoder,
    KnowledgeGraph,
    meta_gradient,
)
from metalab.methods.maml import MAML
from metalab.tasks.episodes import EpisodeSampler, TaskBatch
from metalab.tasks.regression import (
    ARML_2D_FAMILIES,
    ARML_2D_RANGES,
    FAMILIES,
    ARML2DFamily,
    ARML2DTasks,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def small_arml(**changes) -> ARML:
    """A float64 ARML on the 2-D tasks with a 2-8-8-1 base learner, width 6, 3 vertices and 2
    clusters, inner steps of 0.05 (so that the second-order terms matter), whose gate layers
    are spread away from 1/2 and whose weights are not small and biases not 0 (so that no
    gradient vanishes by symmetry: a gate on a zero weight gets none)."""
    config = ARML.recipe("2d-regression").updated(
        hidden=8, embed_dim=6, vertices=3, inner_steps=2, inner_lr=0.05, **changes
    )
    torch.manual_seed(0)
    method = ARML(config).double()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in method.encoder.gates.values():
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=gen, dtype=F64))
        for p in method.net.parameters():  # the code starts biases at 0
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=F64))
    return method


def batch_2d(tasks: int, shots: int = 5, queries: int = 6, seed: int = 1) -> TaskBatch:
    batch = ARML2DTasks(shots, queries, seed=seed).sample_batch(tasks)
    return TaskBatch(*(t.double() for t in batch.tensors()))


def detached(meta):
    return {g: {k: p.detach().clone() for k, p in part.items()} for g, part in meta.items()}


# -- the 2-D regression tasks ---------------------------------------------------------------------


def test_the_2d_family_keeps_the_codes_invariants():
    tasks = ARML2DTasks(10, 10, seed=0)
    batch, info = tasks.fixed_set(1200)
    x = torch.cat([batch.support_x, batch.query_x], 1).double().numpy()  # (T, 20, 2)
    y = torch.cat([batch.support_y, batch.query_y], 1).double().numpy()[..., 0]
    family = info["family"]
    assert x.shape == (1200, 20, 2) and FAMILIES["arml-2d"] is ARML2DTasks
    # Each family about 1/6 of the tasks (1200 tasks: 4 standard deviations is 0.043).
    shares = np.bincount(family, minlength=6) / len(family)
    assert len(shares) == 6 and np.abs(shares - 1 / 6).max() < 0.043, shares
    # Families 0-3 on the y = 1 line; the surfaces use both coordinates over [-5, 5].
    line, plane = family < 4, family >= 4
    assert (x[line, :, 1] == 1.0).all()
    for coords in (x[line, :, 0], x[plane, :, 0], x[plane, :, 1]):
        assert coords.min() >= -5 and coords.max() <= 5 and coords.min() < -4.9 < 4.9 < coords.max()
    for name, (low, high) in ARML_2D_RANGES.items():
        assert (info[name] >= low).all() and (info[name] <= high).all(), name
        assert np.ptp(info[name]) > 0.9 * (high - low), name
    # The clean targets follow each family's formula (written out here independently).
    u, v = x[..., 0], x[..., 1]
    p = {k: info[k][:, None] for k in ARML_2D_RANGES}
    formulas = [
        p["amplitude"] * np.sin(p["frequency"] * u + p["phase"]),
        p["line_a"] * u + p["line_b"],
        p["quadratic_a"] * u**2 + p["quadratic_b"] * u + p["quadratic_c"],
        p["cubic_a"] * u**3 + p["cubic_b"] * u**2 + p["cubic_c"] * u + p["cubic_d"],
        p["surface_a"] * u**2 + p["surface_b"] * v**2,
        np.sin(-p["ripple_a"] * (u**2 + v**2)) + p["ripple_b"],
    ]
    expected = np.stack(formulas)[family, np.arange(len(family))]
    np.testing.assert_allclose(info["clean"][..., 0], expected, atol=1e-5)
    for t in (0, 1, 2, 3, 4, 5, 6):
        np.testing.assert_allclose(tasks.function(info, t, x[t])[:, 0], expected[t], atol=1e-5)
    # Noise of std 0.3 on every target (24,000 residuals: standard error of the std ~0.0014).
    residual = y - info["clean"][..., 0]
    assert abs(residual.std() - 0.3) < 0.006 and abs(residual.mean()) < 0.008
    # Seeded, checkpointable, fixed sets are prefixes; the sampler MAML and ARML train on.
    state = tasks.state()
    first = tasks.sample_batch(3)
    tasks.set_state(state)
    assert torch.equal(tasks.sample_batch(3).support_y, first.support_y)
    assert torch.equal(tasks.fixed_set(7)[0].query_x, batch.query_x[:7])
    assert isinstance(ARML.task_sampler(ARML.recipe("2d-regression"), "train"), ARML2DTasks)
    maml = MAML(MAML.recipe("arml-2d"))
    assert maml.net.layers[0].in_features == 2 and maml.regression
    for bad in (dict(noise=-0.1), dict(x_range=(5.0, -5.0))):
        with pytest.raises(ConfigError):
            ARML2DTasks(5, 5, family=ARML2DFamily(**bad))


# -- the graph, the autoencoders, the gates -------------------------------------------------------


def test_the_knowledge_graph_is_row_normalised_and_assigns_by_softmax():
    torch.manual_seed(0)
    graph = KnowledgeGraph(dim=5, vertices=4, sigma=2.0).double()
    prototypes = torch.randn(3, 2, 5, dtype=F64)  # 3 tasks, 2 prototypes each
    a, assignment = graph.adjacency(prototypes)
    assert a.shape == (3, 6, 6) and assignment.shape == (3, 2, 4)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 6, dtype=F64), rtol=0, atol=1e-14)
    assert (a > 0).all()
    # The assignment: softmax over vertices of -||c - h||^2 / (2 sigma), written out.
    h = graph.vertices.detach()
    for t in range(3):
        for k in range(2):
            logits = torch.stack([-((prototypes[t, k] - h[v]) ** 2).sum() / 4 for v in range(4)])
            torch.testing.assert_close(assignment[t, k], logits.softmax(0), rtol=1e-13, atol=0)
    # Unnormalised: A + I has 1 on the diagonal (no self-edge), is symmetric, and its
    # prototype-vertex block is the assignment.
    raw = a * (1 / a.diagonal(dim1=-2, dim2=-1))[..., None]
    torch.testing.assert_close(raw.diagonal(dim1=-2, dim2=-1), torch.ones(3, 6, dtype=F64))
    torch.testing.assert_close(raw, raw.transpose(-1, -2))
    torch.testing.assert_close(raw[:, :2, 2:], assignment)
    assert ((raw - torch.eye(6, dtype=F64)) < 1).all()  # sigmoid edges
    # One task alone gives the same as in a batch; the output keeps the prototypes' rows.
    enhanced, single = graph(prototypes[1])
    torch.testing.assert_close(single, assignment[1])
    assert enhanced.shape == (2, 5) and enhanced.abs().max() < 1  # tanh
    torch.testing.assert_close(graph(prototypes)[0][1], enhanced)


def test_the_gru_autoencoder_learns_to_reconstruct():
    """Its reconstruction loss falls 5x in 300 Adam steps on 8 fixed sequences, and its code is
    the mean of the encoder's states."""
    torch.manual_seed(0)
    ae = GRUAutoencoder(4, 16)
    sequences = torch.randn(8, 3, 4)
    code, loss = ae(sequences)
    assert code.shape == (8, 16) and loss.shape == (8,)
    h, states = torch.zeros(8, 16), []
    for x in sequences.unbind(1):
        h = ae.encoder(x, h)
        states.append(h)
    torch.testing.assert_close(code, torch.stack(states).mean(0))
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-2)
    first = loss.mean().item()
    for _ in range(300):
        optimizer.zero_grad()
        ae(sequences)[1].mean().backward()
        optimizer.step()
    assert ae(sequences)[1].mean().item() < first / 5, first


def test_gates_lie_in_the_unit_interval_and_batches_equal_single_tasks():
    method = small_arml()
    batch = batch_2d(4)
    gates, reconstruction, assignment = method.encoder(batch.support_x, batch.support_y)
    for name, p in method.net.named_parameters():
        assert gates[name].shape == (4, *p.shape) and ((gates[name] > 0) & (gates[name] < 1)).all()
        assert (gates[name][0] != gates[name][1]).all(), name  # each task its own gates
    assert torch.cat([g.flatten() for g in gates.values()]).std() > 0.1
    assert reconstruction.shape == (4,) and (reconstruction > 0).all()
    torch.testing.assert_close(assignment.sum(-1), torch.ones(4, 2, dtype=F64))
    one, recon_one, _ = method.encoder(batch.support_x[2], batch.support_y[2])
    for name in gates:
        torch.testing.assert_close(one[name], gates[name][2])
    torch.testing.assert_close(recon_one, reconstruction[2])
    theta = method.initial_params(batch.support_x, batch.support_y)
    for name, w in method.params().items():
        torch.testing.assert_close(theta[name], gates[name] * w)


# -- the meta-gradient ----------------------------------------------------------------------------


def reference_loss(method: ARML, meta, support, query, steps: int, lr: float, weight: float):
    """One task's ARML loss written out with plain autograd: the encoder on the task alone, the
    gated initialisation, ``steps`` steps with create_graph, the query MSE plus the weighted
    reconstruction."""
    gates, reconstruction, _ = functional_call(method.encoder, meta["encoder"], support)
    phi = {k: gates[k] * w for k, w in meta["net"].items()}

    def mse(params, x, y):
        return F.mse_loss(functional_call(method.net, params, (x,)), y)

    for _ in range(steps):
        grads = torch.autograd.grad(mse(phi, *support), list(phi.values()), create_graph=True)
        phi = {k: p - lr * g for (k, p), g in zip(phi.items(), grads)}
    return mse(phi, *query) + weight * reconstruction


def test_backends_agree_with_a_per_task_autograd_loop():
    """3 tasks, 2 inner steps at 0.05, lambda 0.01: vmap and loop give the loss and the gradient
    of every meta-parameter of the written-out reference to 1e-10 relative."""
    method = small_arml()
    batch = batch_2d(3)
    meta = detached(method.meta_params())
    leaves = {
        g: {k: p.clone().requires_grad_() for k, p in part.items()} for g, part in meta.items()
    }
    total = (
        sum(
            reference_loss(
                method,
                leaves,
                (batch.support_x[t], batch.support_y[t]),
                (batch.query_x[t], batch.query_y[t]),
                2,
                0.05,
                0.01,
            )
            for t in range(3)
        )
        / 3
    )
    total.backward()
    for backend in ("vmap", "loop"):
        result = meta_gradient(
            method.loss_fn, method.encoder, meta, (batch.support_x, batch.support_y),
            (batch.query_x, batch.query_y), 2, 0.05, 0.01, backend=backend,
        )  # fmt: skip
        assert abs(result.loss.item() - total.item()) < 1e-10 * total.item(), backend
        assert result.metrics["query_loss"].shape == (3,)
        for group, part in leaves.items():
            for k, leaf in part.items():
                # One GCN layer keeps the prototype rows, which never read the vertex-vertex
                # edges: their weights get no gradient (in the official code too).
                silent = k.startswith("graph.vertex_edge")
                assert (leaf.grad.abs().max() == 0) == silent, (group, k)
                torch.testing.assert_close(
                    result.grads[group][k], leaf.grad, rtol=1e-10, atol=1e-13, msg=(backend, k)
                )


def test_meta_gradient_matches_finite_differences():
    """Along a random unit direction inside each group (theta_0, the encoder), the central
    difference (eps 1e-6) of the mean loss of 2 tasks agrees with the analytic directional
    derivative within 1e-7 of the group's gradient norm."""
    method = small_arml()
    batch = batch_2d(2)
    support, query = (batch.support_x, batch.support_y), (batch.query_x, batch.query_y)
    meta = detached(method.meta_params())

    def loss(m):
        return meta_gradient(method.loss_fn, method.encoder, m, support, query, 2, 0.05, 0.01)

    analytic = loss(meta)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for group, part in meta.items():
        norm = math.sqrt(sum(g.square().sum().item() for g in analytic.grads[group].values()))
        v = {k: torch.randn(p.shape, generator=gen, dtype=F64) for k, p in part.items()}
        length = math.sqrt(sum(x.square().sum().item() for x in v.values()))

        def shifted(sign, group=group, v=v, length=length):
            moved = {k: p + sign * eps * v[k] / length for k, p in meta[group].items()}
            return loss({**meta, group: moved}).loss.item()

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
        directional = sum((analytic.grads[group][k] * v[k]).sum() for k in v).item() / length
        assert norm > 1e-3 and abs(numeric - directional) < 1e-7 * norm, (group, numeric)


def test_with_open_gates_and_no_reconstruction_it_is_maml():
    """Gate biases at 40 (sigmoid = 1 in float64) and lambda = 0: the loss and the gradient for
    theta_0 are MAML's (functional.meta_gradient) to 1e-12, and the encoder gets none."""
    method = small_arml()
    with torch.no_grad():
        for layer in method.encoder.gates.values():
            layer.weight.zero_()
            layer.bias.fill_(40.0)
    batch = batch_2d(4)
    support, query = (batch.support_x, batch.support_y), (batch.query_x, batch.query_y)
    ours = meta_gradient(
        method.loss_fn, method.encoder, method.meta_params(), support, query, 2, 0.05, 0.0
    )
    maml = functional.meta_gradient(method.loss_fn, method.params(), support, query, 2, 0.05)
    assert abs(ours.loss.item() - maml.loss.item()) < 1e-12 * maml.loss.item()
    for k, g in maml.grads.items():
        torch.testing.assert_close(ours.grads["net"][k], g, rtol=1e-12, atol=1e-15)
    assert all((g == 0).all() for g in ours.grads["encoder"].values())


# -- learning -------------------------------------------------------------------------------------


def test_arml_learns_the_2d_regression_in_seconds():
    """300 meta-steps of 10 tasks (Adam 3e-3, the recipe otherwise): the noise-free MSE after
    5 steps on K = 10 falls from the untrained model's (about that of predicting 0, ~25) to
    well below half of it (measured: 25.4 -> 7.2)."""
    assert get_method("arml") is ARML
    config = ARML.recipe("2d-regression").updated(meta_batch=10, lr=3e-3, backend="vmap")
    torch.manual_seed(0)
    method = ARML(config)
    args = dict(shots=10, tasks=200, steps=(5,), family="arml-2d")
    before = evaluate_regression(method, **args)[0].mean
    tasks = ARML.task_sampler(config, "train")
    optimizer = method.make_optimizer()
    for _ in range(300):
        optimizer.zero_grad()
        _, metrics = method.meta_step(tasks.sample_batch(config.meta_batch))
        optimizer.step()
    after = evaluate_regression(method, **args)[0].mean
    assert before > 15 and after < 0.4 * before, (before, after)
    assert metrics["reconstruction"] < 3.0, metrics
    # The regression curve and predict agree on a task (the curve's step 5 is predict's answer).
    batch = ARML2DTasks(10, 10, seed=4).sample_batch(2)
    curve = method.regression_curve(batch, 5)
    method.config = method.config.updated(eval_inner_steps=5)
    out = method.predict(batch.support_x[1], batch.support_y[1], batch.query_x[1])
    mse = (out - batch.query_y[1]).square().mean()
    torch.testing.assert_close(curve[1, 5], mse, rtol=1e-5, atol=1e-6)


@pytest.mark.realdata
def test_arml_learns_omniglot_episodes(omniglot_root):
    """The image path on plain Omniglot (the recipe's 5 inner steps at 0.01, a smaller encoder):
    25 meta-steps of 2 tasks reach well above chance (0.2) on 5-way 1-shot test episodes
    through the standard evaluation (measured: 58.9 +- 2.4%)."""
    config = ARML.recipe("omni-art-multi-5w1s").updated(
        data="omniglot", hidden=16, embed_dim=32, queries=5, meta_batch=2, backend="vmap"
    )
    torch.manual_seed(0)
    method = ARML(config)
    sampler = EpisodeSampler(omniglot("vinyals", "train", omniglot_root), 5, 1, 5, seed=0)
    optimizer = method.make_optimizer()
    for _ in range(25):
        optimizer.zero_grad()
        method.meta_step(sampler.sample_batch(2))
        optimizer.step()
    test = omniglot("vinyals", "test", omniglot_root)
    result = evaluate(method, EpisodeSampler(test, 5, 1, 5, seed=7), episodes=60)
    assert result.mean > 0.45, result
    assignment = method.assignment(EpisodeSampler(test, 5, 1, 1, seed=7).sample_batch(3))
    assert assignment.shape == (3, 5, 8)
    with pytest.raises(ConfigError, match="5-way output layer"):
        evaluate(method, EpisodeSampler(test, 20, 1, 1, seed=7), episodes=1)


# -- evaluation and settings ----------------------------------------------------------------------


def test_eval_reports_both_targets_per_family_and_draws_the_graph(tmp_path, capsys):
    """`metalab train` (with its figure of the drawn functions on the y = 1 line) and `metalab
    eval` of a 2-D run: both errors per family, the graph in eval.json, the figure."""
    run = str(tmp_path / "run")
    train_args = ["--recipe", "2d-regression", "--episodes", "3", "--meta-batch", "4"]
    assert main(["train", "arml", *train_args, "--run-dir", run, "--no-progress"]) == 0
    assert (tmp_path / "run" / "arml-2d-draws.png").is_file()
    assert main(["eval", run, "--episodes", "120", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "all, noisy targets" in out and "ripple, noise-free targets" in out
    stored = json.loads((tmp_path / "run" / "eval.json").read_text())
    graph = stored["knowledge_graph"]
    assert graph["families"] == list(ARML_2D_FAMILIES)
    np.testing.assert_allclose(np.sum(graph["assignment"], 1), 1.0, atol=1e-3)
    rows = {(r["protocol"]["family"], r["protocol"]["targets"], r["protocol"]["steps"]): r
            for r in stored["results"]}  # fmt: skip
    assert len(rows) == 2 * 2 * 7 and rows[("all", "noisy", 20)]["protocol"]["episodes"] == 120
    # Noise std 0.3: the noisy MSE exceeds the noise-free one by about 0.09 over all tasks.
    gap = rows[("all", "noisy", 20)]["mean"] - rows[("all", "noise-free", 20)]["mean"]
    assert 0.0 < gap < 0.5, gap
    assert sum(rows[(f, "noisy", 5)]["protocol"]["episodes"] for f in ARML_2D_FAMILIES) == 120
    assert (tmp_path / "run" / "arml-graph.png").stat().st_size > 20_000


def test_regression_errors_score_maml_on_the_same_tasks():
    torch.manual_seed(0)
    maml = MAML(MAML.recipe("arml-2d"))
    rows = dict(regression_errors(maml, tasks=50, steps=(20,)))
    assert rows["all, noisy targets"].protocol["steps"] == 20
    assert rows["all, noisy targets"].mean > rows["all, noise-free targets"].mean > 1.0


def test_recipes_follow_the_scripts_and_bad_settings_are_refused():
    full = ARML.recipe("2d-regression-full")
    assert (full.episodes, full.meta_batch, full.inner_steps, full.eval_inner_steps) == (
        70_000, 25, 5, 20,
    )  # fmt: skip
    assert (full.inner_lr, full.lr, full.recon_weight, full.vertices, full.sigma) == (
        1e-3, 1e-3, 0.01, 6, 2.0,
    )  # fmt: skip
    assert ARML.recipe("2d-regression").episodes < full.episodes
    assert MAML.recipe("arml-2d-full").episodes == 70_000
    # Each recipe is MAML's of the same name on every setting MAML has (compared at equal steps).
    pairs = {"2d-regression": "arml-2d", "2d-regression-full": "arml-2d-full"}
    for ours in ARML.recipes:
        maml = asdict(MAML.recipe(pairs.get(ours, ours)))
        assert {k: v for k, v in asdict(ARML.recipe(ours)).items() if k in maml} == maml, ours
    art = ARML.recipe("omni-art-multi-5w5s")
    assert (art.vertices, art.sigma, art.embed_dim, art.meta_batch, art.inner_lr) == (
        8, 8.0, 128, 4, 0.01,
    )  # fmt: skip
    base = ARML.recipe("2d-regression")
    for changes in (
        {"learn_inner_lr": True},
        {"vertices": 0},
        {"sigma": 0.0},
        {"recon_weight": -1.0},
        {"data": "attributes"},
        {"data": "cifar"},
    ):
        with pytest.raises(ConfigError) as error:
            ARML(base.updated(**changes))
        assert "\n" not in str(error.value), changes
    with pytest.raises(ValueError, match="backend"):
        meta_gradient(None, None, {}, (), (), 1, 0.1, 0.0, backend="grad-of-vmap")
