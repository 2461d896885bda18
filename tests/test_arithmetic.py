"""Speed switches decided per machine (metalab.arithmetic): the decision from given probe times and
capabilities, the probe that never runs what the machine lacks, and runs that keep their choice."""

from __future__ import annotations

import json

import pytest
import torch

import metalab.arithmetic as arithmetic
from metalab.arithmetic import BF16, CHANNELS_LAST, Switch, candidates, decide, settings_for
from metalab.errors import ConfigError
from metalab.methods.maml import MAML
from metalab.methods.protonet import ProtoNet, ProtoNetConfig
from metalab.rundir import load_checkpoint, load_method
from metalab.tasks.episodes import Episode, TaskBatch
from metalab.tasks.regression import SinusoidTasks
from metalab.train import train

SWITCHES = (BF16, CHANNELS_LAST)
AUTO = {"bf16": "auto", "channels_last": "auto"}
AVX2 = {"device": "cpu", "name": "test CPU", "isa": "AVX2", "native_bf16": False}
AVX512_BF16 = {"device": "cpu", "name": "test CPU", "isa": "AVX512", "native_bf16": True}


# -- the decision on given inputs --------------------------------------------------------------------
def test_without_native_bf16_bf16_is_never_a_candidate_nor_chosen():
    assert candidates(AUTO, SWITCHES, AVX2) == [
        {"bf16": False, "channels_last": False},
        {"bf16": False, "channels_last": True},
    ]
    # the AVX2 machine of issue 22 (60-way 5-shot step, ms); a bf16 time given anyway is ignored
    times = {"plain": 1.438, "channels_last": 0.791, "bf16": 0.5, "bf16+channels_last": 0.4}
    assert decide(AUTO, SWITCHES, AVX2, times) == {"bf16": False, "channels_last": True}


def test_with_native_bf16_the_fastest_variant_wins():
    times = {"plain": 0.61, "channels_last": 0.33, "bf16": 0.43, "bf16+channels_last": 0.154}
    assert len(candidates(AUTO, SWITCHES, AVX512_BF16)) == 4
    assert decide(AUTO, SWITCHES, AVX512_BF16, times) == {"bf16": True, "channels_last": True}
    slow_bf16 = {**times, "bf16+channels_last": 0.5}  # a CPU whose bf16 kernels are slow
    assert decide(AUTO, SWITCHES, AVX512_BF16, slow_bf16) == {"bf16": False, "channels_last": True}


def test_a_switch_must_save_more_than_the_margin():
    near = {"plain": 1.00, "channels_last": 0.97}
    assert decide(AUTO, SWITCHES, AVX2, near) == {"bf16": False, "channels_last": False}
    clear = {"plain": 1.00, "channels_last": 0.90}
    assert decide(AUTO, SWITCHES, AVX2, clear) == {"bf16": False, "channels_last": True}
    # with two switches: bf16+cl beats cl by 3% only, so cl alone is kept
    both = {"plain": 1.0, "channels_last": 0.50, "bf16": 0.9, "bf16+channels_last": 0.485}
    assert decide(AUTO, SWITCHES, AVX512_BF16, both) == {"bf16": False, "channels_last": True}


def test_fixed_switches_are_not_varied_and_out_of_memory_variants_drop_out():
    asked = {"bf16": True, "channels_last": "auto"}
    assert candidates(asked, SWITCHES, AVX2) == [
        {"bf16": True, "channels_last": False},
        {"bf16": True, "channels_last": True},
    ]
    backend = Switch("backend", ("vmap", "loop"))
    times = {"backend=vmap": None, "backend=loop": 2.0}
    assert decide({"backend": "auto"}, (backend,), AVX2, times) == {"backend": "loop"}
    with pytest.raises(ConfigError, match="no variant of the training step fits in memory"):
        decide({"backend": "auto"}, (backend,), AVX2, {"backend=vmap": None})


def test_the_fastest_variant_within_the_memory_cap_wins():
    backend = Switch("backend", ("vmap", "loop"))
    times = {"backend=vmap": 1.0, "backend=loop": 2.0}
    memory = {"backend=vmap": 7000.0, "backend=loop": 300.0}
    auto = {"backend": "auto"}
    assert decide(auto, (backend,), AVX2, times, memory=memory, cap=8000) == {"backend": "vmap"}
    assert decide(auto, (backend,), AVX2, times, memory=memory, cap=4000) == {"backend": "loop"}
    # nothing fits: the one that needs least; unknown memory never excludes a variant
    assert decide(auto, (backend,), AVX2, times, memory=memory, cap=100) == {"backend": "loop"}
    unknown = {"backend=vmap": None, "backend=loop": 300.0}
    assert decide(auto, (backend,), AVX2, times, memory=unknown, cap=100) == {"backend": "vmap"}


