"""Memory-augmented neural networks — Santoro, Bartunov, Botvinick, Wierstra & Lillicrap, ICML 2016,
"Meta-learning with memory-augmented neural networks".

An LSTM controller reads and writes an external memory M (``memory_slots`` x ``memory_width``,
128 x 40) through ``read_heads`` heads (4). At step t it sees ``(x_t, y_{t-1})`` and its reads of
the previous step, and emits per head a key k_t, a vector to write a_t and a write gate alpha:

    K(k, M(i)) = k . M(i) / (||k|| ||M(i)||)                       # Eq. 1  cosine similarity
    w^r_t(i)   = exp K(k_t, M_t(i)) / sum_j exp K(k_t, M_t(j))     # Eq. 2  read weights
    r_t        = sum_i w^r_t(i) M_t(i)                             # Eq. 3  read vector
    w^u_t      = gamma w^u_{t-1} + w^r_t + w^w_t                   # Eq. 4  usage
    w^lu_t(i)  = 0 if w^u_t(i) > m(w^u_t, n) else 1                # Eq. 5  least used, n = reads
    w^w_t      = sigma(alpha) w^r_{t-1} + (1 - sigma(alpha)) w^lu_{t-1}   # Eq. 6  write weights
    M_t(i)     = M_{t-1}(i) + w^w_t(i) a_t                         # Eq. 7  (LRUA write)

where m(v, n) is the n-th smallest entry of v. Before the write, the least-used slot (of w^u_{t-1})
is set to zero, as the paper says. The write uses the previous step's read weights, so a head can write the
label that arrives at t+1 into the slot it read for the image at t. Within a step we write, then
read the written memory (Eq. 2 reads M_t). The class scores come from [h_t, r_t]. Memory, usage and
weights start at zero for every episode; every tensor carries the batch of episodes as its first
dimension, so a step is one batched op for all episodes (the loop is over time only).

Baselines on the same episodes (``model``): ``lstm``, the same controller without memory (output
from h_t), and ``ff``, a feed-forward net with one hidden layer on ``(x_t, y_{t-1})``.

Choices where the paper is silent or its details are unconfirmed (docs/mann.md):

* the written vector a_t is not the key: Eq. 7 is also quoted with k_t in its place, but a
  separate a_t (the NTM's add vector) lets the key stay an image feature while the written vector
  carries the label (writing k_t learned slower in our CPU probes). k_t and a_t are ``tanh`` of
  linear maps of h_t; each head has its own k_t, a_t and alpha; with several heads, Eq. 4 sums the
  heads' read and write weights and Eq. 7 adds every head's write;
* a learned key strength beta_t = 1 + softplus(w . h_t) per head multiplies Eq. 2's similarities
  (the NTM's; ``key_strength=False`` is the printed Eq. 2). With cosines in [-1, 1] one slot of 128
  gets at most ~5% of a read, so a single stored binding is hardly readable: measured 41.4 vs 34.8%
  at the 2nd instance in the learning-test setting (docs/mann.md);
* ties in Eq. 5 (all usages are 0 at the start) go to the lowest slot index, so exactly n slots
  are least used; m(w^u, n) is found by a stable sort;
* the controller also receives its previous reads r_{t-1} (as in the NTM);
* gamma = 0.95; the write gate starts at sigma(alpha) = 0.5 (``write_gate_bias`` 0); gradient norm
  clipped at 10; RMSprop with torch's defaults except lr;
* the loss is the cross-entropy of every step (summed over the 5 characters of a string label),
  averaged over steps and episodes; a string label counts as correct when all 5 are right;
* a trainer "episode" is one optimizer step on ``meta_batch`` (16) episodes, so the recipes'
  100,000 are batches; the paper's "100,000 episodes" may count single episodes;
* episodes hold exactly ``instances`` (10) drawings per class: 50 steps for 5 classes (the
  paper's "~10 instances each"), 150 for 15 classes (ours: so that the 10th instance exists).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError
from metalab.methods.base import Method, MethodConfig
from metalab.tasks.sequences import (
    LABEL_KINDS,
    STRING_LENGTH,
    STRING_SYMBOLS,
    Sequences,
    SequenceSampler,
    load_characters,
    present,
)

MODELS = ("mann", "lstm", "ff")
VAL_SEED = 2017  # fixed validation episodes (the test episodes: metalab.evaluate.sequences)
TEST_CHARACTERS = 423  # held-out characters of the split: the most classes an episode can have


@dataclass
class MANNConfig(MethodConfig):
    data: str = "omniglot"
    image_size: int = 20  # Omniglot downscaled to 20x20, as in the paper
    model: str = "mann"  # mann | lstm (controller only) | ff (feed-forward)
    labels: str = "onehot"  # onehot | string (5 characters over {a..e})
    classes: int = 5  # classes per episode
    instances: int = 10  # drawings of each class per episode: length = classes * instances
    hidden_size: int = 200  # controller LSTM units [U]
    memory_slots: int = 128  # [S]
    memory_width: int = 40  # [S]
    read_heads: int = 4  # [U]
    gamma: float = 0.95  # usage decay, Eq. 4 [U]
    write_gate_bias: float = 0.0  # initial bias of alpha (Eq. 6): sigma = 0.5 at the start [U]
    key_strength: bool = True  # a learned beta_t >= 1 scaling Eq. 2's similarities (NTM): ours
    max_shift: int = 2  # random translation of training images, pixels [U]
    clip_norm: float = 10.0  # gradient norm clipping; 0 = none [U]
    meta_batch: int = 16  # episodes per optimizer step [U]
    lr: float = 1e-4  # RMSprop [U]
    episodes: int = 100_000  # optimizer steps (see the module doc) [S for 100,000]
    val_every: int = 500
    val_episodes: int = 500


RECIPES = {
    "omniglot-onehot-5": MANNConfig(labels="onehot", classes=5),  # Table 1
    "omniglot-string-5": MANNConfig(labels="string", classes=5),  # Table 2, 5 classes
    "omniglot-string-15": MANNConfig(labels="string", classes=15),  # Table 2, 15 classes
}


# -- the memory (LRUA), pure functions of batched tensors -------------------------------------------
class LRUAState(NamedTuple):
    """The memory of a batch of episodes at one step."""

    memory: torch.Tensor  # M_t (B, slots, width)
    usage: torch.Tensor  # w^u_t (B, slots)
    read_weights: torch.Tensor  # w^r_t (B, heads, slots)


def initial_memory(
    episodes: int, slots: int, width: int, heads: int, device=None, dtype=torch.float32
) -> LRUAState:
    """An empty memory for a new episode: M, usage and read weights all zero."""
    zeros = dict(device=device, dtype=dtype)
    return LRUAState(
        torch.zeros(episodes, slots, width, **zeros),
        torch.zeros(episodes, slots, **zeros),
        torch.zeros(episodes, heads, slots, **zeros),
    )


def cosine_read(
    memory: torch.Tensor, keys: torch.Tensor, strength: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Content-based read: ``memory (B, N, W)``, ``keys (B, H, W)`` -> read weights ``(B, H, N)``
    (Eq. 1-2) and read vectors ``(B, H, W)`` (Eq. 3). Empty (zero) slots have similarity 0.
    ``strength (B, H)``: the NTM's key strength beta multiplying the similarities (None: 1)."""
    similarity = F.normalize(keys, dim=-1) @ F.normalize(memory, dim=-1).transpose(1, 2)  # Eq. 1
    if strength is not None:
        similarity = strength.unsqueeze(-1) * similarity
    weights = similarity.softmax(dim=-1)  # Eq. 2
    return weights, weights @ memory  # Eq. 3


