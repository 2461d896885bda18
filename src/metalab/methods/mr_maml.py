"""MR-MAML — Yin, Tucker, Zhou, Levine & Finn, ICLR 2020, "Meta-learning without memorization".

When the training tasks are not mutually exclusive (:mod:`metalab.tasks.nme`), MAML can solve
them all from the query input alone and ignore the support set ("memorisation"); it then fails on
new tasks. MR-MAML splits the network into an encoder x -> z that is NOT adapted in the inner loop
and a head that is, and regularises what the encoder can carry:

    z = e_phi(x),  theta'_i = theta - alpha grad_theta L(f_theta(z^s), y^s)       # Eq. 1 (head)
    head:     min_theta  L(f_theta'_i(z*), y*)                                    # Sec. 4
    encoder:  min_phi    L(f_theta'_i(z*), y*) + beta KL(q(z* | x*, phi) || N(0, I))   # Eq. 3 (A)
          or  min_phi    L(f_theta'_i(z*), y*) + beta KL(q(phi | mu, sigma) || N(0, I)) # Eq. 5 (W)

(A), the activation bottleneck: the encoder outputs a Gaussian over z (mean and softplus std) and
z is sampled by reparameterisation; (W), the weight bottleneck: the encoder's weights are
Bayes-by-backprop Gaussians (mean-field, prior N(0, 1)) sampled at every call. Neither KL depends
on the head, so one objective gives the head the query loss only and the encoder the query loss
plus beta KL, as the paper's two optimisers do. ``regularizer="none"`` is plain MAML on the same
tasks (the encoder is the identity on sinusoids).

Faithful to the official sinusoid notebook (google-research
``meta_learning_without_memorization/sinusoid/MR_MAML.ipynb``, read for this port [R]; the shared
PAPERS.md §13):
- head 40-40-1 ReLU; (A) encoder Dense 80 ReLU -> mean and softplus std of a 5-d z, KL averaged
  over points and dimensions, beta = 5, 10,000 iterations; (W) encoder of two Bayes layers (100
  ReLU, 5; :mod:`metalab.nets.bayes`, TFP's defaults) with rho ~ N(-50, 0.1^2), so the weights'
  std is TFP's floor, float32 eps (1.2e-7), and stays there (the KL's pull on rho is ~1e-15): the
  weight bottleneck acts through the KL's loc^2 / 2 term, a decay of the encoder's weights; KL
  summed over the kernels, beta = 5e-5, 15,000 iterations; MAML 15,000 iterations; one task per iteration, one inner SGD step at
  0.01, 10 support and 10 query points; Keras initialisation (Glorot-uniform kernels, zero biases).
- **The optimiser quirk**: the notebook builds a NEW Keras Adam for the encoder (A), or for encoder
  and head together (W), at every iteration, so each of those steps is Adam's first,
  lr * g / (|g| + eps): a step of about lr * sign(g) per weight, however small the gradient; a
  tiny KL gradient then moves a weight as far as a large data gradient. ``optimizer="notebook"``
  reproduces it (:class:`FreshAdam`, with Keras's epsilon), ``"adam"`` keeps one Adam throughout.
- Test (:meth:`MRMAML.report`): 100 SGD steps at 0.01 on the head from 5 support points; the
  notebook feeds the head the encoder's mean for (A) (``_, w, _ = encoder(x)``) and a fresh weight
  sample for (W), whose std is 1.2e-7 (above), i.e. the mean: we use the means for both (zero
  noise), so testing is deterministic.

Images (NME Omniglot; the paper's architecture is not released [U]): ours is Finn's Conv4 with the
first ``encoder_blocks`` blocks as the non-adapted encoder (Bayes convolutions for (W)) and the
remaining blocks and the linear layer as the adapted head; (A) is not offered for images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from metalab.errors import ConfigError
from metalab.functional import Params, adapt, write_grads
from metalab.methods.base import Method, MethodConfig
from metalab.nets.bayes import ActivationEncoder, BayesConv2d, BayesLinear, activation_kl
from metalab.nets.conv4 import conv_block
from metalab.nets.mlp import MLP
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.nme import NMESinusoidTasks, RotatedGlyphTasks

REGULARIZERS = ("none", "activation", "weights")
# The notebook's meta-test MSE (noisy targets, 100 steps, 100 tasks) per regularizer [R].
NOTEBOOK = {"none": 0.515, "activation": 0.150, "weights": 0.162}
GLYPHS = "rotated-glyphs"  # tasks.nme.RotatedGlyphTasks: our substitute for the pose task
KERAS_EPS = 1e-7  # Keras Adam's epsilon, added to sqrt(v) before bias correction
IMAGES = {"omniglot": 1, "mnist": 1, "rotated-glyphs": 1}  # image data and their channels


@dataclass
class MRMAMLConfig(MethodConfig):
    regularizer: str = "weights"  # none | activation | weights
    beta: float = 5e-5  # weight of the KL term (the notebook: 5 for activation, 5e-5 for weights)
    dim_w: int = 5  # width of the encoder's output z (the head's input)
    encoder_hidden: int = 100  # hidden units of the sinusoid encoder (notebook: A 80, W 100)
    scale_init: float = -50.0  # (W) initial rho of the weights' std softplus(rho)
    encoder_blocks: int = 3  # images: conv blocks in the encoder (0: none, MAML); the rest adapt
    hidden: int = 40  # head: MLP units (sinusoid) or conv filters (images)
    inner_steps: int = 1  # inner SGD steps on the head in meta-training
    inner_lr: float = 0.01  # alpha
    eval_inner_steps: int = 100  # steps at test (the notebook: 100)
    eval_inner_lr: float = 0.0  # alpha at test; 0 = inner_lr
    optimizer: str = "notebook"  # notebook | adam: notebook = a new Adam every iteration, as [R]


_NME = dict(
    data="nme-sinusoid",
    ways=1,
    eval_ways=1,
    shots=10,
    queries=10,
    eval_shots=5,
    eval_queries=200,
    meta_batch=1,
    lr=1e-3,
    val_every=0,
    hidden=40,
    inner_steps=1,
    inner_lr=0.01,
    eval_inner_steps=100,
    eval_inner_lr=0.01,
)
# NME Omniglot, 20-way 1-shot (Yin et al. Sec. 6.2 [U: architecture, beta, schedule]). Ours: Finn's
# Conv4 (64 filters, stride 2), blocks 1-3 the encoder, block 4 and the linear layer adapted with 5
# steps at 0.1 (Finn's 20-way step), meta-batch 8, Adam 1e-3, std init softplus(-3) (the CNP
# code's) so that the weight noise is real from the start, beta = 1e-3 (the pose code's); a CPU
# budget. Validation and test episodes are the usual shuffled ones on new classes.
_NME_OMNIGLOT = dict(
    data="omniglot",
    split="vinyals",
    nme_episodes=True,
    ways=20,
    eval_ways=20,
    shots=1,
    queries=1,
    eval_shots=1,
    eval_queries=5,
    meta_batch=8,
    hidden=64,
    inner_steps=5,
    inner_lr=0.1,
    eval_inner_steps=5,
    lr=1e-3,
    episodes=3000,
    val_every=500,
    val_episodes=100,
    optimizer="adam",
    scale_init=-3.0,
    beta=1e-3,
)


# Rotated-glyph regression, OUR SUBSTITUTE for the pose task (tasks.nme.RotatedGlyphTasks; no
# paper number applies). The pose code's MR-MAML(W) settings where they carry over [R]: 15
# support and 15 query points, meta-batch 10, 5 inner steps (20 at test), beta = 1e-3; ours: 28x28
# images, Finn's Conv4 with 32 filters, blocks 1-3 the encoder, inner lr 0.01 and Adam 1e-3 (the
# code's 0.002 for both is for its 128x128 renders and 30k iterations), a CPU budget.
_GLYPHS = dict(
    data=GLYPHS,
    split="vinyals",
    ways=1,
    eval_ways=1,
    shots=15,
    queries=15,
    eval_shots=15,
    eval_queries=15,
    meta_batch=10,
    hidden=32,
    inner_steps=5,
    inner_lr=0.01,
    eval_inner_steps=20,
    lr=1e-3,
    episodes=3000,
    val_every=0,
    optimizer="adam",
    scale_init=-3.0,
    beta=1e-3,
)


class FreshAdam(torch.optim.Adam):
    """Adam whose parameter groups with ``fresh=True`` forget their moments before every step,
    as a Keras Adam built anew each iteration does (the MR-MAML notebook): each step is then Adam's
    first, ``lr * g / (|g| + eps)``. Groups without the flag are plain Adam."""

    def step(self, closure=None):
        for group in self.param_groups:
            if group.get("fresh"):
                for p in group["params"]:
                    self.state.pop(p, None)
        return super().step(closure)


class IdentityEncoder(nn.Module):
    """MAML: the head sees the input itself."""

    bayes: list = []

    def forward(self, x: torch.Tensor, noise) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.new_zeros(())


class ActivationBottleneck(nn.Module):
    """(A): x -> h (ReLU) -> z ~ N(mu(h), softplus(s(h))^2); the KL to N(0, I) of the query
    points' z, averaged over points and dimensions (the notebook's ``kl_qp_gaussian``)."""

    bayes: list = []

    def __init__(self, n_in: int, hidden: int, dim_w: int) -> None:
        super().__init__()
        self.net = _keras_init(ActivationEncoder(n_in, hidden, dim_w))

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sigma = self.net(x)
        return mu + sigma * eps, activation_kl(mu, sigma, dims="mean")  # Eq. 3


class WeightEncoder(nn.Module):
    """(W) for vectors: two Bayes layers (``hidden`` ReLU units, then ``dim_w``)."""

    def __init__(self, n_in: int, hidden: int, dim_w: int, scale_init: float) -> None:
        super().__init__()
        self.first = BayesLinear(n_in, hidden, scale_init)
        self.second = BayesLinear(hidden, dim_w, scale_init)
        self.bayes = [self.first, self.second]

    def forward(
        self, x: torch.Tensor, eps: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.first(x, self.first.kernel(eps[0])))
        return self.second(h, self.second.kernel(eps[1])), x.new_zeros(())


class ConvEncoder(nn.Module):
    """Images: ``blocks`` of Finn's stride-2 conv blocks (Bayes convolutions for (W)) with batch
    norm on batch statistics and ReLU; not adapted in the inner loop."""

    def __init__(self, channels: int, hidden: int, blocks: int, bayes: bool, scale_init: float):
        super().__init__()
        self.convs = nn.ModuleList(
            BayesConv2d(channels if i == 0 else hidden, hidden, scale_init)
            if bayes
            else nn.Conv2d(channels if i == 0 else hidden, hidden, 3, stride=2, padding=1)
            for i in range(blocks)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden) for _ in range(blocks))
        replace_all_batch_norm_modules_(self)
        self.bayes = list(self.convs) if bayes else []

    def forward(
        self, x: torch.Tensor, eps: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = conv(x, conv.kernel(eps[i])) if self.bayes else conv(x)
            x = F.relu(norm(x))
        return x, x.new_zeros(())


class ConvHead(nn.Module):
    """Images: the remaining conv blocks, the mean over positions and a linear layer to ``out``
    logits (or one regression output)."""

    def __init__(self, channels: int, hidden: int, blocks: int, out: int) -> None:
        super().__init__()
        self.blocks = replace_all_batch_norm_modules_(
            nn.Sequential(
                *(
                    conv_block(channels if i == 0 else hidden, hidden, "stride")
                    for i in range(blocks)
                )
            )
        )
        self.out = nn.Linear(hidden, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(z).mean((2, 3)))


def _keras_init(module: nn.Module) -> nn.Module:
    """Glorot-uniform kernels and zero biases for the dense layers (Keras's defaults)."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return module


def part(params: Params, prefix: str) -> Params:
    """The entries of ``params`` named ``prefix.*``, without the prefix (a sub-module's names)."""
    return {k[len(prefix) + 1 :]: v for k, v in params.items() if k.startswith(prefix + ".")}


def task_loss(
    method: MRMAML,
    steps: int,
    lr: float,
    params: Params,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    noise: tuple,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One task's objective: the query loss after ``steps`` inner steps on the head, plus, for
    (A), beta times the KL of the query points' z (the encoder's share of Eq. 3; it does not
    depend on the head). ``noise``: ``(support noise, query noise)`` for the encoder."""
    encoder, head = part(params, "encoder"), part(params, "head")
    z_support, _ = functional_call(method.encoder, encoder, (support[0], noise[0]))
    z_query, kl = functional_call(method.encoder, encoder, (query[0], noise[1]))
    inner = lambda h, z, y: method.head_loss(h, z, y)[0]  # noqa: E731
    adapted = adapt(head, inner, (z_support, support[1]), steps, lr)  # Eq. 1, the head only
    loss, metrics = method.head_loss(adapted, z_query, query[1])
    beta = method.config.beta if method.config.regularizer == "activation" else 0.0
    return loss + beta * kl, {**metrics, "query_loss": loss, "kl": kl}


class MRMAML(Method):
    """MAML with a non-adapted, meta-regularised encoder (Yin et al. 2020); see the module
    docstring. Regression on the NME sinusoid (``data="nme-sinusoid"``) or few-shot images."""

    name = "mr-maml"
    Config = MRMAMLConfig
    recipes = {
        # The notebook's three models on the NME sinusoid (MSE 0.515, 0.150, 0.162 [R]).
        "nme-sinusoid": MRMAMLConfig(**_NME, regularizer="none", episodes=15_000),
        "nme-sinusoid-a": MRMAMLConfig(
            **_NME, regularizer="activation", beta=5.0, encoder_hidden=80, episodes=10_000
        ),
        "nme-sinusoid-w": MRMAMLConfig(**_NME, regularizer="weights", beta=5e-5, episodes=15_000),
        "nme-omniglot-20w1s": MRMAMLConfig(**_NME_OMNIGLOT, regularizer="weights"),
        # The same network and schedule without the regulariser (the encoder deterministic).
        "nme-omniglot-20w1s-none": MRMAMLConfig(**_NME_OMNIGLOT, regularizer="none"),
        "rotated-glyphs": MRMAMLConfig(**_GLYPHS, regularizer="weights"),
        # The same network without the regulariser (deterministic encoder, head adapted).
        "rotated-glyphs-none": MRMAMLConfig(**_GLYPHS, regularizer="none"),
        # MAML on the same tasks: no encoder, every block adapted (about 4x the step time).
        "rotated-glyphs-maml": MRMAMLConfig(**_GLYPHS, regularizer="none", encoder_blocks=0),
    }
    task_batches = True
    test_time = ("eval_inner_steps", "eval_inner_lr")

    @classmethod
    def task_sampler(cls, config: MRMAMLConfig, part: str, data_root=None):
        """NME sinusoid tasks for training (no validation, as the notebook), rotated-glyph tasks
        of the training characters; None for image episodes."""
        if config.data == GLYPHS and part == "train":
            from metalab.data.datasets import load_dataset

            data = load_dataset(
                "omniglot", config.split, config.train_part, config.image_size, data_root
            )
            return RotatedGlyphTasks(data, config.shots, config.queries, seed=config.seed)
        if config.data != "nme-sinusoid":
            return None
        return (
            NMESinusoidTasks(config.shots, config.queries, seed=config.seed)
            if part == "train"
            else None
        )

    def __init__(self, config: MRMAMLConfig) -> None:
        super().__init__(config)
        c = config
        if c.regularizer not in REGULARIZERS:
            raise ConfigError(
                f"regularizer={c.regularizer!r}: use one of {', '.join(REGULARIZERS)}"
            )
        if c.optimizer not in ("notebook", "adam"):
            raise ConfigError(f"optimizer={c.optimizer!r}: use notebook or adam")
        self.regression = c.data in ("nme-sinusoid", GLYPHS)
        if c.data == "nme-sinusoid":
            n_in = NMESinusoidTasks.input_dim
            if c.regularizer == "none":
                self.encoder: nn.Module = IdentityEncoder()
            elif c.regularizer == "activation":
                self.encoder = ActivationBottleneck(n_in, c.encoder_hidden, c.dim_w)
            else:
                self.encoder = WeightEncoder(n_in, c.encoder_hidden, c.dim_w, c.scale_init)
            width = n_in if c.regularizer == "none" else c.dim_w
            self.head: nn.Module = _keras_init(MLP((width, c.hidden, c.hidden, 1)))
        else:
            if c.data not in IMAGES:
                raise ConfigError(
                    f"data={c.data!r}: MR-MAML knows nme-sinusoid and the images {sorted(IMAGES)}"
                )
            if c.regularizer == "activation":
                raise ConfigError(
                    "regularizer=activation is for the sinusoid here (the paper's image "
                    "experiments use weights): use --regularizer weights or none"
                )
            low = 0 if c.regularizer == "none" else 1
            if not low <= c.encoder_blocks <= 3:
                raise ConfigError(
                    f"encoder_blocks={c.encoder_blocks}: use {low}..3 (0, MAML adapting every "
                    "block, only with --regularizer none)"
                )
            self.encoder = ConvEncoder(
                IMAGES[c.data], c.hidden, c.encoder_blocks, c.regularizer == "weights",
                c.scale_init,
            )  # fmt: skip
            channels = c.hidden if c.encoder_blocks else IMAGES[c.data]
            out = 1 if self.regression else c.ways
            self.head = ConvHead(channels, c.hidden, 4 - c.encoder_blocks, out)

    # -- pieces ---------------------------------------------------------------------------------
    def head_loss(
        self, head: Params, z: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The head's loss with parameters ``head`` (the head module's names) on features ``z``."""
        out = functional_call(self.head, head, (z,))
        if self.regression:
            return F.mse_loss(out, y), {}
        acc = (out.argmax(-1) == y).to(out.dtype).mean()
        return F.cross_entropy(out, y), {"acc": acc}

    def noise(self, tasks: int, points: int, zero: bool = False) -> object:
        """The encoder's noise for ``tasks`` tasks of ``points`` inputs each: (A) one eps per
        point and dimension of z, (W) one per kernel entry (a weight sample per call), none:
        an empty tensor. ``zero``: the means (testing)."""
        draw = torch.zeros if zero else torch.randn
        ref = next(self.parameters())
        kw = dict(dtype=ref.dtype, device=ref.device)
        if isinstance(self.encoder, ActivationBottleneck):
            return draw(tasks, points, self.config.dim_w, **kw)
        bayes = getattr(self.encoder, "bayes", [])
        if bayes:
            return [draw(tasks, *layer.loc.shape, **kw) for layer in bayes]
        return torch.zeros(tasks, 0, **kw)

    def params(self) -> Params:
        return dict(self.named_parameters())

    # -- training -------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Adam at ``lr``; with ``optimizer="notebook"`` the encoder's moments (A), or every
        moment (W), are forgotten before each step (:class:`FreshAdam`, Keras's epsilon)."""
        c = self.config
        fresh_encoder = c.optimizer == "notebook" and c.regularizer != "none"
        fresh_head = c.optimizer == "notebook" and c.regularizer == "weights"
        eps = KERAS_EPS / math.sqrt(1 - 0.999)  # Keras's eps, as it acts on Adam's first step
        groups = [
            {"params": list(self.encoder.parameters()), "fresh": fresh_encoder},
            {"params": list(self.head.parameters()), "fresh": fresh_head},
        ]
        for g in groups:
            g["eps"] = eps if g["fresh"] else 1e-8
        return FreshAdam([g for g in groups if g["params"]], lr=c.lr)

    def meta_step(self, batch: TaskBatch) -> tuple[float, dict[str, float]]:
        """Per-task gradients of :func:`task_loss` inside a vmap (never a gradient through a
        vmapped loss, see metalab.functional.inner), averaged and written into ``.grad``; then
        (W) beta times the gradient of the weights' KL."""
        c = self.config
        params = {k: p.detach() for k, p in self.params().items()}
        noise = (
            self.noise(batch.tasks, batch.support_x.shape[1]),
            self.noise(batch.tasks, batch.query_x.shape[1]),
        )
        one = partial(task_loss, self, c.inner_steps, c.inner_lr)
        grads, (losses, metrics) = vmap(grad_and_value(one, has_aux=True), in_dims=(None, 0, 0, 0))(
            params, (batch.support_x, batch.support_y), (batch.query_x, batch.query_y), noise
        )
        write_grads(self.params(), {k: g.mean(0) for k, g in grads.items()})
        loss = losses.mean().item()
        if c.regularizer == "weights":
            kl = sum(layer.kl() for layer in self.encoder.bayes)  # Eq. 5
            (c.beta * kl).backward()
            loss += c.beta * kl.item()
        return loss, {k: v.mean().item() for k, v in metrics.items()}

    # -- prediction -----------------------------------------------------------------------------
    def adapt_head(
        self, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, lr: float
    ) -> Params:
        """The head after ``steps`` SGD steps on one task's support set, on the encoder's mean."""
        z, _ = self.encoder(support_x, self._zero(support_x))
        head = {k: v.detach() for k, v in self.head.named_parameters()}
        inner = lambda h, zz, y: self.head_loss(h, zz, y)[0]  # noqa: E731
        with torch.enable_grad():
            return adapt(head, inner, (z.detach(), support_y), steps, lr)

    def _zero(self, x: torch.Tensor):
        noise = self.noise(1, x.shape[0], zero=True)
        return noise[0] if isinstance(noise, torch.Tensor) else [n[0] for n in noise]

    def answer(
        self, support_x, support_y, query_x, steps: int | None = None, lr: float | None = None
    ) -> torch.Tensor:
        """Outputs for the queries of one task after ``steps`` (default ``eval_inner_steps``)
        steps on the head at ``lr`` (default ``eval_inner_lr`` or ``inner_lr``)."""
        c = self.config
        steps = c.eval_inner_steps if steps is None else steps
        lr = (c.eval_inner_lr or c.inner_lr) if lr is None else lr
        head = self.adapt_head(support_x, support_y, steps, lr)
        z, _ = self.encoder(query_x, self._zero(query_x))
        return functional_call(self.head, head, (z,))

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        if not self.regression and int(support_y.max()) + 1 != self.config.ways:
            raise ConfigError(
                f"this MR-MAML model has a {self.config.ways}-way head; it cannot answer "
                f"{int(support_y.max()) + 1}-way episodes (train one with --ways)"
            )
        return self.answer(support_x, support_y, query_x)

    def supports_ways(self, ways: int) -> bool:
        return not self.regression and ways == self.config.ways

    @property
    def transductive(self) -> bool:
        """Batch norm on the statistics of the batch at hand (images), as MAML's."""
        return self.config.data != "nme-sinusoid"

    def protocol(self) -> dict:
        c = self.config
        return {"inner_steps": c.eval_inner_steps, "inner_lr": c.eval_inner_lr or c.inner_lr}

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval` of an NME sinusoid run: the notebook's test (5 support points, MSE on
        200 grid points after 0, 1, 5 and ``eval_inner_steps`` head steps) on ``episodes``
        (default 600) fixed tasks, and a figure of fits; images: the standard protocols."""
        if self.config.data == GLYPHS:
            from metalab.evaluate.memorization import report_glyphs

            report_glyphs(self, run_dir, episodes=episodes, device=device, data_root=data_root)
            return True
        if not self.regression:
            return False
        from metalab.evaluate.memorization import evaluate_nme_sinusoid, report_nme
        from metalab.evaluate.protocol import EVAL_SEED

        c = self.config
        lr = c.eval_inner_lr or c.inner_lr
        self.to(device)
        results = []

        def predict_all(batch: TaskBatch, steps: int) -> torch.Tensor:
            b = batch.to(device)
            return torch.stack(
                [
                    self.answer(b.support_x[t], b.support_y[t], b.query_x[t], steps, lr)
                    for t in range(b.tasks)
                ]
            )

        for steps in sorted({0, 1, 5, c.eval_inner_steps}):
            results += evaluate_nme_sinusoid(
                partial(predict_all, steps=steps),
                {"steps": steps, "inner_lr": lr},
                tasks=600 if episodes is None else episodes,
                shots=c.eval_shots,
            )
        notebook = {"steps": c.eval_inner_steps, "inner_lr": lr, "tasks": "the notebook's"}
        results += evaluate_nme_sinusoid(
            partial(predict_all, steps=c.eval_inner_steps), notebook, tasks=100, notebook=True
        )
        title = f"{self.name} — {Path(run_dir).name} (the notebook: {NOTEBOOK[c.regularizer]})"
        report_nme(self, run_dir, results, title)
        from metalab.plots import plot_nme_fits
        from metalab.tasks.nme import NMESinusoidTasks as Tasks

        batch, info = Tasks.test_set(4, c.eval_shots, 200, EVAL_SEED)
        fits = {
            f"{c.eval_inner_steps} steps": predict_all(batch, c.eval_inner_steps)
            .detach()
            .cpu()
            .numpy()
        }
        plot_nme_fits(Path(run_dir) / "nme_fits.png", batch, info, fits)
        return True
