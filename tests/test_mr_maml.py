"""MR-MAML (Yin et al. 2020): the KL terms are the closed-form Gaussian KLs, the notebook's
"new Adam every iteration" is Adam's first step every step, the meta-gradient of every variant
(head adapted, encoder not) matches an independent per-task autograd loop in float64 and, on
images, the functional core's subset adaptation; the NME samplers keep their invariants; and on
the NME sinusoid MAML memorises the training tasks while MR-MAML(A) cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, kl_divergence
from torch.func import functional_call

from metalab import functional
from metalab.data.datasets import load_dataset
from metalab.errors import ConfigError
from metalab.methods.mr_maml import MRMAML, ActivationBottleneck, FreshAdam
from metalab.nets.bayes import FLOAT32_EPS
from metalab.tasks.episodes import TaskBatch
from metalab.tasks.nme import (
    AMPLITUDES,
    TRAIN_INDICES,
    NMEEpisodes,
    NMESinusoidTasks,
    RotatedGlyphTasks,
    rotate,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def test_activation_kl_is_the_mean_gaussian_kl():
    """MR-MAML(A)'s KL averages over points AND dimensions (MR-CNP's sums the dimensions)."""
    torch.manual_seed(0)
    enc = ActivationBottleneck(21, 8, 5).double()
    x = torch.randn(7, 21, dtype=F64)
    _, kl = enc(x, torch.zeros(7, 5, dtype=F64))
    mu, sigma = enc.net(x)
    assert torch.allclose(kl, kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).mean(), rtol=1e-9)


def test_a_fresh_adam_takes_the_first_adam_step_every_time():
    """Each fresh step is lr * g / (|g| + eps) whatever came before; a plain group keeps its
    moments, so its second step is not that formula."""
    fresh, plain = nn.Parameter(torch.zeros(3, dtype=F64)), nn.Parameter(torch.zeros(3, dtype=F64))
    opt = FreshAdam(
        [{"params": [fresh], "fresh": True, "eps": 1e-6}, {"params": [plain], "fresh": False}],
        lr=0.1,
    )
    for step, g in enumerate((torch.tensor([1.0, -2.0, 1e-4]), torch.tensor([-3.0, 0.5, 1e-6]))):
        g = g.double()
        before_f, before_p = fresh.detach().clone(), plain.detach().clone()
        fresh.grad, plain.grad = g.clone(), g.clone()
        opt.step()
        assert torch.allclose(fresh.detach(), before_f - 0.1 * g / (g.abs() + 1e-6), atol=1e-12)
        first_step = before_p - 0.1 * g / (g.abs() + 1e-8)
        assert torch.allclose(plain.detach(), first_step, atol=1e-12) == (step == 0)
    assert opt.state[fresh]["step"] == 1 and opt.state[plain]["step"] == 2


def small(regularizer: str, data: str = "nme-sinusoid", **changes) -> MRMAML:
    """A small float64 MR-MAML whose Bayes stds are O(0.1), so the weight noise matters."""
    recipe = "nme-sinusoid" if data == "nme-sinusoid" else "nme-omniglot-20w1s"
    config = MRMAML.recipe(recipe).updated(
        regularizer=regularizer, hidden=8, encoder_hidden=6, scale_init=-2.0, **changes
    )
    if data != "nme-sinusoid":
        config = config.updated(ways=3, hidden=4)
    torch.manual_seed(0)
    return MRMAML(config).double()


def sinusoid_batch(tasks: int = 3) -> TaskBatch:
    batch = NMESinusoidTasks(4, 5, seed=1).sample_batch(tasks)
    return TaskBatch(*(t.double() for t in batch.tensors()))


def reference_grads(method: MRMAML, batch: TaskBatch, noise, steps: int, lr: float) -> dict:
    """The textbook recipe: per task, encode support and query with the task's noise, adapt the
    head with autograd.grad(create_graph=True), query loss (+ beta KL for (A)); mean over tasks;
    plus beta KL of the weights for (W)."""
    c = method.config
    params = dict(method.named_parameters())
    leaves = {k: p.detach().clone().requires_grad_() for k, p in params.items()}
    enc = {k[8:]: v for k, v in leaves.items() if k.startswith("encoder.")}
    total = 0
    for t in range(batch.tasks):

        def pick(n, t=t):
            return n[t] if isinstance(n, torch.Tensor) else [e[t] for e in n]

        zs, _ = functional_call(method.encoder, enc, (batch.support_x[t], pick(noise[0])))
        zq, kl = functional_call(method.encoder, enc, (batch.query_x[t], pick(noise[1])))
        head = {k[5:]: v for k, v in leaves.items() if k.startswith("head.")}
        for _ in range(steps):
            out = functional_call(method.head, head, (zs,))
            loss = (
                F.mse_loss(out, batch.support_y[t])
                if method.regression
                else F.cross_entropy(out, batch.support_y[t])
            )
            g = torch.autograd.grad(loss, list(head.values()), create_graph=True)
            head = {k: v - lr * gk for (k, v), gk in zip(head.items(), g)}
        out = functional_call(method.head, head, (zq,))
        loss = (
            F.mse_loss(out, batch.query_y[t])
            if method.regression
            else F.cross_entropy(out, batch.query_y[t])
        )
        total = total + loss + (c.beta * kl if c.regularizer == "activation" else 0)
    total = total / batch.tasks
    if c.regularizer == "weights":
        for name in [k[:-4] for k in leaves if k.endswith(".loc")]:
            q = Normal(leaves[f"{name}.loc"], F.softplus(leaves[f"{name}.rho"]) + FLOAT32_EPS)
            total = total + c.beta * kl_divergence(q, Normal(0.0, 1.0)).sum()
    names = list(leaves)
    return dict(zip(names, torch.autograd.grad(total, list(leaves.values()), allow_unused=True)))


@pytest.mark.parametrize("regularizer", ["none", "activation", "weights"])
def test_meta_gradient_matches_a_per_task_autograd_loop(regularizer):
    method = small(regularizer, beta=0.3, inner_steps=2)
    batch = sinusoid_batch()
    torch.manual_seed(5)
    noise = (
        method.noise(batch.tasks, batch.support_x.shape[1]),
        method.noise(batch.tasks, batch.query_x.shape[1]),
    )
    torch.manual_seed(5)  # meta_step draws the same noise
    method.zero_grad()
    method.meta_step(batch)
    expected = reference_grads(method, batch, noise, 2, method.config.inner_lr)
    for name, p in method.named_parameters():
        ref = expected[name] if expected[name] is not None else torch.zeros_like(p)
        assert torch.allclose(p.grad, ref, rtol=1e-9, atol=1e-12), name
    encoder_grads = [p.grad.abs().sum() for n, p in method.named_parameters() if "encoder" in n]
    assert regularizer == "none" or all(g > 0 for g in encoder_grads)


@pytest.mark.realdata
def test_images_none_is_the_functional_subset_meta_gradient(omniglot_root):
    """With a deterministic encoder and no KL, MR-MAML on images is MAML adapting the head only:
    :func:`metalab.functional.meta_gradient` with ``keys`` = the head's parameters."""
    method = small("none", data="omniglot", inner_steps=2, inner_lr=0.2)
    data = load_dataset("omniglot", "vinyals", "train", 28, omniglot_root)
    batch = NMEEpisodes(data, 3, 1, 2, seed=0).sample_batch(2)
    batch = TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch.tensors()))
    method.zero_grad()
    method.meta_step(batch)

    class Whole(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.encoder, self.head = m.encoder, m.head

        def forward(self, x):
            return self.head(self.encoder(x, [])[0])

    whole = Whole(method)
    params = {k: p.detach() for k, p in whole.named_parameters()}
    head = [k for k in params if k.startswith("head.")]
    ours = functional.meta_gradient(
        functional.classification_loss(whole), params,
        (batch.support_x, batch.support_y), (batch.query_x, batch.query_y), 2, 0.2, keys=head,
    )  # fmt: skip
    for name, p in method.named_parameters():
        assert torch.allclose(p.grad, ours.grads[name], rtol=1e-9, atol=1e-12), name


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="regularizer='bottleneck'"):
        MRMAML(MRMAML.recipe("nme-sinusoid").updated(regularizer="bottleneck"))
    with pytest.raises(ConfigError, match="regularizer=activation is for the sinusoid"):
        MRMAML(MRMAML.recipe("nme-omniglot-20w1s").updated(regularizer="activation"))


