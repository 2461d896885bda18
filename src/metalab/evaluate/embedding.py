"""The embedding baselines of CACTUs (Hsu, Levine & Finn 2019, Table 1 and appendix): an
unsupervised embedding used directly on labelled test episodes, with no meta-learning.

Four baselines, each a pure function of arrays (any embedding, raw pixels included) that answers
one episode's queries from its support set:

* :func:`nearest_neighbour` — 1-NN, Euclidean, on the support embeddings;
* :func:`logistic_regression` — multinomial logistic regression, L2 penalty, C = 1 (the code's
  ``C=1``, ``penalty='l2'``, ``multi_class='multinomial'``);
* :func:`mlp` — one hidden ReLU layer with dropout and a softmax, trained full-batch with Adam;
* :func:`cluster_matching` — k-means of the *meta-training* embeddings (:func:`fit_clusters`);
  each support example is assigned its nearest centroid, each such cluster takes the majority
  label of its support examples, and a query gets the label of the nearest of those clusters.

:func:`evaluate_baselines` scores them on the same fixed episodes
(:meth:`~metalab.tasks.episodes.EpisodeSampler.fixed_indices`, the test seed), and
:func:`report_embedding` is ``metalab eval RUN`` for an embedding run
(:class:`~metalab.methods.embedding.EmbeddingMethod`): the paper's protocols, a table, and the
results merged into the run's ``eval.json``.

Choices (where we differ from the official code, kylehkhsu/cactus-maml ``baselines.py``):

* Protocol as the code's: 1000 test episodes of 5 queries per class; Omniglot 5/20-way 1/5-shot
  on the test characters, MNIST 10-way 1/5/10-shot on the 10k test images. The same fixed
  episodes for every baseline (and for the meta-learners, with the same queries and seed).
* Logistic regression: scikit-learn's ``lbfgs`` instead of ``saga``. The objective is the same
  strictly convex one (so the same minimiser, up to the solvers' tolerances); ``saga`` took
  2.7 s per 20-way 5-shot episode on raw pixels against 0.03 s for ``lbfgs`` (measured), i.e.
  45 minutes per protocol.
* MLP: the code (Keras) trained up to 500 full-batch epochs with early stopping on the *query*
  loss (patience 2), which reads the query labels. We train a fixed :data:`MLP_STEPS` full-batch
  Adam steps (lr :data:`MLP_LR`, Keras's default) instead, with :data:`MLP_UNITS` hidden units
  and dropout :data:`MLP_DROPOUT` (the code's values were flags; these are ours), Glorot-uniform
  weights and zero biases as Keras. Episodes are trained together as a batch of independent
  networks (the loss is a sum over episodes and Adam is elementwise, so each network's updates
  are exactly its own).
* Cluster matching: k = 500 for Omniglot, 10 for MNIST (:data:`CLUSTERS`, the paper's), k-means++
  with :data:`KMEANS_N_INIT` restarts (the code's 10 cost ~30 s each on 22k raw Omniglot pixels
  with k = 500 on one core) and scikit-learn's default iterations; a majority tie goes to the
  smaller label (as the code's ``np.unique`` + ``argmax``). The centroids are cached in the run
  directory under a hash of the meta-training embeddings.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metalab.errors import ConfigError
from metalab.evaluate.fewshot import CACTUS_QUERIES, CACTUS_TABLES
from metalab.evaluate.protocol import EVAL_SEED, Result, confidence_interval

BASELINES = ("nearest-neighbour", "logistic-regression", "mlp", "cluster-matching")
CLUSTERS = {"omniglot": 500, "mnist": 10}  # k of cluster matching (the paper's)
EPISODES = 1000
LOGISTIC_C = 1.0
LOGISTIC_MAX_ITER = 1000
MLP_UNITS = 128
MLP_DROPOUT = 0.5
MLP_STEPS = 100
MLP_LR = 1e-3
MLP_CHUNK = 100  # episodes trained together (a fixed size, so the dropout masks are too)
KMEANS_N_INIT = 3
KMEANS_SEED = 0


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(len(a), len(b))`` squared Euclidean distances, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0)


def nearest_neighbour(
    z_support: np.ndarray, y_support: np.ndarray, z_query: np.ndarray
) -> np.ndarray:
    """The label of each query's nearest support example (Euclidean; a tie goes to the first
    support example). ``(n, d)``, ``(n,)``, ``(q, d)`` -> ``(q,)``."""
    nearest = _squared_distances(z_query, z_support).argmin(1)
    return np.asarray(y_support)[nearest]


def logistic_regression(
    z_support: np.ndarray,
    y_support: np.ndarray,
    z_query: np.ndarray,
    C: float = LOGISTIC_C,
    max_iter: int = LOGISTIC_MAX_ITER,
) -> np.ndarray:
    """Multinomial logistic regression with an L2 penalty (inverse strength ``C``) and an
    intercept, fitted on the support set by ``lbfgs`` (deterministic); the queries' labels."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, l1_ratio=0.0, solver="lbfgs", max_iter=max_iter)
    model.fit(np.asarray(z_support, np.float64), np.asarray(y_support))
    return model.predict(np.asarray(z_query, np.float64))


