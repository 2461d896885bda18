"""CNP, MR-CNP(A) and MR-CNP(W) — Yin, Tucker, Zhou, Levine & Finn, ICLR 2020, "Meta-learning
without memorization", on the non-mutually-exclusive (NME) sinusoid (the shared PAPERS.md §13).

A conditional neural process (Garnelo et al. 2018) encodes each context point, averages the codes
and decodes a target input with the average:

    r_i = h(x_i, y_i),   r = mean_i r_i,   z = W_z r,   y*_mean = g(z, x*)           # CNP

and is trained on the Gaussian log-likelihood of the target points. On NME tasks the input x
carries the task's identity (a one-hot of the amplitude index), so g can solve every training task
from x* alone and ignore z: the model *memorises* and fails on new tasks. Yin et al. put an
information bottleneck between x and the network, an encoder x -> w, and penalise it:

    (A) activations: w ~ q(w | x) = N(mu_w(x), sigma_w(x)^2), loss += beta KL(q(w | x) || N(0, I))
    (W) weights:     w = f_theta(x), theta ~ q(theta) = N(mu, sigma^2) (Bayes by backprop),
                     loss += beta KL(q(theta) || N(0, I))

with the context encoded as r_i = h(w_i, y_i) and the target decoded as g(z, w*) (the paper's
two "meta-regularizers" [U: its section and equation numbers were not checked]).

This file ports the official notebook (google-research ``meta_learning_without_memorization/
sinusoid/MR_CNP.ipynb``, read, not copied) [R]: its task sampling (one task per iteration, 20
points ``x ~ U[-5, 5]`` split at random into 10 context and 10 target points, amplitude index in
0..15), its networks (h: 100-100-dim_r ReLU, z: one linear layer to dim_z, g: 100-100-1 ReLU;
dim_r 10, dim_z 5, dim_w 5; the (A) encoder 100 ReLU -> (mu_w, softplus -> sigma_w); the (W)
encoder two ``tfp.layers.DenseReparameterization`` layers, 100 ReLU -> dim_w), its loss (the
negative log-likelihood of N(y*; g, 0.1^2) summed over the target points), Adam at 1e-3 built once,
its iterations (30,000; **120,000 for MR-CNP(W)**, which the notebook's (W) cell sets) and its test
(below). Choices, each marked [R] (the notebook or the TensorFlow / TFP code it calls), [U] or ours:

- Initialisation [R]: every plain dense layer is ``tf.layers.dense(..., kernel_initializer=
  'normal')``, Keras's ``RandomNormal``, std 0.05 in TF 1.x (its API docs), with zero biases;
  the BbB layers use TFP's defaults: kernel mean N(0, 0.1^2), untransformed scale N(-3, 0.1^2)
  (scale = softplus + float32 eps, about 0.05), a point-estimate bias N(0, 0.1^2), prior N(0, 1).
- The deterministic CNP [R]: despite its name ``z_sample`` the notebook's z is a linear map of r,
  no sampling; so the CNP prediction needs one pass, not the notebook's mean of 100 equal passes.
- (A)'s KL [R]: computed on the *context* points' q(w | x) only (the target points are encoded
  with fresh noise but not penalised), summed over the 5 dims and averaged over the points, with
  the notebook's 1e-16 added to the variance inside the log. beta = 5.0.
- (W)'s KL [R]: the closed form summed over both layers' kernels (the bias has no prior), added
  once per step: TFP's ``DenseReparameterization`` adds a layer's divergence on its first call
  only (read in TFP's current source; the 2019 release the notebook ran is [U]), though the
  notebook calls the encoder twice (context, then targets); each call samples fresh kernels
  (reparameterised, not local reparameterisation), as here. beta = 0.15.
- The context input of the plain CNP is ``[x, y, one-hot]``; of MR-CNP ``[w, y]``; the decoder's
  ``[z, x*]`` or ``[z, w*]`` [R, same order as the notebook].
- ``meta_batch`` tasks per step (the notebook: 1); the loss is averaged over them, each task with
  its own noise and its own BbB kernels (ours, for meta_batch > 1).
- Noise: training draws from torch's global RNG, which the trainer seeds and checkpoints;
  prediction draws from a generator seeded with ``config.seed`` on every call, so that it is a
  deterministic function of its inputs (ours).
- Adam: torch's (eps 1e-8 added to sqrt(v_hat)); TF1's adds it before the bias correction
  [U: the effect was not measured; the results below match the notebook's].

Test protocol [R] (:meth:`CNP.report`): tasks with an amplitude ``U[0.1, 4]`` (continuous) and a
random one-hot index in **5..15** (``random.randint(5, K_amp - 5)``, both ends included), 5 or 10
context points with noise std 0.1, the prediction the mean of 100 draws of the model at 100 points
``linspace(-5, 5)``, and the MSE to the noise-free curve. The notebook tests 100 tasks; we test 600
(our rule) with a 95% confidence interval. Notebook outputs (5 / 10 context points): CNP 0.967 /
0.819, MR-CNP(A) 0.043 / 0.035, MR-CNP(W) 0.066 / 0.055.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal

from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.nets.bayes import ActivationEncoder, BayesLinear, activation_kl
from metalab.nets.mlp import MLP
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.nme import NMESinusoidTasks

Noise = dict[str, torch.Tensor]
REGULARIZERS = ("none", "activation", "weights")
DATA = "nme-sinusoid"
TF_NORMAL_STD = 0.05  # Keras's RandomNormal ('normal') in TF 1.x
# The notebook's test tasks: one-hot index in 5..15, 100 points on [-5, 5], one noise draw (std
# 0.1) on the context targets (the keywords of NMESinusoidTasks.test_set).
TEST_SET = dict(indices=(5, 16), grid=(-5.0, 5.0), support_noise=0.1)
TEST_POINTS = 100
TEST_SHOTS = (5, 10)
# The notebook's outputs: MSE to the noise-free curve, by regularizer and context points.
NOTEBOOK = {
    ("none", 5): 0.967,
    ("none", 10): 0.819,
    ("activation", 5): 0.043,
    ("activation", 10): 0.035,
    ("weights", 5): 0.066,
    ("weights", 10): 0.055,
}


def tf_init(layer: nn.Linear) -> nn.Linear:
    """Initialise ``layer`` as the notebook's ``tf.layers.dense(kernel_initializer='normal')``:
    weights N(0, 0.05^2), zero bias."""
    nn.init.normal_(layer.weight, std=TF_NORMAL_STD)
    nn.init.zeros_(layer.bias)
    return layer


def tf_dense(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer initialised by :func:`tf_init`."""
    return tf_init(nn.Linear(n_in, n_out))


