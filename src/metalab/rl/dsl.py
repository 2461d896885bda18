"""The typed program language of meta-learned curiosity (Alet, Schneider, Lozano-Pérez & Kaelbling
2020, "Meta-learning curiosity algorithms", ICLR; Sec. 3 and App. A).

A curiosity *program* is a DAG of typed operations over the transition ``(s_t, a_t, s_{t+1})``. One
node is the intrinsic reward (a real number per transition); ``AddToLoss`` nodes add real numbers
to the program's own training loss, which trains the neural networks the program owns (Adam, lr
0.005 as in the official code). Data structures (networks, running-norm statistics, a kNN buffer,
a visit counter) are zero-input nodes whose output is the structure itself, so two nodes can share
one network, as in the paper's figures (e.g. RND, Fig. 3: the same state fed to a fixed random
network and to a trained predictor).

``Builder`` writes programs by hand (see ``metalab.rl.programs``), ``Program`` type-checks them,
``Program.instantiate`` gives a runnable ``CuriosityModule`` (``reward``, ``update``),
``enumerate_programs`` lists the type-correct programs up to a size, and ``signature`` /
``prune_duplicates`` merge programs whose outputs agree on a fixed fake environment (Sec. 4,
"pruning duplicates").

Observations are vectors here (the paper's CNNs on grid images become small MLPs); actions are
one-hot vectors of the action space.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections import Counter as Multiset
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metalab.errors import ConfigError

FEATURES = 32  # the paper's feature-vector size (type F, "FeatureVector32")
HIDDEN = 32  # hidden width of every owned MLP
LR = 0.005  # Adam step size of the curiosity module (the official config's)


class Type(Enum):
    """The value types of the DSL (App. A: S, A, F, R and the data structures)."""

    STATE = "state"  # s_t or s_{t+1}: (B, obs_dim)
    ACTION = "action"  # an action-space vector, one-hot a_t or predicted logits: (B, act_dim)
    FEATURE = "feature"  # a 32-d feature vector: (B, 32)
    REAL = "real"  # one real number per transition: (B,)
    VOID = "void"  # what AddToLoss returns
    NET_S_F = "net state->feature"
    NET_F_F = "net feature->feature"
    NET_F_A = "net feature->action"
    NET_A_F = "net action->feature"
    NET_FF_F = "net feature x feature->feature"
    ENSEMBLE_S_F = "ensemble of nets state->feature"
    FEATURE_LIST = "list of features"  # one feature vector per ensemble member: (K, B, 32)
    RANDOM_NET_S_F = "fixed random net state->feature"
    RUNNING_NORM = "running-norm statistics"
    KNN = "nearest-neighbour buffer"
    COUNTER = "visit counter"

    def __str__(self) -> str:
        return self.value


VECTORS = (Type.FEATURE, Type.ACTION)
TRAINABLE_NETS = (Type.NET_S_F, Type.NET_F_F, Type.NET_F_A, Type.NET_A_F, Type.NET_FF_F)
OWNED_NETS = (*TRAINABLE_NETS, Type.ENSEMBLE_S_F)  # what a program must train
Signature = tuple[tuple[Type, ...], Type]


# ---------------------------------------------------------------------------------------------
# Operations. An op lists its concrete signatures (polymorphic ops list one per instance);
# `grad_inputs` says which inputs pass gradients on (Detach, RunningNorm, kNN do not).
# ---------------------------------------------------------------------------------------------


class Op:
    """An operation: its signatures, whether it owns state, and ``__call__`` on a batch."""

    mutates: bool = False  # takes `mutate=`: updates a data structure when executed
    commutative: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def signatures(self) -> list[Signature]:
        raise NotImplementedError

    def output_type(self, given: tuple[Type, ...]) -> Type | None:
        """The output type for these input types, or None when they do not fit."""
        for inputs, out in self.signatures():
            if inputs == given:
                return out
        return None

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (True,) * len(given)

    def arity(self) -> int:
        return len(self.signatures()[0][0])


@dataclass(frozen=True)
class Input(Op):
    """One of the program's inputs s_t, a_t, s_{t+1}."""

    label: str
    type: Type

    def signatures(self) -> list[Signature]:
        return [((), self.type)]


