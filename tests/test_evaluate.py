"""The protocol's arithmetic: mean and 95% CI, and that evaluation uses the fixed episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metalab.evaluate import confidence_interval, evaluate
from metalab.tasks.episodes import EpisodeSampler, FewShotDataset


def test_confidence_interval_formula():
    values = [0.9, 1.0, 0.8, 0.95]
    mean, ci = confidence_interval(values)
    sd = math.sqrt(sum((v - 0.9125) ** 2 for v in values) / 3)  # sample sd, n - 1
    assert mean == pytest.approx(0.9125)
    assert ci == pytest.approx(1.96 * sd / 2)
    assert confidence_interval([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        confidence_interval([])


class Oracle(torch.nn.Module):
    """Reads the class from the image (pixel value = class id): always right, except that queries
    of ``wrong_class`` get the next label."""

    def __init__(self, wrong_class: int | None = None) -> None:
        super().__init__()
        self.wrong_class = wrong_class

    def predict(self, support_x, support_y, query_x):
        support_class = (support_x[:, 0, 0, 0] * 255).round()
        query_class = (query_x[:, 0, 0, 0] * 255).round()
        same = (query_class[:, None] == support_class[None, :]).float()  # (queries, support)
        logits = same @ torch.nn.functional.one_hot(support_y).float()  # (queries, ways)
        wrong = query_class == self.wrong_class
        logits[wrong] = logits[wrong].roll(1, dims=1)
        return logits


def class_images(classes: int, per_class: int) -> FewShotDataset:
    labels = np.repeat(np.arange(classes), per_class)
    images = torch.from_numpy(labels.astype(np.uint8)).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return FewShotDataset(images.contiguous(), labels, [str(c) for c in range(classes)], "ids")


def test_evaluate_counts_accuracy_per_episode():
    sampler = EpisodeSampler(class_images(10, 6), ways=5, shots=1, queries=5, seed=0)
    perfect = evaluate(Oracle(), sampler, episodes=50)
    assert perfect.mean == 1.0 and perfect.ci95 == 0.0
    assert perfect.protocol == {
        "dataset": "ids",
        "ways": 5,
        "shots": 1,
        "queries": 5,
        "seed": 0,
        "episodes": 50,
    }
    # class 3 always answered wrong: an episode holding it scores 4/5, else 5/5
    flawed = evaluate(Oracle(wrong_class=3), sampler, episodes=50)
    indices = sampler.fixed_indices(50)
    has_three = np.array([3 in sampler.dataset.labels[i[:, 0]] for i in indices])
    expected = np.where(has_three, 0.8, 1.0)
    assert flawed.mean == pytest.approx(expected.mean())
    assert flawed.ci95 == pytest.approx(1.96 * expected.std(ddof=1) / math.sqrt(50))
