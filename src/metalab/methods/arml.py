"""ARML — Yao, Wu, Tao, Li, Ding, Li & Li, ICLR 2020, "Automated Relational Meta-learning".

MAML starts every task from one initialisation theta_0. ARML starts task i from its own,
theta_0i = sigmoid(W_g [t_i (+) q_i] + b_g) * theta_0, with gates computed from the task's
support set through a learned *meta-knowledge graph*:

    e_j   = embedding of support example j                                # sample embeddings
    c_k   = prototypes: soft clusters of the e_j (regression) or class means (images)
    A_R   = sigmoid(w_r |c_i - c_j| + b_r)        between prototypes       # prototype graph
    A_G   = sigmoid(w_g |h_i - h_j| + b_g)        between learned vertices h_v
    A_S   = softmax_v(-||c_k - h_v||^2 / (2 sigma))  prototype -> vertex  # assignment
    C^    = tanh(D^-1 (A + I) [C; H] W + b)[:prototypes]                   # one GCN layer
    q_i, L_q = GRU autoencoder over e_j (2-D) or c_k (+) one_hot(k) (images)
    t_i, L_t = GRU autoencoder over C^ (the meta-knowledge-enhanced prototypes)
    theta_0i = sigmoid(W_g [q_i (+) t_i] + b_g) * theta_0                  # one gate per weight
    phi_i    = MAML's inner loop from theta_0i on the support set
    loss     = L(phi_i, query) + lambda (L_q + L_t)

and every parameter (theta_0, the embeddings, the graph, both autoencoders, the gates) is
meta-learned through the second-order meta-gradient of that loss. The gates differ per task, so
:func:`meta_gradient` takes each task's dL_i/dtheta_0i (MAML's inner loop from the task's own
initialisation, :func:`query_loss`) inside a ``vmap`` over tasks (``vmap(grad(query_loss))``,
never a gradient through a vmapped loss, see :mod:`metalab.functional.inner`) or one task at a
time, and chains it with plain autograd through the gates and the encoder, which runs on all
tasks at once. Both backends agree with a written-out per-task autograd loop and with finite
differences in float64 (tests/test_arml.py).

Followed: the official TensorFlow code, huaxiuyao/ARML (``maml.py``, ``metadag.py``,
``task_embedding.py``, ``image_embedding.py``, the scripts ``2D_bash``, ``artmulti_bash``), read
to understand it, not copied; the shared NEXT-WAVE.md §4 and PAPERS.md §9. Tags: [P] paper,
[R] official code read, [U] unconfirmed. Where the two differ we follow the code:
- [R] 2-D sample embedding: a linear layer of ``[x, y]`` (no activation) to ``embed_dim`` = 40;
  prototypes = P^T E with P = softmax over ``clusters`` = 2 of a linear layer of E (unnormalised
  sums, not means). The sample autoencoder reads the K sample embeddings (the paper's q_i reads
  the prototypes [P]); the image one reads prototype (+) one-hot label, as the paper.
- [R] Image task embedding: 2 conv 5x5 (32 filters, no bias) with ReLU, 3x3/2 max-pool and
  local response normalisation (TF's depth radius 4, bias 1, alpha 0.001/9, beta 0.75), FC 384,
  FC ``embed_dim`` (the scripts' ``hidden_dim`` 128; the paper says 64 [P]), ReLU on both.
  Prototypes are class means.
- [R] Edges carry no temperature (the paper divides |c_i - c_j| by gamma [P]); the assignment
  uses ||c - h||^2 / (2 sigma) with sigma = 2 (2-D) / 8 (images); the diagonal of A_R and A_G is
  0 before + I; the adjacency is row-normalised D^-1 (A + I); one GCN layer with tanh; only the
  prototype rows are kept. Vertices: 6 (2-D), 8 (Art-Multi), 4 (Plain-Multi). With one layer
  and only the prototype rows kept, the vertex-vertex edges never reach the output: their
  weights get no gradient, here as in the code (kept, as the code has them).
- [R] Each autoencoder: a GRU encoder whose code is the *mean of its outputs over the
  sequence*, a GRU decoder started from the encoder's last state with a zero input and fed its
  own linear read-out, outputs reversed; loss = mean squared reconstruction error. The two
  losses are summed and weighted by ``recon_weight`` = 0.01 (``emb_loss_weight`` in the
  scripts). GRU cells compute TensorFlow's GRUCell (reset gate on the state before the matrix).
- [R] One dense sigmoid gate layer per weight tensor (same as one W_g); the loss is the query
  loss after the *last* of ``inner_steps`` steps (5), second order (``stop_grad`` False).
- [R] Initialisation as TF's defaults: Glorot-uniform dense layers with zero bias, GRU gate
  bias 1, GCN and read-out weights truncated normal with std 1, read-out bias 0.1, task-CNN
  weights truncated normal std 0.04 (FC bias 0.1); the 2-D base learner's weights truncated
  normal std 0.01 and zero biases (the image base learner keeps metalab's Conv4Classifier
  initialisation).
- [R] 2-D: ``update_lr`` = 1e-3 (the flag default; the paper's 0.001 too), 5 steps in
  training, 20 at test (``num_updates_test``), meta-batch 25, Adam 1e-3, 70,000 iterations, 10
  support and 10 query points, no normalisation. Which test step the paper's table reports is
  not stated [U]; :func:`metalab.evaluate.regression.regression_errors` reports 5 and 20, to the noisy targets (what the
  code's test averages, and so the paper's number) and to the noise-free function, on 1000
  fixed tasks (seed 2017, the same for every model; the code draws 1000 fresh ones).
- 2-D tasks (:class:`metalab.tasks.regression.ARML2DTasks`): the code's families, ranges and
  inputs U[-5, 5] (the paper: [0, 5]); each task one family, uniformly.
- Images, Art-Multi scripts [R]: 4-conv base learner with 32 filters and batch norm on batch
  statistics (the flag default ``norm=batch_norm``), 5 steps at ``update_lr`` 0.01, meta-batch 4,
  Adam 1e-3 (the paper's 0.001 inner / 0.01 outer look swapped [P]), 15 queries per class in
  training. Our choice: the code's cross-entropy is summed over the examples and divided by K
  (Finn's ``utils.xent``), i.e. N times our mean on the support set and NQ/K times it on the
  queries. Like metalab's MAML (same convention in Finn's code) we keep the scripts' numbers on
  mean losses: the code's inner step is ``--inner-lr 0.05`` here, and its reconstruction weight
  relative to a mean query loss is 0.01 K / (N Q). Batch norm's scale and shift are gated and
  adapted like every other weight (TF's batch norm had a shift only, outside the gated weights).
- Art-Multi's CUB/DTD/Aircraft/Fungi are not here; the image recipes train on the wave's
  "omni-art-multi" substitute (Omniglot alphabet groups x {plain, blur, pencil}, built
  elsewhere; no paper number), and ARML answers ordinary N-way K-shot episodes through
  :meth:`ARML.predict`, so every standard evaluation applies.
- The equation structure above is the paper's Sec. 4 from the shared notes; its equation
  numbers are not cited because they were not checked [U].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from metalab.errors import ConfigError
from metalab.evaluate.protocol import EVAL_SEED
from metalab.functional import (
    BACKENDS,
    LossFn,
    Params,
    adapt,
    classification_loss,
    regression_loss,
    write_grads,
)
from metalab.methods.base import Method
from metalab.methods.maml import ATTRIBUTES, CHANNELS, MAML, REGRESSION, MAMLConfig
from metalab.nets.classifier import Conv4Classifier
from metalab.nets.conv4 import feature_side
from metalab.nets.mlp import MLP
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.regression import ARML_2D_FAMILIES, FAMILIES, ON_LINE

# Image datasets ARML trains on, by channels: MAML's, Omni-Art-Multi among them, except the
# ambiguous attribute tasks (2-way tasks with their own coverage protocol).
IMAGE_CHANNELS = {k: v for k, v in CHANNELS.items() if k != ATTRIBUTES}
Meta = dict[str, Params]  # {"net": theta_0, "encoder": every other meta-parameter}


# -- the pieces of the task encoder ----------------------------------------------------------------


def _truncated_normal_(weight: torch.Tensor, std: float) -> torch.Tensor:
    """TensorFlow's truncated normal: N(0, std^2) redrawn outside two standard deviations."""
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def _dense(n_in: int, n_out: int) -> nn.Linear:
    """``tf.layers.dense``'s defaults: Glorot-uniform weights, zero bias."""
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class GRUCell(nn.Module):
    """A GRU step as TensorFlow's ``GRUCell`` computes it (Cho et al. 2014):
    ``r, u = sigmoid([x, h] W + b)``, ``c = tanh([x, r * h] W_c + b_c)``,
    ``h' = u * h + (1 - u) * c``; Glorot weights, gate bias 1, candidate bias 0."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.gates = _dense(input_size + hidden_size, 2 * hidden_size)
        nn.init.ones_(self.gates.bias)
        self.candidate = _dense(input_size + hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``x (..., input_size), h (..., hidden_size) -> h' (..., hidden_size)``."""
        reset, update = torch.sigmoid(self.gates(torch.cat([x, h], -1))).chunk(2, -1)
        candidate = torch.tanh(self.candidate(torch.cat([x, reset * h], -1)))
        return update * h + (1 - update) * candidate


