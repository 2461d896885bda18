"""Matching Networks: the attention, both halves of full context embeddings, and learning on Omniglot."""

from __future__ import annotations

import json

import pytest
import torch

from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import evaluate
from metalab.methods.matching import (
    MatchingConfig,
    MatchingNetworks,
    QueryEncoder,
    SupportEncoder,
    attention,
    class_log_probs,
)
from metalab.tasks.episodes import EpisodeSampler


@pytest.fixture(scope="module")
def val_set(omniglot_root):
    return omniglot("vinyals", "val", omniglot_root)


def test_attention_rows_are_distributions_and_class_probabilities_sum_to_one():
    g = torch.Generator().manual_seed(0)
    query, support = torch.randn(2, 7, 16, generator=g), torch.randn(2, 10, 16, generator=g)
    a = attention(query, support)
    assert a.shape == (2, 7, 10) and bool((a >= 0).all())
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 7))
    labels = torch.arange(5).repeat_interleave(2).expand(2, 10)
    log_p = class_log_probs(a, labels, 5)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 7))
    # Eq. 1: P(y = k) is the attention mass on the support examples of class k
    torch.testing.assert_close(log_p.exp()[..., 3], a[..., 6] + a[..., 7])


def test_cosine_attention_ignores_the_scale_of_embeddings():
    g = torch.Generator().manual_seed(1)
    query, support = torch.randn(1, 3, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    scale = torch.rand(1, 5, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(attention(query, support), attention(query, support * scale))


def test_support_encoder_uses_the_whole_set_with_a_skip_connection():
    torch.manual_seed(0)
    encoder = SupportEncoder(8)
    support = torch.randn(1, 6, 8)
    out = encoder(support)
    assert out.shape == support.shape and not torch.allclose(out, support)
    changed = support.clone()
    changed[0, 5] += 1.0  # the last example changes the first one's g(x, S) (backward LSTM)
    assert not torch.allclose(encoder(changed)[0, 0], out[0, 0])
    for p in encoder.lstm.parameters():  # with the LSTM silenced only the skip connection is left
        torch.nn.init.zeros_(p)
    torch.testing.assert_close(encoder(support), support)


def test_query_encoder_reads_the_support_set():
    torch.manual_seed(0)
    encoder = QueryEncoder(8, steps=3)
    query, support = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    out = encoder(query, support)
    assert out.shape == query.shape and not torch.allclose(out, query)
    assert not torch.allclose(encoder(query, support.roll(1, dims=-1)), out)
    assert torch.allclose(encoder(query, support[:, torch.randperm(6)]), out, atol=1e-6)


@pytest.mark.realdata
def test_fce_changes_the_embedding(val_set):
    episode = EpisodeSampler(val_set, 5, 1, 2, seed=0).sample()
    other = EpisodeSampler(val_set, 5, 1, 2, seed=1).sample()
    torch.manual_seed(0)
    model = MatchingNetworks(MatchingConfig(fce=True)).eval()
    with torch.no_grad():
        z = model.encoder(torch.cat([episode.support_x, episode.query_x]))[None]
        s, q = z[:, :5], z[:, 5:]
        g = model.support_encoder(s)
        assert not torch.allclose(g, s)  # g(x_i, S) != g'(x_i)
        assert not torch.allclose(model.query_encoder(q, g), q)  # f(x, S) != f'(x)
        # f(x, S) depends on S: other support images give query 0 another embedding
        z2 = model.encoder(other.support_x)[None]
        f_other = model.query_encoder(q, model.support_encoder(z2))
        assert not torch.allclose(f_other[0, 0], model.query_encoder(q, g)[0, 0])


@pytest.mark.realdata
def test_batched_tasks_match_one_at_a_time(val_set):
    torch.manual_seed(0)
    model = MatchingNetworks(MatchingConfig(fce=True)).eval()
    batch = EpisodeSampler(val_set, 5, 2, 3, seed=4).sample_batch(3)
    with torch.no_grad():
        together = model.predict(batch.support_x, batch.support_y, batch.query_x)
        for t in range(3):
            alone = model.predict(batch.support_x[t], batch.support_y[t], batch.query_x[t])
            torch.testing.assert_close(together[t], alone, atol=1e-5, rtol=1e-5)


def test_recipes_build_and_unknown_settings_are_refused():
    for name in MatchingNetworks.recipes:
        MatchingNetworks(MatchingNetworks.recipe(name))
    with pytest.raises(ConfigError, match="unknown setting"):
        MatchingConfig().updated(read_step=3)


@pytest.mark.realdata
@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_learns_5way_1shot_omniglot(omniglot_root, val_set, fce, one_thread):
    """Seconds of training on the real Vinyals `train` classes: far above chance (20%) on fixed
    validation episodes of unseen characters."""
    torch.manual_seed(0)
    model = MatchingNetworks(MatchingConfig(fce=fce))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    train = EpisodeSampler(omniglot("vinyals", "train", omniglot_root), 5, 1, 5, seed=0)
    for _ in range(150):
        loss, _ = model.meta_loss(train.sample_batch(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = evaluate(model, EpisodeSampler(val_set, 5, 1, 15, seed=2017), episodes=100)
    assert result.mean > 0.7, result


@pytest.mark.realdata
def test_cli_trains_with_fce_and_tests_the_mnist_transfer(omniglot_root, mnist_root, tmp_path):
    """`metalab train matching --fce` then `metalab eval --data mnist`: 10-way 1-shot on MNIST
    with no MNIST training (Vinyals et al.'s transfer protocol), with its protocol recorded."""
    from metalab.cli import main

    run = tmp_path / "mn"
    common = ["--data-root", str(omniglot_root), "--no-progress", "--device", "cpu"]
    assert main(["train", "matching", "--fce", "--episodes", "3", "--val-every", "0",
                 "--run-dir", str(run), *common]) == 0  # fmt: skip
    assert json.loads((run / "config.json").read_text())["fce"] is True
    assert main(["eval", str(run), "--data", "mnist", "--episodes", "5", *common]) == 0
    (result,) = json.loads((run / "eval.json").read_text())["results"]
    p = result["protocol"]
    assert (p["dataset"], p["ways"], p["shots"]) == ("mnist/test", 10, 1)
    assert p["trained_on"] == "omniglot/vinyals/train" and 0 <= result["mean"] <= 1