def test_nme_sinusoid_tasks():
    tasks = NMESinusoidTasks(10, 10, seed=0)
    batch, info = tasks.fixed_set(400)
    x = batch.support_x.numpy()
    assert x.shape == (400, 10, 21)
    onehot = x[:, :, 1:]
    assert (onehot.sum(-1) == 1).all() and (onehot.argmax(-1) == info["index"][:, None]).all()
    assert set(info["index"]) == set(range(TRAIN_INDICES))  # training never sees 16..19
    assert np.allclose(info["amplitude"], AMPLITUDES[info["index"]])
    residual = batch.support_y.numpy() - info["clean"][:, :10]
    assert 0.09 < residual.std() < 0.11
    test, tinfo = NMESinusoidTasks.test_set(200, shots=5, points=200, seed=3)
    assert test.query_x.shape == (200, 200, 21) and (tinfo["index"] < TRAIN_INDICES).all()
    assert not np.isin(tinfo["amplitude"], AMPLITUDES).any()  # continuous amplitudes
    again, _ = NMESinusoidTasks.test_set(50, shots=5, points=200, seed=3)
    assert torch.equal(again.support_y, test.support_y[:50])  # task i depends on (seed, i)


@pytest.mark.realdata
def test_nme_episodes_fix_each_class_label(omniglot_root):
    data = load_dataset("omniglot", "vinyals", "train", 28, omniglot_root)
    sampler = NMEEpisodes(data, 20, 1, 1, seed=0)
    slots = np.concatenate(sampler.slots)
    assert len(slots) == len(set(slots)) == data.num_classes  # a partition of the classes
    label_of = {}
    for _ in range(200):
        rows = sampler.sample_indices()
        for label, row in enumerate(rows):
            cls = int(data.labels[row[0]])
            assert label_of.setdefault(cls, label) == label  # the same label every time
            assert (data.labels[row] == cls).all()
    state = sampler.state()
    first = sampler.sample_batch(2)
    sampler.set_state(state)
    assert torch.equal(sampler.sample_batch(2).support_x, first.support_x)
    with pytest.raises(ConfigError, match="alphabet-episodes 0"):
        sampler.mix_alphabets(0.5)


