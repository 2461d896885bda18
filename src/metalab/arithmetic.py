"""Arithmetic chosen for the machine at hand: the speed switches of a method, decided once per run.

A speed switch changes how fast a training step runs, not what it computes (beyond rounding):
bfloat16 autocast, channels-last activations, MAML's meta-gradient backend. Which ones pay depends
on the machine. On a CPU with AVX-512 BF16, bf16 + channels-last made a ProtoNet episode 3.96x
faster than a plain loop; on an AVX2-only CPU, which has no native bf16 kernels, the same bf16
made it 5x *slower* (a bf16 matrix product ran 27x slower than fp32) while channels-last alone
was 1.8x faster (benchmarks/RESULTS.md). So a config says ``auto | on | off`` for each switch
(MAML's backend: ``auto | vmap | loop``), the recipes say ``auto``, and for a run :func:`choose`

1. checks what the device can do (:func:`capabilities`), so that a path PyTorch has no native
   kernel for is never probed (it could take minutes);
2. times the method's own training step on the run's first batch for each remaining combination
   (model, optimizer-free, random state and batch-norm buffers restored afterwards);
3. keeps the fastest (:func:`decide`), preferring fewer switches unless one is clearly faster.

The decision, the probe's times and the machine are stored in the run's config
(``config.arithmetic``), so ``--resume`` and ``metalab eval`` reuse it; on a machine that lacks a
kernel the decision needs, :func:`settle` falls back to the plain value and says so.
"""

from __future__ import annotations

import copy
import itertools
import os
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from metalab.errors import ConfigError
from metalab.runtime import (
    peak_rss_mib,
    reset_peak_rss,
    return_freed_memory,
    rss_mib,
    trim_heap,
)

MARGIN = 0.05  # a variant with more switches on must be at least 5% faster than a simpler one


@dataclass(frozen=True)
class Switch:
    """A speed switch: its config field, its values (the first is the plain one, used when a
    decision is missing) and the capability its other values need (None: any machine)."""

    name: str
    values: tuple = (False, True)
    needs: str | None = None


BF16 = Switch("bf16", needs="native_bf16")  # bfloat16 autocast of the network
CHANNELS_LAST = Switch("channels_last")  # NHWC activations and conv weights


# -- what the machine offers ----------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _onednn_allows_bf16() -> bool:
    """``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 keeps oneDNN off the bf16 instructions."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return isa == "ALL" or "BF16" in isa or "AMX" in isa


def capabilities(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What ``device`` offers, as a plain dict (stored with a decision): the processor, PyTorch's
    kernel level and whether bfloat16 has native kernels there."""
    device = torch.device(device)
    caps: dict[str, Any] = {"device": device.type, "torch": torch.__version__.split("+")[0]}
    if device.type == "cuda":
        caps["name"] = torch.cuda.get_device_name(device)
        caps["native_bf16"] = bool(torch.cuda.is_bf16_supported())
        return caps
    isa = torch.backends.cpu.get_cpu_capability()  # e.g. AVX512, AVX2, DEFAULT (honours
    # ATEN_CPU_CAPABILITY); bf16 GEMMs and convolutions need AVX-512 BF16 or AMX in oneDNN
    native = (
        isa.startswith("AVX512")
        and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        and _onednn_allows_bf16()
    )
    caps.update(name=cpu_model(), isa=isa, native_bf16=bool(native))
    return caps


def describe_machine(caps: Mapping[str, Any]) -> str:
    """One line: ``AMD EPYC (AVX512, native bf16)``."""
    if caps["device"] == "cuda":
        return f"{caps['name']} ({'bf16' if caps['native_bf16'] else 'no bf16'})"
    bf16 = "native bf16" if caps["native_bf16"] else "no native bf16"
    return f"{caps['name']} ({caps['isa']}, {bf16})"


# -- the decision ---------------------------------------------------------------------------------
def requested(config: Any, switches: Iterable[Switch]) -> dict[str, Any]:
    """What the config asks of each switch: ``"auto"`` or a fixed value (``on``/``off`` and
    booleans of older runs read as True/False)."""
    words = {"on": True, "off": False, "true": True, "false": False}
    out = {}
    for s in switches:
        value = getattr(config, s.name)
        if isinstance(value, str) and value.lower() in words and s.values == (False, True):
            value = words[value.lower()]
        if value != "auto" and value not in s.values:
            shown = (
                "auto | on | off" if s.values == (False, True) else " | ".join(["auto", *s.values])
            )
            raise ConfigError(f"{s.name}={value!r}: use {shown}")
        out[s.name] = value
    return out


