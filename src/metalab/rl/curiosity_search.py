"""Meta-learned curiosity, the outer loop: search the program space (Alet et al. 2020, Sec. 4).

1. ``candidates(max_ops)``: every type-correct program with at most ``max_ops`` operations
   (``dsl.enumerate_programs``), less duplicates, programs whose rewards agree on a fixed fake
   environment (``dsl.prune_duplicates``). The list is deterministic, so ``candidate:K:I``
   names one program for good.
2. The search evaluates ``budget`` of them, one per iteration: each program lives ``trials``
   lifetimes (``curiosity.run_lifetime``; the same seeds for every program, so programs are
   compared on paired trials) and is scored by the mean. The first ``warmup`` programs are drawn
   at random; after that a ridge regressor on the program's structure (``features``: counts of
   each operation and data structure, size, losses), refitted on everything scored so far,
   predicts the score of each candidate left and the best prediction goes next (the paper's
   "predicting algorithm performance").
3. ``metalab eval SEARCH_RUN`` ranks what was scored; the best programs then run on the
   transfer environments with ``metalab train curiosity --program candidate:K:I``.

``CuriositySearch`` is ``metalab train curiosity-search``; every scored program is
checkpointed, so an interrupted search resumes at the next one.
"""

from __future__ import annotations

import hashlib
import pickle
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import ClassVar

import numpy as np

from metalab.errors import ConfigError
from metalab.evaluate.protocol import seeds_interval
from metalab.io import atomic_write
from metalab.plots import plot_band_curves
from metalab.rl.curiosity import (
    HistoryLoop,
    LifetimeConfig,
    LifetimeMethod,
    check_config,
    run_lifetime,
)
from metalab.rl.dsl import DataStructure, Program, enumerate_programs, prune_duplicates
from metalab.rl.dsl import structure_key as _structure_key
from metalab.rl.train import RLSummary


@lru_cache(maxsize=4)
def candidates(max_ops: int) -> tuple[Program, ...]:
    """The type-correct programs with at most ``max_ops`` operations, one per group of
    duplicates, in enumeration order (deterministic).

    Enumerating and pruning the 5-op space takes about two minutes, so the list is cached under
    ``metalab.data.root.cache_dir()``, keyed by the source of ``metalab.rl.dsl`` (a change to the
    language makes a new list)."""
    if not 1 <= max_ops <= 6:
        raise ConfigError(f"max_ops={max_ops}: use 1 to 6 (5 already gives thousands)")
    import metalab.rl.dsl as dsl
    from metalab.data.root import cache_dir

    digest = hashlib.sha256(Path(dsl.__file__).read_bytes()).hexdigest()[:16]
    path = cache_dir() / f"curiosity-candidates-{max_ops}-{digest}.pkl"
    if path.exists():
        try:
            return tuple(pickle.loads(path.read_bytes()))
        except Exception:  # a damaged cache file: build the list again
            pass
    pool = tuple(prune_duplicates(list(enumerate_programs(max_ops))))
    atomic_write(path, pickle.dumps(pool))
    return pool


def feature_names(programs: tuple[Program, ...]) -> list[str]:
    """The vocabulary of ``features``: every op and structure name seen in ``programs``."""
    names = {node.op.name for p in programs for node in p.nodes[3:]}
    return sorted(names)


def features(program: Program, vocabulary: list[str]) -> np.ndarray:
    """A program's structure as numbers: the count of each op / data structure in
    ``vocabulary``, then its operations, data structures and loss nodes."""
    counts = dict.fromkeys(vocabulary, 0)
    for node in program.nodes[3:]:
        if node.op.name in counts:
            counts[node.op.name] += 1
    structures = sum(isinstance(n.op, DataStructure) for n in program.nodes[3:])
    ops = len(program.nodes) - 3 - structures
    return np.array([*counts.values(), ops, structures, len(program.losses)], dtype=np.float64)


