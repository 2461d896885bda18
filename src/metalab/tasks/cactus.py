"""CACTUs — Hsu, Levine & Finn 2019, "Unsupervised learning via meta-learning" (ICLR): tasks from
clusters of an unsupervised embedding of unlabelled images.

Embed every meta-training image (an embedding run: :mod:`metalab.methods.embedding`), then build
P *partitions* of the images into pseudo-classes (Sec. 3, "Clustering to Automatically Construct
Tasks for Unsupervised meta-learning"), and draw N-way K-shot episodes from them
(:class:`CactusEpisodes`): a partition uniformly, N of its pseudo-classes large enough for
K support + Q query images, labels in random order. Three partitioners, as in the official code
(kylehkhsu/cactus-maml, ``task_generator.py``):

* :func:`kmeans_partitions` — k-means with k clusters; the first partition on the embeddings as
  they are, each further one on *randomly rescaled* embeddings (every dimension multiplied by a
  U(0, 1) weight, the code's ``scaled_encodings``), so the P partitions differ; 10 restarts for a
  single partition and 1 otherwise; a partition is drawn again while 75% or fewer of its clusters
  have more than K + Q members.
* :func:`hyperplane_partitions` — ⌈log₂ N⌉ random hyperplanes per partition, each image labelled
  by its side of each, keeping only images at least a margin away from every one.
* :func:`random_partitions` — uniformly random labels ("randrand"), the control: tasks of the same
  shape with no structure.

Pseudo-classes with at most K + Q members are never drawn (the code's ``clean_partition``, and
its "too small" test for k-means). Labels of the meta-training set are never read: the loader's
dataset is only a store of images here. Validation and test use the true classes (labelled
episodes of other characters), as in the paper.

The k-means is scikit-learn's ``KMeans`` (k-means++ initialisation; the code's ``max_iter``
3000, ``precompute_distances`` and ``n_jobs`` arguments are gone from scikit-learn; we keep its
default 300 iterations, see docs/cactus.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.tasks.episodes import EpisodeSampler, check_shape

PARTITIONERS = ("kmeans", "hyperplanes", "random")
BIG_ENOUGH = (
    0.75  # a k-means partition is kept when more than this share of clusters can fill a task
)
RETRIES = 20  # draws of one partition before giving up (the code loops forever)
HYPERPLANE_SPLITS = 1000  # candidate hyperplanes (the code's num_splits for meta-training)
HYPERPLANE_OFFSET = 0.8  # a hyperplane passes through a point ~ U(-0.8, 0.8)^d (the code's)
PIXELS = "pixels"  # --cactus-embedding pixels: no learned embedding, the lower-bound row
PIXEL_COMPONENTS = 64


def pixel_embedding(dataset: FewShotDataset, components: int = PIXEL_COMPONENTS, seed: int = 0):
    """The images' pixels projected on their top ``components`` principal components (float32
    ``(n, components)``): k-means on them is k-means on the pixels up to the discarded variance
    (the code's ``on_pixels`` sanity row), at a fraction of the cost."""
    from sklearn.decomposition import PCA

    x = dataset.images.reshape(len(dataset.images), -1).numpy().astype(np.float32) / 255
    return PCA(components, random_state=seed).fit_transform(x).astype(np.float32)


def kmeans_partitions(
    z: np.ndarray, clusters: int, partitions: int, min_size: int, seed: int = 0
) -> np.ndarray:
    """P k-means partitions of embeddings ``z`` ``(n, d)``: labels ``(P, n)`` int32 in
    ``0..clusters-1``. Partition 0 clusters ``z`` itself, partition p > 0 ``z * w_p`` with
    ``w_p ~ U(0, 1)^d`` (the random rescaling); each is redrawn (next k-means seed) while 75% or
    fewer of its clusters have more than ``min_size`` members (K + Q, the code's rule)."""
    from sklearn.cluster import KMeans

    n, d = z.shape
    if not 2 <= clusters <= n:
        raise ConfigError(f"cactus_clusters={clusters}: use 2..{n} (the number of images)")
    rng = np.random.Generator(np.random.PCG64(seed))
    n_init = 10 if partitions == 1 else 1  # the code: 10 restarts only for a single partition
    labels = np.empty((partitions, n), dtype=np.int32)
    for p in range(partitions):
        scaled = z if p == 0 else z * rng.uniform(0.0, 1.0, size=d).astype(z.dtype)
        for _ in range(RETRIES):
            state = int(rng.integers(2**31 - 1))
            found = KMeans(clusters, init="k-means++", n_init=n_init, random_state=state).fit(
                scaled
            )
            counts = np.bincount(found.labels_, minlength=clusters)
            if (counts > min_size).sum() > BIG_ENOUGH * clusters:
                break
        else:
            raise ConfigError(
                f"k-means with k={clusters}: {RETRIES} draws left 75% or fewer clusters with more "
                f"than {min_size} images: use fewer --cactus-clusters"
            )
        labels[p] = found.labels_
    return labels


def hyperplane_partitions(
    z: np.ndarray,
    ways: int,
    partitions: int,
    margin: float,
    min_size: int,
    seed: int = 0,
    splits: int = HYPERPLANE_SPLITS,
) -> np.ndarray:
    """P partitions by random hyperplanes: labels ``(P, n)`` int32, -1 for an image in no cell.

    First ``splits`` hyperplanes, each with a normal ~ U(-1, 1)^d and through a point
    ~ U(-0.8, 0.8)^d, kept when both sides hold at least ``10 * min_size`` images more than
    ``margin`` away from it. A partition takes ⌈log₂ ways⌉ of them: its 2^m cells are the
    images on the same side of each (and more than ``margin`` from all); cells with fewer than
    ``min_size`` images are dropped, and the draw is repeated until ``ways`` cells remain.
    The margin is in embedding units (the code's 1.2 was set for its ACAI/BiGAN codes)."""
    n, d = z.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    sides: list[np.ndarray] = []  # per hyperplane: 0 below, 1 above, -1 within the margin
    failed = 0
    while len(sides) < splits:
        normal = rng.uniform(-1.0, 1.0, size=d)
        normal /= np.linalg.norm(normal)
        point = rng.uniform(-HYPERPLANE_OFFSET, HYPERPLANE_OFFSET, size=d)
        distance = (z - point) @ normal
        side = np.full(n, -1, dtype=np.int8)
        side[distance <= -margin], side[distance >= margin] = 0, 1
        if min((side == 0).sum(), (side == 1).sum()) >= 10 * min_size:
            sides.append(side)
        else:
            failed += 1
            if failed > 100 * splits:
                raise ConfigError(
                    f"cactus_margin={margin}: almost no random hyperplane keeps "
                    f"{10 * min_size} images on each side beyond it: use a smaller margin"
                )
    per_partition = max(1, math.ceil(math.log2(ways)))
    if per_partition > splits:
        raise ConfigError(f"ways={ways} needs {per_partition} hyperplanes, only {splits} drawn")
    bits = 1 << np.arange(per_partition)
    labels = np.empty((partitions, n), dtype=np.int32)
    for p in range(partitions):
        for _ in range(100 * RETRIES):
            chosen = np.stack([sides[i] for i in rng.choice(splits, per_partition, replace=False)])
            cell = np.where((chosen >= 0).all(axis=0), bits @ chosen.clip(0), -1)
            counts = np.bincount(cell[cell >= 0], minlength=1 << per_partition)
            small = counts < min_size
            cell[(cell >= 0) & small[cell.clip(0)]] = -1
            if (~small).sum() >= ways:
                labels[p] = cell
                break
        else:
            raise ConfigError(
                f"hyperplane partitions: {ways} cells of {min_size}+ images are rare at "
                f"cactus_margin={margin}: use a smaller margin"
            )
    return labels


def random_partitions(n: int, clusters: int, partitions: int, seed: int = 0) -> np.ndarray:
    """ "randrand": P partitions of ``n`` images with labels drawn uniformly from ``clusters``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, clusters, size=(partitions, n)).astype(np.int32)


class _Partition:
    """One partition as index arrays: the images of pseudo-class ``c`` are
    ``order[starts[c] : starts[c] + counts[c]]``; ``eligible``: the classes that can fill a task."""

    def __init__(self, labels: np.ndarray, need: int) -> None:
        kept = labels >= 0
        self.order = np.flatnonzero(kept)[np.argsort(labels[kept], kind="stable")]
        self.counts = np.bincount(labels[kept], minlength=int(labels.max(initial=0)) + 1)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.eligible = np.flatnonzero(self.counts >= max(need, 1))


class CactusEpisodes(EpisodeSampler):
    """N-way K-shot Q-query episodes of pseudo-classes: each episode picks one of the
    ``partitions`` uniformly, then ``ways`` of its pseudo-classes with at least K + Q images,
    then K + Q images of each (all without replacement); labels ``0..ways-1`` in draw order.

    Args:
        dataset: the images (its labels are never read).
        partitions: ``(P, n)`` pseudo-labels, -1 for an image left out.
        ways, shots, queries, seed: as :class:`~metalab.tasks.episodes.EpisodeSampler`.
        name: what the partitions are, for the protocol (e.g. ``"kmeans k=500 P=100"``).
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        partitions: np.ndarray,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        name: str = "cactus",
    ) -> None:
        partitions = np.atleast_2d(np.asarray(partitions))
        if partitions.shape[1] != len(dataset.images):
            raise ConfigError(
                f"partitions label {partitions.shape[1]} images, {dataset.name} has "
                f"{len(dataset.images)}: rebuild them for this dataset"
            )
        check_shape(ways, shots, queries)
        need = shots + queries
        self.parts = [_Partition(labels, need) for labels in partitions]
        self.parts = [part for part in self.parts if len(part.eligible) >= ways]
        if not self.parts:
            raise ConfigError(
                f"ways={ways}: no partition has {ways} pseudo-classes of {need}+ images "
                f"(shots+queries): lower --ways, --shots or --queries, or use fewer clusters"
            )
        self._start(dataset, ways, shots, queries, seed)  # the true classes play no part
        self.name = name

    def mix_alphabets(self, fraction: float, ways: int = 20) -> EpisodeSampler:
        if fraction:
            raise ConfigError(
                "--alphabet-episodes needs labelled classes, and CACTUs tasks have none: "
                "leave it out"
            )
        return self

    def protocol(self) -> dict:
        return {
            "dataset": self.dataset.name,
            "tasks": self.name,
            "partitions": len(self.parts),
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
            "seed": self.seed,
        }

    def sample_indices(
        self, rng: np.random.Generator | None = None, within: bool | None = None
    ) -> np.ndarray:
        """Image indices ``(ways, shots + queries)`` of one episode; row i is label i."""
        rng = self.rng if rng is None else rng
        part = self.parts[rng.integers(len(self.parts))]
        classes = rng.choice(part.eligible, self.ways, replace=False)
        m = self.shots + self.queries
        return np.stack(
            [
                part.order[part.starts[c] + rng.choice(part.counts[c], m, replace=False)]
                for c in classes
            ]
        )


