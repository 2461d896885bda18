"""The sinusoid task family: shapes, ranges, that targets follow each task's own sinusoid,
determinism and fixed sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metalab.errors import ConfigError
from metalab.tasks.regression import FAMILIES, SinusoidFamily, SinusoidTasks


def test_batches_follow_each_tasks_sinusoid():
    tasks = SinusoidTasks(shots=10, queries=7, seed=0)
    batch, amplitude, phase = tasks.fixed(200)
    assert batch.support_x.shape == (200, 10, 1) and batch.query_y.shape == (200, 7, 1)
    assert batch.support_x.dtype == torch.float32
    assert ((amplitude >= 0.1) & (amplitude <= 5.0)).all() and (
        (phase >= 0) & (phase <= np.pi)
    ).all()
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
        expected = amplitude[:, None, None] * np.sin(x.double().numpy() - phase[:, None, None])
        np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
    # the ranges are really used: amplitudes and phases spread over their intervals
    assert amplitude.min() < 0.6 and amplitude.max() > 4.5 and phase.max() - phase.min() > 2.5


def test_streams_are_seeded_and_checkpointable():
    a, b = SinusoidTasks(5, 5, seed=3), SinusoidTasks(5, 5, seed=3)
    assert torch.equal(a.sample_batch(4).support_y, b.sample_batch(4).support_y)
    state = a.state()
    expected = a.sample_batch(2).query_y
    c = SinusoidTasks(5, 5, seed=99)
    c.set_state(state)
    assert torch.equal(c.sample_batch(2).query_y, expected)
    assert not torch.equal(SinusoidTasks(5, 5, seed=4).sample_batch(2).query_y, expected)


def test_fixed_sets_are_prefixes_and_ignore_the_stream():
    tasks = SinusoidTasks(5, 10, seed=1)
    long, _, _ = tasks.fixed(20)
    tasks.sample_batch(3)
    short, _, _ = tasks.fixed(8)
    assert torch.equal(short.support_x, long.support_x[:8])


def test_family_ranges_and_bad_settings():
    narrow = SinusoidTasks(3, 3, family=SinusoidFamily(amplitude=(1.0, 1.0), phase=(0.0, 0.0)))
    batch, amplitude, phase = narrow.fixed(5)
    assert (amplitude == 1.0).all() and (phase == 0.0).all()
    np.testing.assert_allclose(batch.support_y.numpy(), np.sin(batch.support_x.numpy()), atol=1e-6)
    with pytest.raises(ConfigError, match="shots=0"):
        SinusoidTasks(0, 5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_knows_its_noise_free_function(family):
    """``function`` at a fixed task's inputs gives the ``clean`` targets of the set (the noisy
    targets differ from them only for a noisy family), for every task."""
    stream = FAMILIES[family](shots=4, queries=6, seed=5)
    batch, info = stream.fixed_set(30)
    x = torch.cat([batch.support_x, batch.query_x], 1).double().numpy()
    y = torch.cat([batch.support_y, batch.query_y], 1).numpy()
    for t in range(30):
        np.testing.assert_allclose(stream.function(info, t, x[t]), info["clean"][t], atol=1e-6)
    noise = np.abs(y - info["clean"]).max()
    assert (noise > 0.1) if family in ("ambiguous", "arml-2d") else (noise < 1e-5)