class DataStructure(Op):
    """A zero-input node whose value is a structure the program owns (net, statistics, ...)."""

    type: Type

    def signatures(self) -> list[Signature]:
        return [((), self.type)]

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> object:
        raise NotImplementedError


def _mlp(n_in: int, n_out: int, dtype: torch.dtype) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, n_out)).to(dtype)


@dataclass(frozen=True)
class Net(DataStructure):
    """A trainable MLP's weights; ``type`` names its input and output spaces (App. A)."""

    type: Type = Type.NET_S_F

    def __post_init__(self) -> None:
        if self.type not in TRAINABLE_NETS:
            raise ConfigError(f"Net needs a trainable net type, got {self.type}")

    @property
    def name(self) -> str:
        return {
            Type.NET_S_F: "NetSF",
            Type.NET_F_F: "NetFF",
            Type.NET_F_A: "NetFA",
            Type.NET_A_F: "NetAF",
            Type.NET_FF_F: "NetFFF",
        }[self.type]

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> nn.Module:
        n_in, n_out = {
            Type.NET_S_F: (obs_dim, FEATURES),
            Type.NET_F_F: (FEATURES, FEATURES),
            Type.NET_F_A: (FEATURES, act_dim),
            Type.NET_A_F: (act_dim, FEATURES),
            Type.NET_FF_F: (2 * FEATURES, FEATURES),
        }[self.type]
        return _mlp(n_in, n_out, dtype)


@dataclass(frozen=True)
class RandomNet(DataStructure):
    """A fixed, randomly initialised state->feature MLP (RND's target, Burda et al. 2018)."""

    type: Type = Type.RANDOM_NET_S_F

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> nn.Module:
        net = _mlp(obs_dim, FEATURES, dtype)
        net.requires_grad_(False)
        return net