def build_partitions(
    how: str,
    z: np.ndarray | None,
    n: int,
    *,
    ways: int,
    min_size: int,
    clusters: int,
    partitions: int,
    margin: float,
    seed: int,
) -> np.ndarray:
    """Pseudo-labels ``(P, n)`` by ``how`` (``kmeans``, ``hyperplanes`` or ``random``)."""
    if partitions < 1:
        raise ConfigError(f"cactus_partitions={partitions}: use 1 or more")
    if how == "random":
        return random_partitions(n, clusters, partitions, seed)
    if z is None:
        raise ConfigError(f"--cactus {how} clusters an embedding: pass --cactus-embedding RUN_DIR")
    if how == "kmeans":
        return kmeans_partitions(z, clusters, partitions, min_size, seed)
    if how == "hyperplanes":
        return hyperplane_partitions(z, ways, partitions, margin, min_size, seed)
    raise ConfigError(f"cactus={how!r}: use off or one of {', '.join(PARTITIONERS)}")


def cactus_episodes(config, dataset: FewShotDataset, data_root=None, device=None) -> CactusEpisodes:
    """The CACTUs training episodes a config asks for (``config.cactus``): the embedding run's
    embeddings of ``dataset`` (``cactus_embedding``), partitioned and cached in the metalab cache
    under the embeddings' hash and the settings, so runs that share them (ProtoNets and MAML,
    a resumed run) cluster once; k-means partitions built for smaller tasks that fail the size
    rule for this run's are built again."""
    from metalab.data.root import cache_dir
    from metalab.io import atomic_write

    how = config.cactus
    if how not in PARTITIONERS:
        raise ConfigError(f"cactus={how!r}: use off or one of {', '.join(PARTITIONERS)}")
    if config.nme_episodes or config.labelled is not None:
        raise ConfigError(
            "--cactus builds its own unlabelled tasks: leave out --nme-episodes and --labelled"
        )
    need = config.shots + config.queries
    z = None
    if how != "random":
        z = _embeddings(config, dataset, data_root, device)
    key = hashlib.sha256(
        json.dumps(
            [how, config.cactus_clusters, config.cactus_partitions, config.cactus_margin,
             config.ways if how == "hyperplanes" else 0, config.seed, len(dataset.images)]
        ).encode()
        + (b"" if z is None else np.ascontiguousarray(z).tobytes())
    ).hexdigest()[:16]  # fmt: skip
    path = cache_dir() / f"cactus-{how}-{key}.npy"
    labels = None
    if path.exists():
        try:
            labels = np.load(path)
        except (OSError, ValueError):
            labels = None  # damaged: rebuilt below
    if labels is not None and not _still_valid(labels, how, config.cactus_clusters, need):
        path = path.with_name(f"{path.stem}-{need}.npy")  # built for smaller tasks: our own
        labels = np.load(path) if path.exists() else None
    if labels is None or labels.shape != (config.cactus_partitions, len(dataset.images)):
        start = time.perf_counter()
        print(
            f"metalab: CACTUs: {config.cactus_partitions} {how} partition(s) of "
            f"{len(dataset.images)} images (cached in {path.parent}) ..."
        )
        labels = build_partitions(
            how, z, len(dataset.images), ways=config.ways, min_size=need,
            clusters=config.cactus_clusters, partitions=config.cactus_partitions,
            margin=config.cactus_margin, seed=config.seed,
        )  # fmt: skip
        atomic_write(path, lambda f: np.save(f, labels))
        print(f"metalab: CACTUs: partitions built in {time.perf_counter() - start:.0f} s")
    return CactusEpisodes(
        dataset, labels, config.ways, config.shots, config.queries, config.seed, describe(config)
    )


