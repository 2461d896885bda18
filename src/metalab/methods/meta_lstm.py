"""Meta-learner LSTM — Ravi & Larochelle, ICLR 2017, "Optimization as a model for few-shot learning".

The learner is a small convolutional classifier whose parameters are *the cell state of an LSTM*.
One episode runs T updates of the learner on the support set, each one an LSTM step (Eq. 2):

    c_t = f_t * c_{t-1} - i_t * grad_t                          # the learner's parameters
    i_t = sigmoid(W_I . [h_t, c_{t-1}, i_{t-1}] + b_I)          # a learning rate per coordinate
    f_t = sigmoid(W_F . [h_t, c_{t-1}, f_{t-1}] + b_F)          # how much of theta to keep

where grad_t and L_t are the gradient and loss of the learner theta_{t-1} = c_{t-1} on a batch of
the support set, and h_t is the output of a first, ordinary LSTM (20 units) fed with the
preprocessed (L_t, grad_t) of each coordinate (Andrychowicz et al. 2016's log/sign scheme, 4
inputs). Both LSTMs share their weights across coordinates, each coordinate with its own state.
c_0, the learner's initialisation, is learned too. With f_t = 1 and i_t = alpha the update is SGD
at learning rate alpha (tests/test_meta_lstm.py checks it to the bit in float64).

The meta-loss is the query loss of the final learner c_T. As in the paper (Sec. 3.2) grad_t and L_t
are inputs: no second derivatives; the meta-gradient reaches W_I, W_F, the first LSTM and c_0
through c_{t-1} (in the gates and in f_t * c_{t-1}) and through h_t. The meta-optimizer is Adam at
1e-3 with the gradient norm clipped at 0.25 (official code, twitter/meta-learning-lstm).

Paper-vs-code choices: batch norm always normalises with the statistics of the
batch at hand (support batch while updating, query set when classifying) and carries no running
statistics across episodes; its scale and shift are learner parameters like the rest. The
Omniglot recipes use the same 32-filter max-pool Conv4 as miniImageNet (28 -> 14 -> 7 -> 3 -> 1,
32 features), sized for a CPU; they are ours, not the paper's. Updates cycle through the support
set in an order that interleaves the classes, ``update_batch`` examples at a time (the paper's
configs use the whole support set: 5 = 5x1, 25 = 5x5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metalab.errors import ConfigError
from metalab.functional.preprocess import log_sign as preprocess
from metalab.methods.base import Method, MethodConfig
from metalab.nets.classifier import Conv4Classifier
from metalab.tasks.episodes import Episode

CHANNELS = {"omniglot": 1, "mnist": 1, "miniimagenet": 3}


@dataclass
class MetaLSTMConfig(MethodConfig):
    hidden: int = 32  # learner conv filters
    updates: int = 12  # T: learner updates per episode (training and prediction)
    update_batch: int = 5  # support examples per learner update
    lstm_hidden: int = 20  # units of the first LSTM
    preprocess_p: float = 10.0  # p of Andrychowicz's preprocessing
    clip_norm: float = 0.25  # meta-gradient norm clipping; 0 = none


class MetaLearner(nn.Module):
    """The two-layer meta-learner: an LSTM over the preprocessed (loss, gradient) of each
    coordinate, and the meta-learner LSTM cell whose cell state is the learner's parameters."""

    def __init__(self, lstm_hidden: int = 20, p: float = 10.0) -> None:
        super().__init__()
        self.p = p
        self.lstm = nn.LSTMCell(4, lstm_hidden)
        # [h_t (lstm_hidden), c_{t-1}, gate_{t-1}] -> gate, shared across coordinates (Eq. 2)
        self.W_I = nn.Parameter(torch.empty(lstm_hidden + 2))
        self.W_F = nn.Parameter(torch.empty(lstm_hidden + 2))
        self.b_I = nn.Parameter(torch.empty(()))
        self.b_F = nn.Parameter(torch.empty(()))
        # Official code: forget gate near 1, input gate (learning rate) small, the rest tiny.
        for weight in (*self.lstm.parameters(), self.W_I, self.W_F):
            nn.init.uniform_(weight, -0.01, 0.01)
        nn.init.uniform_(self.b_F, 4, 5)
        nn.init.uniform_(self.b_I, -5, -4)

    def initial_state(self, c0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(h, s) of the first LSTM and the previous gates (i, f), zero for every coordinate."""
        n, units = c0.shape[0], self.lstm.hidden_size
        zeros = c0.new_zeros(n, units)
        return zeros, zeros, c0.new_zeros(n), c0.new_zeros(n)

    def forward(
        self,
        c: torch.Tensor,
        grad: torch.Tensor,
        loss: torch.Tensor,
        state: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One learner update: ``c (n,)`` and its ``grad (n,)``, ``loss ()`` -> the next ``c``
        and state ``(h, s, i, f)``; ``i`` and ``f`` are this step's gates ``(n,)``."""
        h, s, i_prev, f_prev = state
        features = torch.cat(  # (n, 4): 2 for the loss, 2 for the gradient
            (preprocess(loss, self.p).expand(c.shape[0], 2), preprocess(grad, self.p)), -1
        )
        h, s = self.lstm(features, (h, s))
        units = h.shape[1]
        i = torch.sigmoid(
            h @ self.W_I[:units] + self.W_I[units] * c + self.W_I[units + 1] * i_prev + self.b_I
        )
        f = torch.sigmoid(
            h @ self.W_F[:units] + self.W_F[units] * c + self.W_F[units + 1] * f_prev + self.b_F
        )
        return f * c - i * grad, (h, s, i, f)  # Ravi & Larochelle Eq. 2


_OMNIGLOT = dict(
    data="omniglot",
    split="vinyals",
    image_size=28,
    ways=5,
    eval_ways=5,
    queries=15,
    eval_queries=15,
    episodes=20_000,
    val_every=500,
    val_episodes=200,
)
_MINI = dict(
    data="miniimagenet",
    split="ravi",
    image_size=84,
    ways=5,
    eval_ways=5,
    queries=15,
    eval_queries=15,
    val_every=1000,
    val_episodes=600,
)
_1SHOT = dict(shots=1, eval_shots=1, updates=12, update_batch=5)
_5SHOT = dict(shots=5, eval_shots=5, updates=8, update_batch=25)


class MetaLSTM(Method):
    """Ravi & Larochelle's meta-learner LSTM with a Conv4 learner (32 filters, max-pool)."""

    name = "meta-lstm"
    Config = MetaLSTMConfig
    transductive = True  # the learner's batch norm uses the statistics of the batch at hand
    recipes = {
        # Ours, CPU-sized: the paper's learner and meta-learner and its 1-/5-shot update schedules
        # on Omniglot 28x28 (Vinyals split), 20,000 episodes.
        "omniglot-5w1s": MetaLSTMConfig(**_OMNIGLOT, **_1SHOT),
        "omniglot-5w5s": MetaLSTMConfig(**_OMNIGLOT, **_5SHOT),
        # The official configs: 75,000 (1-shot) and 50,000 (5-shot) episodes, Adam 1e-3, clip 0.25;
        # 12 updates with batch 5, and 8 updates with batch 25.
        "miniimagenet-5w1s": MetaLSTMConfig(**_MINI, **_1SHOT, episodes=75_000),
        "miniimagenet-5w5s": MetaLSTMConfig(**_MINI, **_5SHOT, episodes=50_000),
    }

    def __init__(self, config: MetaLSTMConfig) -> None:
        super().__init__(config)
        c = config
        if c.data not in CHANNELS:
            raise ConfigError(f"data={c.data!r}: meta-lstm knows {sorted(CHANNELS)}")
        if c.updates < 0 or c.update_batch < 1:
            raise ConfigError("updates must be 0 or more and update_batch 1 or more")
        # The learner's own parameters are c_0, the learned initialisation (the initial cell state).
        self.learner = Conv4Classifier(c.ways, CHANNELS[c.data], c.hidden, "max", c.image_size)
        self.meta_learner = MetaLearner(c.lstm_hidden, c.preprocess_p)
        self._shapes = [(name, p.shape, p.numel()) for name, p in self.learner.named_parameters()]

    # -- the learner as a flat vector -----------------------------------------------------------
    def initial_parameters(self) -> torch.Tensor:
        """c_0 ``(n,)``: the learner's parameters, flattened (differentiable)."""
        return torch.cat([p.flatten() for p in self.learner.parameters()])

    def unflatten(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """The flat vector ``c (n,)`` as the learner's parameter dict (views of ``c``)."""
        out, offset = {}, 0
        for name, shape, numel in self._shapes:
            out[name] = c[offset : offset + numel].view(shape)
            offset += numel
        return out

    def layers(self) -> dict[str, slice]:
        """Coordinates of each learner layer in the flat vector: ``conv1``..``conv4`` (conv and
        batch norm) and ``linear``."""
        spans: dict[str, slice] = {}
        offset = 0
        for name, _, numel in self._shapes:
            layer = "linear" if name.startswith("head") else f"conv{int(name.split('.')[2]) + 1}"
            start = spans[layer].start if layer in spans else offset
            spans[layer] = slice(start, offset + numel)
            offset += numel
        return spans

    def logits(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The learner with parameters ``c`` on images ``(B, C, H, W)``; batch norm on the batch."""
        return functional_call(self.learner, self.unflatten(c), (x,))

    # -- an episode -----------------------------------------------------------------------------
    def update_batches(self, support_y: torch.Tensor) -> list[torch.Tensor]:
        """The support indices of each of the T updates: ``update_batch`` at a time, cycling
        through the support set in an order that interleaves the classes."""
        c = self.config
        n = support_y.shape[0]
        order = torch.argsort(support_y, stable=True)
        ways = int(support_y.max()) + 1
        order = order.view(ways, n // ways).t().flatten()  # class 0, 1, ..., 0, 1, ...
        size = min(c.update_batch, n)
        return [order[(t * size + torch.arange(size)) % n] for t in range(c.updates)]

    def adapt(
        self, support_x: torch.Tensor, support_y: torch.Tensor, trace: bool = False
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """c_T: T meta-learner updates of c_0 on the support set; with ``trace``, also each
        update's gates ``(i_t, f_t)``, detached."""
        c = self.initial_parameters()
        state = self.meta_learner.initial_state(c)
        gates = []
        for batch in self.update_batches(support_y):
            x, y = support_x[batch], support_y[batch]
            with torch.enable_grad():  # evaluation runs under no_grad; the learner needs grad
                theta = c.detach().requires_grad_()
                loss = F.cross_entropy(self.logits(theta, x), y)
                (grad,) = torch.autograd.grad(loss, theta)  # an input: no second derivatives
            c, state = self.meta_learner(c, grad, loss.detach(), state)
            if trace:
                gates.append((state[2].detach(), state[3].detach()))
        return c, gates

    def episode_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Query loss and accuracy of the learner after the T updates on the support set."""
        self._check_ways(episode.support_y)
        c, _ = self.adapt(episode.support_x, episode.support_y)
        logits = self.logits(c, episode.query_x)
        acc = (logits.argmax(-1) == episode.query_y).float().mean()
        return F.cross_entropy(logits, episode.query_y), acc

    # -- training -------------------------------------------------------------------------------
    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean query loss over the episode(s) of ``batch`` (an Episode or a TaskBatch)."""
        episodes = (
            [Episode(*(t[k] for t in batch.tensors()[:4])) for k in range(batch.support_x.shape[0])]
            if batch.support_x.dim() == 5
            else [batch]
        )
        losses, accs = zip(*(self.episode_loss(e) for e in episodes))
        return torch.stack(losses).mean(), {"acc": torch.stack(accs).mean().item()}

    def meta_step(self, batch: Episode) -> tuple[float, dict[str, float]]:
        """Backpropagate the meta-loss and clip the meta-gradient's norm (official code: 0.25)
        before the trainer's Adam step; ``grad_norm`` is the norm before clipping."""
        loss, metrics = self.meta_loss(batch)
        loss.backward()
        if self.config.clip_norm > 0:
            norm = nn.utils.clip_grad_norm_(self.parameters(), self.config.clip_norm)
            metrics["grad_norm"] = norm.item()
        return loss.item(), metrics

    # -- prediction -----------------------------------------------------------------------------
    def _check_ways(self, support_y: torch.Tensor) -> None:
        if int(support_y.max()) + 1 != self.config.ways:
            raise ConfigError(
                f"this meta-lstm model has a {self.config.ways}-way learner; it cannot answer "
                f"{int(support_y.max()) + 1}-way episodes (train one with --ways)"
            )

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Logits of the queries by the learner after the T updates on the support set."""
        self._check_ways(support_y)
        c, _ = self.adapt(support_x, support_y)
        return self.logits(c, query_x)

    def supports_ways(self, ways: int) -> bool:
        return ways == self.config.ways

    def protocol(self) -> dict:
        return {"updates": self.config.updates, "update_batch": self.config.update_batch}

    def gate_values(self, episode: Episode) -> dict[str, np.ndarray]:
        """Mean input and forget gate of each learner layer at each update of one episode:
        ``{"input/conv1": (T,), ..., "forget/linear": (T,)}``."""
        with torch.no_grad():
            _, gates = self.adapt(episode.support_x, episode.support_y, trace=True)
        out = {}
        for layer, span in self.layers().items():
            for k, kind in enumerate(("input", "forget")):
                out[f"{kind}/{layer}"] = np.array([g[k][span].mean().item() for g in gates])
        return out

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval`: the paper's gate figure (``gates.png``,
        :func:`metalab.evaluate.optimization.report_gates`), then the standard few-shot table
        (False)."""
        from metalab.evaluate.optimization import report_gates

        return report_gates(self, run_dir, episodes=episodes, device=device, data_root=data_root)