class Welford:
    """Running mean and sample standard deviation over every value seen (the official code's
    Welford helper; a batch is merged at once with Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: float | np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if len(x) == 0:
            return
        n, mean = len(x), float(x.mean())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += float(((x - mean) ** 2).sum()) + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0


@dataclass(frozen=True)
class RunningNormData(DataStructure):
    """The statistics a ``RunningNorm`` keeps."""

    type: Type = Type.RUNNING_NORM

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> Welford:
        return Welford()


class KnnBuffer:
    """The last ``capacity`` feature vectors, queried for the nearest one (L2)."""

    def __init__(self, capacity: int) -> None:
        self.items: deque[torch.Tensor] = deque(maxlen=capacity)

    def nearest(self, queries: torch.Tensor) -> torch.Tensor:
        """The stored vector nearest each query ``(B, d)``; zeros while the buffer is empty."""
        if not self.items:
            return torch.zeros_like(queries)
        stored = torch.stack(list(self.items))  # (N, d)
        return stored[torch.cdist(queries, stored).argmin(dim=1)]


@dataclass(frozen=True)
class KnnData(DataStructure):
    """A nearest-neighbour buffer (the official code's small one holds 100 vectors)."""

    capacity: int = 100
    type: Type = Type.KNN

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> KnnBuffer:
        return KnnBuffer(self.capacity)


@dataclass(frozen=True)
class CounterData(DataStructure):
    """Visit counts of exact states (a hash table; for discrete or grid states)."""

    type: Type = Type.COUNTER

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> Multiset:
        return Multiset()


# --- arithmetic on real numbers ---------------------------------------------------------------


@dataclass(frozen=True)
class Add(Op):
    """x + y. (The official code computes x + 0.2 y; we keep the plain, commutative sum.)"""

    commutative = True

    def signatures(self) -> list[Signature]:
        return [((Type.REAL, Type.REAL), Type.REAL)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


@dataclass(frozen=True)
class Subtract(Op):
    """x - y."""

    def signatures(self) -> list[Signature]:
        return [((Type.REAL, Type.REAL), Type.REAL)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x - y


@dataclass(frozen=True)
class SquareRootAbs(Op):
    """sqrt(|x|)."""

    def signatures(self) -> list[Signature]:
        return [((Type.REAL,), Type.REAL)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().sqrt()


@dataclass(frozen=True)
class InverseSqrt(Op):
    """1 / sqrt(max(|x|, 1)): a count-based bonus from a visit count (counts start at 1)."""

    def signatures(self) -> list[Signature]:
        return [((Type.REAL,), Type.REAL)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().clamp(min=1.0).rsqrt()


@dataclass(frozen=True)
class Zero(Op):
    """A zero per transition of the batch (the official ConstantZero; reads only the batch size)."""

    def signatures(self) -> list[Signature]:
        return [((Type.STATE,), Type.REAL)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False,)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        return torch.zeros(s.shape[0], dtype=s.dtype)


# --- vectors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class L2Norm(Op):
    """||x||_2 / sqrt(d) (the official code's scaling)."""

    def signatures(self) -> list[Signature]:
        return [((t,), Type.REAL) for t in VECTORS]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=1) / math.sqrt(x.shape[1])


@dataclass(frozen=True)
class L2Distance(Op):
    """||x - y||_2 / sqrt(d), for two vectors of the same space."""

    commutative = True

    def signatures(self) -> list[Signature]:
        return [((t, t), Type.REAL) for t in VECTORS]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).norm(dim=1) / math.sqrt(x.shape[1])


@dataclass(frozen=True)
class DotProduct(Op):
    """<x, y> for two vectors of the same space."""

    commutative = True

    def signatures(self) -> list[Signature]:
        return [((t, t), Type.REAL) for t in VECTORS]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x * y).sum(dim=1)


@dataclass(frozen=True)
class Detach(Op):
    """x with its gradient stopped (the official DetachFeatureVector; here also on reals)."""

    def signatures(self) -> list[Signature]:
        return [((t,), t) for t in (*VECTORS, Type.REAL)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False,)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


@dataclass(frozen=True)
class SoftmaxAndNLL(Op):
    """Cross-entropy of predicted action logits against a target action (its argmax)."""

    def signatures(self) -> list[Signature]:
        return [((Type.ACTION, Type.ACTION), Type.REAL)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (True, False)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target.argmax(dim=1), reduction="none")


# --- networks ---------------------------------------------------------------------------------


_APPLY = {  # (input, net) -> output
    (Type.STATE, Type.NET_S_F): Type.FEATURE,
    (Type.STATE, Type.RANDOM_NET_S_F): Type.FEATURE,
    (Type.FEATURE, Type.NET_F_F): Type.FEATURE,
    (Type.FEATURE, Type.NET_F_A): Type.ACTION,
    (Type.ACTION, Type.NET_A_F): Type.FEATURE,
}


@dataclass(frozen=True)
class Apply(Op):
    """net(x); a fixed random net's output carries no gradient (the paper's "Detach" CNN)."""

    def signatures(self) -> list[Signature]:
        return [(pair, out) for pair, out in _APPLY.items()]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False, False) if given[1] is Type.RANDOM_NET_S_F else (True, True)

    def __call__(self, x: torch.Tensor, net: nn.Module) -> torch.Tensor:
        out = net(x)
        return out if any(p.requires_grad for p in net.parameters()) else out.detach()


@dataclass(frozen=True)
class Ensemble(DataStructure):
    """``size`` independently initialised trainable state->feature MLPs (the paper's FC
    ensemble); ``ApplyEnsemble`` runs them all."""

    size: int = 4
    type: Type = Type.ENSEMBLE_S_F

    def build(self, obs_dim: int, act_dim: int, dtype: torch.dtype) -> nn.ModuleList:
        return nn.ModuleList(_mlp(obs_dim, FEATURES, dtype) for _ in range(self.size))


@dataclass(frozen=True)
class ApplyEnsemble(Op):
    """Every member's output on the states: a list of features ``(K, B, 32)``."""

    def signatures(self) -> list[Signature]:
        return [((Type.STATE, Type.ENSEMBLE_S_F), Type.FEATURE_LIST)]

    def __call__(self, x: torch.Tensor, ensemble: nn.ModuleList) -> torch.Tensor:
        return torch.stack([member(x) for member in ensemble])


@dataclass(frozen=True)
class ListMean(Op):
    """The members' mean feature vector."""

    def signatures(self) -> list[Signature]:
        return [((Type.FEATURE_LIST,), Type.FEATURE)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(0)


@dataclass(frozen=True)
class ListVariance(Op):
    """The members' disagreement: their variance (over members, n - 1), averaged over the 32
    dimensions."""

    def signatures(self) -> list[Signature]:
        return [((Type.FEATURE_LIST,), Type.REAL)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.var(0).mean(-1)


@dataclass(frozen=True)
class ListDistanceToVector(Op):
    """The members' average ``L2Distance`` to one feature vector (as a loss, it trains every
    member towards the vector)."""

    def signatures(self) -> list[Signature]:
        return [((Type.FEATURE_LIST, Type.FEATURE), Type.REAL)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y.unsqueeze(0)).norm(dim=-1).mean(0) / math.sqrt(x.shape[-1])


@dataclass(frozen=True)
class ApplyPair(Op):
    """net([x, y]): the 64 -> 32 net on two concatenated feature vectors."""

    def signatures(self) -> list[Signature]:
        return [((Type.FEATURE, Type.FEATURE, Type.NET_FF_F), Type.FEATURE)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, net: nn.Module) -> torch.Tensor:
        return net(torch.cat([x, y], dim=1))


@dataclass(frozen=True)
class AddToLoss(Op):
    """Adds the batch mean of x to the program's training loss (an update node, Sec. 3)."""

    def signatures(self) -> list[Signature]:
        return [((Type.REAL,), Type.VOID)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


# --- stateful operations (the structure updates when the program executes) ----------------------


@dataclass(frozen=True)
class RunningNorm(Op):
    """(x - mean) / std over every value seen so far; 0 while std is 0 (official RunningNorm)."""

    mutates = True

    def signatures(self) -> list[Signature]:
        return [((Type.REAL, Type.RUNNING_NORM), Type.REAL)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False, False)

    def __call__(self, x: torch.Tensor, stats: Welford, mutate: bool = False) -> torch.Tensor:
        x = x.detach()
        if mutate:
            stats.update(x.cpu().numpy())
        if stats.std == 0:
            return torch.zeros_like(x)
        return (x - stats.mean) / stats.std


@dataclass(frozen=True)
class NearestNeighbor(Op):
    """The stored vector nearest each ``query``; then ``stream`` is added to the buffer.

    As the official NearestNeighborSmall: all queries of the batch are answered before the
    batch's own vectors enter the buffer.
    """

    mutates = True

    def signatures(self) -> list[Signature]:
        return [((Type.FEATURE, Type.FEATURE, Type.KNN), Type.FEATURE)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False, False, False)

    def __call__(
        self, stream: torch.Tensor, query: torch.Tensor, knn: KnnBuffer, mutate: bool = False
    ) -> torch.Tensor:
        nearest = knn.nearest(query.detach())
        if mutate:
            knn.items.extend(stream.detach())
        return nearest


@dataclass(frozen=True)
class VisitCount(Op):
    """How often each exact state has been seen, this one included (rows counted in order)."""

    mutates = True

    def signatures(self) -> list[Signature]:
        return [((Type.STATE, Type.COUNTER), Type.REAL)]

    def grad_inputs(self, given: tuple[Type, ...]) -> tuple[bool, ...]:
        return (False, False)

    def __call__(self, s: torch.Tensor, counts: Multiset, mutate: bool = False) -> torch.Tensor:
        out = []
        for row in s.detach().cpu().numpy():
            key = row.tobytes()
            if mutate:
                counts[key] += 1
            out.append(counts[key])
        return torch.tensor(out, dtype=s.dtype)


# ---------------------------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------------------------

INPUTS = (
    Input("s_t", Type.STATE),
    Input("a_t", Type.ACTION),
    Input("s_next", Type.STATE),
)
S_T, A_T, S_NEXT = 0, 1, 2


@dataclass(frozen=True)
class Node:
    """``op`` applied to the values of the earlier nodes ``inputs``."""

    op: Op
    inputs: tuple[int, ...] = ()


def _describe(types: Sequence[Type]) -> str:
    return "(" + ", ".join(str(t) for t in types) + ")"


@dataclass(frozen=True)
class Program:
    """A curiosity program: nodes 0-2 are s_t, a_t, s_{t+1}; ``output`` is the intrinsic reward.

    Every ``AddToLoss`` node is a loss node. Construction type-checks every node and enforces the
    paper's rule that a program owning a network also trains it (Sec. 3): each ``Net`` must reach
    some ``AddToLoss`` through gradient-carrying edges.

    Raises:
        ConfigError: naming the node and the expected vs given types, or the untrained net.
    """

    nodes: tuple[Node, ...]
    output: int
    types: tuple[Type, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if tuple(n.op for n in self.nodes[:3]) != INPUTS or any(n.inputs for n in self.nodes[:3]):
            raise ConfigError("a program's nodes 0-2 must be the inputs s_t, a_t, s_next")
        types: list[Type] = []
        for i, node in enumerate(self.nodes):
            if any(not 0 <= j < i for j in node.inputs):
                raise ConfigError(
                    f"node {i} ({node.op.name}) reads {node.inputs}: inputs must be earlier nodes"
                )
            given = tuple(types[j] for j in node.inputs)
            out = node.op.output_type(given)
            if out is None:
                expected = " or ".join(_describe(ins) for ins, _ in node.op.signatures())
                raise ConfigError(
                    f"node {i} ({node.op.name}) expects {expected}, given {_describe(given)}"
                )
            types.append(out)
        object.__setattr__(self, "types", tuple(types))
        if not 0 <= self.output < len(self.nodes) or types[self.output] is not Type.REAL:
            got = types[self.output] if 0 <= self.output < len(types) else "no node"
            raise ConfigError(f"the output node {self.output} must be a real number, got {got}")
        untrained = self.owned_nets() - self.trained_nets()
        if untrained:
            i = min(untrained)
            raise ConfigError(
                f"node {i} ({self.nodes[i].op.name}) is a network no AddToLoss trains: a program "
                "that owns a net must also train it (Alet et al. 2020, Sec. 3)"
            )

    @property
    def losses(self) -> list[int]:
        """The loss nodes (``AddToLoss``)."""
        return [i for i, n in enumerate(self.nodes) if isinstance(n.op, AddToLoss)]

    def owned_nets(self) -> set[int]:
        return {i for i, t in enumerate(self.types) if t in OWNED_NETS}

    def gradient_reach(self) -> list[set[int]]:
        """For each node, the trainable nets its value depends on differentiably."""
        reach: list[set[int]] = []
        for i, node in enumerate(self.nodes):
            nets = {i} if self.types[i] in OWNED_NETS else set()
            given = tuple(self.types[j] for j in node.inputs)
            for j, passes in zip(node.inputs, node.op.grad_inputs(given)):
                if passes:
                    nets |= reach[j]
            reach.append(nets)
        return reach

    def trained_nets(self) -> set[int]:
        """The nets whose weights get a gradient from some loss node."""
        reach = self.gradient_reach()
        return set().union(*(reach[i] for i in self.losses))

    def ancestors(self, roots: Sequence[int]) -> set[int]:
        """``roots`` and every node they read, transitively."""
        return _ancestors(self.nodes, roots)

    def __str__(self) -> str:
        lines = [
            f"{i}: {n.op.name}{list(n.inputs) if n.inputs else ''}"
            for i, n in enumerate(self.nodes[3:], 3)
        ]
        return "\n".join([*lines, f"reward = node {self.output}"])

    def instantiate(
        self,
        obs_dim: int,
        act_dim: int,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        lr: float = LR,
    ) -> CuriosityModule:
        """A runnable module with fresh nets and empty structures (seeded per structure)."""
        return CuriosityModule(self, obs_dim, act_dim, seed, dtype, lr)


class Builder:
    """Writes a program node by node: ``b.add(op, *inputs)`` returns the new node's index."""

    def __init__(self) -> None:
        self.nodes: list[Node] = [Node(op) for op in INPUTS]

    def add(self, op: Op, *inputs: int) -> int:
        self.nodes.append(Node(op, tuple(inputs)))
        return len(self.nodes) - 1

    def program(self, output: int) -> Program:
        return Program(tuple(self.nodes), output)


# ---------------------------------------------------------------------------------------------
# Executor
# ---------------------------------------------------------------------------------------------


class CuriosityModule:
    """A program with its own nets and structures: ``reward`` then ``update`` on each batch.

    ``reward`` executes every node without gradients and updates the stateful structures
    (running norm, kNN buffer, visit counts), like one execution of the paper's program per batch;
    ``update`` recomputes the loss nodes with gradients (structures read, not updated) and takes
    one Adam step on the owned nets.
    """

    def __init__(
        self, program: Program, obs_dim: int, act_dim: int, seed: int, dtype: torch.dtype, lr: float
    ) -> None:
        self.program, self.obs_dim, self.act_dim, self.dtype = program, obs_dim, act_dim, dtype
        labels = structure_labels(program)
        self.structures: dict[int, object] = {}
        for i, node in enumerate(program.nodes):
            if isinstance(node.op, DataStructure):
                # Seeded by the structure's canonical name, so reordered copies of one program
                # get the same weights (duplicate pruning relies on it).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed * 100_003 + zlib.crc32(labels[i].encode()))
                    self.structures[i] = node.op.build(obs_dim, act_dim, dtype)
        params = [
            p
            for s in self.structures.values()
            if isinstance(s, nn.Module)
            for p in s.parameters()
            if p.requires_grad
        ]
        self.optimizer = torch.optim.Adam(params, lr=lr) if params else None

    def structure(self, node: int) -> object:
        """The net / statistics / buffer owned by data-structure node ``node``."""
        return self.structures[node]

    def _inputs(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> list[torch.Tensor]:
        a = torch.as_tensor(a)
        if a.dim() == 1:  # action indices -> one-hot
            a = F.one_hot(a.long(), self.act_dim)
        return [torch.as_tensor(x).to(self.dtype) for x in (s, a, s_next)]

    def _run(self, inputs: list[torch.Tensor], needed: set[int], mutate: bool) -> list:
        values: list = []
        for i, node in enumerate(self.program.nodes):
            if i not in needed:
                values.append(None)
            elif i < 3:
                values.append(inputs[i])
            elif isinstance(node.op, DataStructure):
                values.append(self.structures[i])
            else:
                args = [values[j] for j in node.inputs]
                kwargs = {"mutate": mutate} if node.op.mutates else {}
                values.append(node.op(*args, **kwargs))
        return values

    @torch.no_grad()
    def reward(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        """The intrinsic reward of each transition ``(B,)``; updates the stateful structures."""
        values = self._run(self._inputs(s, a, s_next), set(range(len(self.program.nodes))), True)
        return values[self.program.output]

    def _loss(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        losses = self.program.losses
        values = self._run(self._inputs(s, a, s_next), self.program.ancestors(losses), False)
        return sum((values[i].mean() for i in losses), torch.zeros((), dtype=self.dtype))

    @torch.no_grad()
    def loss(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> float:
        """The program's training loss on a batch (the sum of its loss nodes' batch means)."""
        return float(self._loss(s, a, s_next))

    def update(self, s: torch.Tensor, a: torch.Tensor, s_next: torch.Tensor) -> float:
        """One Adam step on the owned nets; returns the loss before the step (0 without losses)."""
        if self.optimizer is None:
            return 0.0
        loss = self._loss(s, a, s_next)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# Canonical structure, enumeration and duplicate pruning (Sec. 4)
# ---------------------------------------------------------------------------------------------


def _ancestors(nodes: Sequence[Node], roots: Sequence[int]) -> set[int]:
    seen, todo = set(), list(roots)
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            todo.extend(nodes[i].inputs)
    return seen


def _unlabelled(nodes: Sequence[Node], i: int) -> str:
    """The expression of node ``i`` with data structures named by kind only."""
    node = nodes[i]
    if i < 3:
        return node.op.label
    if isinstance(node.op, DataStructure):
        return node.op.name
    args = [_unlabelled(nodes, j) for j in node.inputs]
    return f"{node.op.name}({', '.join(sorted(args) if node.op.commutative else args)})"


def _canonical(nodes: Sequence[Node], roots: Sequence[int]) -> tuple[list[str], dict[int, str]]:
    """The expressions of ``roots``, with each data structure named by its kind and the order in
    which a depth-first walk from the roots first meets it (so sharing shows: NetSF#0 twice)."""
    labels: dict[int, str] = {}
    memo: dict[int, str] = {}

    def expr(i: int) -> str:
        if i in memo:
            return memo[i]
        node = nodes[i]
        if i < 3:
            out = node.op.label
        elif isinstance(node.op, DataStructure):
            rank = sum(1 for j in labels if nodes[j].op == node.op)
            out = labels[i] = f"{node.op.name}#{rank}"
        else:
            kids = list(node.inputs)
            if node.op.commutative:  # walk arguments in the order they will be printed
                kids.sort(key=lambda j: _unlabelled(nodes, j))
            args = {j: expr(j) for j in kids}
            texts = [args[j] for j in node.inputs]
            out = f"{node.op.name}({', '.join(sorted(texts) if node.op.commutative else texts)})"
        memo[i] = out
        return out

    return [expr(r) for r in roots], labels


def structure_key(program: Program) -> str:
    """A canonical text of the program: equal for the same DAG written in another node order."""
    keys = []
    for order in itertools.permutations(program.losses):
        texts, _ = _canonical(program.nodes, [program.output, *order])
        keys.append(" ; ".join([texts[0], *sorted(texts[1:])]))
    return min(keys)


def structure_labels(program: Program) -> dict[int, str]:
    """Canonical names of the data-structure nodes (nodes no root reaches get their index)."""
    losses = sorted(program.losses, key=lambda i: _unlabelled(program.nodes, i))
    _, labels = _canonical(program.nodes, [program.output, *losses])
    for i, node in enumerate(program.nodes):
        if isinstance(node.op, DataStructure) and i not in labels:
            labels[i] = f"{node.op.name}@{i}"
    return labels


CURIOSITY_OPS: tuple[Op, ...] = (
    Add(),
    Subtract(),
    SquareRootAbs(),
    L2Norm(),
    L2Distance(),
    DotProduct(),
    Detach(),
    RunningNorm(),
    NearestNeighbor(),
    Apply(),
    ApplyPair(),
    SoftmaxAndNLL(),
    AddToLoss(),
)
"""The operations ``enumerate_programs`` combines by default (a subset of the paper's App. A)."""

ENSEMBLE_OPS: tuple[Op, ...] = (ApplyEnsemble(), ListMean(), ListVariance(), ListDistanceToVector())
"""Ensembles and list statistics: in the language, not in the default enumeration (so the default
candidate lists, and their ``candidate:K:I`` names, stay as they are); pass
``CURIOSITY_OPS + ENSEMBLE_OPS`` to ``enumerate_programs`` to search them too."""

_STRUCTURES = {
    Type.NET_S_F: Net(Type.NET_S_F),
    Type.NET_F_F: Net(Type.NET_F_F),
    Type.NET_F_A: Net(Type.NET_F_A),
    Type.NET_A_F: Net(Type.NET_A_F),
    Type.NET_FF_F: Net(Type.NET_FF_F),
    Type.RANDOM_NET_S_F: RandomNet(),
    Type.RUNNING_NORM: RunningNormData(),
    Type.KNN: KnnData(),
    Type.COUNTER: CounterData(),
    Type.ENSEMBLE_S_F: Ensemble(),
}
_NEW = -1  # "a fresh data structure" in an input slot


def _types(nodes: Sequence[Node]) -> list[Type]:
    types: list[Type] = []
    for node in nodes:
        out = node.op.output_type(tuple(types[j] for j in node.inputs))
        if out is None:
            raise ConfigError(
                f"{node.op.name} does not take {_describe([types[j] for j in node.inputs])}"
            )
        types.append(out)
    return types


def _extensions(nodes: list[Node], types: list[Type], ops: Sequence[Op]) -> Iterator[list[Node]]:
    """Every way to append one operation (and the fresh structures it needs)."""
    existing = set(nodes)
    for op in ops:
        for ins, _ in op.signatures():
            slots = [[i for i, t in enumerate(types) if t is want] for want in ins]
            slots = [[*s, _NEW] if want in _STRUCTURES else s for s, want in zip(slots, ins)]
            for choice in itertools.product(*slots):
                values = [j for j in choice if j != _NEW and types[j] not in _STRUCTURES]
                if len(set(values)) < len(values):  # f(x, x): the paper's inputs_allowed forbids it
                    continue
                if op.commutative and values != sorted(values):
                    continue
                new, inputs = list(nodes), []
                for j, want in zip(choice, ins):
                    if j == _NEW:
                        new.append(Node(_STRUCTURES[want]))
                        j = len(new) - 1
                    inputs.append(j)
                node = Node(op, tuple(inputs))
                if node not in existing:
                    yield [*new, node]


def _complete(nodes: list[Node], types: list[Type]) -> Iterator[Program]:
    """The programs on these nodes: a real node as output, every op feeding it or a loss, every
    loss training some net."""
    ops = [i for i in range(3, len(nodes)) if not isinstance(nodes[i].op, DataStructure)]
    losses = [i for i in ops if isinstance(nodes[i].op, AddToLoss)]
    for out in ops:
        if types[out] is not Type.REAL or not set(ops) <= _ancestors(nodes, [out, *losses]):
            continue
        try:
            program = Program(tuple(nodes), out)
        except ConfigError:
            continue
        reach = program.gradient_reach()
        detached = [nodes[i].inputs[0] for i in ops if isinstance(nodes[i].op, Detach)]
        if all(reach[i] for i in losses) and all(reach[i] for i in detached):
            yield program


def _partial_key(nodes: Sequence[Node]) -> str:
    """Order-free text of a partial DAG: the sorted expressions of its sinks."""
    sinks = set(range(3, len(nodes))) - {j for n in nodes for j in n.inputs}
    texts, _ = _canonical(nodes, sorted(sinks, key=lambda i: _unlabelled(nodes, i)))
    return " ; ".join(sorted(texts))


def enumerate_programs(max_ops: int, ops: Sequence[Op] = CURIOSITY_OPS) -> Iterator[Program]:
    """Type-correct programs with 1..``max_ops`` operations (data structures not counted).

    Breadth first, one operation at a time; each program appears once up to node order
    (``structure_key``). Pruned as in the paper's synthesizer: no op reads the same value twice,
    every op feeds the reward or a loss, every owned net is trained, every loss trains a net,
    ``Detach`` only where there is a gradient to stop.
    """
    seen: set[str] = set()
    frontier = [[Node(op) for op in INPUTS]]
    for _ in range(max_ops):
        grown, grown_keys = [], set()
        for nodes in frontier:
            for new in _extensions(nodes, _types(nodes), ops):
                key = _partial_key(new)
                if key in grown_keys:
                    continue
                grown_keys.add(key)
                grown.append(new)
                for program in _complete(new, _types(new)):
                    k = structure_key(program)
                    if k not in seen:
                        seen.add(k)
                        yield program
        frontier = grown


def fake_environment(
    obs_dim: int = 4, act_dim: int = 3, batches: int = 3, batch_size: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed random transitions ``(s, a one-hot, s_next)`` in float64 on a small grid of states
    (so exact revisits happen and counts differ from 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        s = torch.randint(0, 3, (batch_size, obs_dim), generator=g).double()
        s_next = torch.randint(0, 3, (batch_size, obs_dim), generator=g).double()
        a = F.one_hot(torch.randint(0, act_dim, (batch_size,), generator=g), act_dim).double()
        out.append((s, a, s_next))
    return out


def signature(
    program: Program,
    fake_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    seed: int = 0,
    decimals: int = 6,
    normalise: bool = True,
) -> tuple:
    """The program's rewards on a fixed fake environment (reward, then update, per batch),
    rounded: equal signatures mean duplicate programs (Sec. 4).

    ``normalise``: divided by their standard deviation (their sign when it is 0), as the
    lifetime divides the intrinsic reward by its running standard deviation, so programs that
    differ by a positive factor (and all positive constants) are one program to the agent."""
    batches = fake_environment() if fake_batches is None else fake_batches
    s0, a0, _ = batches[0]
    module = program.instantiate(s0.shape[1], a0.shape[1], seed, dtype=torch.float64)
    rewards = []
    for s, a, s_next in batches:
        rewards.append(module.reward(s, a, s_next).numpy())
        module.update(s, a, s_next)
    flat = np.concatenate(rewards)
    if normalise and np.isfinite(flat).all():
        std = flat.std(ddof=1)
        flat = flat / std if std > 1e-9 else np.sign(flat)
    flat = np.round(flat, decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    return tuple("nan" if math.isnan(x) else x for x in flat.tolist())


def prune_duplicates(
    programs: Sequence[Program],
    fake_batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    seed: int = 0,
    normalise: bool = True,
) -> list[Program]:
    """One representative (the first) of each group of programs with equal signatures."""
    batches = fake_environment() if fake_batches is None else fake_batches
    kept: dict[tuple, Program] = {}
    for program in programs:
        kept.setdefault(signature(program, batches, seed, normalise=normalise), program)
    return list(kept.values())