class GRUAutoencoder(nn.Module):
    """The code's ``LSTMAutoencoder`` (GRU cells): encode a sequence, return the mean of the
    encoder's outputs as its code and the squared error of the reconstruction.

    Args:
        input_size: width of a sequence element.
        hidden_size: width of the code.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.encoder = GRUCell(input_size, hidden_size)
        self.decoder = GRUCell(input_size, hidden_size)
        self.readout = nn.Linear(hidden_size, input_size)
        _truncated_normal_(self.readout.weight, 1.0)
        nn.init.constant_(self.readout.bias, 0.1)

    def forward(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., n, input_size) -> (code (..., hidden_size), reconstruction loss (...))``: the
        decoder starts from the encoder's last state with a zero input, feeds each read-out
        back in, and its outputs are reversed (it reconstructs the last element first)."""
        h = sequence.new_zeros(*sequence.shape[:-2], self.hidden_size)
        outputs = []
        for x in sequence.unbind(-2):
            h = self.encoder(x, h)
            outputs.append(h)
        code = torch.stack(outputs, -2).mean(-2)
        x, decoded = torch.zeros_like(sequence[..., 0, :]), []
        for _ in outputs:
            h = self.decoder(x, h)
            x = self.readout(h)
            decoded.append(x)
        reconstruction = torch.stack(decoded[::-1], -2)
        return code, (sequence - reconstruction).square().mean((-2, -1))