def _still_valid(labels: np.ndarray, how: str, clusters: int, need: int) -> bool:
    """Whether cached k-means partitions pass the size rule for tasks of ``need`` images per
    class (they are shared between task shapes, the rule is not): more than 75% of clusters with
    more than ``need`` members. Other partitioners have no such rule."""
    if how != "kmeans":
        return True
    counts = np.stack([np.bincount(p[p >= 0], minlength=clusters) for p in labels])
    return bool(((counts > need).sum(axis=1) > BIG_ENOUGH * clusters).all())


def describe(config) -> str | None:
    """What a run's training tasks were, for results and tables (None: the true classes)."""
    if config.cactus == "off":
        return None
    k, p = config.cactus_clusters, config.cactus_partitions
    source = Path(config.cactus_embedding).name if config.cactus_embedding else "?"
    return {
        "kmeans": f"CACTUs k-means k={k} P={p} of {source}",
        "hyperplanes": f"CACTUs hyperplanes margin={config.cactus_margin:g} P={p} of {source}",
        "random": f"randrand k={k} P={p}",
    }.get(config.cactus, config.cactus)


def _embeddings(config, dataset: FewShotDataset, data_root, device) -> np.ndarray:
    """The embedding run's embeddings of ``dataset``, after checking it was trained on the same
    images (dataset, split and part) and loading them at its image size."""
    from metalab.data.datasets import load_dataset
    from metalab.methods.embedding import embeddings_of

    if config.cactus_embedding == PIXELS:
        return pixel_embedding(dataset, seed=config.seed)
    run = Path(config.cactus_embedding) if config.cactus_embedding else None
    if run is None or not (run / "config.json").is_file():
        raise ConfigError(
            f"--cactus {config.cactus} needs --cactus-embedding RUN_DIR, the run of an embedding "
            f"(got {str(run) if run else 'none'!r}): train one with `metalab train acai --recipe "
            "omniglot --run-dir runs/acai-omniglot`"
        )
    saved = json.loads((run / "config.json").read_text())
    mine = (config.data, config.split, config.train_part)
    theirs = (saved.get("data"), saved.get("split"), saved.get("train_part"))
    if mine != theirs:
        raise ConfigError(
            f"{run} embeds {'/'.join(map(str, theirs))} images, this run trains on "
            f"{'/'.join(mine)}: use an embedding of the same images"
        )
    size = saved.get("image_size", config.image_size)
    images = dataset
    if size != config.image_size:
        images = load_dataset(config.data, config.split, config.train_part, size, data_root)
    return embeddings_of(run, images, device)
