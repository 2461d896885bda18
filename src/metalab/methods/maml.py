"""Model-Agnostic Meta-Learning — Finn, Abbeel & Levine, ICML 2017; and first-order MAML.

MAML learns an initialisation theta from which a few gradient steps on a task's support set give
parameters that do well on the task's query set:

    theta'_i = theta - alpha * grad_theta L_Ti(f_theta)                       # Eq. 1
    theta   <- theta - beta * grad_theta sum_i L_Ti(f_theta'_i)              # Eq. 2, 3

with the second derivatives of Eq. 2 kept (MAML) or dropped (first-order MAML, Sec. 5.2: the inner
gradient is treated as a constant). The inner loop and its meta-gradient are
:func:`metalab.functional.meta_gradient`; this file is the method: the networks of Sec. 5
(a 1-40-40-1 ReLU MLP for sinusoids, Conv4 with batch norm on batch statistics for images), the
paper's recipes, and prediction by adapting on the support set.

Paper-vs-code choices: Omniglot trains with K query examples per class as in
Finn's code (``update_batch_size*2`` examples per class), and evaluates with ``eval_inner_steps``
(3 for 5-way in the paper; the code used 10). Every parameter is adapted in the inner loop, batch
norm's scale and shift included (Finn's TensorFlow batch norm had a shift only, meta-learned but not
adapted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call, vmap

from metalab.arithmetic import CHANNELS_LAST, Switch, images
from metalab.errors import ConfigError
from metalab.functional import (
    LossFn,
    Params,
    adapt,
    classification_loss,
    meta_gradient,
    regression_loss,
    write_grads,
)
from metalab.methods.base import Method, MethodConfig
from metalab.nets.classifier import Conv4Classifier
from metalab.nets.mlp import MLP
from metalab.tasks.attributes import AttributeTasks, omniglot_attribute_tasks
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.regression import FAMILIES, AmbiguousTasks, SinusoidTasks

# Task families whose networks are MLP regressors: Finn's sinusoids, and Finn, Xu & Levine's
# ambiguous sinusoid-or-line tasks (a few noisy points in a narrow window; tasks.regression).
REGRESSION = FAMILIES  # the regression task families by config.data
# Ambiguous 2-way tasks of Omniglot characters with synthetic attributes (tasks.attributes): our
# substitute for PLATIPUS's ambiguous CelebA tasks, on 1-channel 28x28 images.
ATTRIBUTES = "attributes"
CHANNELS = {"omniglot": 1, "mnist": 1, "miniimagenet": 3, ATTRIBUTES: 1}
CHANNELS["omni-art-multi"] = 1  # our substitute for ARML's Art-Multi (metalab.data.artmulti)


@dataclass
class MAMLConfig(MethodConfig):
    hidden: int = 64  # Conv4 filters; hidden units of each MLP layer for regression
    pool: str = "stride"  # stride (Omniglot) | max (miniImageNet)
    inner_steps: int = 1  # gradient steps on the support set during meta-training
    inner_lr: float = 0.4  # alpha
    eval_inner_steps: int = 3  # steps when predicting (test)
    eval_inner_lr: float = 0.0  # alpha at test; 0 = inner_lr
    first_order: bool = False  # drop the second derivatives (Sec. 5.2)
    learn_inner_lr: bool = False  # one learnable alpha per weight (Li et al. 2017, Meta-SGD)
    # Speed switches (metalab.arithmetic): auto is decided by timing on the run's first batch.
    backend: str = "auto"  # auto | vmap | loop (see metalab.functional.meta_gradient)
    chunk_size: int = 0  # vmap: at most this many tasks at once; 0 = all (auto lowers it on OOM)
    channels_last: str = "auto"  # auto | on | off: channels-last activations for the conv net


_SINUSOID = dict(
    data="sinusoid",
    ways=1,
    shots=10,
    queries=10,
    eval_ways=1,
    eval_shots=5,
    eval_queries=100,
    meta_batch=25,
    episodes=70_000,
    lr=1e-3,
    val_every=0,
    hidden=40,
    inner_steps=1,
    inner_lr=0.01,
    eval_inner_steps=10,
)
# PLATIPUS's ambiguous regression (Finn, Xu & Levine 2018, Sec. 5 [U for every setting]): K = 5
# noisy support points in a narrow window, the sinusoid network, inner step and schedule.
# One step at test, as in training: 5 or 10 steps at alpha = 0.01 diverge on these tasks (lines
# reach |y| = 18; MAML and PLATIPUS runs of this recipe measured MSE > 1e5 after 5 steps).
AMBIGUOUS = dict(_SINUSOID, data="ambiguous", shots=5, eval_shots=5, eval_inner_steps=1)
# ARML's 2-D regression (Yao et al. 2020; huaxiuyao/ARML 2D_bash/2D_10shot.sh and its flag
# defaults [R]; the shared PAPERS.md §9: MAML 2.292 +- 0.163, 10-shot MSE): six function families
# of (x, y) (tasks.regression.ARML2DTasks), a 2-40-40-1 ReLU MLP, K = 10 support and 10 query
# points, 5 steps at alpha = 1e-3 in training and 20 at test, meta-batch 25, Adam 1e-3.
_ARML_2D = dict(
    _SINUSOID,
    data="arml-2d",
    eval_shots=10,
    eval_queries=10,
    inner_steps=5,
    inner_lr=1e-3,
    eval_inner_steps=20,
)
_OMNIGLOT = dict(
    data="omniglot",
    split="vinyals",
    shots=1,
    queries=1,
    eval_shots=1,
    eval_queries=15,
    lr=1e-3,
    episodes=60_000,
    val_every=1000,
    val_episodes=300,
)
_5SHOT = dict(shots=5, queries=5, eval_shots=5)
# App. A.1 and Finn's code, miniImageNet (Ravi split, 84x84 RGB; a user's copy, see the README's
# Data section): 32 filters with max-pool, 5 steps at alpha = 0.01 in training and 10 at test, 15
# queries per class, meta-batch 4 (1-shot) / 2 (5-shot), 60,000 iterations. Not applied: the
# code's clip of the meta-gradient to [-10, 10].
_MINI = dict(
    data="miniimagenet",
    split="ravi",
    image_size=84,
    hidden=32,
    pool="max",
    ways=5,
    eval_ways=5,
    queries=15,
    eval_queries=15,
    inner_steps=5,
    inner_lr=0.01,
    eval_inner_steps=10,
    lr=1e-3,
    episodes=60_000,
    val_every=1000,
    val_episodes=300,
)
_5WAY = dict(ways=5, eval_ways=5, meta_batch=32, inner_lr=0.4, eval_inner_steps=3)
_20WAY = dict(ways=20, eval_ways=20, meta_batch=16, inner_steps=5, inner_lr=0.1, eval_inner_steps=5)
# Ambiguous classification with coverage on OUR SUBSTITUTE for PLATIPUS's CelebA tasks (Finn, Xu
# & Levine 2018 [U]): Omniglot characters with synthetic attributes (tasks.attributes; no paper
# number). The paper's: 2-way tasks, positives with all of three attributes and negatives with
# none, K = 5 [U], a Conv4 [U: its filters]. Ours: 32 filters, one inner step at alpha = 0.4
# (Finn's Omniglot step) in training and at test (1 test step gave the best NLL and coverage of
# 0, 1, 3, 5 on a short run), 5 queries per class in training and 10 at test, meta-batch 8, Adam
# 1e-3, 8,000 meta-steps, no validation (as the regression recipes). Timed on one thread of a
# busy 2-core AMD EPYC: 0.06 s per meta-step for MAML (about 8 min), 0.14-0.15 s for PLATIPUS
# (about 20 min).
_ATTRIBUTES = dict(
    data=ATTRIBUTES,
    split="vinyals",
    ways=2,
    eval_ways=2,
    shots=5,
    queries=5,
    eval_shots=5,
    eval_queries=10,
    hidden=32,
    inner_steps=1,
    inner_lr=0.4,
    eval_inner_steps=1,
    meta_batch=8,
    episodes=8000,
    lr=1e-3,
    val_every=0,
)

# ARML's base learner (Yao et al. 2020; huaxiuyao/ARML artmulti_bash scripts [R]) on OUR
# SUBSTITUTE for Art-Multi, Omni-Art-Multi (metalab.data.artmulti; no paper number is comparable):
# 4 conv blocks of 32 filters with max-pool (ARML's maml.py), 5 inner steps at alpha = 0.01, meta-
# batch 4, Adam 1e-3, K + 15 queries per class in training, 20 inner steps at test
# (num_updates_test); 15 test queries per class (ARML's code: K). ARML runs 60,000 (1-shot) /
# 40,000 (5-shot) iterations (--episodes 60000); ours are CPU budgets, see the recipes.
_ART_MULTI = dict(
    data="omni-art-multi",
    split="art4",
    hidden=32,
    pool="max",
    ways=5,
    eval_ways=5,
    queries=15,
    eval_queries=15,
    inner_steps=5,
    inner_lr=0.01,
    eval_inner_steps=20,
    meta_batch=4,
    lr=1e-3,
    val_episodes=100,
)
# CACTUs-MAML (Hsu, Levine & Finn 2019; kylehkhsu/cactus-maml scripts/omniglot_kmeans.sh [R]):
# 20-way 1-shot training with 5 queries per class on k-means pseudo-classes (k = 500) of an
# unsupervised embedding of the 1100 unrotated training characters (--cactus-embedding RUN_DIR;
# tasks.cactus), P = 100 partitions (the paper's best setting; the script's 1 "takes less
# while"), 32 filters, batch norm, strided convs, 5 inner steps at alpha = 0.05, meta-batch 8,
# Adam 1e-3, 30,000 iterations, no validation; tested on 5-way episodes with 5 queries and 50
# inner steps (the code's test_num_updates; which step the paper tabulates is not in the code
# [U]). --cactus off: the supervised oracle (the paper's ran 120,000 iterations).
_CACTUS = dict(
    data="omniglot",
    split="cactus",
    hidden=32,
    pool="stride",
    ways=20,
    shots=1,
    queries=5,
    eval_ways=5,
    eval_shots=1,
    eval_queries=5,
    inner_steps=5,
    inner_lr=0.05,
    eval_inner_steps=50,
    meta_batch=8,
    lr=1e-3,
    episodes=30_000,
    val_every=0,
    cactus="kmeans",
    cactus_clusters=500,
    cactus_partitions=100,
)


def first_outputs(params: Params, ways: int) -> Params:
    """``params`` with the output layer cut to its first ``ways`` units (``head.*``)."""
    return {k: v[:ways] if k.startswith("head.") else v for k, v in params.items()}


class MAML(Method):
    """MAML with a Conv4 classifier (images) or an MLP regressor (``data="sinusoid"``)."""

    name = "maml"
    Config = MAMLConfig
    recipes = {
        # Sec. 5.1 / App. C: K = 10 support and 10 query points, one step at alpha = 0.01,
        # meta-batch 25, Adam 1e-3, 70,000 meta-iterations; tested with up to 10 steps.
        "sinusoid": MAMLConfig(**_SINUSOID),
        # The "pretrained on all tasks" baseline of App. C: the same network trained on the query
        # loss of the initial parameters (no inner step), fine-tuned at test with a step size
        # tuned on validation tasks.
        "sinusoid-pretrained": MAMLConfig(**{**_SINUSOID, "inner_steps": 0}),
        # The point-estimate baseline of PLATIPUS's ambiguous regression (sinusoids or lines, 5
        # noisy points in a window of width 2; tasks.regression.AmbiguousFamily).
        "ambiguous-regression": MAMLConfig(**AMBIGUOUS),
        # ARML's 2-D regression baseline (settings in _ARML_2D): arml-2d is the budget of ARML's
        # CPU recipe (arml 2d-regression, 20,000 iterations), to compare at equal steps: 14 min
        # on one thread of a busy 2-core CPU (4 min of CPU time); arml-2d-full the script's 70,000.
        "arml-2d": MAMLConfig(**{**_ARML_2D, "episodes": 20_000}),
        "arml-2d-full": MAMLConfig(**_ARML_2D),
        # App. A.1, Omniglot 5-way: 1 step at alpha = 0.4, meta-batch 32, tested with 3 steps.
        "omniglot-5w1s": MAMLConfig(**_OMNIGLOT, **_5WAY),
        "omniglot-5w5s": MAMLConfig(**{**_OMNIGLOT, **_5SHOT}, **_5WAY),
        # App. A.1, Omniglot 20-way: 5 steps at alpha = 0.1, meta-batch 16, tested with 5 steps.
        "omniglot-20w1s": MAMLConfig(**_OMNIGLOT, **_20WAY),
        "omniglot-20w5s": MAMLConfig(**{**_OMNIGLOT, **_5SHOT}, **_20WAY),
        # miniImageNet 5-way (Table 1: 48.70 +- 1.84% 1-shot, 63.11 +- 0.92% 5-shot).
        "miniimagenet-5w1s": MAMLConfig(**_MINI, shots=1, eval_shots=1, meta_batch=4),
        "miniimagenet-5w5s": MAMLConfig(**_MINI, shots=5, eval_shots=5, meta_batch=2),
        # The point-estimate baseline of the ambiguous attribute tasks (our substitute for
        # PLATIPUS's CelebA; settings in _ATTRIBUTES, ours unless marked [U]).
        "ambiguous-attributes": MAMLConfig(**_ATTRIBUTES),
        # ARML's base learner on Omni-Art-Multi (settings in _ART_MULTI), cut to CPU budgets of
        # about 20 minutes of one thread of a 2-core AMD EPYC (measured CPU time per meta-step:
        # 0.28 s at 1-shot, 0.8 s at 5-shot; a validation of 100 episodes at 20 steps ~15 s);
        # wall time is longer when other processes share the cores.
        "omni-art-multi-5w1s": MAMLConfig(
            **_ART_MULTI, shots=1, eval_shots=1, episodes=4000, val_every=1000
        ),
        "omni-art-multi-5w5s": MAMLConfig(
            **_ART_MULTI, shots=5, eval_shots=5, episodes=1500, val_every=500
        ),
        # CACTUs-MAML (settings in _CACTUS). -cpu is ours, a reduced FIRST-ORDER run that fits
        # a 2-core CPU (docs/cactus.md): 2,000 iterations, 20 partitions.
        "cactus-omniglot": MAMLConfig(**_CACTUS),
        "cactus-omniglot-cpu": MAMLConfig(
            **{**_CACTUS, "episodes": 2000, "first_order": True, "cactus_partitions": 20}
        ),
        # The MNIST script (mnist_kmeans.sh [R]; the paper's Table 7): k = 10, P = 100, 10-way
        # 1-shot training with 10 queries per class, meta-batch 16, 20,000 iterations; tested
        # 10-way with K = 1, 5, 10 and 5 queries.
        "cactus-mnist": MAMLConfig(
            **{
                **_CACTUS,
                "data": "mnist",
                "split": "standard",
                "ways": 10,
                "queries": 10,
                "eval_ways": 10,
                "meta_batch": 16,
                "episodes": 20_000,
                "cactus_clusters": 10,
            }
        ),  # fmt: skip
    }
    task_batches = True  # the trainer always hands meta_step a TaskBatch, even of one task
    fewer_ways: ClassVar[bool] = True  # predict answers fewer ways than trained (first outputs)
    test_time = ("eval_inner_steps", "eval_inner_lr")  # `metalab eval --test-time NAME=VALUE`
    # The meta-gradient function meta_step calls; --compile compiles it for the vmap backend. A
    # subclass with its own step names its own (PLATIPUS, ARML).
    step_function: ClassVar[Callable] = staticmethod(meta_gradient)
    _compiled: dict | None = None  # --compile's pieces (enable_compile)

    @classmethod
    def task_sampler(
        cls, config: MAMLConfig, part: str, data_root=None
    ) -> SinusoidTasks | AmbiguousTasks | AttributeTasks | None:
        """Regression tasks drawn on the fly for training, and no validation (as in Finn's code);
        ambiguous attribute tasks (``data="attributes"``) over the meta-train images and
        attributes, also without validation; None for images (episodes of the dataset)."""
        if config.data == ATTRIBUTES and part == "train":
            return omniglot_attribute_tasks(
                config.train_part, config.shots, config.queries, config.seed, config.split,
                config.image_size, data_root,
            )  # fmt: skip
        if config.data not in REGRESSION or part != "train":
            return None
        return REGRESSION[config.data](config.shots, config.queries, seed=config.seed)

    @property
    def answers(self) -> frozenset[str]:
        """Regression tasks (the MLP), or one-shot image runs and trials (the conv net)."""
        return frozenset({"regression"}) if self.regression else Method.answers

    @property
    def transductive(self) -> bool:
        """The conv net's batch norm uses the statistics of the batch at hand when testing too
        (Finn's code), so a query's answer depends on the episode's other queries."""
        return not self.regression

    def __init__(self, config: MAMLConfig) -> None:
        super().__init__(config)
        c = config
        if c.inner_steps < 0 or c.eval_inner_steps < 0:
            raise ConfigError("inner_steps and eval_inner_steps must be 0 or more")
        self.regression = c.data in REGRESSION
        if self.regression:
            self.net: nn.Module = MLP((FAMILIES[c.data].input_dim, c.hidden, c.hidden, 1))
            self.loss_fn = regression_loss(self.net)
        else:
            if c.data not in CHANNELS:
                raise ConfigError(f"data={c.data!r}: MAML knows {sorted(CHANNELS) + ['sinusoid']}")
            if c.data == ATTRIBUTES and (c.ways, c.eval_ways, c.image_size) != (2, 2, 28):
                raise ConfigError(
                    f"ways={c.ways}, eval_ways={c.eval_ways}, image_size={c.image_size}: attribute "
                    "tasks are 2-way on 28x28 images: use --ways 2 --eval-ways 2 --image-size 28"
                )
            self.net = Conv4Classifier(c.ways, CHANNELS[c.data], c.hidden, c.pool, c.image_size)
            self.loss_fn = classification_loss(self.net)
        # Meta-SGD rates, one per weight, stored in the order of the network's parameters.
        self.inner_lrs = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, c.inner_lr)) for p in self.net.parameters()]
            if c.learn_inner_lr
            else []
        )
        self.set_arithmetic()

    # -- speed switches -------------------------------------------------------------------------
    def speed_switches(self) -> tuple[Switch, ...]:
        """The meta-gradient backend (vmap first: the plain choice), and channels-last for the
        conv net. Both give the same meta-gradient; which is faster depends on the machine and
        the task shapes (benchmarks/RESULTS.md: vmap on GPUs, small MLPs and Omniglot's small
        query sets on a CPU; the loop for large query sets on a CPU)."""
        backend = Switch("backend", ("vmap", "loop"))
        return (backend,) if self.regression else (backend, CHANNELS_LAST)

    def set_arithmetic(self, settings: dict | None = None) -> None:
        super().set_arithmetic(settings)
        chunk = self.arithmetic.get("chunk", self.config.chunk_size or None)
        self.arithmetic["chunk"] = chunk if self.arithmetic["backend"] == "vmap" else None

    @classmethod
    def check_compile(cls) -> None:
        """``--compile`` covers :meth:`meta_step`'s meta-gradient function (MAML's, FOMAML's,
        LLAMA's; PLATIPUS and ARML name their own :attr:`step_function`)."""
        if cls.meta_step is not MAML.meta_step and cls.step_function is MAML.step_function:
            raise ConfigError(
                f"{cls.name} has its own training step, which does not compile yet: leave out "
                "--compile"
            )

    def enable_compile(self, announce: bool = False) -> list:
        """Training: the vmap backend compiles the whole meta-gradient (:meth:`step_gradient`);
        MAML's loop backend the query loss of each task (its first-order pass: the inner loop's
        double backward does not compile). Prediction: MAML's test-time inner loop and the
        adapted forward."""
        from metalab.compiling import Compiled

        self.check_compile()
        if self._compiled is None:
            step = type(self).step_function
            self._compiled = {
                "vmap": Compiled(step, f"{self.name}'s meta-gradient", announce),
                "loop": Compiled(self.loss_fn, f"{self.name}'s query loss", announce),
                "predict": Compiled(self._adapted_outputs, f"{self.name}'s prediction", announce),
            }
        return list(self._compiled.values())

    def step_gradient(self) -> Callable:
        """The meta-gradient function :meth:`meta_step` calls (:attr:`step_function`), compiled
        under ``--compile`` when the backend is vmap."""
        if self._compiled is not None and self.arithmetic["backend"] == "vmap":
            return self._compiled["vmap"]
        return type(self).step_function

    def fit_to_memory(self) -> bool:
        """Out of memory with vmap: halve the chunk of tasks vmapped at once (down to one)."""
        if self.arithmetic["backend"] != "vmap":
            return False
        chunk = (self.arithmetic["chunk"] or self._tasks) // 2
        self.arithmetic["chunk"] = chunk or None
        return chunk >= 1

    # -- the pieces -----------------------------------------------------------------------------
    def params(self) -> Params:
        """theta, as the dict ``functional_call`` takes (live parameters, not copies)."""
        return dict(self.net.named_parameters())

    def lr(self, test: bool = False) -> float | Params:
        """alpha: a float, or one tensor per parameter with ``learn_inner_lr``."""
        c = self.config
        if c.learn_inner_lr:
            return dict(zip(self.params(), self.inner_lrs))
        return (c.eval_inner_lr or c.inner_lr) if test else c.inner_lr

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the layout the arithmetic asks for; a task batch (T, B, C, H, W) per task."""
        if x.dim() == 5:
            return images(x.flatten(0, 1), self.arithmetic).unflatten(0, x.shape[:2])
        return images(x, self.arithmetic)

    def forward_with(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """The network with parameters ``params``: logits, or regression outputs."""
        return functional_call(self.net, params, (self._inputs(x),))

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        lr: float | Params | None = None,
        params: Params | None = None,
    ) -> Params:
        """theta'_i: ``steps`` (default ``eval_inner_steps``) steps on one task's support set."""
        c = self.config
        steps = c.eval_inner_steps if steps is None else steps
        lr = self.lr(test=True) if lr is None else lr
        params = self.params() if params is None else params
        with torch.enable_grad():  # evaluation runs under no_grad; the inner loop needs grad
            return adapt(
                params,
                lambda p, x, y: self.loss_fn(p, x, y)[0],
                (self._inputs(support_x), support_y),
                steps,
                lr,
            )

    # -- training -------------------------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> tuple[float, dict[str, float]]:
        """Write the meta-gradient of a batch of tasks into ``.grad`` (Eq. 2-3, before the Adam
        step the trainer takes); returns the mean query loss after adaptation and metrics."""
        c = self.config
        self._tasks = batch.tasks  # for fit_to_memory
        params = self.params()
        loss_fn, outer_inputs = self.outer_loss(batch)
        backend, query_loss = self.arithmetic["backend"], None
        if self._compiled is not None and backend == "loop" and loss_fn is self.loss_fn:
            query_loss = self._compiled["loop"]  # (LLAMA's objective stays eager)
        result = self.step_gradient()(
            loss_fn,
            params,
            (self._inputs(batch.support_x), batch.support_y),
            outer_inputs,
            c.inner_steps,
            self.lr(),
            c.first_order,
            backend,
            self.arithmetic["chunk"],
            query_loss_fn=query_loss,
        )
        write_grads(params, result.grads)
        if result.lr_grads is not None:
            write_grads(dict(zip(params, self.inner_lrs)), result.lr_grads)
        return result.loss.item(), {k: v.mean().item() for k, v in result.metrics.items()}

    def outer_loss(self, batch: TaskBatch) -> tuple[LossFn, tuple[torch.Tensor, ...]]:
        """The loss :meth:`meta_step` adapts with and differentiates after adaptation, and the
        inputs of its outer call: MAML's loss on the queries (Eq. 3). A variant that adds a
        term to the meta-objective (LLAMA's log det) returns its own."""
        return self.loss_fn, (self._inputs(batch.query_x), batch.query_y)

    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Not used for training (see :meth:`meta_step`); kept for the base-class contract."""
        raise NotImplementedError("MAML trains through meta_step (per-task meta-gradients)")

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Logits for the queries after ``eval_inner_steps`` steps on the support set; batch norm
        uses the statistics of the batch at hand, as in training (Finn's code). An N-way episode
        with N below the training ways is answered by the first N units of the output layer,
        adapted alone (the CACTUs code's test of its 20-way models on 5-way tasks:
        ``tf.gather(logits, range(dim_output_val))``)."""
        params, lr = self.params(), self.lr(test=True)
        if not self.regression:
            ways = int(support_y.max()) + 1
            if not self.supports_ways(ways):
                raise ConfigError(
                    f"this MAML model has a {self.config.ways}-way output layer; it cannot answer "
                    f"{ways}-way episodes (train one with --ways {ways})"
                )
            if ways < self.config.ways:
                params = first_outputs(params, ways)
                lr = first_outputs(lr, ways) if isinstance(lr, dict) else lr
        adapted = self._compiled["predict"] if self._compiled else self._adapted_outputs
        return adapted(support_x, support_y, query_x, params, lr)

    def _adapted_outputs(self, support_x, support_y, query_x, params, lr) -> torch.Tensor:
        return self.forward_with(self.adapt(support_x, support_y, lr=lr, params=params), query_x)

    def sample_functions(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        samples: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The outputs ``(draws, queries, ...)`` of models drawn for one task given its support
        set: MAML's adapted model is a point estimate, so one draw whatever ``samples`` asks
        (LLAMA and PLATIPUS draw ``samples``; :mod:`metalab.evaluate.uncertainty`)."""
        with torch.no_grad():
            return self.predict(support_x, support_y, query_x)[None]

    def supports_ways(self, ways: int) -> bool:
        """Regression, or classification with at most the training ways (fewer: the first
        output units, see :meth:`predict`; only the training ways for a subclass whose own
        ``predict`` does not slice, ``fewer_ways = False``)."""
        if self.regression:
            return True
        return ways <= self.config.ways if self.fewer_ways else ways == self.config.ways

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval` of a run on attribute tasks: the coverage protocol
        (:func:`metalab.evaluate.coverage.report_coverage`: a table and ``eval.json``); False
        (the standard protocols) for every other run."""
        if self.config.data != ATTRIBUTES:
            return False
        from metalab.evaluate.coverage import report_coverage

        return report_coverage(self, run_dir, episodes=episodes, device=device, data_root=data_root)

    def protocol(self) -> dict:
        c = self.config
        lr = "learned" if c.learn_inner_lr else self.lr(test=True)
        return {"inner_steps": c.eval_inner_steps, "inner_lr": lr, "first_order": c.first_order}

    def get_extra_state(self) -> dict:
        return {"backend": self.arithmetic["backend"], "chunk": self.arithmetic["chunk"]}

    def set_extra_state(self, state: dict) -> None:
        """Checkpoints from before ``config.arithmetic`` kept auto's backend here; a run with a
        stored decision follows the decision."""
        if (
            self.config.backend == "auto"
            and self.config.arithmetic is None
            and state.get("backend")
        ):
            self.set_arithmetic({**self.arithmetic, **state})

    def regression_curve(
        self, batch: TaskBatch, steps: int, lr: float | None = None
    ) -> torch.Tensor:
        """Query MSE of each task after 0..``steps`` inner steps: ``(T, steps + 1)``, all tasks
        at once (vmapped; no meta-gradient)."""
        lr = self.lr(test=True) if lr is None else lr
        theta = {k: p.detach() for k, p in self.params().items()}

        def curve(sx, sy, qx, qy):
            params, errors = theta, []
            for step in range(steps + 1):
                out = self.forward_with(params, qx)
                errors.append((out - qy).square().mean())
                if step < steps:
                    params = self.adapt(sx, sy, steps=1, lr=lr, params=params)
            return torch.stack(errors)

        return vmap(curve)(*batch.tensors())


@dataclass
class FOMAMLConfig(MAMLConfig):
    first_order: bool = True


class FOMAML(MAML):
    """First-order MAML: the same recipes with ``first_order=True`` (``metalab train fomaml``)."""

    name = "fomaml"
    Config = FOMAMLConfig
    recipes = {
        name: FOMAMLConfig(**{**asdict(config), "first_order": True})
        for name, config in MAML.recipes.items()
    }
