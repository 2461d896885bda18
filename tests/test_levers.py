"""Issue 13's levers for one-shot learning of new alphabets: within-alphabet training episodes,
stroke-width and affine augmentation, the encoders, and ProtoNet's test-time settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metalab.cli import main
from metalab.data.fewshot import FewShotDataset
from metalab.data.omniglot import omniglot
from metalab.errors import ConfigError
from metalab.evaluate import evaluate_within_alphabet
from metalab.methods.gnn import GNNConfig
from metalab.methods.maml import MAML
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.nets.conv4 import Conv4
from metalab.nets.resnet12 import ResNet12
from metalab.rundir import load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.tasks.transforms import augment_episode, augment_images, stroke_width
from metalab.train import train


def toy(counts: list[int], size: int = 4) -> FewShotDataset:
    """Each example's pixels hold its own index (as in test_episodes), to trace images back."""
    labels = np.repeat(np.arange(len(counts)), counts)
    n = len(labels)
    images = torch.arange(n, dtype=torch.int64).view(n, 1, 1, 1).expand(n, 1, size, size)
    names = [f"c{i}" for i in range(len(counts))]
    return FewShotDataset(images.to(torch.uint8), labels, names, "toy")


def example_ids(x: torch.Tensor) -> np.ndarray:
    return (x[..., 0, 0, 0] * 255).round().long().numpy()


@pytest.fixture(scope="module")
def background(omniglot_root):
    return omniglot("lake", "train", omniglot_root)


def group_of(name: str) -> str:
    alphabet, _, rotation = name.split("/")
    return f"{alphabet}/{rotation}"


@pytest.mark.realdata
def test_within_alphabet_episodes_take_one_alphabet_at_one_rotation(background):
    sampler = EpisodeSampler(background, 60, 1, 2, seed=5).mix_alphabets(0.5, 20)
    plain = EpisodeSampler(background, 60, 1, 2, seed=5)
    within = 0
    for _ in range(300):
        indices = sampler.sample_indices()
        groups = {group_of(background.class_names[c]) for c in background.labels[indices[:, 0]]}
        if len(indices) == 20:
            within += 1
            assert len(groups) == 1  # one alphabet, one rotation
            assert len(set(background.labels[indices.ravel()])) == 20
        else:
            assert len(indices) == 60 and len(groups) > 1
        plain.sample_indices()
    assert 110 <= within <= 190  # Binomial(300, 0.5): outside is a ~1e-6 event
    assert sampler.protocol()["alphabet_episodes"] == 0.5
    # an episode's images and labels follow its own number of classes
    episode = sampler.episode_from_indices(sampler.sample_indices(within=True))
    assert episode.support_x.shape[0] == 20 and episode.query_y.tolist()[-2:] == [19, 19]
    # a task batch is all of one kind, so it stacks
    shapes = {sampler.sample_batch(3).support_x.shape[:2] for _ in range(30)}
    assert shapes == {(3, 20), (3, 60)}


@pytest.mark.realdata
def test_no_within_alphabet_episodes_leaves_the_stream_as_it_was(background):
    mixed = EpisodeSampler(background, 20, 1, 5, seed=2).mix_alphabets(0.0)
    plain = EpisodeSampler(background, 20, 1, 5, seed=2)
    for _ in range(5):
        assert np.array_equal(mixed.sample_indices(), plain.sample_indices())
    fixed = EpisodeSampler(background, 20, 1, 5, seed=2).mix_alphabets(1.0)
    assert np.array_equal(fixed.fixed_indices(3), plain.fixed_indices(3))  # test sets unmixed


def test_within_alphabet_errors():
    data = toy([5] * 30)
    with pytest.raises(ConfigError, match="named Alphabet/character"):
        EpisodeSampler(data, 5, 1, 1).mix_alphabets(0.5)
    data.class_names = [f"A{i % 2}/character{i:02d}/rot000" for i in range(30)]
    with pytest.raises(ConfigError, match="the largest has 15.*--alphabet-ways 15"):
        EpisodeSampler(data, 5, 1, 1).mix_alphabets(0.5, 20)
    with pytest.raises(ConfigError, match="alphabet_episodes=1.5"):
        EpisodeSampler(data, 5, 1, 1).mix_alphabets(1.5)
    sampler = EpisodeSampler(data, 5, 1, 1).mix_alphabets(1.0, 15)
    e = sampler.sample()
    assert len({data.class_names[c][:2] for c in data.labels[example_ids(e.support_x)]}) == 1