def test_the_probe_measures_each_variants_memory_and_honours_the_cap():
    """MAML's vmap holds every task's graph at once, the loop one task's: on 16 tasks of
    Omniglot-shaped images the probe must see it, and a cap below vmap's need picks the loop."""
    config = MAML.recipe("omniglot-5w1s").updated(
        meta_batch=16, hidden=16, channels_last="off", memory_cap=1e-3
    )
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(
        torch.rand(16, 5, 1, 28, 28, generator=g),
        torch.arange(5).repeat(16, 1),
        torch.rand(16, 75, 1, 28, 28, generator=g),
        torch.arange(5).repeat_interleave(15).repeat(16, 1),
    )
    method = MAML(config)
    decision = arithmetic.choose(method, batch, torch.device("cpu"), repeats=1)
    mib = decision["probe_mib"]
    assert mib["backend=vmap"] > 3 * mib["backend=loop"] > 0, mib
    assert decision["memory_cap_mib"] == 1 and decision["settings"]["backend"] == "loop"
    assert "MiB" in arithmetic.describe(decision)


def test_config_words_and_errors():
    config = ProtoNetConfig(bf16="on", channels_last=False)
    assert arithmetic.requested(config, SWITCHES) == {"bf16": True, "channels_last": False}
    with pytest.raises(ConfigError, match="bf16='fast': use auto | on | off"):
        arithmetic.requested(ProtoNetConfig(bf16="fast"), SWITCHES)


def test_a_stored_decision_falls_back_where_the_machine_lacks_the_kernel():
    decided = {"settings": {"bf16": True, "channels_last": True}}
    config = ProtoNetConfig(arithmetic=decided)
    assert settings_for(config, SWITCHES, AVX512_BF16) == (decided["settings"], [])
    settings, notes = settings_for(config, SWITCHES, AVX2)
    assert settings == {"bf16": False, "channels_last": True}
    assert len(notes) == 1 and "lacks native bf16 kernels: using False" in notes[0]
    # asked for explicitly, bf16 stays on (the user's call), and no decision means plain
    assert settings_for(ProtoNetConfig(bf16="on"), SWITCHES, AVX2)[0]["bf16"] is True
    assert settings_for(ProtoNetConfig(), SWITCHES) == (
        {"bf16": False, "channels_last": False},
        [],
    )


def test_capabilities_of_this_machine_and_onednn_limit(monkeypatch):
    caps = arithmetic.capabilities("cpu")
    assert caps["isa"] == torch.backends.cpu.get_cpu_capability() and caps["name"]
    assert isinstance(caps["native_bf16"], bool)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert arithmetic.capabilities("cpu")["native_bf16"] is False


# -- the probe ---------------------------------------------------------------------------------------
def _episode(ways: int = 5, queries: int = 2) -> Episode:
    g = torch.Generator().manual_seed(0)
    return Episode(
        torch.rand(ways, 1, 28, 28, generator=g),
        torch.arange(ways),
        torch.rand(ways * queries, 1, 28, 28, generator=g),
        torch.arange(ways).repeat_interleave(queries),
    )