def least_used(usage: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: ``w^lu (B, N)``, 1 on the ``n`` slots of smallest usage (ties: lowest index), and the
    index of the least-used slot ``(B,)``."""
    order = usage.argsort(dim=-1, stable=True)
    weights = torch.zeros_like(usage).scatter_(-1, order[:, :n], 1.0)
    return weights, order[:, 0]


def lrua_step(
    state: LRUAState,
    keys: torch.Tensor,
    adds: torch.Tensor,
    write_gate: torch.Tensor,
    gamma: float,
    strength: torch.Tensor | None = None,
) -> tuple[LRUAState, torch.Tensor, torch.Tensor]:
    """One step of least-recently-used access: every head writes its a_t, then reads with its k_t.

    Args:
        state: the memory after step t-1.
        keys: ``(B, H, W)`` k_t of every head (reads).
        adds: ``(B, H, W)`` a_t of every head (writes).
        write_gate: ``(B, H)`` alpha of every head (a logit: sigma(alpha) in Eq. 6).
        gamma: usage decay (Eq. 4).

    Returns:
        The memory after step t, the read vectors ``(B, H, W)`` and the write weights ``(B, H, N)``.
    """
    memory, usage, previous_reads = state
    heads = keys.shape[1]
    lu_weights, least = least_used(usage, heads)  # w^lu_{t-1}, n = number of reads
    slot = least.view(-1, 1, 1).expand(-1, 1, memory.shape[2])
    memory = memory.scatter(1, slot, 0.0)  # the least-used slot is zeroed before writing
    sigma = torch.sigmoid(write_gate).unsqueeze(-1)  # (B, H, 1)
    write_weights = sigma * previous_reads + (1 - sigma) * lu_weights.unsqueeze(1)  # Eq. 6
    memory = memory + write_weights.transpose(1, 2) @ adds  # Eq. 7, all heads: (B, N, W)
    read_weights, reads = cosine_read(memory, keys, strength)  # Eq. 1-3 on M_t
    usage = gamma * usage + read_weights.sum(1) + write_weights.sum(1)  # Eq. 4
    return LRUAState(memory, usage, read_weights), reads, write_weights


# -- the networks -----------------------------------------------------------------------------------
class MANN(Method):
    """MANN with LRUA (``model="mann"``), or one of its baselines (``lstm``, ``ff``), on episodes
    presented as sequences (:mod:`metalab.tasks.sequences`)."""

    name = "mann"
    Config = MANNConfig
    recipes = RECIPES
    task_batches = True  # the trainer hands over a batch of episodes, even of one
    answers = frozenset()  # its own protocol (accuracy per instance, report), no support sets

    def __init__(self, config: MANNConfig) -> None:
        super().__init__(config)
        c = config
        _check(c)
        self.blocks = 1 if c.labels == "onehot" else STRING_LENGTH
        self.digits = c.classes if c.labels == "onehot" else STRING_SYMBOLS
        inputs = c.image_size**2 + self.blocks * self.digits  # (x_t, y_{t-1})
        h = c.hidden_size
        reads = c.read_heads * c.memory_width if c.model == "mann" else 0
        if c.model == "ff":
            self.hidden = nn.Linear(inputs, h)
        else:  # LSTM: the input part of the gates for all steps at once, the recurrent part per step
            self.input_gates = nn.Linear(inputs, 4 * h)
            self.recurrent_gates = nn.Linear(h + reads, 4 * h, bias=False)
        if c.model == "mann":
            self.keys = nn.Linear(h, c.read_heads * c.memory_width)
            self.adds = nn.Linear(h, c.read_heads * c.memory_width)
            self.write_gates = nn.Linear(h, c.read_heads)
            self.strengths = nn.Linear(h, c.read_heads) if c.key_strength else None
            nn.init.constant_(self.write_gates.bias, c.write_gate_bias)
        self.output = nn.Linear(h + reads, self.blocks * self.digits)  # from [h_t, r_t]

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class scores of every step of a batch of episodes.

        Args:
            x: ``(B, T, 400)`` images.
            labels: ``(B, T, blocks)`` the label of every image; step t sees only those of
                steps < t (:func:`~metalab.tasks.sequences.present`).

        Returns:
            Logits ``(B, T, blocks, digits)``.
        """
        inputs = present(x, labels, self.digits)  # (B, T, 400 + blocks * digits)
        if self.config.model == "ff":
            features = torch.relu(self.hidden(inputs))
        else:
            features = self._recurrent(inputs)  # (B, T, hidden [+ heads * width])
        return self.output(features).unflatten(-1, (self.blocks, self.digits))

    def _recurrent(self, inputs: torch.Tensor) -> torch.Tensor:
        """The controller (and memory) over time: ``[h_t, r_t]`` of every step, ``(B, T, F)``."""
        c = self.config
        b, steps = inputs.shape[:2]
        h = inputs.new_zeros(b, c.hidden_size)
        cell = torch.zeros_like(h)
        gates_in = self.input_gates(inputs)  # (B, T, 4H)
        mann = c.model == "mann"
        if mann:
            memory = initial_memory(
                b, c.memory_slots, c.memory_width, c.read_heads, inputs.device, inputs.dtype
            )
            reads = inputs.new_zeros(b, c.read_heads * c.memory_width)
        outputs = []
        for t in range(steps):
            recurrent = torch.cat([h, reads], -1) if mann else h
            gates = gates_in[:, t] + self.recurrent_gates(recurrent)
            i, f, g, o = gates.chunk(4, dim=-1)
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
            if mann:
                shape = (b, c.read_heads, c.memory_width)
                keys = torch.tanh(self.keys(h)).view(shape)  # k_t
                adds = torch.tanh(self.adds(h)).view(shape)  # a_t
                beta = 1 + F.softplus(self.strengths(h)) if c.key_strength else None
                memory, r, _ = lrua_step(memory, keys, adds, self.write_gates(h), c.gamma, beta)
                reads = r.flatten(1)
                outputs.append(torch.cat([h, reads], -1))
            else:
                outputs.append(h)
        return torch.stack(outputs, dim=1)

    # -- training --------------------------------------------------------------------------------
    @classmethod
    def task_sampler(cls, config: MANNConfig, part: str, data_root=None) -> SequenceSampler:
        """Training episodes from ``config.train_part``, or the fixed validation episodes."""
        _check(config)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "mann trains in one process: run `metalab train mann` without torchrun"
            )
        if part == "val" and config.train_part == "trainval":
            raise ConfigError(
                "--train-part trainval leaves no validation characters: add --val-every 0"
            )
        source = config.train_part if part == "train" else part
        seed = config.seed if part == "train" else VAL_SEED
        return sequence_sampler(config, source, data_root, seed)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(self.parameters(), lr=self.config.lr)

    def meta_loss(self, batch: Sequences) -> tuple[torch.Tensor, dict[str, float]]:
        """Cross-entropy of every step (summed over a string's characters), mean over steps."""
        logits = self(batch.x, batch.labels)
        loss = F.cross_entropy(logits.flatten(0, 2), batch.labels.flatten(), reduction="none")
        loss = loss.view(batch.labels.shape).sum(-1).mean()
        correct = (logits.argmax(-1) == batch.labels).all(-1).float()  # (B, T)
        metrics = {"acc": correct.mean().item()}
        if self.config.instances > 1:
            metrics["acc_2nd"] = correct[batch.instance == 2].mean().item()
        return loss, metrics

    def meta_step(self, batch: Sequences) -> tuple[float, dict[str, float]]:
        loss, metrics = self.meta_loss(batch)
        loss.backward()
        if self.config.clip_norm > 0:
            nn.utils.clip_grad_norm_(self.parameters(), self.config.clip_norm)
        return loss.item(), metrics

    # -- evaluation ------------------------------------------------------------------------------
    def validation_score(self, sampler: SequenceSampler, episodes: int, device) -> float:
        """Mean accuracy from the 2nd instance on (the 1st is a guess for every model), on
        ``episodes`` fixed episodes of the validation characters."""
        from metalab.evaluate.sequences import instance_accuracy

        return float(instance_accuracy(self, sampler, episodes, device)[:, 1:].mean())

    def report(self, run_dir, *, episodes: int | None, device, data_root=None) -> bool:
        """`metalab eval`: :func:`metalab.evaluate.sequences.report_instances` (accuracy at the
        k-th instance on fixed test episodes; ``eval.json``, ``instances.png`` and a table)."""
        from metalab.evaluate.sequences import report_instances

        return report_instances(
            self, run_dir, episodes=episodes, device=device, data_root=data_root
        )