def candidates(
    asked: Mapping[str, Any], switches: Iterable[Switch], caps: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Every combination the probe may time: fixed switches as asked, ``auto`` ones over their
    values, leaving out a value whose capability the machine lacks (so it is never run)."""
    options = []
    for s in switches:
        if asked[s.name] != "auto":
            options.append([(s.name, asked[s.name])])
            continue
        usable = [v for i, v in enumerate(s.values) if i == 0 or not s.needs or caps.get(s.needs)]
        options.append([(s.name, v) for v in usable])
    return [dict(combo) for combo in itertools.product(*options)]


def key(settings: Mapping[str, Any]) -> str:
    """A variant's name: the switches that are on, e.g. ``bf16+channels_last``, ``backend=loop``."""
    parts = [
        name if value is True else f"{name}={value}"
        for name, value in settings.items()
        if value is not False and value is not None
    ]
    return "+".join(parts) or "plain"


def decide(
    asked: Mapping[str, Any],
    switches: Iterable[Switch],
    caps: Mapping[str, Any],
    seconds: Mapping[str, float | None],
    margin: float = MARGIN,
    memory: Mapping[str, float | None] | None = None,
    cap: float | None = None,
) -> dict[str, Any]:
    """The settings to run with, from the probe's ``seconds`` per variant :func:`key` (None: it did
    not fit in memory) and the machine's capabilities.

    Only :func:`candidates` count (a time given for a variant the machine lacks is ignored), and
    with ``memory`` (MiB a variant's step added, None: unknown) and a ``cap`` in MiB only those
    within the cap; when none is, the one that needs least. The fastest wins, except that a
    variant with fewer switches away from their plain value is kept when the faster one saves
    less than ``margin`` of its time: no rounding change for noise.
    """
    switches = list(switches)
    plain = {s.name: s.values[0] for s in switches}
    timed = [
        (seconds[key(c)], c)
        for c in candidates(asked, switches, caps)
        if seconds.get(key(c)) is not None
    ]
    if not timed:
        raise ConfigError(
            "no variant of the training step fits in memory: lower --meta-batch (or --ways)"
        )
    if memory and cap is not None:
        need = {key(c): memory.get(key(c)) for _, c in timed}
        within = [(t, c) for t, c in timed if need[key(c)] is None or need[key(c)] <= cap]
        timed = within or [min(timed, key=lambda tc: need[key(tc[1])])]

    def changes(c: Mapping[str, Any]) -> int:
        return sum(c[name] != plain[name] for name in c)

    best_time, best = min(timed, key=lambda t: (t[0], changes(t[1])))
    for t, c in sorted(timed, key=lambda t: (changes(t[1]), t[0])):
        if changes(c) < changes(best) and t * (1 - margin) <= best_time:
            return c
    return best


def settings_for(
    config: Any, switches: Iterable[Switch], caps: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The settings a method runs with before (or without) a probe: fixed switches as asked,
    ``auto`` ones from the run's stored decision (``config.arithmetic``) or plain when there is
    none. With ``caps``, a decided value the machine lacks a kernel for falls back to plain;
    the second return value says which, one line each."""
    switches = list(switches)
    asked = requested(config, switches)
    decision = (getattr(config, "arithmetic", None) or {}).get("settings", {})
    settings, notes = {}, []
    for s in switches:
        value = asked[s.name]
        if value == "auto":
            value = decision.get(s.name, s.values[0])
            lacking = caps is not None and s.needs and value != s.values[0] and not caps[s.needs]
            if lacking:
                notes.append(
                    f"{s.name}: the run chose {value!r}, but this {caps['device']} lacks "
                    f"{s.needs.replace('_', ' ')} kernels: using {s.values[0]!r}"
                )
                value = s.values[0]
        settings[s.name] = value
    return settings, notes


def settle(method: torch.nn.Module, device: torch.device | str) -> list[str]:
    """Apply the method's settings for ``device`` (stored decision, minus what the device lacks);
    returns notes on any fallback. Used by the trainer and by evaluation."""
    settings, notes = settings_for(method.config, method.speed_switches(), capabilities(device))
    method.set_arithmetic(settings)
    return notes


def choose(method: torch.nn.Module, batch: Any, device: torch.device, repeats: int = 3) -> dict:
    """Probe and decide the ``auto`` switches of ``method`` on ``batch`` (on ``device``); apply the
    decision and return it as stored in ``config.arithmetic``: ``settings``, ``probe_ms`` per
    variant (None: did not fit in memory) and the ``machine``.

    Each variant's time is the best of ``repeats`` :meth:`meta_step` calls after a warm-up; the
    model's parameters, buffers and the random state are restored afterwards, so the run that
    follows is the one it would have been with that setting from the start.
    """
    switches = method.speed_switches()
    asked = requested(method.config, switches)
    caps = capabilities(device)
    variants = candidates(asked, switches, caps)
    seconds: dict[str, float | None] = {}
    memory: dict[str, float | None] = {}  # MiB each variant's step added at its peak
    probed: dict[str, dict] = {}
    unsupported: list[str] = []  # variants this torch build cannot run (see _unsupported)
    if len(variants) > 1:
        saved = copy.deepcopy(method.state_dict())
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
        try:
            for settings in variants:
                method.set_arithmetic(settings)
                try:
                    with _PeakMemory(device) as peak:
                        seconds[key(settings)] = _time_step(method, batch, device, repeats)
                    memory[key(settings)] = peak.mib
                except RuntimeError as error:
                    if not _unsupported(error):
                        raise
                    method.zero_grad(set_to_none=True)
                    seconds[key(settings)] = None
                    unsupported.append(key(settings))
                    continue
                probed[key(settings)] = dict(method.arithmetic)  # with a method's details
                # (MAML's vmap chunk, lowered when the whole batch did not fit)
        finally:
            method.zero_grad(set_to_none=True)
            method.load_state_dict(saved)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
    cap = memory_cap_mib(method.config, device)
    chosen = (
        decide(asked, switches, caps, seconds, memory=memory, cap=cap) if seconds else variants[0]
    )
    method.set_arithmetic(probed.get(key(chosen), chosen))
    decision = {
        "settings": dict(method.arithmetic),
        "probe_ms": {k: None if v is None else round(1000 * v, 2) for k, v in seconds.items()},
        "machine": caps,
    }
    if any(v is not None for v in memory.values()):
        decision["probe_mib"] = {k: None if v is None else round(v) for k, v in memory.items()}
        decision["memory_cap_mib"] = round(cap)
    if unsupported:
        decision["unsupported"] = unsupported
    return decision


def memory_cap_mib(config: Any, device: torch.device) -> float:
    """MiB a probed variant's step may add: ``config.memory_cap`` GiB when set, else half the
    memory available now (CPU) or 90% of the GPU's."""
    asked = getattr(config, "memory_cap", 0.0) or 0.0
    if asked > 0:
        return 1024 * asked
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**20
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return available / 1024 / 2
    except (OSError, StopIteration):
        return float("inf")


class _PeakMemory:
    """The most memory a block of work added (``.mib``; None where it cannot be read): torch's
    allocations on a GPU; on a CPU the resident size, with glibc returning freed blocks during
    the block so that the size follows the memory in use (metalab.runtime)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._returning = return_freed_memory()
            self._returning.__enter__()
            trim_heap()  # free heap the process kept would be reused unseen
            self.base = rss_mib() if reset_peak_rss() else None
        return self

    def __exit__(self, *error) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
            return
        self._returning.__exit__(*error)
        peak = peak_rss_mib()
        if self.base is not None and peak is not None:
            self.mib = max(peak - self.base, 0.0)


def _unsupported(error: RuntimeError) -> bool:
    """Whether ``error`` says that this torch build does not implement the combination (torch
    2.13: channels-last convolution backward inside a vmap over a single task raises "NYI:
    Tensor.clone(memory_format) inside vmap ..."), rather than a bug, which must propagate."""
    return str(error).startswith("NYI")


def _time_step(method, batch, device: torch.device, repeats: int) -> float | None:
    """Seconds of one training step (best of ``repeats`` after a warm-up), or None when it runs
    out of memory even after the method shrank its work (:meth:`Method.fit_to_memory`)."""
    while True:
        try:
            method.meta_step(batch)
            runs = []
            for _ in range(repeats):
                method.zero_grad(set_to_none=True)
                _sync(device)
                start = time.perf_counter()
                method.meta_step(batch)
                _sync(device)
                runs.append(time.perf_counter() - start)
            return min(runs)
        except torch.OutOfMemoryError:
            method.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not method.fit_to_memory():
                return None


def describe(decision: Mapping[str, Any]) -> str:
    """One line for the start of a run: the choice, the probe's times and the machine."""
    chosen = key(decision["settings"])
    line = f"arithmetic: {chosen}"
    if decision["probe_ms"]:
        failed = set(decision.get("unsupported", ()))

        memory = decision.get("probe_mib", {})

        def shown(k: str, v: float | None) -> str:
            if v is not None:
                mib = memory.get(k)
                return f"{v:.0f} ms" + ("" if mib is None else f" {mib:,.0f} MiB")
            return "not supported by this torch" if k in failed else "out of memory"

        times = ", ".join(f"{k} {shown(k, v)}" for k, v in decision["probe_ms"].items())
        cap = decision.get("memory_cap_mib")
        line += f" (probe, one step: {times}" + ("" if cap is None else f"; cap {cap:,} MiB") + ")"
    return f"{line} on {describe_machine(decision['machine'])}"


def images(x: torch.Tensor, settings: Mapping[str, Any]) -> torch.Tensor:
    """``x`` in the memory layout the settings ask for (channels-last for 4-d image batches)."""
    if settings.get("channels_last") and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def autocast(x: torch.Tensor, settings: Mapping[str, Any]):
    """bfloat16 autocast on ``x``'s device when the settings ask for it (else a no-op context)."""
    return torch.autocast(x.device.type, torch.bfloat16, enabled=bool(settings.get("bf16")))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