class KnowledgeGraph(nn.Module):
    """The meta-knowledge graph (``metadag.py``): learned vertices, the super-graph of a task's
    prototypes and the vertices, and one tanh GCN layer over it.

    Args:
        dim: width of a prototype and of a vertex.
        vertices: learned vertices.
        sigma: temperature of the prototype-to-vertex assignment.
    """

    def __init__(self, dim: int, vertices: int, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        limit = math.sqrt(6 / (1 + dim))  # Glorot on each vertex's (1, dim) variable
        self.vertices = nn.Parameter(torch.empty(vertices, dim).uniform_(-limit, limit))
        self.prototype_edge = _dense(dim, 1)
        self.vertex_edge = _dense(dim, 1)
        self.gcn = nn.Linear(dim, dim)
        _truncated_normal_(self.gcn.weight, 1.0)
        nn.init.zeros_(self.gcn.bias)

    @staticmethod
    def _edges(nodes: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        """``sigmoid(w |n_i - n_j| + b)`` for i != j, 0 on the diagonal: ``(..., n, n)``."""
        gap = (nodes[..., :, None, :] - nodes[..., None, :, :]).abs()
        n = nodes.shape[-2]
        off_diagonal = 1 - torch.eye(n, dtype=nodes.dtype, device=nodes.device)
        return torch.sigmoid(layer(gap))[..., 0] * off_diagonal

    def adjacency(self, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The row-normalised super-graph ``D^-1 (A + I)`` ``(..., C + V, C + V)`` (prototypes
        first) and the prototype-to-vertex assignment ``A_S`` ``(..., C, V)``, each row a
        softmax over the vertices, for prototypes ``(..., C, dim)``."""
        lead, v = prototypes.shape[:-2], len(self.vertices)
        distance = (prototypes[..., :, None, :] - self.vertices).square().sum(-1)  # (..., C, V)
        assignment = torch.softmax(-distance / (2 * self.sigma), dim=-1)
        between_vertices = self._edges(self.vertices, self.vertex_edge).expand(*lead, v, v)
        top = torch.cat([self._edges(prototypes, self.prototype_edge), assignment], -1)
        bottom = torch.cat([assignment.transpose(-1, -2), between_vertices], -1)
        a = torch.cat([top, bottom], -2)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        return a / a.sum(-1, keepdim=True), assignment

    def forward(self, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., C, dim) -> (meta-knowledge-enhanced prototypes (..., C, dim), assignment
        (..., C, V))``."""
        a, assignment = self.adjacency(prototypes)
        c, lead = prototypes.shape[-2], prototypes.shape[:-2]
        nodes = torch.cat([prototypes, self.vertices.expand(*lead, *self.vertices.shape)], -2)
        out = torch.tanh(a @ (nodes @ self.gcn.weight.T) + self.gcn.bias)  # one GCN layer
        return out[..., :c, :], assignment


def _lrn(x: torch.Tensor) -> torch.Tensor:
    """``tf.nn.lrn(x, 4, bias=1, alpha=0.001/9, beta=0.75)`` over channels of ``(B, C, H, W)``:
    x / (1 + alpha * sum of x^2 over the 9 nearest channels)^beta."""
    padded = F.pad(x.square(), (0, 0, 0, 0, 4, 4))
    window = sum(padded[:, i : i + x.shape[1]] for i in range(9))
    return x / (1 + 0.001 / 9 * window) ** 0.75


class TaskCNN(nn.Module):
    """The image task embedding (``image_embedding.py``): 2 conv 5x5 blocks (no bias) with
    ReLU, 3x3/2 max-pool and local response normalisation, then FC 384 and FC ``dim``, ReLU.

    Args:
        channels: image channels.
        filters: conv filters (the code's ``task_embedding_num_filters`` 32).
        dim: embedding width (the scripts' ``hidden_dim`` 128).
        image_size: input side.
    """

    def __init__(self, channels: int, filters: int, dim: int, image_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, filters, 5, padding=2, bias=False)
        self.conv2 = nn.Conv2d(filters, filters, 5, padding=2, bias=False)
        side = (image_size + 1) // 2
        side = (side + 1) // 2
        self.fc1 = nn.Linear(filters * side * side, 384)
        self.fc2 = nn.Linear(384, dim)
        for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
            _truncated_normal_(layer.weight, 0.04)
        for layer in (self.fc1, self.fc2):
            nn.init.constant_(layer.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., C, H, W) -> (..., dim)``."""
        lead = x.shape[:-3]
        x = x.reshape(-1, *x.shape[-3:])
        x = _lrn(F.max_pool2d(F.relu(self.conv1(x)), 3, 2, padding=1))
        x = F.max_pool2d(_lrn(F.relu(self.conv2(x))), 3, 2, padding=1)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))).reshape(*lead, -1)


class TaskEncoder(nn.Module):
    """Support set -> one sigmoid gate per weight of the base learner: sample embeddings,
    prototypes, the meta-knowledge graph, the two autoencoders and the gate layers. Takes one
    task, or a batch of tasks on leading dimensions (computed at once, no vmap needed).

    Args:
        shapes: the base learner's parameter shapes by name (one gate tensor each).
        dim: width of sample embeddings, prototypes, vertices and codes.
        vertices, sigma: the meta-knowledge graph's.
        clusters: regression: soft clusters of the samples (the prototypes).
        ways: images: classes per task (one prototype each); None for regression.
        input_dim: regression: width of an input point.
        channels, filters, image_size: images: the task CNN's.
    """

    def __init__(
        self,
        shapes: dict[str, torch.Size],
        dim: int,
        vertices: int,
        sigma: float,
        clusters: int = 2,
        ways: int | None = None,
        input_dim: int = 1,
        channels: int = 1,
        filters: int = 32,
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.ways, self.shapes = ways, dict(shapes)
        if ways is None:  # regression: e_j = W [x_j, y_j] + b, soft clusters as prototypes
            self.embedding: nn.Module = _dense(input_dim + 1, dim)
            self.clustering = _dense(dim, clusters)
            sequence_width = dim
        else:  # images: a CNN embedding, class means as prototypes
            self.embedding = TaskCNN(channels, filters, dim, image_size)
            sequence_width = dim + ways
        self.graph = KnowledgeGraph(dim, vertices, sigma)
        self.samples_ae = GRUAutoencoder(sequence_width, dim)
        self.graph_ae = GRUAutoencoder(dim, dim)
        self.gates = nn.ModuleDict(
            {_key(name): _dense(2 * dim, math.prod(shape)) for name, shape in self.shapes.items()}
        )

    def prototypes(
        self, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prototypes ``(..., C, dim)`` and the sequence the sample autoencoder reads: the
        sample embeddings (regression) or prototype (+) one-hot label (images)."""
        if self.ways is None:
            e = self.embedding(torch.cat([support_x, support_y], -1))  # (..., K, dim)
            soft = torch.softmax(self.clustering(e), dim=-1)  # (..., K, C): samples over clusters
            return soft.transpose(-1, -2) @ e, e
        e = self.embedding(support_x)  # (..., N*K, dim)
        labels = torch.arange(self.ways, device=support_y.device)
        onehot = (support_y[..., None] == labels).to(e.dtype)  # (..., N*K, N)
        prototypes = (onehot.transpose(-1, -2) @ e) / onehot.sum(-2)[..., None]  # class means
        eye = torch.eye(self.ways, dtype=e.dtype, device=e.device)
        return prototypes, torch.cat([prototypes, eye.expand(*e.shape[:-2], -1, -1)], -1)

    def forward(
        self, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> tuple[Params, torch.Tensor, torch.Tensor]:
        """A support set ``(..., K, ...)`` -> (gates ``{name: (..., *shape)}`` in (0, 1), the
        summed reconstruction loss ``(...)``, the prototype-to-vertex assignment
        ``(..., C, V)``)."""
        prototypes, sequence = self.prototypes(support_x, support_y)
        enhanced, assignment = self.graph(prototypes)
        q, samples_loss = self.samples_ae(sequence)
        t, graph_loss = self.graph_ae(enhanced)
        task = torch.cat([q, t], -1)  # the task representation (..., 2 dim)
        gates = {
            name: torch.sigmoid(self.gates[_key(name)](task)).view(*task.shape[:-1], *shape)
            for name, shape in self.shapes.items()
        }
        return gates, samples_loss + graph_loss, assignment


def _key(name: str) -> str:
    """A parameter name as a ModuleDict key (no dots)."""
    return name.replace(".", "_")


# -- the meta-gradient -----------------------------------------------------------------------------


def query_loss(
    loss_fn: LossFn,
    steps: int,
    lr: float,
    first_order: bool,
    theta: Params,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One task's query loss (and metrics) after ``steps`` inner steps from ``theta``, the
    task's own initialisation theta_0i (MAML's inner loop, :func:`metalab.functional.adapt`)."""
    adapted = adapt(theta, lambda p, *d: loss_fn(p, *d)[0], support, steps, lr, first_order)
    return loss_fn(adapted, *query)


class ARMLGradient(NamedTuple):
    """What :func:`meta_gradient` returns, without an autograd graph: the mean loss ``()``, its
    gradient grouped as ``meta``, and each metric per task ``(T,)``."""

    loss: torch.Tensor
    grads: Meta
    metrics: dict[str, torch.Tensor]


def meta_gradient(
    loss_fn: LossFn,
    encoder: TaskEncoder,
    meta: Meta,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
    steps: int,
    lr: float,
    recon_weight: float,
    first_order: bool = False,
    backend: str = "vmap",
    chunk_size: int | None = None,
) -> ARMLGradient:
    """The ARML loss of a batch of tasks, averaged over the tasks, and its gradient with respect
    to every meta-parameter: L_i = query loss of task i after the inner loop from
    theta_0i = gates_i * theta_0, plus ``recon_weight`` times task i's two reconstruction losses.

    The chain rule in two parts: dL_i/dtheta_0i, second order through the inner loop, per task
    inside a vmap over the tasks (``vmap(grad(query_loss))``, each task's own initialisation;
    never a gradient through a vmapped loss, see :mod:`metalab.functional.inner`) or one task
    at a time (``"loop"``); then plain autograd from every theta_0i (and the reconstruction
    losses) back through the gates, the autoencoders, the graph and the embeddings, which the
    encoder computes for all tasks at once.

    Args:
        loss_fn: the base learner's ``loss_fn(params, x, y) -> (loss, metrics)``.
        encoder: the :class:`TaskEncoder` whose parameters are ``meta["encoder"]``.
        meta: ``{"net": theta_0, "encoder": ...}`` (detached here).
        support, query: ``(x, y)`` with a leading task dimension ``T``.
        steps, lr, first_order: the inner loop (:func:`metalab.functional.adapt`).
        recon_weight: lambda, the weight of the reconstruction losses.
        backend: ``"vmap"`` or ``"loop"`` (the same result).
        chunk_size: with ``"vmap"``, at most this many tasks at once.

    Returns:
        An :class:`ARMLGradient`; metrics ``query_loss``, ``reconstruction`` and ``loss_fn``'s.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {', '.join(BACKENDS)}")
    tasks = {t.shape[0] for t in (*support, *query)}
    if len(tasks) != 1:
        raise ValueError(f"support and query disagree on the number of tasks: {sorted(tasks)}")
    count = tasks.pop()
    leaves = {
        g: {k: p.detach().requires_grad_() for k, p in part.items()} for g, part in meta.items()
    }
    inner = partial(query_loss, loss_fn, steps, lr, first_order)
    with torch.enable_grad():
        gates, reconstruction, _ = functional_call(encoder, leaves["encoder"], support)
        theta = {k: gates[k] * w for k, w in leaves["net"].items()}  # theta_0i, (T, *shape)
        start = {k: v.detach() for k, v in theta.items()}
        if backend == "vmap":
            batched = vmap(grad_and_value(inner, has_aux=True), chunk_size=chunk_size)
            per_task, (losses, metrics) = batched(start, support, query)
        else:
            per_task, losses, metrics = _loop(inner, start, support, query, count)
        torch.autograd.backward(
            [*theta.values(), reconstruction.mean()],
            [*(per_task[k] / count for k in theta), reconstruction.new_tensor(recon_weight)],
        )
    grads = {
        g: {k: torch.zeros_like(p) if p.grad is None else p.grad for k, p in part.items()}
        for g, part in leaves.items()
    }
    reconstruction = reconstruction.detach()
    loss = losses.mean() + recon_weight * reconstruction.mean()
    metrics = {**metrics, "query_loss": losses, "reconstruction": reconstruction}
    return ARMLGradient(loss, grads, metrics)


def _loop(
    inner: LossFn,
    start: Params,
    support: tuple[torch.Tensor, ...],
    query: tuple[torch.Tensor, ...],
    count: int,
) -> tuple[Params, torch.Tensor, dict[str, torch.Tensor]]:
    """The ``"loop"`` backend of :func:`meta_gradient`: dL_i/dtheta_0i one task at a time with
    plain autograd; the gradients ``(T, *shape)``, losses ``(T,)`` and metrics ``(T,)``."""
    grads, losses, metrics = [], [], []
    for t in range(count):
        theta = {k: v[t].clone().requires_grad_() for k, v in start.items()}
        loss, task_metrics = inner(theta, tuple(s[t] for s in support), tuple(q[t] for q in query))
        grads.append(dict(zip(theta, torch.autograd.grad(loss, list(theta.values())))))
        losses.append(loss.detach())
        metrics.append({k: m.detach() for k, m in task_metrics.items()})
    stacked = {k: torch.stack([g[k] for g in grads]) for k in start}
    return (
        stacked,
        torch.stack(losses),
        {k: torch.stack([m[k] for m in metrics]) for k in metrics[0]},
    )


# -- the method ------------------------------------------------------------------------------------


@dataclass
class ARMLConfig(MAMLConfig):
    vertices: int = 6  # meta-knowledge graph vertices (the code: 6 2-D, 4 Plain-, 8 Art-Multi)
    clusters: int = 2  # regression: soft clusters of the support samples (the prototypes)
    sigma: float = 2.0  # prototype-to-vertex softmax of -||c - h||^2 / (2 sigma) (2-D 2, images 8)
    embed_dim: int = 40  # sample embedding, prototype, vertex and code width (images: 128)
    embed_filters: int = 32  # images: filters of the task-embedding CNN
    recon_weight: float = 0.01  # lambda: weight of the two autoencoders' reconstruction losses


def _recipe(maml_recipe: str, **graph) -> ARMLConfig:
    """MAML's recipe of the same task (its base learner, inner loop and budget) with ARML's own
    settings."""
    return ARMLConfig(**{**asdict(MAML.recipe(maml_recipe)), **graph})


# The 2-D script (huaxiuyao/ARML 2D_bash/2D_10shot.sh and flag defaults [R]) beyond MAML's arml-2d
# recipe (K = 10 support and 10 query points, 2 x 40 ReLU, 5 inner steps at 1e-3 in training and
# 20 at test, meta-batch 25, Adam 1e-3): 6 vertices, 2 clusters, sigma 2, width 40, lambda 0.01.
_GRAPH_2D = dict(vertices=6, clusters=2, sigma=2.0, embed_dim=40, recon_weight=0.01)
# The Art-Multi scripts [R] beyond MAML's omni-art-multi recipes (5-way, 15 training queries per
# class, 4-conv base learner with 32 filters and max-pool, 5 inner steps at 0.01 (see the
# docstring on the loss scale), 20 test steps (``num_updates_test``; which one the paper reports
# is [U]), meta-batch 4, Adam 1e-3): 8 vertices, sigma 8, width 128 (``hidden_dim``), lambda 0.01.
_GRAPH_IMAGES = dict(vertices=8, sigma=8.0, embed_dim=128, recon_weight=0.01)


class ARML(MAML):
    """MAML whose initialisation is gated per task by a representation of the task's support set
    built through a learned meta-knowledge graph (Yao et al. 2020)."""

    fewer_ways = False  # its own predict answers the training ways only
    name = "arml"
    step_function = staticmethod(meta_gradient)  # --compile compiles it (vmap backend)
    Config = ARMLConfig
    recipes = {
        # A CPU budget of the 2-D regression (paper: ARML 0.438 +- 0.029, MAML 2.292 +- 0.163,
        # 10-shot MSE): 20,000 iterations of the script's settings, 19 min on one thread of a
        # busy 2-core CPU (7 min of CPU time); compare with MAML's arml-2d recipe (same budget).
        # Measured (seed 0, 1000 test tasks, noisy targets, 20 steps): ARML 0.764 +- 0.145,
        # MAML 1.157 +- 0.242.
        "2d-regression": _recipe("arml-2d", **_GRAPH_2D),
        # The script's 70,000 iterations (about 25 min of CPU time, an hour or more when busy).
        "2d-regression-full": _recipe("arml-2d-full", **_GRAPH_2D),
        # Omni-Art-Multi 5-way 1-shot / 5-shot (no paper number; the claim to check is ARML >
        # MAML per sub-dataset): MAML's CPU budgets (the scripts: 60,000 / 40,000 iterations);
        # 0.5 s / 1.75 s per meta-step on one thread of a busy 2-core CPU (MAML 1-shot: 0.4 s).
        "omni-art-multi-5w1s": _recipe("omni-art-multi-5w1s", **_GRAPH_IMAGES),
        "omni-art-multi-5w5s": _recipe("omni-art-multi-5w5s", **_GRAPH_IMAGES),
    }

    def __init__(self, config: ARMLConfig) -> None:
        Method.__init__(self, config)
        c = config
        if c.learn_inner_lr:
            raise ConfigError("ARML adapts with one fixed inner_lr: leave out --learn-inner-lr")
        if c.inner_steps < 0 or c.eval_inner_steps < 0:
            raise ConfigError("inner_steps and eval_inner_steps must be 0 or more")
        if min(c.vertices, c.clusters, c.embed_dim, c.embed_filters) < 1:
            raise ConfigError(
                f"vertices={c.vertices}, clusters={c.clusters}, embed_dim={c.embed_dim}, "
                f"embed_filters={c.embed_filters}: use 1 or more for each"
            )
        if not c.sigma > 0 or c.recon_weight < 0:
            raise ConfigError(
                f"sigma={c.sigma}, recon_weight={c.recon_weight}: use sigma > 0, weight >= 0"
            )
        self.regression = c.data in REGRESSION
        if self.regression:
            input_dim = FAMILIES[c.data].input_dim
            self.net: nn.Module = MLP((input_dim, c.hidden, c.hidden, 1))
            for layer in self.net.layers:  # the code's construct_fc_weights
                if isinstance(layer, nn.Linear):
                    _truncated_normal_(layer.weight, 0.01)
                    nn.init.zeros_(layer.bias)
            self.loss_fn = regression_loss(self.net)  # the code's mse: a mean
            encoder = dict(clusters=c.clusters, input_dim=input_dim)
        else:
            if c.data not in IMAGE_CHANNELS:
                raise ConfigError(
                    f"data={c.data!r}: ARML knows {sorted(IMAGE_CHANNELS) + sorted(REGRESSION)}"
                )
            channels = IMAGE_CHANNELS[c.data]
            if c.pool == "max" and feature_side(c.image_size, "max") < 1:
                raise ConfigError(f"image_size={c.image_size}: use 16 or more with pool max")
            self.net = Conv4Classifier(c.ways, channels, c.hidden, c.pool, c.image_size)
            self.loss_fn = classification_loss(self.net)  # mean CE: see the docstring
            encoder = dict(
                ways=c.ways, channels=channels, filters=c.embed_filters, image_size=c.image_size
            )
        self.inner_lrs = nn.ParameterList()  # MAML's Meta-SGD rates: none here
        shapes = {name: p.shape for name, p in self.net.named_parameters()}
        self.encoder = TaskEncoder(shapes, c.embed_dim, c.vertices, c.sigma, **encoder)
        self.set_arithmetic()

    # -- the pieces -----------------------------------------------------------------------------
    def meta_params(self) -> Meta:
        """The live meta-parameters: ``{"net": theta_0, "encoder": everything else}``."""
        return {"net": self.params(), "encoder": dict(self.encoder.named_parameters())}

    def initial_params(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Params:
        """theta_0i = gates * theta_0 for one task's support set (or a batch of tasks: a leading
        ``T`` on the support set and on the result), detached."""
        with torch.no_grad():
            gates, _, _ = self.encoder(self._inputs(support_x), support_y)
            return {name: gates[name] * w for name, w in self.params().items()}

    def assignment(self, batch: TaskBatch) -> torch.Tensor:
        """The prototype-to-vertex assignment of every task of ``batch``: ``(T, C, V)``."""
        with torch.no_grad():
            return self.encoder(self._inputs(batch.support_x), batch.support_y)[2]

    # -- training -------------------------------------------------------------------------------
    def meta_step(self, batch: TaskBatch) -> tuple[float, dict[str, float]]:
        """Write the gradient of the ARML loss, averaged over a batch of tasks, into ``.grad`` of
        every meta-parameter; returns the mean loss and the metrics (``query_loss``,
        ``reconstruction``, and ``acc`` for classification)."""
        c = self.config
        self._tasks = batch.tasks  # for fit_to_memory
        meta = self.meta_params()
        result = self.step_gradient()(
            self.loss_fn,
            self.encoder,
            meta,
            (self._inputs(batch.support_x), batch.support_y),
            (self._inputs(batch.query_x), batch.query_y),
            c.inner_steps,
            c.inner_lr,
            c.recon_weight,
            c.first_order,
            self.arithmetic["backend"],
            self.arithmetic["chunk"],
        )
        for group, part in meta.items():
            write_grads(part, result.grads[group])
        return result.loss.item(), {k: v.mean().item() for k, v in result.metrics.items()}

    # -- prediction -----------------------------------------------------------------------------
    def predict(self, support_x, support_y, query_x) -> torch.Tensor:
        """Outputs (logits or regression values) for the queries after ``eval_inner_steps``
        steps on the support set from the task's gated initialisation."""
        if not self.regression and int(support_y.max()) + 1 != self.config.ways:
            raise ConfigError(
                f"this ARML model has a {self.config.ways}-way output layer; it cannot answer "
                f"{int(support_y.max()) + 1}-way episodes (train one with --ways)"
            )
        theta = self.initial_params(support_x, support_y)
        return self.forward_with(self.adapt(support_x, support_y, params=theta), query_x)

    def regression_curve(
        self, batch: TaskBatch, steps: int, lr: float | None = None
    ) -> torch.Tensor:
        """Query MSE of each task after 0..``steps`` inner steps from its gated initialisation:
        ``(T, steps + 1)``, all tasks at once (vmapped)."""
        lr = self.lr(test=True) if lr is None else lr

        def curve(params, sx, sy, qx, qy):
            errors = []
            for step in range(steps + 1):
                errors.append((self.forward_with(params, qx) - qy).square().mean())
                if step < steps:
                    params = self.adapt(sx, sy, steps=1, lr=lr, params=params)
            return torch.stack(errors)

        return vmap(curve)(self.initial_params(batch.support_x, batch.support_y), *batch.tensors())

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval` of a regression run: :func:`metalab.evaluate.regression.regression_errors` on ``episodes`` (default
        1000) fixed test tasks after 5 and 20 steps (and ``eval_inner_steps``), per family too,
        printed and merged into ``eval.json`` with the graph's assignment of families to
        vertices, and the figure ``arml-graph.png`` (:func:`metalab.plots.plot_knowledge_graph`).
        Image runs: False (the standard few-shot protocols answer through :meth:`predict`)."""
        if not self.regression:
            return False
        from metalab.evaluate.regression import REPORT_STEPS, regression_errors
        from metalab.plots import plot_knowledge_graph
        from metalab.reports import print_tables, regression_table, save_eval

        run_dir = Path(run_dir)
        tasks = 1000 if episodes is None else episodes
        steps = tuple(sorted({*REPORT_STEPS, self.config.eval_inner_steps}))
        rows = regression_errors(self, tasks=tasks, steps=steps, device=device)
        names, assignment = family_assignment(self, tasks=tasks, device=device)
        title = f"{self.name} — {run_dir.name}: {self.config.data} regression"
        print_tables(regression_table(title, rows))
        graph = {"families": names, "assignment": assignment.round(4).tolist()}
        save_eval(
            run_dir / "eval.json",
            [r for _, r in rows],
            None,
            {"method": self.name},
            extra={"knowledge_graph": graph},
        )
        fits = family_fits(self) if self.config.data == "arml-2d" else None
        plot_knowledge_graph(run_dir / "arml-graph.png", assignment, names, fits)
        return True


# -- regression evaluation (the 2-D protocol) ------------------------------------------------------


@torch.no_grad()
def family_assignment(
    method: ARML, tasks: int = 1000, seed: int = EVAL_SEED, device: torch.device | str = "cpu"
) -> tuple[list[str], np.ndarray]:
    """The meta-knowledge graph's view of the task families: the prototype-to-vertex
    assignment averaged over a task's prototypes and over the fixed test tasks of each family,
    ``(families, vertices)`` with rows summing to 1, and the families' names."""
    c = method.config
    batch, info = FAMILIES[c.data](c.eval_shots, c.eval_queries, seed=seed).fixed_set(tasks)
    per_task = method.assignment(batch.to(device)).mean(1).double().cpu().numpy()  # (T, V)
    ids = info.get("family", np.zeros(tasks, int))
    present = np.unique(ids)
    names = [ARML_2D_FAMILIES[f] if c.data == "arml-2d" else f"family {f}" for f in present]
    return names, np.stack([per_task[ids == f].mean(0) for f in present])


@torch.no_grad()
def family_fits(method: ARML, seed: int = EVAL_SEED, points: int = 200) -> list[dict]:
    """One fixed test task of each 2-D family and the method's fit after ``eval_inner_steps``
    steps: along x on the task's line y = 1 (the 1-D families, with the support points), or
    along x at y = 0 (the surfaces; their support points lie elsewhere in the plane)."""
    c = method.config
    stream = FAMILIES["arml-2d"](c.eval_shots, c.eval_queries, seed=seed)
    batch, info = stream.fixed_set(60)  # 60 tasks hold every family (10 expected each)
    u = np.linspace(*stream.family.x_range, points)
    fits = []
    for f, name in enumerate(ARML_2D_FAMILIES):
        found = np.flatnonzero(info["family"] == f)
        if len(found) == 0:
            continue
        t = int(found[0])
        v = 1.0 if f < ON_LINE else 0.0
        grid = np.stack([u, np.full_like(u, v)], 1)
        sx, sy = batch.support_x[t], batch.support_y[t]
        query = torch.from_numpy(grid).to(sx)
        pred = method.predict(sx, sy, query)[:, 0].double().cpu().numpy()
        fit = {"family": name, "x": u, "true": stream.function(info, t, grid)[:, 0], "pred": pred}
        fit["slice"] = f"y = {v:g}"
        if f < ON_LINE:
            fit["support_x"], fit["support_y"] = sx[:, 0].numpy(), sy[:, 0].numpy()
        fits.append(fit)
    return fits