def _glorot(generator: torch.Generator, tasks: int, fan_in: int, fan_out: int) -> torch.Tensor:
    limit = (6 / (fan_in + fan_out)) ** 0.5
    return (torch.rand(tasks, fan_in, fan_out, generator=generator) * 2 - 1) * limit


def mlp(
    z_support: np.ndarray,
    y_support: np.ndarray,
    z_query: np.ndarray,
    *,
    ways: int | None = None,
    units: int = MLP_UNITS,
    dropout: float = MLP_DROPOUT,
    steps: int = MLP_STEPS,
    lr: float = MLP_LR,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """A one-hidden-layer ReLU network with dropout, trained on the support set by ``steps``
    full-batch Adam steps on the cross-entropy; the queries' labels (argmax, no dropout).

    One episode ``(n, d)``, ``(n,)``, ``(q, d)`` -> ``(q,)``, or a batch of episodes of one shape
    ``(T, n, d)``, ``(T, n)``, ``(T, q, d)`` -> ``(T, q)``, trained together as T independent
    networks. Labels are ``0..ways-1`` (``ways`` default: the largest label + 1). The initial
    weights and the dropout masks come from a CPU generator seeded by ``seed``, so the answer
    depends only on the inputs and ``seed`` (on one device)."""
    single = np.ndim(z_support) == 2
    zs = torch.tensor(np.asarray(z_support, np.float32))
    zq = torch.tensor(np.asarray(z_query, np.float32))
    ys = torch.tensor(np.asarray(y_support, np.int64))
    if single:
        zs, zq, ys = zs[None], zq[None], ys[None]
    ways = int(ys.max()) + 1 if ways is None else ways
    tasks, n, d = zs.shape
    generator = torch.Generator().manual_seed(seed)
    params = [
        _glorot(generator, tasks, d, units),
        torch.zeros(tasks, 1, units),
        _glorot(generator, tasks, units, ways),
        torch.zeros(tasks, 1, ways),
    ]
    params = [p.to(device).requires_grad_() for p in params]
    w1, b1, w2, b2 = params
    zs, zq, ys = zs.to(device), zq.to(device), ys.to(device)
    # Fused: one kernel for every network's update (7x faster on a CPU than the default).
    fused = torch.device(device).type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(params, lr=lr, fused=fused or None)
    keep = 1.0 - dropout
    with torch.enable_grad():
        for _ in range(steps):
            hidden = torch.relu(torch.baddbmm(b1, zs, w1))
            if dropout > 0:
                mask = torch.rand(hidden.shape, generator=generator) < keep
                hidden = hidden * mask.to(device) / keep
            logits = torch.baddbmm(b2, hidden, w2)
            # A sum over episodes of each episode's mean loss: every network gets its own gradient.
            loss = F.cross_entropy(logits.reshape(-1, ways), ys.reshape(-1), reduction="sum") / n
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        answer = torch.baddbmm(b2, torch.relu(torch.baddbmm(b1, zq, w1)), w2).argmax(-1).cpu()
    answer = answer.numpy()
    return answer[0] if single else answer


def fit_clusters(z_train: np.ndarray, k: int, seed: int = KMEANS_SEED, n_init: int = KMEANS_N_INIT):
    """scikit-learn ``KMeans`` with ``k`` clusters (k-means++, ``n_init`` restarts, the best
    kept) fitted on the meta-training embeddings; its ``cluster_centers_`` are the centroids."""
    from sklearn.cluster import KMeans

    if not 1 <= k <= len(z_train):
        raise ConfigError(f"k={k} clusters of {len(z_train)} embeddings: use 1..{len(z_train)}")
    return KMeans(n_clusters=k, init="k-means++", n_init=n_init, random_state=seed).fit(
        np.asarray(z_train, np.float32)
    )


def _centroids(clusters) -> np.ndarray:
    return np.asarray(getattr(clusters, "cluster_centers_", clusters))


def cluster_matching(
    z_support: np.ndarray, y_support: np.ndarray, z_query: np.ndarray, kmeans
) -> np.ndarray:
    """Embedding cluster matching: each support example goes to its nearest centroid of
    ``kmeans`` (a fitted ``KMeans`` or its ``(k, d)`` centroids); each cluster so reached takes
    the majority label of its support examples (a tie: the smaller label); each query gets the
    label of its nearest centroid among those clusters."""
    centroids = _centroids(kmeans)
    y_support = np.asarray(y_support)
    assigned = _squared_distances(z_support, centroids).argmin(1)
    matched = np.unique(assigned)
    labels = np.empty(len(matched), dtype=y_support.dtype)
    for i, cluster in enumerate(matched):
        values, counts = np.unique(y_support[assigned == cluster], return_counts=True)
        labels[i] = values[counts.argmax()]  # np.unique sorts: the first maximum is the smallest
    return labels[_squared_distances(z_query, centroids[matched]).argmin(1)]


def _episode_labels(ways: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(ways), per_class)


def evaluate_baselines(
    z_test: np.ndarray,
    indices: np.ndarray,
    shots: int,
    baselines: Sequence[str] = BASELINES,
    *,
    z_train: np.ndarray | None = None,
    clusters=None,
    protocol: dict | None = None,
    seed: int = EVAL_SEED,
    mlp_options: dict | None = None,
    device: torch.device | str = "cpu",
    timings: dict[str, float] | None = None,
) -> dict[str, Result]:
    """Each baseline's accuracy on fixed episodes, mean ± 95% CI over episodes.

    Args:
        z_test: ``(n, d)`` embeddings of the test images (any embedding: raw pixels too).
        indices: ``(episodes, ways, shots + queries)`` rows of ``z_test``; row i of an episode is
            label i and its first ``shots`` columns the support
            (:meth:`~metalab.tasks.episodes.EpisodeSampler.fixed_indices`).
        shots: support examples per class.
        baselines: names among :data:`BASELINES`.
        z_train: the meta-training embeddings, to fit cluster matching's k-means when
            ``clusters`` is a number.
        clusters: cluster matching's clusters: a number k (k-means of ``z_train``, seeded by
            :data:`KMEANS_SEED`), a fitted ``KMeans``, or ``(k, d)`` centroids.
        protocol: what the episodes are (dataset, split, seed, ...), stored in every result with
            the shape of the episodes, the baseline and its settings.
        seed: the MLP's seed (each chunk of :data:`MLP_CHUNK` episodes gets its own).
        mlp_options: keywords of :func:`mlp` (units, dropout, steps, lr) replacing the defaults.
        device: where the MLP trains.
        timings: when given, filled with each baseline's wall-clock seconds.

    Returns:
        ``{baseline: Result}`` in the order of ``baselines``.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}: use some of {', '.join(BASELINES)}")
    indices = np.asarray(indices)
    episodes, ways, per_class = indices.shape
    queries = per_class - shots
    if not 1 <= shots < per_class:
        raise ConfigError(f"shots={shots} with {per_class} examples per class: need a query")
    support = indices[:, :, :shots].reshape(episodes, ways * shots)
    query = indices[:, :, shots:].reshape(episodes, ways * queries)
    y_support, y_query = _episode_labels(ways, shots), _episode_labels(ways, queries)
    base = {
        **(protocol or {}),
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "episodes": episodes,
    }
    results = {}
    for name in baselines:
        started = time.perf_counter()
        settings: dict = {}
        if name == "nearest-neighbour":
            settings = {"neighbours": 1, "distance": "euclidean"}
            answers = np.stack(
                [nearest_neighbour(z_test[s], y_support, z_test[q]) for s, q in zip(support, query)]
            )
        elif name == "logistic-regression":
            from sklearn.exceptions import ConvergenceWarning

            settings = {"C": LOGISTIC_C, "penalty": "l2", "solver": "lbfgs"}
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                answers = np.stack(
                    [
                        logistic_regression(z_test[s], y_support, z_test[q])
                        for s, q in zip(support, query)
                    ]
                )
            unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
            if unconverged:
                print(
                    f"metalab: logistic regression: lbfgs stopped at max_iter="
                    f"{LOGISTIC_MAX_ITER} before converging in {unconverged} of {episodes} "
                    f"{ways}-way {shots}-shot episodes"
                )
        elif name == "mlp":
            options = {
                "units": MLP_UNITS,
                "dropout": MLP_DROPOUT,
                "steps": MLP_STEPS,
                "lr": MLP_LR,
                **(mlp_options or {}),
            }
            settings = {**options, "optimizer": "adam, full batch", "seed": seed}
            answers = np.concatenate(
                [
                    mlp(
                        z_test[support[start : start + MLP_CHUNK]],
                        np.broadcast_to(y_support, support[start : start + MLP_CHUNK].shape),
                        z_test[query[start : start + MLP_CHUNK]],
                        ways=ways,
                        seed=_chunk_seed(seed, start // MLP_CHUNK),
                        device=device,
                        **options,
                    )
                    for start in range(0, episodes, MLP_CHUNK)
                ]
            )
        else:  # cluster-matching
            if clusters is None:
                raise ConfigError("cluster matching needs clusters: a number k, or centroids")
            if isinstance(clusters, (int, np.integer)):
                if z_train is None:
                    raise ConfigError("cluster matching with k clusters needs z_train to fit")
                clusters = fit_clusters(z_train, int(clusters))
            centroids = _centroids(clusters)
            settings = {"clusters": len(centroids)}
            if hasattr(clusters, "n_init"):
                settings.update(kmeans_n_init=clusters.n_init, kmeans_seed=clusters.random_state)
            answers = np.stack(
                [
                    cluster_matching(z_test[s], y_support, z_test[q], centroids)
                    for s, q in zip(support, query)
                ]
            )
        accuracy = (answers == y_query).mean(1)
        results[name] = Result(
            *confidence_interval(accuracy), {**base, "baseline": name, **settings}
        )
        if timings is not None:
            timings[name] = time.perf_counter() - started
    return results


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def cached_clusters(
    z_train: np.ndarray,
    k: int,
    cache_dir: Path | None,
    seed: int = KMEANS_SEED,
    n_init: int = KMEANS_N_INIT,
):
    """:func:`fit_clusters`, its centroids cached in ``cache_dir`` (None: not cached) under a hash
    of ``z_train``, k, the seed and the restarts; returns the ``KMeans`` or, when cached, an
    object with ``cluster_centers_``, ``n_init`` and ``random_state``."""
    from metalab.io import atomic_write

    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(np.ascontiguousarray(z_train).tobytes()).hexdigest()[:12]
        path = Path(cache_dir) / f"kmeans-{digest}-k{k}-n{n_init}-s{seed}.npy"
        if path.exists():
            try:
                centroids = np.load(path)
                if centroids.shape == (k, z_train.shape[1]):
                    return _Clusters(centroids, n_init, seed)
            except (OSError, ValueError):
                pass  # damaged: fitted again below
    kmeans = fit_clusters(z_train, k, seed, n_init)
    if path is not None:
        atomic_write(path, lambda f: np.save(f, kmeans.cluster_centers_))
    return kmeans


class _Clusters:
    """Stored centroids with the settings that made them (what cluster matching reads)."""

    def __init__(self, centroids: np.ndarray, n_init: int, random_state: int) -> None:
        self.cluster_centers_, self.n_init, self.random_state = centroids, n_init, random_state


def report_embedding(
    method,
    run_dir: Path,
    *,
    episodes: int | None,
    device,
    data_root=None,
    seed: int = EVAL_SEED,
    baselines: Sequence[str] = BASELINES,
) -> dict[tuple[int, int], dict[str, Result]]:
    """``metalab eval RUN`` for an embedding run: the baselines on the paper's protocols for the
    run's dataset (:data:`~metalab.evaluate.fewshot.CACTUS_TABLES`, 5 queries per class, ``episodes`` fixed
    episodes, default 1000, of the test part of the run's split), embedded by the run's
    ``best.pt`` (:func:`~metalab.methods.embedding.embeddings_of`, cached in the run directory);
    cluster matching's k-means on the run's meta-training part. Prints a table and merges the
    results into ``run_dir/eval.json``. Returns ``{(ways, shots): {baseline: Result}}``."""
    from metalab.data.datasets import load_dataset
    from metalab.methods.embedding import embeddings_of
    from metalab.reports import embedding_baselines_table, print_tables, save_eval
    from metalab.tasks.episodes import EpisodeSampler

    c, run_dir = method.config, Path(run_dir)
    if c.data not in CACTUS_TABLES:
        raise ConfigError(
            f"the embedding baselines have protocols for {' and '.join(CACTUS_TABLES)}, not {c.data}"
        )
    episodes = EPISODES if episodes is None else episodes
    test = load_dataset(c.data, c.split, "test", c.image_size, data_root)
    z_test = embeddings_of(run_dir, test, device)
    clusters = None
    if "cluster-matching" in baselines:
        train = load_dataset(c.data, c.split, c.train_part, c.image_size, data_root)
        z_train = embeddings_of(run_dir, train, device)
        clusters = cached_clusters(z_train, CLUSTERS[c.data], run_dir)
    shared = {"split": c.split, "embedding": method.name, "checkpoint": "best.pt"}
    found: dict[tuple[int, int], dict[str, Result]] = {}
    for ways, shots in CACTUS_TABLES[c.data]:
        sampler = EpisodeSampler(test, ways, shots, CACTUS_QUERIES, seed=seed)
        found[ways, shots] = evaluate_baselines(
            z_test,
            sampler.fixed_indices(episodes),
            shots,
            baselines,
            clusters=clusters,
            protocol={**sampler.protocol(), **shared},
            seed=seed,
            device=device,
        )
    results = [r for by_baseline in found.values() for r in by_baseline.values()]
    print_tables(embedding_baselines_table(f"{method.name} — {run_dir.name}", results))
    save_eval(run_dir / "eval.json", results, None, {"method": method.name})
    return found
