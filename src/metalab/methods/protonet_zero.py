"""Zero-shot Prototypical Networks — Snell, Swersky & Zemel, NIPS 2017, §3.3.

With no support images, a class's prototype comes from its meta-data: ``c_k = g(v_k)``, a learned
linear map of the class's attribute vector, normalised to unit length. Queries are embedded by a
learned linear map ``f`` of fixed image features, and classified by a softmax over negative squared
Euclidean distances to the prototypes (Eq. 2), trained on episodes of 50 classes x 10 queries.

An episode here carries the attribute vectors of its classes as ``support_x`` ``(ways, A)`` with
``support_y = arange(ways)``, and image features as ``query_x`` ``(ways * queries, D)``.

On CUB the paper reports 54.6% 50-way zero-shot accuracy (not measured here: the data is not on
our machines). The test split has exactly 50 classes, so every 50-way test episode uses all of
them; :func:`metalab.evaluate.zero_shot.evaluate_zero_shot_all` classifies every test image among
the 50 test classes at once, the protocol of the numbers the paper compares with (Reed et al.
2016's evaluation code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metalab.data.cub import AttributeDataset
from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.methods.protonet import squared_euclidean
from metalab.tasks.episodes import Episode, EpisodeSampler, TaskBatch


@dataclass
class ProtoNetZeroConfig(MethodConfig):
    """The paper's CUB settings are the defaults."""

    data: str = "cub"
    split: str = "reed"
    ways: int = 50  # classes per training episode
    shots: int = 0  # zero-shot: the support set is one attribute vector per class
    queries: int = 10
    eval_ways: int = 50  # the val and test parts have 50 classes each
    eval_shots: int = 0
    eval_queries: int = 10
    episodes: int = 20_000  # ours: the paper does not give its budget (it early-stops on val)
    lr: float = 1e-4  # Adam, fixed
    weight_decay: float = 1e-5
    val_every: int = 500
    val_episodes: int = 100
    embedding: int = 1024  # output of both linear maps
    feature_dim: int = 1024  # image features (GoogLeNet)
    attribute_dim: int = 312  # CUB's continuous class attributes


