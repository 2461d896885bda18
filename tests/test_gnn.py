"""Garcia & Bruna's GNN on real Omniglot episodes: the adjacency, the hidden and revealed labels,
batching, and that it learns (run with METALAB_DATA=../shared/data)."""

from __future__ import annotations

import pytest
import torch

from metalab.data.datasets import load_dataset
from metalab.errors import ConfigError
from metalab.evaluate import EVAL_SEED, evaluate
from metalab.methods import get_method
from metalab.methods.gnn import GNN, GNNConfig
from metalab.rundir import load_method
from metalab.tasks.episodes import UNLABELLED, Episode
from metalab.train import train


@pytest.fixture(scope="module")
def val_set(omniglot_root):
    return load_dataset("omniglot", "vinyals", "val", 28, omniglot_root)


def episode(dataset, ways=5, shots=1, queries=3, labelled=None, seed=0) -> Episode:
    return GNN.sampler(dataset, ways, shots, queries, seed=seed, labelled=labelled).sample()


def model(seed: int = 0, **changes) -> GNN:
    torch.manual_seed(seed)
    return GNN(GNNConfig(**changes))


@pytest.mark.realdata
def test_adjacency_is_row_stochastic_without_self_loops(val_set, one_thread):
    method = model(ways=5, eval_ways=5)
    e = episode(val_set, shots=2, queries=3)
    for mode in (method.train, method.eval):
        mode()
        x, _, _ = method.graphs(e.support_x[None], e.support_y[None], e.query_x[None])
        assert x.shape == (15, 11, 64 + 5)  # a graph per query: the query and 10 support nodes
        for k in range(len(method.convs)):
            adjacency = method.adjacencies[k](x)  # (graphs, nodes, nodes)
            assert (adjacency >= 0).all()
            torch.testing.assert_close(adjacency.sum(-1), torch.ones(15, 11))
            assert (adjacency.diagonal(dim1=1, dim2=2) == 0).all()
            x = method.layer(k, x)
        if not method.training:  # the last layer's query row is row 0 of the full adjacency
            torch.testing.assert_close(
                method.last_adjacency.query_row(x), method.last_adjacency(x)[:, 0]
            )


@pytest.mark.realdata
def test_task_batch_equals_its_episodes(val_set, one_thread):
    method = model(ways=5, eval_ways=5).eval()  # eval: batch norm does not mix the episodes
    sampler = GNN.sampler(val_set, 5, 1, 2, seed=1)
    batch = sampler.sample_batch(3)
    with torch.no_grad():
        together = method.predict_episode(batch)
        alone = [method.predict(*(t[i] for t in batch.tensors()[:3])) for i in range(3)]
    assert together.shape == (3, 10, 5)
    torch.testing.assert_close(together, torch.stack(alone), rtol=1e-4, atol=1e-4)


@pytest.mark.realdata
def test_a_hidden_label_is_hidden_and_a_shown_one_is_used(val_set, one_thread):
    method = model(ways=5, eval_ways=5, shots=5).eval()
    e = episode(val_set, shots=5, queries=2, labelled=1)
    assert (e.support_y == UNLABELLED).sum() == 20 and e.oracle_y is not None
    with torch.no_grad():
        logits = method.predict_episode(e)
        hidden = int((e.support_y == UNLABELLED).nonzero()[0])
        oracle = e.oracle_y.clone()
        oracle[hidden] = (oracle[hidden] + 1) % 5
        same = method.predict_episode(
            Episode(e.support_x, e.support_y, e.query_x, e.query_y, oracle)
        )
        torch.testing.assert_close(same, logits, rtol=0, atol=0)
        shown = int((e.support_y != UNLABELLED).nonzero()[0])
        relabelled = e.support_y.clone()
        relabelled[shown] = (relabelled[shown] + 1) % 5
        other = method.predict(e.support_x, relabelled, e.query_x)
    assert not torch.allclose(other, logits)


@pytest.mark.realdata
def test_active_query_reveals_one_unlabelled_node(val_set, one_thread):
    method = model(ways=5, eval_ways=5, shots=5, active=True)
    e = episode(val_set, shots=5, queries=4, labelled=2)
    x, hidden, oracle = method.graphs(
        e.support_x[None], e.support_y[None], e.query_x[None], e.oracle_y[None]
    )
    assert hidden.shape == (20, 26) and not hidden[:, 0].any() and hidden.sum(1).eq(15).all()
    for mode in (method.train, method.eval):  # sampled from the attention, then its arg-max
        mode()
        x1 = method.layer(0, x)
        changed = (method.reveal(x1, hidden, oracle) != x1).any(-1)  # (graphs, nodes)
        assert changed.sum(1).eq(1).all(), "one node per graph"
        assert hidden[changed].all(), "an unlabelled support node"
        revealed = method.propagate(x, hidden, oracle)
        assert not torch.allclose(revealed, method.propagate(x)), "revealing changes the logits"
    with torch.no_grad():  # the answer in eval mode uses the oracle label of the chosen node
        logits = method.predict_episode(e)
        flipped = (e.oracle_y + 1) % 5
        other = method.predict_episode(
            Episode(e.support_x, e.support_y, e.query_x, e.query_y, flipped)
        )
    assert not torch.allclose(logits, other)


@pytest.mark.realdata
def test_active_gradient_reaches_the_attention(val_set, one_thread):
    method = model(ways=5, eval_ways=5, shots=5, active=True)
    batch = GNN.sampler(val_set, 5, 5, 1, labelled=1).sample_batch(2)
    loss, _ = method.meta_loss(batch)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.attention.parameters())


@pytest.mark.realdata
def test_ways_are_fixed(val_set):
    assert get_method("gnn") is GNN
    method = model(ways=5, eval_ways=5)
    assert method.supports_ways(5) and not method.supports_ways(20)
    with pytest.raises(ConfigError, match="eval_ways=20"):
        GNN(GNNConfig(ways=20, eval_ways=5))
    with pytest.raises(ConfigError, match="5-way episodes, not 20-way"):
        method.predict_episode(episode(val_set, ways=20, queries=1))


@pytest.mark.realdata
def test_active_needs_unlabelled_examples(val_set):
    method = model(ways=5, eval_ways=5, active=True).eval()
    with pytest.raises(ConfigError, match="labelled < shots"):
        method.predict_episode(episode(val_set, shots=2))
    with pytest.raises(ConfigError, match="predict_episode"):
        e = episode(val_set, shots=2, labelled=1)
        method.predict(e.support_x, e.support_y, e.query_x)


def test_recipes_build():
    for name, config in GNN.recipes.items():
        graphs = config.meta_batch * config.ways * config.queries
        assert config.eval_ways == config.ways and graphs in (100, 300), name
        GNN(config)


@pytest.mark.realdata
def test_learns_5way_1shot(omniglot_root, val_set, tmp_path, one_thread):
    """200 steps of 2 episodes x 50 graphs (lr 2e-3 to be quick; the recipe is 1e-3 x 100k steps
    of 300 graphs): well above chance on fixed validation episodes."""
    config = GNNConfig(
        ways=5, shots=1, queries=10, eval_ways=5, meta_batch=2, episodes=200, lr=2e-3, val_every=0
    )
    train("gnn", config, tmp_path, device="cpu", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "best.pt", "gnn")
    result = evaluate(method, GNN.sampler(val_set, 5, 1, 15, seed=EVAL_SEED), 40)
    assert result.mean >= 0.6, result
