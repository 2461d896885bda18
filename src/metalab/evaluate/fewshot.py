"""Few-shot episodes: mean accuracy ± 1.96·sd/√n over fixed, seeded test episodes."""

from __future__ import annotations

import numpy as np
import torch

from metalab.evaluate.protocol import Result, answer_protocol, confidence_interval, eval_mode
from metalab.tasks.episodes import Episode, EpisodeSampler

STANDARD_TABLE = ((5, 1), (5, 5), (20, 1), (20, 5))  # (ways, shots) of the Omniglot tables
# Unsupervised meta-learning's tables (Hsu et al. 2019, CACTUs): (ways, shots) per dataset, with
# 5 queries per class over 1000 test tasks (the code's), for every run on the cactus split or
# trained on CACTUs tasks, and for the embedding baselines.
CACTUS_TABLES = {"omniglot": STANDARD_TABLE, "mnist": ((10, 1), (10, 5), (10, 10))}
CACTUS_QUERIES = 5


@torch.no_grad()
def evaluate(
    method: torch.nn.Module,
    sampler: EpisodeSampler,
    episodes: int = 600,
    device: torch.device | str = "cpu",
) -> Result:
    """Accuracy of ``method.predict`` over ``episodes`` fixed episodes of ``sampler``.

    The episodes depend only on the sampler's dataset, shape and seed (see
    :meth:`EpisodeSampler.fixed_indices`), never on how far a training stream has advanced.
    The method is put in eval mode for the call and restored afterwards.
    """
    indices = sampler.fixed_indices(episodes)
    accuracies = np.empty(episodes)
    with eval_mode(method):
        for i in range(episodes):
            episode = sampler.episode_from_indices(indices[i]).to(device)
            logits = predict_queries(method, episode)
            accuracies[i] = (logits.argmax(-1) == episode.query_y).float().mean().item()
    mean, ci = confidence_interval(accuracies)
    return Result(mean, ci, {**sampler.protocol(), "episodes": episodes, **answer_protocol(method)})


def predict_queries(method: torch.nn.Module, episode: Episode) -> torch.Tensor:
    """``method.predict_episode`` (a :class:`~metalab.methods.base.Method`), or ``predict`` on the
    support set for any other module with that call."""
    if hasattr(method, "predict_episode"):
        return method.predict_episode(episode)
    return method.predict(episode.support_x, episode.support_y, episode.query_x)