class Predictor:
    """Ridge regression from ``features`` to the search score (standardised features)."""

    def __init__(self, alpha: float = 1.0) -> None:
        from sklearn.linear_model import Ridge

        self.model = Ridge(alpha=alpha)
        self.mean = self.scale = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> Predictor:
        self.mean, self.scale = x.mean(0), x.std(0) + 1e-8
        self.model.fit((x - self.mean) / self.scale, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict((x - self.mean) / self.scale)


@dataclass
class SearchConfig(LifetimeConfig):
    """The search: which programs, how many, how each is scored (lifetime settings inherited)."""

    max_ops: int = 4  # candidates: programs with at most this many operations
    budget: int = 100  # programs evaluated
    warmup: int = 20  # of which drawn at random before the regressor orders the rest
    trials: int = 2  # lifetimes per program (seeds seed, seed+1, ...; the same for all)
    alpha: float = 1.0  # ridge penalty of the regressor
    workers: int = 1  # processes scoring programs at once (> 1: the order depends on timing)
    steps: int = 500  # steps of each environment in one lifetime (short: 500)


def check_search(c: SearchConfig) -> None:
    check_config(c)
    for name in ("budget", "trials", "workers"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name}={getattr(c, name)}: must be at least 1")
    if c.warmup < 2:
        raise ConfigError(f"warmup={c.warmup}: the regressor needs at least 2 scored programs")
    candidates(c.max_ops)  # checks max_ops


class CuriositySearch(LifetimeMethod):
    """``metalab train curiosity-search``: score ``budget`` candidate programs."""

    name: ClassVar[str] = "curiosity-search"
    Config: ClassVar[type[SearchConfig]] = SearchConfig
    recipes: ClassVar[dict[str, SearchConfig]] = {
        # Ours for one CPU core in about an hour: 240 of the 2,120 programs of up to 5 ops
        # (40 at random, then in the regressor's order), two 500-step lifetimes each.
        "grid-cpu": SearchConfig(env="grid-15", max_ops=5, budget=240, warmup=40, steps=500),
        # Closer to the paper's budget (it searched ~52,000 programs of up to ~7 ops with 5 x 5
        # x 2500-step trials on many machines): 5-op programs, full lifetimes.
        # With 16 worker processes (a 16-core machine, one lifetime per core).
        "grid": SearchConfig(
            env="grid-15", max_ops=5, budget=1000, warmup=100, steps=2500, trials=5, workers=16
        ),  # fmt: skip
    }
    budget: ClassVar[str] = "budget"

    def __init__(self, config: SearchConfig) -> None:
        super().__init__(config)
        self.pool = candidates(config.max_ops)
        self.vocabulary = feature_names(self.pool)
        self.x = np.stack([features(p, self.vocabulary) for p in self.pool])

    @staticmethod
    def check(config: SearchConfig) -> None:
        check_search(config)

    def next_program(
        self, history: list[dict], busy: frozenset[int] = frozenset()
    ) -> tuple[int, float | None]:
        """The index of the next candidate (neither scored nor ``busy`` being scored) and its
        predicted score (None while warming up)."""
        c = self.config
        done = {row["index"] for row in history} | set(busy)
        left = [i for i in range(len(self.pool)) if i not in done]
        if not left:
            raise ConfigError(f"all {len(self.pool)} candidates are scored: lower --budget")
        if len(history) + len(busy) < c.warmup:
            order = np.random.default_rng(c.seed).permutation(len(self.pool))
            return int(next(i for i in order if i not in done)), None
        predictor = Predictor(c.alpha).fit(
            self.x[[row["index"] for row in history]], np.array([row["score"] for row in history])
        )  # fmt: skip
        predicted = predictor.predict(self.x[left])
        best = int(np.argmax(predicted))
        return left[best], float(predicted[best])


def score_program(program: Program, c: SearchConfig) -> tuple[list[float], float]:
    """The program's scores over ``trials`` lifetimes (seeds seed, seed+1, ...) and the seconds
    they took; run in a worker process when ``workers`` > 1."""
    lives = [run_lifetime(program, c, c.seed + k, points=5) for k in range(c.trials)]
    return [life.score for life in lives], sum(life.seconds for life in lives)


def _worker_init() -> None:
    """A worker process: one thread, and Ctrl-C is the parent's to handle."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def ranking(history: list[dict]) -> list[dict]:
    """The scored programs, best first."""
    return sorted(history, key=lambda row: -row["score"])


class SearchTrainer(HistoryLoop):
    """Scores one program per iteration; the checkpoint holds every score."""

    def __init__(self, search: CuriositySearch, run_dir: Path) -> None:
        super().__init__(search, run_dir)
        self.search = search
        self.name = "curiosity search"
        self.executor: ProcessPoolExecutor | None = None  # workers > 1
        self.pending: dict[Future, tuple[int, float | None]] = {}

    def close(self) -> None:
        """Stop the worker processes; programs still being scored are dropped (a resume scores
        them again)."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor, self.pending = None, {}

    @property
    def total(self) -> int:
        return min(self.config.budget, len(self.search.pool))

    def iterate(self) -> dict:
        c, search = self.config, self.search
        if c.workers == 1:
            index, predicted = search.next_program(self.history)
            scores, seconds = score_program(search.pool[index], c)
        else:  # keep `workers` programs in flight; record one that has finished
            if self.executor is None:
                self.executor = ProcessPoolExecutor(
                    c.workers, mp_context=get_context("spawn"), initializer=_worker_init
                )  # fmt: skip
            while len(self.pending) < c.workers and (
                len(self.history) + len(self.pending) < self.total
            ):
                busy = frozenset(i for i, _ in self.pending.values())
                index, predicted = search.next_program(self.history, busy)
                job = self.executor.submit(score_program, search.pool[index], c)
                self.pending[job] = (index, predicted)
            finished, _ = wait(self.pending, return_when=FIRST_COMPLETED)
            job = min(finished, key=lambda f: self.pending[f][0])
            (index, predicted), (scores, seconds) = self.pending.pop(job), job.result()
        mean, ci = seeds_interval(scores)
        row = {
            "iteration": self.iteration,
            "index": index,
            "name": f"candidate:{c.max_ops}:{index}",
            "program": _structure_key(search.pool[index]),
            "score": mean,
            "ci95": ci,
            "scores": scores,
            "predicted": predicted,
            "seconds": seconds,
        }
        self.iteration += 1
        self.history.append(row)
        return row

    def status(self, row: dict) -> str:
        best = max(r["score"] for r in self.history)
        return f"{row['name']}: {row['score']:.1f} (best {best:.1f})"

    def save_curve(self) -> Path | None:
        """The best score found so far against programs scored."""
        scores = np.array([row["score"] for row in self.history])
        x = np.arange(1, len(scores) + 1)
        best = np.maximum.accumulate(scores)
        return plot_band_curves(
            self.run_dir / "returns.png",
            {"best so far": (x, best, np.zeros_like(best)), "scored": (x, scores, np.zeros_like(scores))},
            "programs scored", "score", f"curiosity search on {self.config.env}",
        )  # fmt: skip

    def summary(self, stopped: str) -> RLSummary:
        best = max((row["score"] for row in self.history), default=None)
        c = self.config
        return RLSummary(self.run_dir, self.iteration, self.iteration * c.trials * c.steps * c.envs,
                         best, stopped)  # fmt: skip


def cross_validated_rho(x: np.ndarray, y: np.ndarray, alpha: float) -> float | None:
    """Leave-one-out Spearman correlation of the regressor's predictions with the scores, on
    programs drawn at random (the warm-up): how well structure predicts score, free of the
    selection that makes the regressor's own picks look alike."""
    from scipy.stats import spearmanr

    if len(y) < 4:
        return None
    keep = np.ones(len(y), bool)
    predicted = []
    for i in range(len(y)):
        keep[i] = False
        predicted.append(float(Predictor(alpha).fit(x[keep], y[keep]).predict(x[i : i + 1])[0]))
        keep[i] = True
    return float(spearmanr(predicted, y)[0])


def evaluate_search(saved: dict, top: int = 10) -> dict:
    """A search checkpoint's summary: the ``top`` programs, and how well the regressor did: the
    mean score of the random warm-up vs of its picks, the Spearman correlation of its
    predictions with the scores of its picks, and leave-one-out on the warm-up."""
    from scipy.stats import spearmanr

    from metalab.rl.curiosity import lifetime_protocol

    c = SearchConfig(**saved["config"])
    search = CuriositySearch(c)
    history = saved["history"]
    ordered = [row for row in history if row["predicted"] is not None]
    rho = (
        float(spearmanr([r["predicted"] for r in ordered], [r["score"] for r in ordered])[0])
        if len(ordered) > 2
        else None
    )
    warm_rows = [row for row in history if row["predicted"] is None]
    warm = [row["score"] for row in warm_rows]
    loo = cross_validated_rho(
        search.x[[row["index"] for row in warm_rows]], np.array(warm), c.alpha
    )  # fmt: skip
    return {
        "method": CuriositySearch.name,
        "config": asdict(c),
        "protocol": {
            **lifetime_protocol(c),
            "trials_per_program": c.trials,
            "candidates": len(search.pool),
            "scored": len(history),
        },  # fmt: skip
        "predictor": {
            "spearman": rho,
            "warmup_loo_spearman": loo,
            "warmup_mean": float(np.mean(warm)) if warm else None,
            "ordered_mean": float(np.mean([r["score"] for r in ordered])) if ordered else None,
        },
        "rows": {row["name"]: row for row in ranking(history)[:top]},
    }


CuriositySearch.Trainer = SearchTrainer  # defined after its method, which it needs
