"""Few-Shot Learning with Graph Neural Networks — Garcia & Bruna, ICLR 2018.

A task is a fully connected graph with one node per support image and ONE node for the query (the
paper's t = 1). A node starts as the image's CNN embedding concatenated with the one-hot vector of
its label, or the uniform distribution 1/N where the label is unknown: the query, and the hidden
support labels of the semi-supervised setting (Eq. 6). Each layer learns an adjacency from the
current node features, an MLP on |x_i - x_j| soft-maxed along each row, without self-loops (Eq. 4-5),
applies the operator family {I, Ã} and a linear map (Eq. 3), and concatenates its output onto the
node features (dense connections). The last layer's N outputs at the query node are the logits.

Active learning: after the first layer a learned score over the unlabelled support nodes chooses one
(sampled from its softmax in training, the arg-max at test) and that node's true label is revealed,
weighted by its attention so that the gradient reaches the scorer (as in the authors' code).

Our episodes have Q queries per class: every query gets its own graph over the same support nodes.
The CNN embeds the episode's images once and the graphs run as one batch ``(graphs, nodes, features)``.
Layer sizes follow the authors' Omniglot model (vgsatorras/few-shot-gnn, ``GNN_nl_omniglot``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metalab import arithmetic
from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.nets.gnn_cnn import GNNEmbedding
from metalab.tasks.episodes import UNLABELLED, Episode


@dataclass
class GNNConfig(MethodConfig):
    embedding: int = 64  # CNN output width (64 for Omniglot in the paper's code)
    nf: int = 96  # GNN width: each graph-conv layer adds nf // 2 features to every node
    layers: int = 2  # graph-conv layers before the output layer
    adjacency_dropout: float = 0.3  # dropout in the last adjacency MLP (their Omniglot model)
    active: bool = False  # active learning: reveal the label of one unlabelled support node
    channels_last: str = "auto"  # auto | on | off: channels-last CNN activations (same math;
    # ~25% faster on the AVX-512 CPU); auto times both on the run's first batch (metalab.arithmetic)


class Adjacency(nn.Module):
    """The learned adjacency Ã (their ``Wcompute``): an MLP on |x_i - x_j| (Eq. 5) whose scores are
    soft-maxed along each row with the diagonal left out (Eq. 4; their code subtracts 1e8 there).

    The MLP is 1x1 convolutions in their code, i.e. Linear + BN + leaky ReLU on every pair, widths
    (2, 1.5, 1, 1) x ``hidden``, then one score. |x_i - x_j| is symmetric, so only the pairs i < j
    are scored (half the work; batch norm then also skips the masked diagonal)."""

    def __init__(self, features: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [features, 2 * hidden, int(1.5 * hidden), hidden, hidden]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.LeakyReLU()]
            if i == 0 and dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, 1))
        self.mlp = nn.Sequential(*layers)

    def score(self, diff: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (...)`` edge scores of |x_i - x_j|."""
        return self.mlp(diff.reshape(-1, diff.shape[-1])).view(diff.shape[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Row-stochastic ``(G, n, n)`` adjacency of node features ``(G, n, d)``."""
        n = x.shape[1]
        i, j = torch.triu_indices(n, n, 1, device=x.device)
        scores = self.score((x[:, i] - x[:, j]).abs())  # (G, n(n-1)/2)  # Eq. 5
        full = x.new_full((x.shape[0], n, n), float("-inf"))  # -inf: no self-loops
        full[:, i, j] = scores
        full[:, j, i] = scores
        return full.softmax(-1)  # Eq. 4

    def query_row(self, x: torch.Tensor) -> torch.Tensor:
        """Only row 0 (the query node) of :meth:`forward`: ``(G, n, d) -> (G, n)``."""
        scores = self.score((x[:, :1] - x[:, 1:]).abs())  # (G, n-1)
        return F.pad(scores, (1, 0), value=float("-inf")).softmax(-1)


class GraphConv(nn.Module):
    """Eq. 3 with the operators {I, Ã}: ``x, Ã x -> BN(Linear([x, Ã x]))`` (their ``Gconv``, J = 2)."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(2 * features, out)
        self.bn = nn.BatchNorm1d(out)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """``(..., d), (..., d) -> (..., out)``: node features and their aggregate ``Ã x``."""
        h = self.linear(torch.cat([x, neighbours], -1))
        return self.bn(h.reshape(-1, h.shape[-1])).view_as(h)


# Adam 1e-3 halved every 10k steps (their --dec_lr 10000); validation every 2000 steps as their tests.
_FEW_SHOT = dict(lr=1e-3, lr_decay_every=10_000, lr_decay=0.5, val_every=2000)


class GNN(Method):
    """CNN embedding + graph neural network over support and query nodes, one graph per query."""

    name = "gnn"
    Config = GNNConfig
    compiled_modules = ("embedding",)  # --compile: the CNN embedding (the graph stays eager)
    partial_labels = True

    recipes = {
        # Their README, Omniglot 5-way 1-shot: 300 single-query episodes per step, 100k steps, Adam
        # 1e-3 halved every 10k. Ours: 20 episodes x 15 queries (3 per class) = 300 graphs per step;
        # validation 200 episodes x 75 queries = the 15,000 graphs of their test calls.
        "omniglot-5w1s": GNNConfig(
            ways=5, shots=1, queries=3, eval_ways=5, eval_shots=1, meta_batch=20,
            episodes=100_000, val_episodes=200, **_FEW_SHOT,
        ),
        # 5-way 5-shot: batch 100, 80k steps; 10 episodes x 10 queries = 100 graphs per step.
        "omniglot-5w5s": GNNConfig(
            ways=5, shots=5, queries=2, eval_ways=5, eval_shots=5, meta_batch=10,
            episodes=80_000, val_episodes=200, **_FEW_SHOT,
        ),
        # 20-way 1-shot: batch 100, 80k steps; 5 episodes x 20 queries = 100 graphs per step;
        # 50 validation episodes x 300 queries = 15,000 graphs.
        "omniglot-20w1s": GNNConfig(
            ways=20, shots=1, queries=1, eval_ways=20, eval_shots=1, meta_batch=5,
            episodes=80_000, val_episodes=50, **_FEW_SHOT,
        ),
        # 20-way 5-shot (the paper reports it; their README has no command): the 20w1s settings,
        # 101-node graphs. Needs several GB of memory per step.
        "omniglot-20w5s": GNNConfig(
            ways=20, shots=5, queries=1, eval_ways=20, eval_shots=5, meta_batch=5,
            episodes=80_000, val_episodes=50, **_FEW_SHOT,
        ),
        # Semi-supervised 5-way 5-shot, 20% labelled (their --unlabeled_extra 4): one labelled
        # support example per class, the other four unlabelled nodes; 5w5s schedule.
        "omniglot-semi": GNNConfig(
            ways=5, shots=5, queries=2, eval_ways=5, eval_shots=5, meta_batch=10, labelled=1,
            eval_labelled=1, episodes=80_000, val_episodes=200, **_FEW_SHOT,
        ),
        # Active learning in the same episodes: each graph asks for one of its 20 hidden labels.
        "omniglot-active": GNNConfig(
            ways=5, shots=5, queries=2, eval_ways=5, eval_shots=5, meta_batch=10, labelled=1,
            eval_labelled=1, active=True, episodes=80_000, val_episodes=200, **_FEW_SHOT,
        ),
        # Lake's protocol: the 30 background alphabets only (five held out for validation), for
        # his 20-way 1-shot runs; the 20w1s settings.
        "lake": GNNConfig(
            split="lake", ways=20, shots=1, queries=1, eval_ways=20, eval_shots=1, meta_batch=5,
            episodes=80_000, val_episodes=50, **_FEW_SHOT,
        ),
    }  # fmt: skip

    def __init__(self, config: GNNConfig) -> None:
        super().__init__(config)
        if config.eval_ways != config.ways:
            raise ConfigError(
                f"gnn has a {config.ways}-way label input and output: set eval_ways={config.ways} "
                f"(not {config.eval_ways})"
            )
        if config.data not in ("omniglot", "mnist"):
            raise ConfigError(
                f"gnn has the paper's Omniglot CNN (1-channel), not for {config.data}"
            )
        self.ways = config.ways
        self.embedding = GNNEmbedding(config.image_size, config.embedding)
        grow = config.nf // 2
        # Node width before layer k: embedding + label + k * nf/2 (dense connections).
        widths = [config.embedding + config.ways + k * grow for k in range(config.layers + 1)]
        self.adjacencies = nn.ModuleList(Adjacency(w, w) for w in widths[:-1])
        self.convs = nn.ModuleList(GraphConv(w, grow) for w in widths[:-1])
        self.last_adjacency = Adjacency(widths[-1], widths[-2], config.adjacency_dropout)
        self.last_conv = GraphConv(widths[-1], config.ways)  # with batch norm, as theirs
        if config.active:  # their conv_active_1/2: a per-node score of the first layer's output
            w = widths[1]
            self.attention = nn.Sequential(
                nn.Linear(w, w), nn.BatchNorm1d(w), nn.LeakyReLU(), nn.Linear(w, 1)
            )
        self.set_arithmetic()

    def speed_switches(self) -> tuple[arithmetic.Switch, ...]:
        return (arithmetic.CHANNELS_LAST,)

    # -- the graphs ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W) -> (B, E)`` in one pass, so batch norm sees the whole (task) batch."""
        return self.embedding(arithmetic.images(images, self.arithmetic))

    def label_vectors(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot labels, the uniform 1/N for UNLABELLED: ``(...) -> (..., N)``.  # Eq. 6"""
        one_hot = F.one_hot(labels.clamp(min=0), self.ways).float()
        return torch.where((labels == UNLABELLED).unsqueeze(-1), 1.0 / self.ways, one_hot)

    def nodes(
        self, support_z: torch.Tensor, support_y: torch.Tensor, query_z: torch.Tensor
    ) -> torch.Tensor:
        """One graph per query, the query first: ``(T, S, E), (T, S), (T, Q, E) ->
        (T*Q, 1+S, E+N)`` node features (Eq. 6)."""
        (tasks, shots, _), queries = support_z.shape, query_z.shape[1]
        support = torch.cat([support_z, self.label_vectors(support_y)], -1)  # (T, S, E+N)
        unknown = query_z.new_full((tasks, queries, self.ways), 1.0 / self.ways)
        query = torch.cat([query_z, unknown], -1)  # (T, Q, E+N)
        support = support.unsqueeze(1).expand(tasks, queries, shots, support.shape[-1])
        return torch.cat([query.unsqueeze(2), support], 2).flatten(0, 1)

    def reveal(self, x: torch.Tensor, hidden: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
        """Active learning: choose one hidden node per graph by attention over the hidden nodes and
        move its label part from uniform to its true one-hot, weighted by the attention
        (``(G, n, d), (G, n) bool, (G, n) labels``). The choice is sampled in training and the
        arg-max in eval; the weight carries the gradient to the scorer, as in their
        ``GNN_active.active`` (which adds ``attention * choice * oracle`` to zero label parts)."""
        scores = self.attention(x.reshape(-1, x.shape[-1])).view(hidden.shape)
        attention = scores.masked_fill(~hidden, float("-inf")).softmax(-1)  # (G, n)
        if self.training:
            choice = torch.multinomial(attention.detach(), 1)
        else:
            choice = attention.detach().argmax(-1, keepdim=True)
        weight = torch.zeros_like(attention).scatter_(1, choice, 1.0) * attention  # (G, n)
        delta = weight.unsqueeze(-1) * (self.label_vectors(oracle) - 1.0 / self.ways)  # (G, n, N)
        start = self.config.embedding  # the label part of the node features
        return x + F.pad(delta, (start, x.shape[-1] - start - self.ways))

    def layer(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Graph-conv layer ``k`` with its learned adjacency; its output is concatenated onto the
        node features (dense connections): ``(G, n, d) -> (G, n, d + nf/2)``.  # Eq. 3-5"""
        h = self.convs[k](x, self.adjacencies[k](x) @ x)
        return torch.cat([x, F.leaky_relu(h)], -1)

    def propagate(
        self,
        x: torch.Tensor,
        hidden: torch.Tensor | None = None,
        oracle: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Node features ``(G, n, d)`` -> the query node's logits ``(G, N)``; with ``hidden`` and
        ``oracle`` (active learning) one hidden label is revealed after the first layer."""
        for k in range(len(self.convs)):
            x = self.layer(k, x)
            if k == 0 and hidden is not None:
                x = self.reveal(x, hidden, oracle)
        # The logits are the query's outputs, so the last layer computes only its row.
        row = self.last_adjacency.query_row(x)  # (G, n)
        return self.last_conv(x[:, 0], (row.unsqueeze(1) @ x).squeeze(1))

    def graphs(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        oracle_y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The node features ``(T*Q, 1+S, E+N)`` of a task batch's graphs, one per query; with
        ``config.active`` also the hidden-label mask and the oracle labels ``(T*Q, 1+S)``."""
        (tasks, shots), queries = support_y.shape, query_x.shape[1]
        z = self.embed(torch.cat([support_x.flatten(0, 1), query_x.flatten(0, 1)]))  # one pass
        support_z = z[: tasks * shots].view(tasks, shots, -1)
        query_z = z[tasks * shots :].view(tasks, queries, -1)
        x = self.nodes(support_z, support_y, query_z)
        if not self.config.active:
            return x, None, None
        hidden = F.pad(support_y == UNLABELLED, (1, 0))  # the query node is never chosen
        oracle = F.pad(oracle_y, (1, 0))
        return x, hidden.repeat_interleave(queries, 0), oracle.repeat_interleave(queries, 0)

    def logits(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        oracle_y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Query logits ``(Q, N)`` of an episode, or ``(T, Q, N)`` of a task batch."""
        batched = support_x.dim() == 5
        if not batched:
            support_x, support_y, query_x = support_x[None], support_y[None], query_x[None]
            oracle_y = None if oracle_y is None else oracle_y[None]
        self._check(support_y, oracle_y)
        out = self.propagate(*self.graphs(support_x, support_y, query_x, oracle_y))
        out = out.view(len(support_y), query_x.shape[1], self.ways)
        return out if batched else out[0]

    def _check(self, support_y: torch.Tensor, oracle_y: torch.Tensor | None) -> None:
        seen = int(support_y.max()) + 1  # 0 when every label is hidden
        if seen not in (0, self.ways):
            raise ConfigError(
                f"this GNN takes {self.ways}-way episodes, not {seen}-way (train one with --ways)"
            )
        if self.config.active and (oracle_y is None or not (support_y == UNLABELLED).any(-1).all()):
            raise ConfigError(
                "active learning asks for the label of an unlabelled support example, but these "
                "episodes have none: use labelled < shots (e.g. --labelled 1)"
            )

    # -- the method contract ---------------------------------------------------------------------
    def meta_loss(self, batch: Episode) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch.support_x, batch.support_y, batch.query_x, batch.oracle_y)
        logits, targets = logits.reshape(-1, self.ways), batch.query_y.reshape(-1)
        loss = F.cross_entropy(logits, targets)
        acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"acc": acc.item()}

    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        if self.config.active:
            raise ConfigError("an active GNN asks an oracle for labels: use predict_episode")
        return self.logits(support_x, support_y, query_x)

    def predict_episode(self, episode: Episode) -> torch.Tensor:
        return self.logits(episode.support_x, episode.support_y, episode.query_x, episode.oracle_y)

    def supports_ways(self, ways: int) -> bool:
        return ways == self.config.ways

    def protocol(self) -> dict:
        return {"graphs": "one per query", "active": self.config.active}