def train_steps(method: MRMAML, steps: int, seed: int = 0) -> MRMAML:
    torch.manual_seed(seed)
    tasks = NMESinusoidTasks(10, 10, seed=seed)
    opt = method.make_optimizer()
    for _ in range(steps):
        opt.zero_grad()
        method.meta_step(tasks.sample_batch(method.config.meta_batch))
        opt.step()
    return method


def test_maml_memorises_the_nme_sinusoid_and_mr_maml_does_not():
    """After the same short training, MAML answers the training tasks WITHOUT adapting (the
    one-hot index names the amplitude), so the support set barely helps it on new tasks;
    MR-MAML(A)'s bottleneck blocks that route: unadapted it cannot tell the tasks apart, and
    after the notebook's 100 test steps it is more accurate on new tasks than MAML."""
    from metalab.evaluate.memorization import evaluate_nme_sinusoid

    results = {}
    for name in ("nme-sinusoid", "nme-sinusoid-a"):
        config = MRMAML.recipe(name).updated(meta_batch=10)
        torch.manual_seed(0)
        method = train_steps(MRMAML(config), 400)
        train, _ = NMESinusoidTasks(5, 50, seed=7).fixed_set(100)
        with torch.no_grad():
            zero = torch.stack(
                [method.answer(train.support_x[t], train.support_y[t], train.query_x[t], 0)
                 for t in range(100)]
            )  # fmt: skip
        unadapted = (zero - train.query_y).square().mean().item()

        def predict(b, m=method):
            return torch.stack(
                [m.answer(b.support_x[t], b.support_y[t], b.query_x[t]) for t in range(b.tasks)]
            )

        test = evaluate_nme_sinusoid(predict, {"steps": 100}, tasks=100)[0].mean
        results[name] = (unadapted, test)
    maml, mr = results["nme-sinusoid"], results["nme-sinusoid-a"]
    assert maml[0] < 0.5 * mr[0]  # MAML answers training tasks from the index alone
    assert mr[1] < maml[1]  # and MR-MAML generalises better to new tasks


