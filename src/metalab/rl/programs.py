"""Hand-written curiosity programs in the DSL of ``metalab.rl.dsl`` (Alet et al. 2020, ICLR).

The published baselines the paper expresses in its language (Sec. 3, Fig. 3 for RND), an ensemble
disagreement bonus written with the language's ensembles, and the two algorithms its search found
(Sec. 5: FAST and CCIM). Each function returns a ``Program``; all run
through the same executor (``Program.instantiate``).
"""

from __future__ import annotations

from metalab.rl.dsl import (
    A_T,
    S_NEXT,
    S_T,
    AddToLoss,
    Apply,
    ApplyEnsemble,
    ApplyPair,
    Builder,
    CounterData,
    Detach,
    Ensemble,
    InverseSqrt,
    KnnData,
    L2Distance,
    ListDistanceToVector,
    ListVariance,
    NearestNeighbor,
    Net,
    Program,
    RandomNet,
    SoftmaxAndNLL,
    Type,
    VisitCount,
    Zero,
)


def no_curiosity() -> Program:
    """Reward 0: the agent learns from the extrinsic reward alone (the paper's baseline)."""
    b = Builder()
    return b.program(b.add(Zero(), S_NEXT))


def count_based() -> Program:
    """1 / sqrt(N(s_{t+1})), N counting exact visits of the next state (Strehl & Littman 2008;
    for discrete or grid states)."""
    b = Builder()
    counts = b.add(CounterData())
    return b.program(b.add(InverseSqrt(), b.add(VisitCount(), S_NEXT, counts)))


def rnd() -> Program:
    """Random Network Distillation (Burda et al. 2018; the paper's Fig. 3): the error of a trained
    predictor of a fixed random network's features of s_{t+1}, which is also its loss."""
    b = Builder()
    target = b.add(Apply(), S_NEXT, b.add(RandomNet()))
    prediction = b.add(Apply(), S_NEXT, b.add(Net(Type.NET_S_F)))
    error = b.add(L2Distance(), prediction, target)
    b.add(AddToLoss(), error)
    return b.program(error)


def forward_model() -> Program:
    """Forward-model curiosity (ICM-style; Pathak et al. 2017, with the fixed random features of
    Burda et al. 2019): the error predicting phi(s_{t+1}) from phi(s_t) and a_t, also its loss.

    phi is a fixed random net (a trained phi needs the inverse model to avoid collapse).
    """
    b = Builder()
    phi = b.add(RandomNet())
    action = b.add(Apply(), A_T, b.add(Net(Type.NET_A_F)))
    prediction = b.add(ApplyPair(), b.add(Apply(), S_T, phi), action, b.add(Net(Type.NET_FF_F)))
    error = b.add(L2Distance(), prediction, b.add(Apply(), S_NEXT, phi))
    b.add(AddToLoss(), error)
    return b.program(error)


def inverse_model() -> Program:
    """Inverse-model curiosity (ICM's inverse head, Pathak et al. 2017): a net predicts a_t from
    phi(s_t), phi(s_{t+1}); the reward is its negative log-likelihood, also its loss (which trains
    phi too)."""
    b = Builder()
    phi = b.add(Net(Type.NET_S_F))
    pair = b.add(
        ApplyPair(),
        b.add(Apply(), S_T, phi),
        b.add(Apply(), S_NEXT, phi),
        b.add(Net(Type.NET_FF_F)),
    )
    logits = b.add(Apply(), pair, b.add(Net(Type.NET_F_A)))
    nll = b.add(SoftmaxAndNLL(), logits, A_T)
    b.add(AddToLoss(), nll)
    return b.program(nll)


def knn_novelty(capacity: int = 100) -> Program:
    """Episodic novelty: the distance of phi(s_{t+1}) to its nearest neighbour among the last
    ``capacity`` features seen (phi a fixed random net; the paper's NearestNeighbor module).
    The empty buffer answers the zero vector, so a first reward is ||phi(s_{t+1})|| / sqrt(32)."""
    b = Builder()
    phi = b.add(Apply(), S_NEXT, b.add(RandomNet()))
    nearest = b.add(NearestNeighbor(), phi, phi, b.add(KnnData(capacity)))
    return b.program(b.add(L2Distance(), phi, nearest))