class ZeroShotSampler(EpisodeSampler):
    """Seeded zero-shot episodes: ``ways`` classes' attribute vectors and ``queries`` images each.

    Indices are ``(ways, queries)`` feature views ``image * crops + crop`` (row i is label i). On a
    part with crops that trains on them (``dataset.random_crop``: CUB train / trainval) each query
    gets a random crop; elsewhere every view is crop 0, the middle crop.
    """

    def __init__(self, dataset: AttributeDataset, ways: int, queries: int, seed: int = 0) -> None:
        if not isinstance(dataset, AttributeDataset):
            raise ConfigError(
                f"zero-shot episodes need class attributes, which {dataset.name} lacks: "
                "use --data cub"
            )
        if queries < 1:
            raise ConfigError(f"queries={queries} is not allowed: use a positive number")
        eligible = int((dataset.counts >= queries).sum())
        if 1 <= ways <= dataset.num_classes and eligible < ways:
            raise ConfigError(
                f"only {eligible} classes of {dataset.name} have queries={queries} images, "
                f"fewer than ways={ways}: lower --queries or --ways"
            )
        # The parent checks ways and seeds the generator; it counts no zero shots, hence 1 + q-1.
        super().__init__(dataset, ways, 1, queries - 1, seed=seed)
        self.shots, self.queries = 0, queries

    def protocol(self) -> dict:
        return {**super().protocol(), "support": "class attributes"}

    def sample_indices(
        self, rng: np.random.Generator | None = None, within: bool | None = None
    ) -> np.ndarray:
        """Feature views ``(ways, queries)`` of one episode; row i is label i (``within``: as
        :meth:`EpisodeSampler.sample_indices`; CUB has no alphabets, so never mixed in)."""
        rng = self.rng if rng is None else rng
        images = super().sample_indices(rng, within)
        crops = self.dataset.crops
        crop = rng.integers(crops, size=images.shape) if self.dataset.random_crop else 0
        return images * crops + crop

    def episode_from_indices(self, indices: np.ndarray) -> Episode:
        """Attributes ``(..., ways, A)`` of the classes of ``(..., ways, queries)`` views, and
        their features ``(..., ways * queries, D)``; an Episode, or a TaskBatch with a lead dim."""
        lead, (ways, queries) = indices.shape[:-2], indices.shape[-2:]
        dataset = self.dataset
        classes = dataset.labels[indices[..., 0] // dataset.crops]  # (..., ways)
        support_x = dataset.attributes[torch.from_numpy(classes)]
        query_x = dataset.gather(np.ascontiguousarray(indices).reshape(-1))
        query_x = query_x.view(*lead, ways * queries, query_x.shape[-1])
        labels = torch.arange(ways)
        kind = TaskBatch if lead else Episode
        return kind(
            support_x,
            labels.expand(*lead, ways).contiguous(),
            query_x,
            labels.repeat_interleave(queries).expand(*lead, ways * queries).contiguous(),
        )


class ProtoNetZero(Method):
    """Linear maps of image features and of class attributes into one space; unit prototypes."""

    name = "protonet-zero"
    Config = ProtoNetZeroConfig
    answers = frozenset()  # classes given by attributes, not by one drawing each
    recipes = {
        # Snell et al. 2017 on CUB (Reed split): 50-way episodes of 10 queries, Adam 1e-4 with
        # weight decay 1e-5, 1024-d embedding; best.pt by validation on the 50 val classes.
        "cub": ProtoNetZeroConfig(),
        # The paper's final step: retrain on train + val (no validation) for as many episodes
        # as the `cub` run's best.pt had.
        "cub-trainval": ProtoNetZeroConfig(train_part="trainval", val_every=0),
    }

    def __init__(self, config: ProtoNetZeroConfig) -> None:
        super().__init__(config)
        self.image_map = nn.Linear(config.feature_dim, config.embedding, bias=False)  # f
        self.attribute_map = nn.Linear(config.attribute_dim, config.embedding, bias=False)  # g

    @classmethod
    def sampler(
        cls,
        dataset: AttributeDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        labelled: int | None = None,
    ) -> ZeroShotSampler:
        if shots != 0 or labelled is not None:
            raise ConfigError(
                f"{cls.name} is zero-shot: its classes come with attributes, not support images; "
                "use --shots 0 (and no --labelled)"
            )
        return ZeroShotSampler(dataset, ways, queries, seed=seed)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    def protocol(self) -> dict:
        return {"zero_shot": True}

    def prototypes(self, attributes: torch.Tensor) -> torch.Tensor:
        """``(..., ways, A) -> (..., ways, embedding)`` unit-length prototypes ``g(v_k)``."""
        _check_width(attributes, self.config.attribute_dim, "attribute vectors", "attribute_dim")
        return F.normalize(self.attribute_map(attributes), dim=-1)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., n, D) -> (..., n, embedding)`` query embeddings ``f(x)``."""
        _check_width(features, self.config.feature_dim, "image features", "feature_dim")
        return self.image_map(features)

    def logits(self, support_x, support_y, query_x) -> torch.Tensor:
        """``(..., queries, ways)``; column k is the class whose support label is k."""
        order = torch.argsort(support_y, dim=-1)  # rows in label order (the sampler's already are)
        attributes = torch.take_along_dim(support_x, order[..., None], dim=-2)
        protos = self.prototypes(attributes)
        z = self.embed(query_x)
        return -squared_euclidean(z, protos)  # Eq. 2

    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x)
        logits, labels = logits.flatten(0, -2), batch.query_y.flatten()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc": acc.item()}

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Logits ``(queries, ways)`` given one attribute vector per class as the support set."""
        return self.logits(support_x, support_y, query_x)


def _check_width(x: torch.Tensor, width: int, what: str, setting: str) -> None:
    if x.shape[-1] != width:
        raise ConfigError(
            f"the {what} are {x.shape[-1]}-wide but {setting}={width}: "
            f"train with {setting}={x.shape[-1]}"
        )
