"""The protocol's arithmetic: mean and 95% CI, and that evaluation uses the fixed episodes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from metalab.data.fewshot import FewShotDataset
from metalab.errors import ConfigError
from metalab.evaluate import (
    confidence_interval,
    decide,
    eval_mode,
    evaluate,
    evaluate_lake_runs,
    evaluate_verification,
    evaluate_within_alphabet,
    one_to_one,
)
from metalab.evaluate.fewshot import predict_queries
from metalab.evaluate.oneshot import within_alphabet_by_alphabet
from metalab.evaluate.protocol import EVAL_SEED
from metalab.methods.l2o import L2O, L2OConfig
from metalab.methods.maml import MAML
from metalab.methods.meta_lstm import MetaLSTM
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.methods.siamese import Siamese, SiameseConfig
from metalab.reports import results_table
from metalab.tasks.episodes import Episode, EpisodeSampler
from metalab.tasks.oneshot import ALL_DRAWERS, within_alphabet_trials


def test_confidence_interval_formula():
    values = [0.9, 1.0, 0.8, 0.95]
    mean, ci = confidence_interval(values)
    sd = math.sqrt(sum((v - 0.9125) ** 2 for v in values) / 3)  # sample sd, n - 1
    assert mean == pytest.approx(0.9125)
    assert ci == pytest.approx(1.96 * sd / 2)
    assert confidence_interval([0.5]) == (0.5, 0.0)
    with pytest.raises(ValueError):
        confidence_interval([])


class Oracle(torch.nn.Module):
    """Reads the class from the image (pixel value = class id): always right, except that queries
    of ``wrong_class`` get the next label."""

    def __init__(self, wrong_class: int | None = None) -> None:
        super().__init__()
        self.wrong_class = wrong_class

    def predict(self, support_x, support_y, query_x):
        support_class = (support_x[:, 0, 0, 0] * 255).round()
        query_class = (query_x[:, 0, 0, 0] * 255).round()
        same = (query_class[:, None] == support_class[None, :]).float()  # (queries, support)
        logits = same @ torch.nn.functional.one_hot(support_y).float()  # (queries, ways)
        wrong = query_class == self.wrong_class
        logits[wrong] = logits[wrong].roll(1, dims=1)
        return logits


def class_images(classes: int, per_class: int) -> FewShotDataset:
    labels = np.repeat(np.arange(classes), per_class)
    images = torch.from_numpy(labels.astype(np.uint8)).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return FewShotDataset(images.contiguous(), labels, [str(c) for c in range(classes)], "ids")


def test_evaluate_counts_accuracy_per_episode():
    sampler = EpisodeSampler(class_images(10, 6), ways=5, shots=1, queries=5, seed=0)
    perfect = evaluate(Oracle(), sampler, episodes=50)
    assert perfect.mean == 1.0 and perfect.ci95 == 0.0
    assert perfect.protocol == {
        "dataset": "ids",
        "ways": 5,
        "shots": 1,
        "queries": 5,
        "seed": 0,
        "episodes": 50,
    }
    # class 3 always answered wrong: an episode holding it scores 4/5, else 5/5
    flawed = evaluate(Oracle(wrong_class=3), sampler, episodes=50)
    indices = sampler.fixed_indices(50)
    has_three = np.array([3 in sampler.dataset.labels[i[:, 0]] for i in indices])
    expected = np.where(has_three, 0.8, 1.0)
    assert flawed.mean == pytest.approx(expected.mean())
    assert flawed.ci95 == pytest.approx(1.96 * expected.std(ddof=1) / math.sqrt(50))


# -- eval mode, the transductive label, and what a method may be asked ------------------------------


def test_eval_mode_restores_the_mode_it_found():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    for training in (True, False):
        net.train(training)
        with eval_mode(net) as inside:
            assert inside is net and not net.training and not net[1].training
        assert net.training is training and net[1].training is training
    net.train()
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        raise RuntimeError("inside")
    assert net.training and net[1].training


def drawings(characters: int = 20, drawers: int = 20, seed: int = 0) -> FewShotDataset:
    """Random 28x28 "drawings" of one alphabet's characters, named as Omniglot's."""
    labels = np.repeat(np.arange(characters), drawers)
    images = torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (len(labels), 1, 28, 28))
    )
    names = [f"Alphabet/character{c + 1:02d}" for c in range(characters)]
    return FewShotDataset(images.to(torch.uint8), labels, names, "drawings")


def _text(table) -> str:
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_transductive_methods_are_labelled_in_results_and_tables():
    sampler = EpisodeSampler(drawings(10, 2), ways=5, shots=1, queries=1, seed=0)
    maml = MAML(MAML.recipe("omniglot-5w1s").updated(hidden=8, eval_inner_steps=1))
    protonet = ProtoNet(ProtoNetConfig(hidden=8))
    assert maml.transductive and MetaLSTM.transductive and not protonet.transductive
    assert not MAML(MAML.recipe("sinusoid")).transductive  # an MLP: no batch statistics
    transductive, plain = evaluate(maml, sampler, 2), evaluate(protonet, sampler, 2)
    assert transductive.protocol["transductive"] is True and "transductive" not in plain.protocol
    assert "drawings (transductive)" in _text(results_table("maml", [transductive]))
    assert "transductive" not in _text(results_table("protonet", [plain]))


def _balanced_assignments(ways: int, per_class: int) -> set[tuple[int, ...]]:
    return set(itertools.permutations(np.repeat(np.arange(ways), per_class).tolist()))


@pytest.mark.parametrize("ways, per_class", [(6, 1), (4, 2)])
def test_one_to_one_is_the_best_balanced_assignment(ways, per_class):
    """Checked against every assignment that gives each class ``per_class`` queries: none scores
    more, and the answer is one of them."""
    scores = torch.randn(ways * per_class, ways, generator=torch.Generator().manual_seed(ways))
    rows = torch.arange(ways * per_class)
    answer = one_to_one(scores, per_class)
    assert torch.bincount(answer, minlength=ways).tolist() == [per_class] * ways
    best = max(
        scores[rows, torch.tensor(a)].sum().item() for a in _balanced_assignments(ways, per_class)
    )
    assert scores[rows, answer].sum().item() == pytest.approx(best, abs=1e-12)
    # a constant per query (logits vs log-probabilities) does not change it
    shifted = scores - torch.logsumexp(scores, 1, keepdim=True) + torch.arange(len(scores))[:, None]
    assert torch.equal(one_to_one(shifted, per_class), answer)


def test_one_to_one_keeps_an_arg_max_that_is_already_one_to_one_and_refuses_bad_shapes():
    permutation = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    scores = torch.eye(5)[permutation] + 0.1 * torch.rand(5, 5)
    assert torch.equal(decide(scores, "one-to-one"), decide(scores)) and torch.equal(
        decide(scores), permutation
    )
    # two queries prefer class 0; the one that prefers it less takes its second choice
    collide = torch.tensor([[5.0, 1.0, 0.0], [4.0, 3.9, 0.0], [0.0, 0.0, 1.0]])
    assert decide(collide).tolist() == [0, 0, 2] and one_to_one(collide).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="5 queries are not 2 for each of 3 classes"):
        one_to_one(torch.zeros(5, 3), per_class=2)
    with pytest.raises(ConfigError, match="decision 'vote': use one of argmax, one-to-one"):
        decide(scores, "vote")


def test_within_alphabet_trials_answered_one_to_one_are_marked_transductive():
    """Each trial's queries are assigned at once (checked against the assignment applied by hand
    to the same trials), and the result says so."""
    lake, alphabet = ProtoNet(ProtoNetConfig(hidden=8, split="lake")), drawings()
    plain, _ = within_alphabet_by_alphabet(lake, alphabet, trials=4)
    joint, by_alphabet = within_alphabet_by_alphabet(
        lake, alphabet, trials=4, decision="one-to-one"
    )
    support, query = within_alphabet_trials(alphabet, 4, 20, ALL_DRAWERS, EVAL_SEED)
    labels, by_hand = torch.arange(20), {"argmax": [], "one-to-one": []}
    with eval_mode(lake), torch.no_grad():
        for s, q in zip(support, query):
            episode = Episode(alphabet.gather(s), labels, alphabet.gather(q), labels)
            scores = predict_queries(lake, episode)
            # a different character for each query
            assert sorted(one_to_one(scores).tolist()) == list(range(20))
            for decision, found in by_hand.items():
                found.append((decide(scores, decision) == labels).float().mean().item())
    assert plain.mean == pytest.approx(np.mean(by_hand["argmax"]), abs=1e-12)
    assert joint.mean == pytest.approx(np.mean(by_hand["one-to-one"]), abs=1e-12)
    assert by_hand["argmax"] != by_hand["one-to-one"]  # the two decisions differ on these trials
    assert "decision" not in plain.protocol and "transductive" not in plain.protocol
    assert joint.protocol["decision"] == "one-to-one" and joint.protocol["transductive"] is True
    assert all(r.protocol["decision"] == "one-to-one" for r in by_alphabet.values())
    text = _text(results_table("protonet", [joint]))
    assert "(one-to-one, transductive)" in text and "a person answers one drawing" in text


def test_lake_protocols_refuse_a_model_that_may_have_seen_the_evaluation_alphabets():
    """The evaluation functions refuse, not only the command line."""
    alphabet = drawings()
    vinyals = ProtoNet(ProtoNetConfig(hidden=8))
    seen = "protonet model was trained on the omniglot vinyals split, which includes Lake's"
    with pytest.raises(ConfigError, match=f"{seen}.*score Lake's runs with a model trained"):
        evaluate_lake_runs(vinyals, [])
    with pytest.raises(ConfigError, match=f"{seen}.*score within-alphabet trials with a model"):
        evaluate_within_alphabet(vinyals, alphabet, trials=1)
    siamese = Siamese(SiameseConfig(hidden=8))
    with pytest.raises(ConfigError, match="siamese model was trained on the omniglot vinyals"):
        evaluate_verification(siamese, alphabet, pairs=2)
    test_part = ProtoNet(ProtoNetConfig(hidden=8, split="lake", train_part="test"))
    with pytest.raises(ConfigError, match="trained on the Lake split's test part"):
        evaluate_lake_runs(test_part, [])
    lake = ProtoNet(ProtoNetConfig(hidden=8, split="lake"))
    result = evaluate_within_alphabet(lake, alphabet, trials=2)
    assert result.protocol["episodes"] == 2 and 0 <= result.mean <= 1


def test_a_protocol_the_method_cannot_answer_is_an_error():
    alphabet = drawings()
    sine = MAML(MAML.recipe("sinusoid"))
    with pytest.raises(ConfigError, match="maml does not answer Lake's one-shot runs"):
        evaluate_lake_runs(sine, [])
    with pytest.raises(ConfigError, match="maml does not answer within-alphabet"):
        evaluate_within_alphabet(sine, alphabet, trials=1)
    with pytest.raises(ConfigError, match="l2o does not answer Lake's one-shot runs"):
        evaluate_lake_runs(L2O(L2OConfig()), [])
    lake = ProtoNet(ProtoNetConfig(hidden=8, split="lake"))
    with pytest.raises(ConfigError, match="protonet has no pair score"):
        evaluate_verification(lake, alphabet, pairs=2)