def test_the_probe_never_runs_what_the_machine_lacks_and_restores_the_model(monkeypatch):
    monkeypatch.setattr(arithmetic, "capabilities", lambda device: dict(AVX2))
    method = ProtoNet(ProtoNetConfig(hidden=8))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    tried = []
    real_step = ProtoNet.meta_step

    def spy(self, batch):
        tried.append(dict(self.arithmetic))
        return real_step(self, batch)

    monkeypatch.setattr(ProtoNet, "meta_step", spy)
    decision = arithmetic.choose(method, _episode(), torch.device("cpu"), repeats=1)
    assert tried and all(not t["bf16"] for t in tried)
    assert {t["channels_last"] for t in tried} == {False, True}
    assert set(decision["probe_ms"]) == {"plain", "channels_last"}
    assert decision["settings"]["bf16"] is False and decision["machine"] == AVX2
    assert method.arithmetic == decision["settings"]
    for k, v in method.state_dict().items():  # batch-norm statistics included
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in method.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_channels_last_changes_layout_not_results():
    torch.manual_seed(0)
    method = ProtoNet(ProtoNetConfig(hidden=8)).eval()
    e = _episode()
    plain = method.predict(e.support_x, e.support_y, e.query_x)
    method.set_arithmetic({"bf16": False, "channels_last": True})
    assert method.encoder.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    fast = method.predict(e.support_x, e.support_y, e.query_x)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_maml_halves_the_vmap_chunk_when_memory_runs_out(monkeypatch):
    """Out-of-memory is simulated (a CPU has no allocator limit to hit): vmap over more than 2
    tasks at once "does not fit", so the probe times vmap on chunks of 2, and the loop."""
    real = MAML.step_function
    vmap_chunks = []

    def limited(*args, **kwargs):
        backend, chunk = args[7], args[8]
        if backend == "vmap":
            vmap_chunks.append(chunk)
        if backend == "vmap" and (chunk is None or chunk > 2):
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(MAML, "step_function", staticmethod(limited))  # what meta_step calls
    method = MAML(MAML.recipe("sinusoid").updated(meta_batch=8))
    batch = SinusoidTasks(10, 10, seed=0).sample_batch(8)
    decision = arithmetic.choose(method, batch, torch.device("cpu"), repeats=1)
    assert set(decision["probe_ms"]) == {"backend=vmap", "backend=loop"}
    assert decision["probe_ms"]["backend=vmap"] is not None
    assert vmap_chunks == [None, 4, 2, 2]  # all 8 tasks, then halves: the warm-up and one run
    assert method.get_extra_state() == {
        "backend": decision["settings"]["backend"],
        "chunk": decision["settings"]["chunk"],
    }

    def nothing_fits(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(MAML, "step_function", staticmethod(nothing_fits))
    with pytest.raises(ConfigError, match="fits in memory: lower --meta-batch"):
        arithmetic.choose(MAML(MAML.recipe("sinusoid")), batch, torch.device("cpu"), repeats=1)


def test_a_variant_this_torch_cannot_run_drops_out_of_the_probe(monkeypatch):
    """torch 2.13 cannot run channels-last convolutions' backward inside a vmap over one task
    ("NYI: Tensor.clone(memory_format) inside vmap"): the probe records that variant as
    unsupported and decides among the others, instead of ending the run."""
    from metalab.arithmetic import describe
    from metalab.tasks.episodes import TaskBatch

    monkeypatch.setattr(arithmetic, "capabilities", lambda device: dict(AVX512_BF16))
    config = MAML.recipe("miniimagenet-5w1s").updated(hidden=8, image_size=28, ways=3, meta_batch=1)
    method = MAML(config)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 3, 28, 28, generator=g)
    batch = TaskBatch(x, torch.arange(3)[None], x.clone(), torch.arange(3)[None])
    method.set_arithmetic({**method.arithmetic, "backend": "vmap", "channels_last": True})
    with pytest.raises(RuntimeError, match="^NYI"):  # the combination itself fails
        method.meta_step(batch)
    method = MAML(config)
    decision = arithmetic.choose(method, batch, torch.device("cpu"), repeats=1)
    assert decision["unsupported"] == ["backend=vmap+channels_last"]
    assert decision["probe_ms"]["backend=vmap+channels_last"] is None
    assert decision["settings"] != {
        **decision["settings"],
        "backend": "vmap",
        "channels_last": True,
    }
    assert "backend=vmap+channels_last not supported by this torch" in describe(decision)
    method.meta_step(batch)  # the chosen variant runs


# -- runs keep their decision ------------------------------------------------------------------------
@pytest.mark.realdata
def test_a_run_records_its_decision_and_resume_keeps_it(omniglot_root, tmp_path, monkeypatch):
    config = ProtoNetConfig(
        split="lake", ways=5, shots=1, queries=2, episodes=4, val_every=0, hidden=8
    )
    run = tmp_path / "run"
    train("protonet", config, run, data_root=omniglot_root, progress=False)
    stored = json.loads((run / "config.json").read_text())["arithmetic"]
    assert {"settings", "probe_ms", "machine"} <= set(stored)
    assert set(stored) - {"settings", "probe_ms", "machine"} <= {"probe_mib", "memory_cap_mib"}
    assert load_checkpoint(run / "checkpoint.pt")["config"]["arithmetic"] == stored

    def no_probe(*args, **kwargs):
        raise AssertionError("a resumed run must not probe again")

    monkeypatch.setattr("metalab.train.choose", no_probe)
    train(
        "protonet",
        config.updated(episodes=6),
        run,
        resume=True,
        data_root=omniglot_root,
        progress=False,
    )
    assert json.loads((run / "config.json").read_text())["arithmetic"] == stored
    method, checkpoint = load_method(run / "checkpoint.pt")
    assert checkpoint["episode"] == 6
    assert method.arithmetic == stored["settings"]