def test_stroke_width_moves_each_image_towards_its_dilation_or_erosion():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 12, 12, generator=g) * (torch.rand(64, 1, 12, 12, generator=g) > 0.7)
    assert torch.equal(stroke_width(x, g, p=0.0), x)
    y = stroke_width(x, g, p=1.0)
    dilated = torch.nn.functional.max_pool2d(x, 3, 1, 1)
    eroded = -torch.nn.functional.max_pool2d(-x, 3, 1, 1)
    assert torch.all(y <= dilated + 1e-6) and torch.all(y >= eroded - 1e-6)
    thicker = (y >= x - 1e-6).flatten(1).all(1)
    thinner = (y <= x + 1e-6).flatten(1).all(1)
    assert torch.all(thicker | thinner) and thicker.any() and thinner.any()
    assert (y - x).abs().flatten(1).amax(1).gt(0).float().mean() > 0.9  # nearly all changed


def test_augmentation_is_fixed_by_its_generator_and_keeps_labels():
    x = torch.zeros(2, 3, 1, 28, 28)
    x[..., 10:18, 12:15] = 1.0
    a = augment_images(x, 0.5, 0.5, torch.Generator().manual_seed(1))
    b = augment_images(x, 0.5, 0.5, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert augment_images(x) is x
    episode = EpisodeSampler(toy([4] * 6, size=8), 3, 1, 2).sample()
    augmented = augment_episode(episode, 0.5, 0.5)
    assert torch.equal(augmented.support_y, episode.support_y)
    assert augmented.query_x.shape == episode.query_x.shape


@pytest.mark.parametrize("size, flat", [(28, 64), (56, 576)])
def test_conv4_pooling(size, flat):
    x = torch.rand(3, 1, size, size)
    net = Conv4(1, 64, pooling="flatten").eval()
    mean = Conv4(1, 64, pooling="mean").eval()
    mean.load_state_dict(net.state_dict())
    assert net(x).shape == (3, flat) and mean(x).shape == (3, 64)
    if size == 28:  # a 1x1 last map: pooling changes nothing
        assert torch.equal(net(x), mean(x))


def test_resnet12_shapes_and_gradients():
    net = ResNet12(1, hidden=8, pooling="mean")
    x = torch.rand(4, 1, 28, 28)
    z = net(x)
    assert z.shape == (4, 80)
    z.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert ResNet12(1, hidden=8, pooling="flatten")(torch.rand(2, 1, 56, 56)).shape == (2, 720)
    with pytest.raises(ConfigError, match="encoder='vgg'"):
        ProtoNet(ProtoNetConfig(encoder="vgg"))


def test_test_time_settings_answer_and_leave_the_model_alone():
    torch.manual_seed(0)
    model = ProtoNet(ProtoNetConfig(bf16="off", channels_last="off")).eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    sx, sy, qx = torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(10, 1, 28, 28)
    with torch.no_grad():
        plain = model.predict(sx, sy, qx)
        model.config = model.config.updated(finetune_steps=3, finetune_lr=0.0)
        assert torch.allclose(model.predict(sx, sy, qx), plain, atol=1e-5)  # no step: no change
        model.config = model.config.updated(finetune_steps=3, finetune_lr=0.05, support_augment=4)
        tuned = model.predict(sx, sy, qx)
        assert torch.equal(tuned, model.predict(sx, sy, qx))  # fixed copies: deterministic
    assert not torch.allclose(tuned, plain)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert model.protocol() == {"support_augment": 4, "finetune_steps": 3, "finetune_lr": 0.05}
    # fine-tuning lowers the loss it descends (distorted support copies vs the prototypes)
    g = torch.Generator().manual_seed(3)
    copies = augment_images(sx, 0.5, 0.5, g)

    def loss(params):
        protos = model.embed(sx, params)
        logits = -((model.embed(copies, params)[:, None] - protos[None]) ** 2).sum(-1)
        return torch.nn.functional.cross_entropy(logits, sy).item()

    model.config = model.config.updated(finetune_steps=20, finetune_lr=0.01)
    own = {n: p.detach() for n, p in model.encoder.named_parameters()}
    tuned_params = model.finetune(sx, sy, 5, torch.Generator().manual_seed(3))
    assert loss(tuned_params) < loss(own)


@pytest.mark.realdata
def test_levers_train_and_learn(omniglot_root, tmp_path, one_thread):
    """Within-alphabet episodes and both distortions together still learn new alphabets fast."""
    config = ProtoNet.recipe("lake").updated(
        ways=20, queries=5, episodes=150, val_every=0, alphabet_episodes=0.5, augment=0.3,
        stroke=0.3, bf16="off", channels_last="off",
    )  # fmt: skip
    torch.manual_seed(0)
    train("protonet", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    method, _ = load_method(tmp_path / "run" / "best.pt")
    test = omniglot("lake", "test", omniglot_root)
    result = evaluate_within_alphabet(method, test, trials=40)
    assert result.mean > 0.3, result  # 20-way: chance is 0.05


@pytest.mark.realdata
def test_levers_that_do_not_apply_are_refused(omniglot_root, tmp_path):
    with pytest.raises(
        ConfigError, match="--augment 0.5: for image episodes, and maml trains on its own tasks"
    ):
        train("maml", MAML.recipe("sinusoid").updated(augment=0.5), tmp_path / "a")
    gnn = {"split": "lake", "ways": 5, "alphabet_episodes": 0.5, "alphabet_ways": 20}
    with pytest.raises(ConfigError, match="gnn answers 5-way episodes only"):
        train("gnn", GNNConfig(**gnn), tmp_path / "b", data_root=omniglot_root)


@pytest.mark.realdata
def test_eval_test_time_from_the_cli(capsys, omniglot_root, tmp_path):
    run, runs_zip = tmp_path / "run", omniglot_root / "omniglot/all_runs.zip"
    common = f"--data-root {omniglot_root} --no-progress".split()
    train_ = "train protonet --split lake --ways 10 --queries 5 --episodes 5 --val-every 0"
    assert main([*train_.split(), "--run-dir", str(run), *common]) == 0
    ask = f"eval {run} --lake-runs {runs_zip} --test-time support_augment=2".split()
    assert main([*ask, *common]) == 0
    assert json.loads((run / "eval.json").read_text())["lake"]["answers"] == {"support_augment": 2}
    capsys.readouterr()
    for setting, says in [
        ("hidden=128", "protonet can change support_augment, finetune_steps, finetune_lr"),
        ("support_augment=many", "support_augment takes a int value like 0"),
        ("support_augment", "write NAME=VALUE"),
    ]:
        assert main(["eval", str(run), "--lake-runs", str(runs_zip), "--test-time", setting,
                     *common]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.realdata
def test_within_alphabet_validation(omniglot_root, tmp_path):
    """val_protocol within-alphabet: trials on the upright characters of the held-out background
    alphabets pick best.pt; a model that cannot answer them, or another split, is refused."""
    from metalab.tasks.oneshot import AlphabetTrials, trial_alphabets

    val = omniglot("lake", "val", omniglot_root)
    trials = AlphabetTrials.unrotated(val)
    assert all(n.endswith("/rot000") for n in trials.dataset.class_names)
    assert trials.dataset.num_classes == val.num_classes // 4
    first = trials.dataset.class_names[0]
    drawing = trials.dataset.images[trials.dataset.class_index[0, 3]]
    assert torch.equal(drawing, val.images[val.class_index[val.class_names.index(first), 3]])
    assert len(set(trial_alphabets(trials.dataset, 8))) == 4  # Inuktitut has only 16 characters
    config = ProtoNet.recipe("lake").updated(
        ways=10, queries=2, episodes=4, val_every=2, val_episodes=8, val_protocol="within-alphabet"
    )
    train("protonet", config, tmp_path / "run", data_root=omniglot_root, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["episode"] for r in rows if r["kind"] == "val"] == [2, 4]
    with pytest.raises(ConfigError, match="--val-protocol within-alphabet is for 20-way"):
        train("protonet", config.updated(split="vinyals"), tmp_path / "v", data_root=omniglot_root)