def disagreement(members: int = 4) -> Program:
    """Ensemble disagreement (in the spirit of Pathak, Gandhi & Gupta 2019, with RND's targets):
    ``members`` trained state->feature nets each predict a fixed random net's features of
    s_{t+1}; the reward is their variance on s_{t+1}, which stays high where they have not yet
    all learned the target. Uses the DSL's ensembles and list statistics."""
    b = Builder()
    target = b.add(Apply(), S_NEXT, b.add(RandomNet()))
    predictions = b.add(ApplyEnsemble(), S_NEXT, b.add(Ensemble(members)))
    b.add(AddToLoss(), b.add(ListDistanceToVector(), predictions, target))
    return b.program(b.add(ListVariance(), predictions))


def fast() -> Program:
    """FAST, Fast Action-Space Transition (found by the search; Sec. 5 and its figure): a net
    pi_hat(s) trained with SoftmaxAndNLL to predict the agent's action a_t from s_t; the reward
    is ||pi_hat(s_{t+1}) - pi_hat(s_t)|| / sqrt(|A|), the change of its prediction.

    Unsure: we take the distance between logits (before the softmax), as the ICLR blog post
    "Exploring meta-learned curiosity algorithms" (2024) reads the figure; the figure may mean
    the softmax distributions. pi_hat is obs->32->action (two DSL nets).
    """
    b = Builder()
    body, head = b.add(Net(Type.NET_S_F)), b.add(Net(Type.NET_F_A))
    now = b.add(Apply(), b.add(Apply(), S_T, body), head)
    nxt = b.add(Apply(), b.add(Apply(), S_NEXT, body), head)
    b.add(AddToLoss(), b.add(SoftmaxAndNLL(), now, A_T))
    return b.program(b.add(L2Distance(), nxt, now))


def ccim() -> Program:
    """CCIM, Cycle-Consistency Intrinsic Motivation (found by the search; Sec. 5 and its figure).

    r: a fixed random net, f: a trained state->32 net ("random and forward"), g: a trained
    32->32 backward net. Losses: ||g(f(s_t)) - r(s_t)|| (trains g and f) and
    ||g(f(s_{t+1})) - f(s_t)|| with f(s_{t+1}), f(s_t) detached (trains g only). Reward:
    ||g(f(s_{t+1})) - g(f(s_t))||.

    Unsure: we could not read the paper's figure itself; this follows the equations of the ICLR
    2024 blog post "Exploring meta-learned curiosity algorithms", whose forward loss has only the
    first term, which we read as the second term's inputs being detached. Whether r sees s_t or
    s_{t+1}, and whether the reward reuses the detached f(s_{t+1}), is our choice.
    The second loss chases a moving target (f(s_t) changes as f fits r), so the total loss
    falls over the first steps on a repeated batch but not monotonically for long.
    """
    b = Builder()
    r, f, g = b.add(RandomNet()), b.add(Net(Type.NET_S_F)), b.add(Net(Type.NET_F_F))
    f_now, f_next = b.add(Apply(), S_T, f), b.add(Apply(), S_NEXT, f)
    back_now = b.add(Apply(), f_now, g)
    back_next = b.add(Apply(), b.add(Detach(), f_next), g)
    b.add(AddToLoss(), b.add(L2Distance(), back_now, b.add(Apply(), S_T, r)))
    b.add(AddToLoss(), b.add(L2Distance(), back_next, b.add(Detach(), f_now)))
    return b.program(b.add(L2Distance(), back_next, back_now))


REFERENCE_PROGRAMS = {
    "no_curiosity": no_curiosity,
    "count_based": count_based,
    "rnd": rnd,
    "forward_model": forward_model,
    "inverse_model": inverse_model,
    "knn_novelty": knn_novelty,
    "disagreement": disagreement,
    "fast": fast,
    "ccim": ccim,
}
"""Name -> function returning the program."""
