"""The curiosity DSL (Alet et al. 2020): type checking, the executor on hand-computed rewards,
duplicate pruning and enumeration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metalab.errors import ConfigError
from metalab.rl import programs
from metalab.rl.dsl import (
    A_T,
    CURIOSITY_OPS,
    ENSEMBLE_OPS,
    S_NEXT,
    S_T,
    Add,
    AddToLoss,
    Apply,
    ApplyEnsemble,
    Builder,
    DataStructure,
    Detach,
    Ensemble,
    L2Distance,
    L2Norm,
    ListVariance,
    Net,
    Program,
    RandomNet,
    RunningNorm,
    RunningNormData,
    SquareRootAbs,
    Subtract,
    Type,
    Welford,
    enumerate_programs,
    prune_duplicates,
    structure_key,
)

OBS, ACT, B = 4, 3, 5


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, OBS, generator=g, dtype=torch.float64)
    s_next = torch.randn(B, OBS, generator=g, dtype=torch.float64)
    a = F.one_hot(torch.randint(0, ACT, (B,), generator=g), ACT).double()
    return s, a, s_next


def weights(module, program: Program, op) -> list[np.ndarray]:
    """The float64 weights of the one node of ``program`` whose op is ``op``."""
    (i,) = [i for i, n in enumerate(program.nodes) if n.op == op]
    net = module.structure(i)
    return [p.detach().numpy() for p in (net[0].weight, net[0].bias, net[2].weight, net[2].bias)]


def mlp(w: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = w
    return np.maximum(x @ w1.T + b1, 0.0) @ w2.T + b2


def dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.linalg.norm(x - y, axis=1) / math.sqrt(x.shape[1])


# --- type checking ----------------------------------------------------------------------------


def test_ill_typed_node_is_named_with_expected_and_given_types():
    b = Builder()
    b.add(L2Distance(), S_T, A_T)
    with pytest.raises(
        ConfigError, match=r"node 3 \(L2Distance\) expects .*given \(state, action\)"
    ):
        b.program(3)
    b = Builder()
    feature = b.add(Apply(), S_T, b.add(RandomNet()))
    with pytest.raises(ConfigError, match=r"output node 4 must be a real number, got feature"):
        b.program(feature)


def test_a_program_owning_a_net_must_train_it():
    b = Builder()
    out = b.add(L2Norm(), b.add(Apply(), S_T, b.add(Net(Type.NET_S_F))))
    with pytest.raises(ConfigError, match=r"node 3 \(NetSF\) is a network no AddToLoss trains"):
        b.program(out)
    # A loss behind Detach sends no gradient to the net: still untrained.
    b = Builder()
    feature = b.add(Apply(), S_T, b.add(Net(Type.NET_S_F)))
    out = b.add(L2Norm(), b.add(Detach(), feature))
    b.add(AddToLoss(), out)
    with pytest.raises(ConfigError, match=r"node 3 \(NetSF\)"):
        b.program(out)
    # The same loss without the Detach trains it; a fixed random net needs no loss.
    b = Builder()
    out = b.add(L2Norm(), b.add(Apply(), S_T, b.add(Net(Type.NET_S_F))))
    b.add(AddToLoss(), out)
    assert b.program(out).trained_nets() == {3}
    assert programs.knn_novelty().owned_nets() == set()


# --- reference programs on hand-computed rewards -----------------------------------------------


def test_no_curiosity_is_zero_and_has_nothing_to_train():
    module = programs.no_curiosity().instantiate(OBS, ACT, seed=0, dtype=torch.float64)
    s, a, s_next = batch()
    assert torch.equal(module.reward(s, a, s_next), torch.zeros(B, dtype=torch.float64))
    assert module.update(s, a, s_next) == 0.0


def test_count_based_rewards_one_over_sqrt_visits_of_the_next_cell():
    module = programs.count_based().instantiate(2, 4, seed=0, dtype=torch.float64)
    cells = torch.tensor([[0, 0], [0, 1], [1, 1], [0, 1]], dtype=torch.float64)
    actions = torch.tensor([1, 2, 3])  # action indices become one-hot
    r = module.reward(cells[:-1], actions, cells[1:])  # next cells (0,1), (1,1), (0,1)
    np.testing.assert_allclose(r.numpy(), [1.0, 1.0, 1 / math.sqrt(2)])
    module.update(cells[:-1], actions, cells[1:])  # updating does not count visits again
    r = module.reward(cells[2:3], actions[:1], cells[1:2])  # (0,1) a third time
    np.testing.assert_allclose(r.numpy(), [1 / math.sqrt(3)])


def test_rnd_first_reward_by_hand():
    program = programs.rnd()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    target = mlp(weights(module, program, RandomNet()), s_next.numpy())
    prediction = mlp(weights(module, program, Net(Type.NET_S_F)), s_next.numpy())
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), dist(prediction, target))


def test_forward_model_first_reward_by_hand():
    program = programs.forward_model()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    phi = weights(module, program, RandomNet())
    action = mlp(weights(module, program, Net(Type.NET_A_F)), a.numpy())
    pair = np.concatenate([mlp(phi, s.numpy()), action], axis=1)
    prediction = mlp(weights(module, program, Net(Type.NET_FF_F)), pair)
    expected = dist(prediction, mlp(phi, s_next.numpy()))
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), expected)


def test_inverse_model_first_reward_by_hand():
    program = programs.inverse_model()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    phi = weights(module, program, Net(Type.NET_S_F))
    pair = np.concatenate([mlp(phi, s.numpy()), mlp(phi, s_next.numpy())], axis=1)
    hidden = mlp(weights(module, program, Net(Type.NET_FF_F)), pair)
    logits = mlp(weights(module, program, Net(Type.NET_F_A)), hidden)
    taken = a.numpy().argmax(axis=1)
    nll = np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(B), taken]
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), nll)


def test_fast_rewards_the_change_of_predicted_action_logits():
    program = programs.fast()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    body = weights(module, program, Net(Type.NET_S_F))
    head = weights(module, program, Net(Type.NET_F_A))
    expected = dist(mlp(head, mlp(body, s_next.numpy())), mlp(head, mlp(body, s.numpy())))
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), expected)
    # The same state twice: the prediction does not change, no reward.
    assert torch.allclose(module.reward(s, a, s), torch.zeros(B, dtype=torch.float64))


def test_ccim_first_reward_by_hand():
    program = programs.ccim()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    f = weights(module, program, Net(Type.NET_S_F))
    g = weights(module, program, Net(Type.NET_F_F))
    expected = dist(mlp(g, mlp(f, s_next.numpy())), mlp(g, mlp(f, s.numpy())))
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), expected)


def test_knn_novelty_is_the_distance_to_the_nearest_stored_feature():
    program = programs.knn_novelty()
    module = program.instantiate(OBS, ACT, seed=3, dtype=torch.float64)
    s, a, s_next = batch()
    phi = mlp(weights(module, program, RandomNet()), s_next.numpy())
    # Empty buffer: the nearest neighbour is the zero vector.
    first = module.reward(s[:2], a[:2], s_next[:2])
    np.testing.assert_allclose(first.numpy(), dist(phi[:2], np.zeros_like(phi[:2])))
    # Now it holds phi(s_next[0]), phi(s_next[1]): a revisit scores 0, a new state its distance.
    second = module.reward(s[2:4], a[2:4], s_next[[0, 2]])
    nearest = min(dist(phi[2:3], phi[0:1])[0], dist(phi[2:3], phi[1:2])[0])
    np.testing.assert_allclose(second.numpy(), [0.0, nearest], atol=1e-12)


def test_disagreement_is_the_ensembles_variance_by_hand():
    program = programs.disagreement(members=3)
    module = program.instantiate(OBS, ACT, seed=2, dtype=torch.float64)
    s, a, s_next = batch()
    (e,) = [i for i, n in enumerate(program.nodes) if isinstance(n.op, Ensemble)]
    members = [
        mlp([p.detach().numpy() for p in (m[0].weight, m[0].bias, m[2].weight, m[2].bias)],
            s_next.numpy())
        for m in module.structure(e)
    ]  # fmt: skip
    assert not np.allclose(members[0], members[1])  # independently initialised
    expected = np.stack(members).var(axis=0, ddof=1).mean(axis=1)
    np.testing.assert_allclose(module.reward(s, a, s_next).numpy(), expected, rtol=1e-12)
    target = mlp(weights(module, program, RandomNet()), s_next.numpy())
    loss = np.mean([dist(m, target) for m in members], axis=0).mean()
    assert module.loss(s, a, s_next) == pytest.approx(loss, rel=1e-12)


def test_list_ops_type_check_and_enumerate_only_when_asked():
    b = Builder()
    b.add(ListVariance(), b.add(Apply(), S_T, b.add(RandomNet())))
    with pytest.raises(ConfigError, match=r"ListVariance\) expects \(list of features\)"):
        b.program(5)
    b = Builder()  # an ensemble no loss trains is refused like any owned net
    variance = b.add(ListVariance(), b.add(ApplyEnsemble(), S_NEXT, b.add(Ensemble())))
    with pytest.raises(ConfigError, match="no AddToLoss trains"):
        b.program(variance)
    assert not any(isinstance(n.op, ApplyEnsemble) for p in enumerate_programs(3) for n in p.nodes)
    found = list(enumerate_programs(3, CURIOSITY_OPS + ENSEMBLE_OPS))
    assert any(isinstance(n.op, ListVariance) for p in found for n in p.nodes)


@pytest.mark.parametrize(
    "name", ["rnd", "forward_model", "inverse_model", "fast", "ccim", "disagreement"]
)
def test_update_lowers_the_programs_own_loss(name):
    module = programs.REFERENCE_PROGRAMS[name]().instantiate(OBS, ACT, seed=0, dtype=torch.float64)
    s, a, s_next = batch(1)
    losses = [module.loss(s, a, s_next)]
    for _ in range(3):  # few steps: CCIM's second loss chases a moving target f(s_t)
        assert module.update(s, a, s_next) == pytest.approx(losses[-1])
        losses.append(module.loss(s, a, s_next))
    assert all(after < before for before, after in zip(losses, losses[1:]))
    assert losses[-1] < 0.95 * losses[0]


def test_running_norm_standardises_by_every_value_seen():
    stats = RunningNormData().build(OBS, ACT, torch.float64)
    out = RunningNorm()(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), stats, mutate=True)
    np.testing.assert_allclose(out.numpy(), [-1.0, 0.0, 1.0])  # mean 2, sample std 1
    single = Welford()
    single.update(5.0)
    assert single.std == 0.0  # one value: the op answers zeros rather than dividing by 0
    assert torch.equal(RunningNorm()(torch.ones(2), single), torch.zeros(2))


# --- duplicate pruning ------------------------------------------------------------------------


def _random_feature_norms(first: int) -> tuple[Builder, int, int]:
    """x = |r1(s_t)|, y = |r2(s_next)| with two random nets, built in an order set by ``first``."""
    b = Builder()
    nets = [b.add(RandomNet()), b.add(RandomNet())]
    net_t, net_next = nets if first == 0 else nets[::-1]
    x = b.add(L2Norm(), b.add(Apply(), S_T, net_t))
    y = b.add(L2Norm(), b.add(Apply(), S_NEXT, net_next))
    return b, x, y


def test_prune_duplicates_merges_equal_outputs_and_keeps_different_ones():
    b, x, y = _random_feature_norms(first=0)
    add_xy = b.program(b.add(Add(), x, y))
    b, x, y = _random_feature_norms(first=1)  # other node order, nets swapped
    add_yx = b.program(b.add(Add(), y, x))
    b, x, y = _random_feature_norms(first=0)
    sub = b.program(b.add(Subtract(), x, y))
    b = Builder()
    feature = b.add(Apply(), S_NEXT, b.add(Net(Type.NET_S_F)))
    loss = b.add(L2Norm(), feature)
    b.add(AddToLoss(), loss)
    plain = b.program(loss)
    detached = b.program(b.add(Detach(), loss))  # same reward, the loss still trains the net
    rnd_swapped = Builder()
    target = rnd_swapped.add(Apply(), S_NEXT, rnd_swapped.add(RandomNet()))
    prediction = rnd_swapped.add(Apply(), S_NEXT, rnd_swapped.add(Net(Type.NET_S_F)))
    error = rnd_swapped.add(L2Distance(), target, prediction)
    rnd_swapped.add(AddToLoss(), error)
    rnd_swapped = rnd_swapped.program(error)
    rnd, fast = programs.rnd(), programs.fast()

    kept = prune_duplicates([add_xy, add_yx, sub, plain, detached, rnd, rnd_swapped, fast])
    assert [id(p) for p in kept] == [id(add_xy), id(sub), id(plain), id(rnd), id(fast)]


# --- enumeration ------------------------------------------------------------------------------


def test_enumeration_is_type_correct_has_no_duplicates_and_finds_a_known_program():
    found = list(enumerate_programs(3))
    assert len(found) > 10
    keys = [structure_key(p) for p in found]
    assert len(set(keys)) == len(keys)
    for p in found:
        Program(p.nodes, p.output)  # type-checks again
        assert p.types[p.output] is Type.REAL
        assert sum(not isinstance(n.op, DataStructure) for n in p.nodes[3:]) <= 3
        assert p.instantiate(OBS, ACT).reward(*batch()).shape == (B,)
    # Change of fixed random features between consecutive states, written in another order.
    b = Builder()
    net = b.add(RandomNet())
    later = b.add(Apply(), S_NEXT, net)
    earlier = b.add(Apply(), S_T, net)
    known = b.program(b.add(L2Distance(), later, earlier))
    assert structure_key(known) in keys
    # The same with two separate random nets is a different program, also enumerated.
    b = Builder()
    known_two = b.program(
        b.add(
            L2Distance(),
            b.add(Apply(), S_T, b.add(RandomNet())),
            b.add(Apply(), S_NEXT, b.add(RandomNet())),
        )
    )
    assert structure_key(known_two) in keys and structure_key(known_two) != structure_key(known)


def test_pruning_merges_programs_that_differ_by_a_positive_factor():
    """The lifetime divides the intrinsic reward by its running std, so a program and a positive
    multiple of it (and any two positive constants) train the same agent: one candidate."""
    b = Builder()
    norm = b.add(L2Norm(), b.add(Apply(), S_NEXT, b.add(RandomNet())))
    plain = b.program(norm)
    twice = b.program(b.add(Add(), norm, b.add(Detach(), norm)))
    b = Builder()
    constant = b.program(b.add(L2Norm(), A_T))  # ||one-hot|| / sqrt(|A|): the same every step
    b = Builder()
    other_constant = b.program(b.add(SquareRootAbs(), b.add(L2Norm(), A_T)))
    kept = prune_duplicates([plain, twice, constant, other_constant])
    assert [id(p) for p in kept] == [id(plain), id(constant)]
    assert len(prune_duplicates([plain, constant, other_constant], normalise=False)) == 3
