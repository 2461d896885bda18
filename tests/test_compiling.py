"""`--compile`: compiled steps compute what eager ones do (float64), a graph that does not compile
falls back with one line, and a run reports what compiling cost. (Whether it is faster is
measured in benchmarks/, not tested.)"""

from __future__ import annotations

import json

import pytest
import torch

from metalab import compiling
from metalab.cli import main
from metalab.compiling import CompileClock, Compiled, compile_forward, describe_compile
from metalab.methods import get_method
from metalab.methods.maml import MAML
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.tasks.episodes import Episode, TaskBatch
from metalab.tasks.regression import SinusoidTasks


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (see conftest.one_thread)."""


def _maml_gradients(method: MAML, batch) -> dict[str, torch.Tensor]:
    method.zero_grad(set_to_none=True)
    method.meta_step(batch)
    return {n: p.grad.clone() for n, p in method.named_parameters()}


@pytest.mark.parametrize("backend", ["vmap", "loop"])
def test_compiled_maml_step_equals_the_eager_one_in_float64(backend):
    config = MAML.recipe("sinusoid").updated(backend=backend, eval_inner_steps=2)
    method = MAML(config).double()
    b = SinusoidTasks(shots=5, queries=10, seed=0).sample_batch(4)
    batch = TaskBatch(b.support_x.double(), b.support_y.double(), b.query_x.double(),
                      b.query_y.double())  # fmt: skip
    task = (batch.support_x[0], batch.support_y[0], batch.query_x[0])
    predicting = backend == "loop"  # prediction compiles the same way for either backend
    eager, eager_out = _maml_gradients(method, batch), predicting and method.predict(*task)
    parts = method.enable_compile()
    compiled, compiled_out = _maml_gradients(method, batch), predicting and method.predict(*task)
    used = [p.name for p in parts if p.first_s is not None and p.failed is None]
    step = "meta-gradient" if backend == "vmap" else "query loss"
    assert used == [f"maml's {step}"] + ["maml's prediction"] * predicting  # compiled and used
    for name, g in eager.items():
        assert g.abs().sum() > 0
        torch.testing.assert_close(compiled[name], g, rtol=1e-10, atol=1e-12)
    if predicting:
        torch.testing.assert_close(compiled_out, eager_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, recipe", [("platipus", "sinusoid"), ("arml", "2d-regression")])
def test_compiled_steps_of_platipus_and_arml_equal_the_eager_ones_in_float64(
    name, recipe, monkeypatch
):
    """Traced by dynamo and AOTAutograd, run without inductor's code generation (which the MAML
    test above covers): inductor takes 1-2 minutes on these graphs on a 2-core CPU."""
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    cls = get_method(name)
    config = cls.recipe(recipe).updated(backend="vmap", meta_batch=2, inner_steps=1)
    torch.manual_seed(0)
    method = cls(config).double()
    b = cls.task_sampler(config, "train").sample_batch(3)
    batch = TaskBatch(b.support_x.double(), b.support_y.double(), b.query_x.double(),
                      b.query_y.double())  # fmt: skip

    def gradients() -> dict[str, torch.Tensor]:
        torch.manual_seed(1)  # PLATIPUS draws its noise in the step: the same draws both times
        return _maml_gradients(method, batch)

    eager = gradients()
    parts = method.enable_compile()
    compiled = gradients()
    (used,) = [p for p in parts if p.first_s is not None]
    assert used.name == f"{name}'s meta-gradient" and used.failed is None
    for key, g in eager.items():
        torch.testing.assert_close(compiled[key], g, rtol=1e-9, atol=1e-12)
    assert sum(g.abs().sum() for g in eager.values()) > 0


def test_compiled_embedding_equals_the_eager_one_in_float64():
    method = ProtoNet(ProtoNetConfig(hidden=8, channels_last="off", bf16="off")).double()
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    y = torch.arange(3).repeat_interleave(4)
    loss, _ = method.meta_loss(_episode(x, y))
    eager = torch.autograd.grad(loss, list(method.parameters()))
    (part,) = method.enable_compile()
    loss_c, _ = method.meta_loss(_episode(x, y))
    compiled = torch.autograd.grad(loss_c, list(method.parameters()))
    assert part.failed is None and part.first_s is not None
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert set(method.state_dict()) == set(ProtoNet(method.config).state_dict())  # same keys


def _episode(x, y):
    support = torch.arange(len(y)) % 4 == 0  # one support image per class, three queries
    return Episode(x[support], y[support], x[~support], y[~support])


def _broken_backend(graph, inputs):
    raise RuntimeError("this backend compiles nothing")


def test_a_graph_that_does_not_compile_runs_eagerly_after_one_line(capsys):
    net = torch.nn.Linear(3, 2)
    wrapper = Compiled(net.forward, "the test net", backend=_broken_backend)
    x = torch.randn(4, 3)
    torch.testing.assert_close(wrapper(x), net(x))
    assert wrapper.failed is not None and "this backend compiles nothing" in wrapper.failed
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "the test net did not compile" in out
    wrapper(x)  # eager from now on, silently
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError, match="shape"):  # bad input is still bad input
        wrapper(torch.randn(4, 5))


def test_compiling_a_module_keeps_its_parameters_and_wrapper():
    net = torch.nn.Linear(3, 2)
    keys = set(net.state_dict())
    first = compile_forward(net, "net", announce=False)
    assert compile_forward(net, "net") is first and set(net.state_dict()) == keys


def test_the_clock_reports_compile_time_and_when_it_pays():
    enabled = []
    clock = CompileClock(lambda: enabled.append(1) or [], eager=2, compiled=3)
    for i, seconds in enumerate([0.9, 0.5, 30.3, 0.3, 0.2, 0.3]):
        report = clock.record(seconds)
        assert enabled == ([1] if i >= 1 else [])  # compiling starts after the second step
    # eager step 0.5 s (the second), compiled 0.3 s (median), compile 30.3 - 0.3 = 30 s, which
    # 0.2 s a step repays after 150 steps
    assert report == {
        "compile_s": 30.0, "eager_ms": 500.0, "compiled_ms": 300.0, "speedup": 1.667,
        "pays_after_steps": 150, "failed": {},
    }  # fmt: skip
    assert "pays after 150 steps" in describe_compile(report)
    assert clock.record(0.3) is None  # once


def test_train_with_compile_reports_its_cost_and_refuses_methods_without_a_compiled_step(
    tmp_path, capsys
):
    run = tmp_path / "run"
    args = ["train", "maml", "--recipe", "sinusoid", "--episodes", "14", "--meta-batch", "4",
            "--backend", "loop", "--val-every", "0", "--run-dir", str(run), "--no-progress"]  # fmt: skip
    assert main([*args, "--compile"]) == 0
    assert "compile: " in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    (report,) = [r for r in rows if r["kind"] == "compile"]
    assert report["episode"] == 13 and report["compile_s"] > 0 and report["failed"] == {}
    assert main(["train", "cnp", "--recipe", "nme-sinusoid", "--episodes", "1",
                 "--run-dir", str(tmp_path / "c"), "--compile"]) == 2  # fmt: skip
    assert "cnp has no step that compiles yet: leave out --compile" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was written


@pytest.mark.realdata
def test_eval_with_compile_gives_the_eager_accuracy(omniglot_root, tmp_path, capsys):
    """`metalab eval RUN --compile` answers through the compiled encoder: the same episodes, the
    same accuracy as eager (float32, so up to a few flipped near-ties of 1500 queries), and it says
    what compiling took."""
    run = tmp_path / "run"
    common = ["--data-root", str(omniglot_root), "--no-progress"]
    train = "train protonet --split lake --ways 5 --queries 2 --episodes 4 --val-every 0 --hidden 8"
    assert main([*train.split(), "--run-dir", str(run), *common]) == 0
    evaluate = f"eval {run} --ways 5 --shots 1 --episodes 20".split()
    accuracy = {}
    for flags in ([], ["--compile"]):
        capsys.readouterr()
        assert main([*evaluate, *flags, *common]) == 0
        out = capsys.readouterr().out
        assert ("protonet's encoder: first call" in out) == bool(flags)
        (result,) = json.loads((run / "eval.json").read_text())["results"]
        accuracy[bool(flags)] = result["mean"]
    assert accuracy[True] == pytest.approx(accuracy[False], abs=0.003)  # 4 of 1500 queries
