"""What every method is: an ``nn.Module`` with a training loss on episodes and a prediction rule.

Kept deliberately small (easyfsl's split between "see the support set" and "answer the queries"):
a method file defines its ``Config`` dataclass (with the paper's recipes by name) and two functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from metalab.arithmetic import Switch, settings_for
from metalab.config import Settings, recipe_of
from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.tasks.episodes import Episode, EpisodeSampler


@dataclass
class MethodConfig(Settings):
    """Settings every episodic method shares. Method configs subclass it and add their own."""

    data: str = "omniglot"  # dataset name
    split: str = "vinyals"  # class split: vinyals | lake
    train_part: str = "train"  # train | trainval: which part of the split to train on
    image_size: int = 28
    ways: int = 5  # training episodes
    shots: int = 1
    queries: int = 15
    eval_ways: int = 5  # validation and the default `metalab eval` protocol
    eval_shots: int = 1
    eval_queries: int = 15
    labelled: int | None = None  # labelled support examples per class in training (None: all)
    eval_labelled: int | None = None  # the same for validation and `metalab eval`
    # Levers for one-shot learning of new alphabets (Lake's protocol), on training episodes only.
    alphabet_episodes: float = 0.0  # fraction of training episodes drawn within one alphabet
    alphabet_ways: int = 20  # classes of such an episode (one alphabet at one rotation)
    augment: float = 0.0  # probability of each of Koch's affine distortions of a training image
    stroke: float = 0.0  # probability of a stroke-width change of a training image
    # Non-mutually-exclusive training episodes (Yin et al. 2020, tasks.nme.NMEEpisodes): each
    # training class keeps one label in every episode, so a network can memorise the classes.
    nme_episodes: bool = False
    # Unsupervised meta-learning (Hsu et al. 2019, CACTUs; tasks.cactus): training episodes of
    # pseudo-classes from partitions of the unlabelled training images; validation and test stay
    # labelled episodes of other classes.
    cactus: str = "off"  # off | kmeans | hyperplanes | random (randrand: random labels)
    # kmeans, hyperplanes: the run directory of an embedding (metalab train acai | bigan | simclr),
    # or "pixels" (k-means on the pixels' top principal components: the no-embedding row)
    cactus_embedding: str = ""
    cactus_clusters: int = 500  # k-means clusters per partition (k); random: labels drawn from k
    cactus_partitions: int = 100  # partitions P (after the first, on randomly rescaled embeddings)
    cactus_margin: float = 1.2  # hyperplanes: distance every image keeps from each hyperplane
    meta_batch: int = 1  # episodes per optimizer step
    episodes: int = 10_000  # training budget in episodes (also see --minutes)
    lr: float = 1e-3
    lr_decay_every: int = 0  # episodes between lr decays; 0 = constant
    lr_decay: float = 0.5
    val_every: int = 500  # episodes between validations; 0 = never
    val_episodes: int = 200
    # episodes | within-alphabet (lake split: 20-way one-shot trials on the held-out background
    # alphabets, unrotated, as Lake tests; val_episodes of them): what picks best.pt
    val_protocol: str = "episodes"
    seed: int = 0
    # torch.compile the method's step (metalab.compiling; a speed choice of each invocation, not
    # kept by --resume): what compiles is the method's (Method.enable_compile)
    compile: bool = False
    # GiB of memory a probed variant of the step may add for `auto` to pick it (metalab.arithmetic):
    # 0 = half the memory available at the probe (CPU), 90% of the GPU's
    memory_cap: float = 0.0
    # The decision for the ``auto`` speed switches (metalab.arithmetic.choose), made by the
    # trainer on the run's first batch and kept for --resume and evaluation; None until then.
    arithmetic: dict | None = None


class Method(nn.Module):
    """Base class: subclasses set ``name``, ``Config`` and ``recipes`` and implement the two calls."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    recipes: ClassVar[dict[str, MethodConfig]] = {}
    task_batches: ClassVar[bool] = False  # always train on a TaskBatch, even of one task
    partial_labels: ClassVar[bool] = False  # answers episodes with UNLABELLED support examples
    # The protocols of metalab.evaluate it answers beside few-shot episodes: "lake-runs" and
    # "within-alphabet" (20-way one-shot image episodes through predict), "verification" (a pair
    # score, pair_probability), "regression" (regression_curve). Asking for another is an error.
    answers: ClassVar[frozenset[str]] = frozenset({"lake-runs", "within-alphabet"})
    # True when a query's answer depends on the other queries of its episode (batch norm on the
    # statistics of the batch at hand at test time): results say so, tables show it.
    transductive: ClassVar[bool] = False
    # Config fields that change only how a trained model answers (test-time augmentation,
    # fine-tuning on the support set): `metalab eval RUN --test-time NAME=VALUE` may set them.
    test_time: ClassVar[tuple[str, ...]] = ()
    # Submodules whose forward `--compile` compiles (e.g. an embedding network); a method that
    # compiles something else overrides check_compile and enable_compile.
    compiled_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig) -> None:
        super().__init__()
        self.config = config
        self.arithmetic: dict[str, Any] = {}  # the speed switches' current values

    # -- speed switches (metalab.arithmetic) ---------------------------------------------------
    def speed_switches(self) -> tuple[Switch, ...]:
        """The switches in this method's config that change speed, not results (bf16 autocast,
        channels-last, ...): the trainer decides the ``auto`` ones by probing. Default: none."""
        return ()

    def set_arithmetic(self, settings: dict[str, Any] | None = None) -> None:
        """Run with ``settings`` (default: what the config and its stored decision say). The base
        class handles ``channels_last`` by converting every 4-d weight; a method reads the rest
        from ``self.arithmetic``."""
        if settings is None:
            settings, _ = settings_for(self.config, self.speed_switches())
        self.arithmetic = dict(settings)
        if "channels_last" in settings:
            layout = torch.channels_last if settings["channels_last"] else torch.contiguous_format
            self.to(memory_format=layout)

    @classmethod
    def check_compile(cls) -> None:
        """A one-line ConfigError unless ``--compile`` has something to compile in this method."""
        if not cls.compiled_modules:
            raise ConfigError(f"{cls.name} has no step that compiles yet: leave out --compile")

    def enable_compile(self, announce: bool = False) -> list:
        """Compile this method's step (lazily: the next call compiles); returns the compiled
        pieces (:class:`metalab.compiling.Compiled`). ``announce``: each says when its first call
        compiled. Default: the forward of each of :attr:`compiled_modules`."""
        from metalab.compiling import compile_forward

        self.check_compile()
        return [
            compile_forward(getattr(self, name), f"{self.name}'s {name}", announce)
            for name in self.compiled_modules
        ]

    def fit_to_memory(self) -> bool:
        """Called when a probed step ran out of memory: shrink the work per call (e.g. MAML's
        vmap chunk) and return True to try again, or False to give the variant up."""
        return False

    @classmethod
    def recipe(cls, name: str) -> MethodConfig:
        """The paper's (or our documented) settings by name."""
        return recipe_of(cls, name)

    @classmethod
    def sampler(
        cls,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        labelled: int | None = None,
    ) -> EpisodeSampler:
        """The episodes this method trains and is tested on; methods whose tasks are not image
        episodes (zero-shot: class meta-data instead of a support set) return their own kind."""
        if labelled is not None and not cls.partial_labels:
            raise ConfigError(
                f"{cls.name} needs every support label: --labelled is for methods that use "
                "unlabelled examples (gnn)"
            )
        return EpisodeSampler(dataset, ways, shots, queries, seed=seed, labelled=labelled)

    @classmethod
    def task_sampler(cls, config: MethodConfig, part: str, data_root=None):
        """Tasks that are not episodes of a class dataset (e.g. optimisation problems), for
        ``part`` ``"train"`` or ``"val"``; None (the default): episodes from :meth:`sampler` over
        ``load_dataset(config.data, ...)``. The object needs ``sample()``, ``sample_batch(n)``,
        ``state()`` and ``set_state(state)``; validation then goes through :meth:`validation_score`."""
        return None

    def validation_score(self, sampler, episodes: int, device) -> float:
        """Higher is better; picks ``best.pt``. Default: accuracy on ``episodes`` fixed episodes,
        or on ``episodes`` within-alphabet trials (``val_protocol="within-alphabet"``)."""
        from metalab.evaluate import evaluate, evaluate_within_alphabet
        from metalab.tasks.oneshot import AlphabetTrials

        if isinstance(sampler, AlphabetTrials):
            return evaluate_within_alphabet(
                self, sampler.dataset, trials=episodes, device=device
            ).mean
        return evaluate(self, sampler, episodes, device).mean

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """A method with its own evaluation (curves, figures) runs it for ``metalab eval RUN_DIR``,
        writes its files into ``run_dir`` and returns True; False (the default): the protocols of
        :func:`metalab.evaluate.evaluate_run` (few-shot episodes, or regression for a method that
        :attr:`answers` it)."""
        return False

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The meta-optimizer the trainer steps: Adam at ``config.lr`` unless a method's paper
        says otherwise (e.g. weight decay)."""
        return torch.optim.Adam(self.parameters(), lr=self.config.lr)

    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on an episode (or TaskBatch), and metrics such as ``acc``."""
        raise NotImplementedError

    def meta_step(self, batch: Episode) -> tuple[float, dict[str, float]]:
        """Accumulate the meta-gradient of ``batch`` into ``.grad``; return the loss and metrics.

        The default backpropagates :meth:`meta_loss`; methods whose meta-gradient is computed
        per task (MAML) override it. The trainer then takes the optimizer step."""
        loss, metrics = self.meta_loss(batch)
        loss.backward()
        return loss.item(), metrics

    def protocol(self) -> dict:
        """How :meth:`predict` answers (e.g. MAML's test-time inner steps), for results."""
        return {}

    def supports_ways(self, ways: int) -> bool:
        """Whether :meth:`predict` answers ``ways``-way episodes (a fixed output layer may not)."""
        return True

    def predict(
        self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``(queries, ways)`` for the query examples given a labelled support set."""
        raise NotImplementedError

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        """Logits for ``episode``'s queries: :meth:`predict` on its support set. Methods that use
        more of an episode (an active learner asks ``episode.oracle_y``) override this."""
        return self.predict(episode.support_x, episode.support_y, episode.query_x)
