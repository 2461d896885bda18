"""Ravi & Larochelle's meta-learner LSTM: its update is SGD when the gates say so, its inputs are
preprocessed as written, the meta-gradient reaches every meta-parameter and is clipped, batch norm
keeps nothing between episodes, and it learns real Omniglot within a minute."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from metalab.cli import main
from metalab.data.omniglot import omniglot
from metalab.evaluate import evaluate
from metalab.evaluate.optimization import gate_statistics
from metalab.methods import get_method
from metalab.methods.meta_lstm import MetaLSTM, preprocess
from metalab.plots import plot_gates
from metalab.rundir import load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.train import train

SMALL = MetaLSTM.recipe("omniglot-5w1s").updated(hidden=8, val_every=0)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def omniglot_val(omniglot_root):
    return omniglot("vinyals", "val", omniglot_root)


def _episode(dataset, shots: int = 1, seed: int = 0, dtype=torch.float32):
    episode = EpisodeSampler(dataset, 5, shots, 5, seed=seed).sample()
    episode.support_x, episode.query_x = episode.support_x.to(dtype), episode.query_x.to(dtype)
    return episode


def test_registered_with_the_papers_schedules():
    assert get_method("meta-lstm") is MetaLSTM
    one, five = MetaLSTM.recipe("miniimagenet-5w1s"), MetaLSTM.recipe("miniimagenet-5w5s")
    assert (one.updates, one.update_batch, one.episodes) == (12, 5, 75_000)
    assert (five.updates, five.update_batch, five.episodes) == (8, 25, 50_000)
    assert one.hidden == 32 and one.image_size == 84 and one.lr == 1e-3 and one.clip_norm == 0.25
    method = MetaLSTM(one)
    assert method.learner(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    assert method.supports_ways(5) and not method.supports_ways(20)


@pytest.mark.realdata
@pytest.mark.parametrize("shots,batch", [(1, 5), (5, 10)])
def test_unit_forget_gate_and_fixed_input_gate_is_exactly_sgd(omniglot_val, shots, batch):
    """f_t = 1 and i_t = alpha (gate weights 0, sigmoid(50) = 1 in float64): c_t = c_{t-1} -
    alpha * grad_t, the same numbers as plain SGD on the learner, batch for batch."""
    torch.manual_seed(0)
    method = MetaLSTM(SMALL.updated(shots=shots, updates=6, update_batch=batch)).double()
    cell = method.meta_learner
    with torch.no_grad():
        cell.W_F.zero_()
        cell.W_I.zero_()
        cell.b_F.fill_(50.0)
        cell.b_I.fill_(math.log(0.1 / 0.9))  # alpha = sigmoid(b_I) ~ 0.1
    alpha = torch.sigmoid(cell.b_I).item()
    episode = _episode(omniglot_val, shots, dtype=torch.float64)
    c_T, gates = method.adapt(episode.support_x, episode.support_y, trace=True)
    assert all(torch.all(f == 1.0) and torch.all(i == alpha) for i, f in gates)

    def loss(params, x, y):
        return F.cross_entropy(functional_call(method.learner, params, (x,)), y)

    params = {k: p.detach() for k, p in method.learner.named_parameters()}
    for index in method.update_batches(episode.support_y):
        g = grad(loss)(params, episode.support_x[index], episode.support_y[index])
        params = {k: p - alpha * g[k] for k, p in params.items()}
    adapted = method.unflatten(c_T)
    assert len(method.update_batches(episode.support_y)) == 6
    for name, p in params.items():
        torch.testing.assert_close(adapted[name], p, rtol=0, atol=1e-13)
    assert not torch.allclose(c_T, method.initial_parameters())  # it did move


def test_preprocessing_follows_andrychowicz_at_both_branches():
    p = 10.0
    x = torch.tensor([3.0, -0.5, 1e-3, 2e-5, -1e-6, 0.0], dtype=torch.float64)
    out = preprocess(x, p)
    assert out.shape == (6, 2)
    for value, (first, second) in zip(x.tolist(), out.tolist()):
        if abs(value) >= math.exp(-p):  # e^-10 ~ 4.5e-5
            assert first == pytest.approx(math.log(abs(value)) / p, rel=1e-12)
            assert second == math.copysign(1.0, value)
        else:
            assert first == -1.0
            assert second == pytest.approx(math.exp(p) * value, rel=1e-12, abs=0)


@pytest.mark.realdata
def test_meta_step_reaches_every_meta_parameter_and_clips(omniglot_val):
    torch.manual_seed(0)
    reference = MetaLSTM(SMALL.updated(updates=3, clip_norm=0))  # unclipped
    reference.meta_step(_episode(omniglot_val))
    raw = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
    for name, p in reference.named_parameters():  # W_I, W_F, b_I, b_F, the first LSTM, c_0
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.manual_seed(0)
    method = MetaLSTM(SMALL.updated(updates=3))
    _, metrics = method.meta_step(_episode(omniglot_val))
    clipped = torch.cat([p.grad.flatten() for p in method.parameters()]).norm().item()
    assert metrics["grad_norm"] == pytest.approx(raw, rel=1e-4)
    assert raw > 0.25 and clipped == pytest.approx(0.25, rel=1e-4)


@pytest.mark.realdata
def test_batch_norm_uses_the_batch_and_keeps_nothing(omniglot_val):
    torch.manual_seed(0)
    method = MetaLSTM(SMALL)
    assert not list(method.buffers())  # no running mean/var to carry across episodes
    episode = _episode(omniglot_val, seed=3)
    other = _episode(omniglot_val, seed=4)
    with torch.no_grad():
        first = method.predict(episode.support_x, episode.support_y, episode.query_x)
        method.train()
        method.meta_loss(other)  # a training episode in between changes no state
        method.eval()
        again = method.predict(episode.support_x, episode.support_y, episode.query_x)
        c = method.initial_parameters()
        # the query logits use the query batch's statistics: a query's logits depend on the others
        alone = method.logits(c, episode.query_x[:1])
        together = method.logits(c, episode.query_x)[:1]
    assert torch.equal(first, again)
    assert not torch.allclose(alone, together)


@pytest.mark.realdata
def test_gate_figure_and_cli_eval(omniglot_root, tmp_path):
    config = SMALL.updated(episodes=2, updates=2)
    train("meta-lstm", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    val = omniglot("vinyals", "val", omniglot_root)
    runs = gate_statistics(method, [_episode(val, seed=s) for s in range(3)])
    path = plot_gates(runs, tmp_path / "g.png")
    assert path.stat().st_size > 10_000
    values = method.gate_values(_episode(val))
    assert set(values) == {f"{k}/{layer}" for k in ("input", "forget") for layer in
                           ("conv1", "conv2", "conv3", "conv4", "linear")}  # fmt: skip
    assert all(v.shape == (2,) and ((v > 0) & (v < 1)).all() for v in values.values())
    args = ["eval", str(tmp_path / "run"), "--ways", "5", "--shots", "1", "--episodes", "5"]
    assert main([*args, "--no-progress"]) == 0
    assert (tmp_path / "run" / "gates.png").stat().st_size > 10_000


@pytest.mark.realdata
def test_meta_lstm_learns_omniglot_in_a_minute(omniglot_root, tmp_path):
    config = MetaLSTM.recipe("omniglot-5w1s").updated(
        episodes=60, queries=5, val_every=0, seed=0
    )  # ~0.5 s an episode on one thread: 30 s
    torch.manual_seed(0)
    train("meta-lstm", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "checkpoint.pt")
    val = omniglot("vinyals", "val", omniglot_root)
    result = evaluate(method, EpisodeSampler(val, 5, 1, 5, seed=7), episodes=50)
    print(f"meta-lstm 5-way 1-shot val accuracy after 60 episodes: {result}")
    assert result.mean >= 0.5, result  # chance is 0.2