def tf_mlp(sizes: tuple[int, ...]) -> MLP:
    """:class:`~metalab.nets.mlp.MLP` of ``sizes`` with every layer as :func:`tf_dense`."""
    net = MLP(sizes)
    for layer in net.layers:
        if isinstance(layer, nn.Linear):
            tf_init(layer)
    return net


def gaussian_nll(mean: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """The notebook's ``neg_loglikelihood``: -log N(y; mean, scale^2) summed over a task's
    points, averaged over the tasks; ``mean``, ``y``: ``(T, Q, 1)``."""
    return -Normal(mean, scale).log_prob(y).sum((1, 2)).mean()


class BayesEncoder(nn.Module):
    """MR-CNP(W)'s encoder ``x -> w``: two :class:`BayesLinear` layers, ``hidden`` ReLU then
    ``dim_w`` linear (the notebook's ``encoder_w``, a Keras Sequential of two
    ``DenseReparameterization`` layers)."""

    def __init__(self, n_in: int, hidden: int, dim_w: int, scale_init: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [BayesLinear(n_in, hidden, scale_init), BayesLinear(hidden, dim_w, scale_init)]
        )

    def forward(self, x: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
        """``x (draws, n, n_in) -> w (draws, n, dim_w)`` with kernels from ``noise`` (one
        standard-normal tensor ``(draws, in, out)`` per layer)."""
        for i, (layer, eps) in enumerate(zip(self.layers, noise)):
            x = layer(x, layer.kernel(eps))
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x

    def kl(self) -> torch.Tensor:
        return sum(layer.kl() for layer in self.layers)


@dataclass
class CNPConfig(MethodConfig):
    """The notebook's CNP by default: NME sinusoids, one task of 10 context and 10 target
    points per step (Adam 1e-3), 30,000 steps, no validation."""

    data: str = DATA
    ways: int = 1
    shots: int = 10
    queries: int = 10
    eval_ways: int = 1
    eval_shots: int = 5
    eval_queries: int = TEST_POINTS
    episodes: int = 30_000
    val_every: int = 0
    regularizer: str = "none"  # none (plain CNP) | activation (MR-CNP A) | weights (MR-CNP W)
    beta: float = 0.0  # weight of the regularizer's KL (the notebook: 5.0 for A, 0.15 for W)
    hidden: int = 100  # units of each hidden layer of the encoders and the decoder
    dim_r: int = 10  # the context code r
    dim_z: int = 5  # z, a linear map of the mean code
    dim_w: int = 5  # the bottleneck w of MR-CNP
    noise_scale: float = 0.1  # std of the Gaussian likelihood of the targets (fixed)
    scale_init: float = -3.0  # MR-CNP(W): rho at initialisation, scale = softplus(rho)
    eval_samples: int = 100  # draws averaged into a prediction (the CNP itself needs one)


class CNP(Method):
    """A conditional neural process, plain (the memorising baseline) or with Yin et al.'s
    meta-regularizer on an encoder of the inputs: activations (A) or weights (W)."""

    name = "cnp"
    Config = CNPConfig
    recipes = {
        # The notebook's CNP: 30,000 iterations of one task (10 context + 10 target points).
        "nme-sinusoid": CNPConfig(),
        # MR-CNP(A): the activation bottleneck at beta = 5.0, 30,000 iterations.
        "nme-sinusoid-a": CNPConfig(regularizer="activation", beta=5.0),
        # MR-CNP(W): Bayes-by-backprop encoder at beta = 0.15; the notebook's (W) cell trains
        # 120,000 iterations.
        "nme-sinusoid-w": CNPConfig(regularizer="weights", beta=0.15, episodes=120_000),
    }
    task_batches = True  # the trainer hands meta_step a TaskBatch, even of one task
    answers = frozenset()  # no image protocols; `metalab eval` runs report()
    test_time = ("eval_samples",)

    def __init__(self, config: CNPConfig) -> None:
        super().__init__(config)
        c = config
        _check(c)
        n_in = NMESinusoidTasks.input_dim  # [x, one-hot of the amplitude index]
        if c.regularizer == "none":
            context_in, target_in = n_in + 1, n_in
        else:
            context_in, target_in = c.dim_w + 1, c.dim_w
        if c.regularizer == "activation":
            self.encoder_w: nn.Module = ActivationEncoder(n_in, c.hidden, c.dim_w)
            for layer in (self.encoder_w.hidden, self.encoder_w.mu, self.encoder_w.sigma):
                tf_init(layer)
        elif c.regularizer == "weights":
            self.encoder_w = BayesEncoder(n_in, c.hidden, c.dim_w, c.scale_init)
        self.encoder_r = tf_mlp((context_in, c.hidden, c.hidden, c.dim_r))
        self.to_z = tf_dense(c.dim_r, c.dim_z)
        self.decoder = tf_mlp((c.dim_z + target_in, c.hidden, c.hidden, 1))

    @classmethod
    def task_sampler(cls, config: CNPConfig, part: str, data_root=None) -> NMESinusoidTasks | None:
        """NME sinusoid tasks drawn on the fly for training (index 0..15, ``shots`` context and
        ``queries`` target points); no validation, as the notebook."""
        if part != "train":
            return None
        return NMESinusoidTasks(config.shots, config.queries, seed=config.seed)

    # -- the model ------------------------------------------------------------------------------
    def draw_noise(
        self, tasks: int, context: int, targets: int, generator: torch.Generator | None = None
    ) -> Noise:
        """Standard-normal noise for one pass over ``tasks`` tasks: (A) ``context`` ``(T, K,
        dim_w)`` and ``target`` ``(T, Q, dim_w)``; (W) one kernel's noise per layer for the
        context pass and one for the target pass, ``(T, in, out)``; none for the CNP.
        ``generator``: None draws from torch's global RNG."""
        device = self.to_z.weight.device
        dtype = self.to_z.weight.dtype

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, dtype=dtype, device="cpu").to(device)

        c = self.config
        if c.regularizer == "activation":
            return {
                "context": normal(tasks, context, c.dim_w),
                "target": normal(tasks, targets, c.dim_w),
            }
        if c.regularizer == "weights":
            return {
                f"{part}.{i}": normal(tasks, *layer.loc.shape)
                for part in ("context", "target")
                for i, layer in enumerate(self.encoder_w.layers)
            }
        return {}

    def forward(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        noise: Noise,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over a batch of tasks: the decoder's mean ``(T, Q, 1)`` and the
        regularizer's KL (``()``; 0 for the CNP) for ``noise`` from :meth:`draw_noise`.

        Args:
            support_x: context inputs ``(T, K, 21)``; support_y: ``(T, K, 1)``.
            query_x: target inputs ``(T, Q, 21)``.
        """
        c = self.config
        if c.regularizer == "activation":
            mu, sigma = self.encoder_w(support_x)
            context = torch.cat([mu + sigma * noise["context"], support_y], -1)  # [w, y]
            mu_t, sigma_t = self.encoder_w(query_x)
            target = mu_t + sigma_t * noise["target"]  # w*
            kl = activation_kl(mu, sigma)  # the context points' q(w | x), as the notebook
        elif c.regularizer == "weights":
            layers = range(len(self.encoder_w.layers))
            w = self.encoder_w(support_x, [noise[f"context.{i}"] for i in layers])
            context = torch.cat([w, support_y], -1)
            target = self.encoder_w(query_x, [noise[f"target.{i}"] for i in layers])
            kl = self.encoder_w.kl()
        else:
            x, onehot = support_x[..., :1], support_x[..., 1:]
            context = torch.cat([x, support_y, onehot], -1)  # [x, y, one-hot]
            target = query_x
            kl = support_x.new_zeros(())
        r = self.encoder_r(context).mean(1)  # r = mean_i h(., y_i): (T, dim_r)
        z = self.to_z(r)[:, None].expand(-1, target.shape[1], -1)  # (T, Q, dim_z)
        return self.decoder(torch.cat([z, target], -1)), kl

    # -- training -------------------------------------------------------------------------------
    def meta_loss(self, batch: TaskBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """The notebook's loss: the targets' negative log-likelihood (summed over a task's
        points, averaged over the tasks) plus ``beta`` times the KL; metrics ``nll``, ``kl``
        and the targets' ``mse``."""
        c = self.config
        noise = self.draw_noise(batch.tasks, batch.support_x.shape[1], batch.query_x.shape[1])
        mean, kl = self(batch.support_x, batch.support_y, batch.query_x, noise)
        nll = gaussian_nll(mean, batch.query_y, c.noise_scale)
        mse = (mean - batch.query_y).square().mean()
        return nll + c.beta * kl, {"nll": nll.item(), "kl": kl.item(), "mse": mse.item()}

    # -- prediction -----------------------------------------------------------------------------
    @property
    def draws(self) -> int:
        """Passes averaged into a prediction: ``eval_samples``, or 1 for the deterministic CNP."""
        return 1 if self.config.regularizer == "none" else self.config.eval_samples

    @torch.no_grad()
    def predict_tasks(self, batch: TaskBatch) -> torch.Tensor:
        """The mean of :attr:`draws` passes (the notebook's prediction) for every task of
        ``batch``: ``(T, Q, 1)``; noise from a generator seeded with ``config.seed`` afresh."""
        batch = batch.to(self.to_z.weight.device)
        generator = torch.Generator().manual_seed(self.config.seed)
        shape = (batch.tasks, batch.support_x.shape[1], batch.query_x.shape[1])
        total = 0.0
        for _ in range(self.draws):
            noise = self.draw_noise(*shape, generator=generator)
            total = total + self(batch.support_x, batch.support_y, batch.query_x, noise)[0]
        return total / self.draws

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """One task's prediction ``(Q, 1)`` (see :meth:`predict_tasks`)."""
        unused_y = query_x.new_zeros(1, query_x.shape[0], 1)
        batch = TaskBatch(support_x[None], support_y[None], query_x[None], unused_y)
        return self.predict_tasks(batch)[0]

    def protocol(self) -> dict:
        return {"prediction": f"mean of {self.draws} draw{'s' * (self.draws > 1)}"}

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval`: the notebook's test on ``episodes`` (default 600) fixed tasks with 5
        and 10 context points (:func:`metalab.evaluate.memorization.evaluate_nme_sinusoid`),
        a table beside the notebook's numbers, ``eval.json`` and ``nme_fits.png``."""
        from metalab.evaluate.memorization import evaluate_nme_sinusoid, report_nme
        from metalab.evaluate.protocol import EVAL_SEED
        from metalab.plots import plot_nme_fits

        tasks = 600 if episodes is None else episodes
        self.to(device)
        results = []
        for shots in TEST_SHOTS:
            protocol = {**self.protocol(), "indices": "5..15"}
            results += evaluate_nme_sinusoid(
                self.predict_tasks, protocol, tasks, shots, TEST_POINTS, EVAL_SEED, **TEST_SET
            )
        notebook = " / ".join(f"{NOTEBOOK[(self.config.regularizer, k)]}" for k in TEST_SHOTS)
        title = f"{self.name} — {Path(run_dir).name} (the notebook, noise-free MSE: {notebook})"
        report_nme(self, run_dir, results, title)
        batch, info = NMESinusoidTasks.test_set(
            4, TEST_SHOTS[0], TEST_POINTS, EVAL_SEED, **TEST_SET
        )
        label = {"none": "CNP", "activation": "MR-CNP(A)", "weights": "MR-CNP(W)"}
        prediction = self.predict_tasks(batch).cpu().numpy()
        plot_nme_fits(
            Path(run_dir) / "nme_fits.png",
            batch,
            info,
            {label[self.config.regularizer]: prediction},
        )
        return True


def _check(c: CNPConfig) -> None:
    """Settings a user can get wrong, as one-line errors."""
    if c.data != DATA:
        raise ConfigError(f"cnp trains on the NME sinusoid, not --data {c.data!r}: use {DATA}")
    if c.regularizer not in REGULARIZERS:
        raise ConfigError(f"--regularizer {c.regularizer!r}: use one of {', '.join(REGULARIZERS)}")
    if c.beta < 0 or not c.noise_scale > 0:
        raise ConfigError(
            f"beta={c.beta}, noise_scale={c.noise_scale}: use beta >= 0 and noise_scale > 0"
        )
    sizes = {"hidden": c.hidden, "dim_r": c.dim_r, "dim_z": c.dim_z, "dim_w": c.dim_w}
    small = {k: v for k, v in sizes.items() if v < 1}
    if small or c.eval_samples < 1:
        raise ConfigError(f"{small or {'eval_samples': c.eval_samples}}: use 1 or more")