def _check(c: MANNConfig) -> None:
    """Settings a user can get wrong, as one-line errors."""
    if c.data != "omniglot":
        raise ConfigError(f"mann trains on Omniglot episodes, not --data {c.data!r}: use omniglot")
    if c.model not in MODELS:
        raise ConfigError(f"--model {c.model!r}: use one of {', '.join(MODELS)}")
    if c.labels not in LABEL_KINDS:
        raise ConfigError(f"--labels {c.labels!r}: use onehot or string")
    if not 2 <= c.classes <= TEST_CHARACTERS:
        raise ConfigError(
            f"--classes {c.classes}: the test split has {TEST_CHARACTERS} characters; "
            f"use 2 to {TEST_CHARACTERS}"
        )
    if c.model == "mann" and c.read_heads > c.memory_slots:
        raise ConfigError(f"read_heads {c.read_heads} > memory_slots {c.memory_slots}")


def sequence_sampler(c: MANNConfig, part: str, data_root, seed: int) -> SequenceSampler:
    """Episodes of ``c``'s shape from the characters of ``part``, shifted only for training."""
    images = load_characters(part, data_root, c.image_size)
    shift = c.max_shift if part in ("train", "trainval") else 0
    return SequenceSampler(images, c.classes, c.instances, c.labels, seed, part, shift)
