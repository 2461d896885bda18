"""Learning to learn by gradient descent by gradient descent — Andrychowicz et al., NIPS 2016.

A coordinatewise LSTM m with parameters phi proposes each optimizee step from the gradient:

    g_t, h_{t+1} = m(grad f(theta_t), h_t, phi)          # one small LSTM, one state per coordinate
    theta_{t+1}  = theta_t + g_t                         # Eq. 1
    L(phi)       = E_f [ sum_{t=1..T} w_t f(theta_t) ]   # Eq. 2, w_t = 1

Every coordinate of theta is a row of one batch through the same 2-layer, 20-unit LSTM (Sec. 2.1).
The gradient is an input, not a function of phi: it is computed without ``create_graph`` and
detached, so no second derivatives are taken (the paper's assumption d grad_t / d phi = 0).
phi is trained with Adam by truncated BPTT: a trajectory of 100 steps is cut into unrolls of 20;
theta and the LSTM state carry over from one unroll to the next, detached at the boundary.
Validation on fresh problems picks ``best.pt`` (early stopping).

Trainer contract: one trainer "episode" is ONE unroll (20 optimizee steps), so a 100-step
trajectory is 5 episodes; ``--episodes`` and ``--val-every`` count unrolls. A resumed run restarts
the trajectory it was in (the optimizee state is not checkpointed; see ProblemSampler.set_state).

Paper-vs-code choices. The paper's appendix preprocesses each gradient as

    grad -> (log|grad| / p, sgn grad)   if |grad| >= e^-p,   else (-1, e^p grad),   p = 10;

the released code uses the same map (as clamps, the same formula) with k = 5, and scales the LSTM
output by 0.01, for MNIST; on quadratics it uses neither (raw gradient in, raw step out), as the
paper also says. Our ``mnist`` recipe takes the PAPER's p = 10 with the code's 0.01 scale, because
we measured that k = 5 does not learn: the first-layer gradients of the N(0, 0.01)-initialised
sigmoid MLP are ~1e-4, which k = 5 maps to (-1, ~0.01) -- nearly the same input for every
coordinate -- and 950 unrolls left the final loss at ln 10; with p = 10 the sign feature saturates
and 50 unrolls already reach 0.4-0.9 (benchmarks/RESULTS.md). ``mnist-k5`` is the code's constant.
The evaluation -- loss curves on fixed test problems against SGD, RMSprop, Adam and NAG with
learning rates tuned on validation problems -- is :mod:`metalab.evaluate.optimization`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from metalab.errors import ConfigError
from metalab.functional.preprocess import log_sign
from metalab.methods.base import Method, MethodConfig
from metalab.tasks.optimization import Problems, ProblemSampler, Unroll, get_family, trajectory


@dataclass
class L2OConfig(MethodConfig):
    data: str = "quadratic"  # problem family: quadratic | mnist
    hidden_size: int = 20  # LSTM units per layer
    layers: int = 2
    preprocess: str = "none"  # none | log_sign (paper appendix A, official code "LogAndSign")
    preprocess_k: float = 10.0  # p of log_sign (the paper; the official code has k = 5)
    output_scale: float = 1.0  # g_t = output_scale * LSTM output (official code: 0.01 on MNIST)
    unroll: int = 20  # truncated BPTT: optimizee steps per meta-gradient (= per trainer episode)
    problems_per_draw: int = 128  # problems optimised together in one trajectory


RECIPES = {
    "quadratic": L2OConfig(
        data="quadratic",
        problems_per_draw=128,  # official code: a batch of 128 quadratics
        episodes=50_000,  # 10,000 epochs x 5 unrolls (official code)
        lr=1e-3,
        val_every=500,
        val_episodes=256,  # fresh validation quadratics
    ),
    "mnist": L2OConfig(
        data="mnist",
        problems_per_draw=1,
        preprocess="log_sign",
        preprocess_k=10.0,  # the paper's p (the official code's 5 does not learn here: docstring)
        output_scale=0.01,  # official code
        episodes=50_000,
        lr=1e-3,
        val_every=200,
        val_episodes=10,  # fresh validation networks
    ),
}
RECIPES["mnist-k5"] = replace(RECIPES["mnist"], preprocess_k=5.0)  # the official code's constant


def preprocess(grad: torch.Tensor, k: float) -> torch.Tensor:
    """Andrychowicz et al. 2016, App. A: ``(N,) -> (N, 2)`` (see :func:`log_sign`)."""
    return log_sign(grad, k)


class L2O(Method):
    """The coordinatewise LSTM optimizer, meta-trained on a problem family."""

    name = "l2o"
    Config = L2OConfig
    recipes = RECIPES
    answers = frozenset()  # its own protocol (loss curves, report), no image episodes

    def __init__(self, config: L2OConfig) -> None:
        super().__init__(config)
        if config.preprocess not in ("none", "log_sign"):
            raise ConfigError(f"preprocess {config.preprocess!r}: use none or log_sign")
        get_family(config.data)
        inputs = 2 if config.preprocess == "log_sign" else 1
        h = config.hidden_size
        self.cells = nn.ModuleList(
            nn.LSTMCell(inputs if i == 0 else h, h) for i in range(config.layers)
        )
        self.head = nn.Linear(h, 1)
        self._trajectory: tuple | None = None  # (problems key, theta, state) between unrolls

    # -- the optimizer m(grad, h; phi) ---------------------------------------------------------
    def initial_state(self, coords: int, device=None) -> torch.Tensor:
        """Zero LSTM state for ``coords`` coordinates: ``(layers, 2, coords, hidden)`` (h, c)."""
        c = self.config
        return torch.zeros(c.layers, 2, coords, c.hidden_size, device=device)

    def forward(self, grad: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for every coordinate: ``grad (N,)``, ``state (layers, 2, N, H)`` ->
        ``(update (N,), new state)``. Rows never interact, so the update of a coordinate does
        not depend on how many others there are, nor on their order."""
        c = self.config
        x = preprocess(grad, c.preprocess_k) if c.preprocess == "log_sign" else grad[:, None]
        new = []
        for layer, cell in enumerate(self.cells):
            h, cs = cell(x, (state[layer, 0], state[layer, 1]))
            new.append(torch.stack([h, cs]))
            x = h
        return c.output_scale * self.head(x).squeeze(-1), torch.stack(new)

    # -- meta-training -------------------------------------------------------------------------
    @classmethod
    def task_sampler(cls, config: L2OConfig, part: str, data_root=None) -> ProblemSampler:
        family = get_family(config.data)
        per_draw = config.problems_per_draw
        return ProblemSampler(family, part, config.seed, per_draw, config.unroll, data_root)

    def meta_step(self, batch: Unroll) -> tuple[float, dict[str, float]]:
        """Backpropagate sum_t f(theta_t) over one unroll into phi (truncated BPTT)."""
        problems, device = batch.problems, batch.problems.device
        carried = self._trajectory
        if batch.start == 0 or carried is None or carried[0] != problems.key:
            theta = problems.theta0
            state = self.initial_state(theta.numel(), device)
        else:
            _, theta, state = carried
        theta = theta.detach().requires_grad_(True)
        loss = problems.loss(theta, batch.start)
        meta_loss = torch.zeros((), device=device)
        for t in range(batch.start, batch.start + batch.length):
            # No create_graph: the gradient is an input, d grad / d phi = 0 (no second derivatives).
            (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
            update, state = self(grad.detach().flatten(), state)
            theta = theta + update.view_as(theta)  # Eq. 1
            loss = problems.loss(theta, t + 1)
            meta_loss = meta_loss + loss.mean()  # Eq. 2, w_t = 1; mean over the drawn problems
        meta_loss.backward()
        self._trajectory = (problems.key, theta.detach(), state.detach())
        return meta_loss.item(), {"final_loss": loss.mean().item()}

    def validation_score(self, sampler: ProblemSampler, episodes: int, device) -> float:
        """Minus the mean final loss of the LSTM on ``episodes`` fixed validation problems."""
        problems = sampler.fixed(episodes).to(device)
        final = self.curves(problems)[:, -1].mean().item()
        return -final if math.isfinite(final) else -math.inf

    @torch.no_grad()
    def curves(self, problems: Problems, steps: int | None = None) -> torch.Tensor:
        """Loss of every problem at steps 0..T under the learned optimizer, ``(n, T + 1)``."""
        steps = problems.family.steps if steps is None else steps
        state = self.initial_state(problems.theta0.numel(), problems.device)

        def update(grad, _, t):
            nonlocal state
            step, state = self(grad.flatten(), state)
            return step.view_as(grad), None

        return trajectory(problems, steps, update)

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval`: :func:`metalab.evaluate.optimization.report_optimizers` (loss curves
        against tuned baselines; ``l2o_<family>.png``, ``eval.json`` and a table)."""
        from metalab.evaluate.optimization import report_optimizers

        return report_optimizers(
            self, run_dir, episodes=episodes, device=device, data_root=data_root
        )


class LearnedOptimizer(torch.optim.Optimizer):
    """A trained :class:`L2O` as a drop-in ``torch.optim.Optimizer`` for any model.

    Each parameter tensor keeps its per-coordinate LSTM state in ``self.state[p]["lstm"]``
    ``(layers, 2, numel, hidden)``, so ``state_dict()``/``load_state_dict()`` carry it; the LSTM
    itself is saved and loaded with the run's checkpoint (:func:`metalab.rundir.load_method`).

    Example::

        method, _ = load_method(Path("runs/l2o-mnist/best.pt"))
        opt = LearnedOptimizer(model.parameters(), method)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params, method: L2O) -> None:
        super().__init__(params, {})
        self.method = method

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "lstm" not in state:
                    state["lstm"] = self.method.initial_state(p.numel(), p.device)
                update, state["lstm"] = self.method(p.grad.detach().flatten(), state["lstm"])
                p.add_(update.view_as(p))
        return loss