def test_rotate_by_a_quarter_turn_is_rot90():
    """Pixel centres of a square image map onto pixel centres, so bilinear is exact: rot90."""
    images = torch.rand(3, 1, 28, 28)
    turned = rotate(images, torch.full((3,), math.pi / 2))
    assert torch.allclose(turned, torch.rot90(images, 1, (2, 3)), atol=1e-5)
    assert torch.allclose(rotate(images, torch.zeros(3)), images, atol=1e-5)


@pytest.mark.realdata
def test_rotated_glyph_tasks(omniglot_root):
    """One character per task, labels in [0, 10), and each character's hidden angle fixed: two
    drawings with the same label are the same rotation of the character's upright drawing."""
    data = load_dataset("omniglot", "vinyals", "test", 28, omniglot_root)
    tasks = RotatedGlyphTasks(data, 5, 5, seed=0)
    assert all(data.class_names[c].endswith("rot000") for c in tasks.classes)
    batch, classes = tasks.fixed_set(20)
    assert np.isin(classes, tasks.classes).all()
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert y.min() >= 0 and y.max() < 10
    again, _ = tasks.fixed_set(5)
    assert torch.equal(again.support_x, batch.support_x[:5])
    # The label of a drawing determines its rotation: rotate an upright drawing of the task's
    # character by offset + r and it is the task's image (the same drawing, the same angle).
    rng = np.random.Generator(np.random.PCG64([0, 0]))
    images, chars = tasks._draw(rng, 1)
    c = chars[0]
    rng = np.random.Generator(np.random.PCG64([0, 0]))
    rng.choice(tasks.classes, 1, replace=False)
    which = (rng.random((1, 10)) * data.counts[[c]][:, None]).astype(np.int64)
    upright = data.gather(data.class_index[c, which[0]]).float()
    r = (torch.cat([images.support_y, images.query_y], 1)[0, :, 0] / 10 - 0.5) * math.pi
    expected = rotate(upright, tasks.offsets[c] + r)
    got = torch.cat([images.support_x, images.query_x], 1)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    other = RotatedGlyphTasks(data, 5, 5, seed=9)
    assert np.array_equal(other.offsets, tasks.offsets)  # angles belong to the characters


def test_notebook_test_set_draws_the_notebooks_amplitudes_and_inputs():
    """Task i reseeds NumPy's legacy generator with i, as the MAML notebook's test loop: its
    amplitude and support inputs are those draws; query points are the notebook's grid, with
    noise 0.1 on the targets and 0.1 twice on the support targets."""
    batch, info = NMESinusoidTasks.notebook_test_set(100)
    for i in (0, 1, 57):
        assert info["amplitude"][i] == np.random.RandomState(i).uniform(0.1, 4.0)
        x = np.random.RandomState(i).uniform(-5, 5, 5)
        assert np.allclose(batch.support_x[i, :, 0].numpy(), x, atol=1e-6)
    assert np.allclose(batch.query_x[0, :, 0].numpy(), np.linspace(-4.5, 4.5, 200), atol=1e-6)
    query_noise = batch.query_y.numpy() - info["clean"]
    assert 0.09 < query_noise.std() < 0.11
    clean_support = info["amplitude"][:, None, None] * np.sin(batch.support_x[..., :1].numpy())
    assert 0.12 < (batch.support_y.numpy() - clean_support).std() < 0.16  # sqrt(2) * 0.1


@pytest.mark.realdata
def test_nme_episodes_switch_is_for_training_only(omniglot_root, tmp_path):
    from metalab.methods import get_method
    from metalab.train import Trainer

    config = MRMAML.recipe("nme-omniglot-20w1s").updated(hidden=8, val_episodes=5)
    trainer = Trainer(MRMAML(config), tmp_path / "run", torch.device("cpu"), omniglot_root)
    assert isinstance(trainer.sampler, NMEEpisodes)
    assert not isinstance(trainer.val_sampler, NMEEpisodes)  # validation stays shuffled
    protonet = get_method("protonet")
    plain = protonet.recipe("omniglot-1shot").updated(nme_episodes=True, val_every=0)
    assert isinstance(
        Trainer(protonet(plain), tmp_path / "p", "cpu", omniglot_root).sampler, NMEEpisodes
    )
    with pytest.raises(ConfigError, match="--nme-episodes True: for image episodes"):
        Trainer(
            MRMAML(MRMAML.recipe("nme-sinusoid").updated(nme_episodes=True)), tmp_path / "s", "cpu"
        )
