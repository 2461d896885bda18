"""``metalab bench``: the second-order MAML step per backend, paired, with its peak memory, as
ratios to the first variant and to this machine's FLOP floor (issue 20).

**How it times.** Every variant runs in a worker process of its own (its own model with the same
initial weights, its own Adam, its own allocator and peak memory) that takes its first step
(compilation included for ``+compile``) and ``warmup`` untimed ones, then waits. The timed steps
are then interleaved: each round asks every worker for a turn, in a fresh random order, so a
change of machine load hits all variants alike (paired), while only one variant computes at a
time. A turn is an untimed step and a timed one; after it the worker hands its free heap back to
the kernel, so that the waiting workers do not hold their peaks (eight variants at the reference
shape held 18 of 24 GiB and the kernel spent its time reclaiming), and the untimed step warms the
heap up again, as in training. Running the variants side by side in *one* process distorted them
(2 CPU threads, the reference shape: the loop backend's step took 34.8 s beside three others
against 3.0 s alone; benchmarks/RESULTS.md), hence the workers.

**The floor** is the step's FLOPs (torch's ``FlopCounterMode`` on the fp32 loop step) over the
best rate of a 2048^3 fp32 matrix product on the same device and threads. The episodes are random
images of Omniglot's shape: the arithmetic is the real step's.

A variant is a base and modifiers joined by ``+``: ``loop``, ``vmap`` (the backends of
:func:`metalab.functional.meta_gradient`), ``plain-loop`` (the textbook per-task loop that
learn2learn and higher implement), ``l2l`` (learn2learn's ``MAML`` wrapper, when installed);
``+cl`` channels-last, ``+bf16`` bfloat16 autocast (skipped where the device has no native bf16
kernels), ``+compile`` ``torch.compile`` (vmap: the whole meta-gradient; loop: each task's query
loss, as ``--compile`` trains), ``+fo`` first order. E.g. ``vmap+compile``, ``loop+cl+bf16``.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from metalab.errors import ConfigError
from metalab.io import atomic_write

BASES = {
    "loop": "metalab loop backend: plain autograd per task",
    "vmap": "metalab vmap backend: vmap(grad(task loss)) over the tasks",
    "plain-loop": "textbook loop: autograd.grad(create_graph) per task, weights swapped in",
    "l2l": "learn2learn's MAML wrapper: clone() and adapt() per task",
}
MODIFIERS = {
    "cl": "channels-last",
    "bf16": "bf16 autocast",
    "compile": "torch.compile",
    "fo": "first order",
}


@dataclass
class BenchSettings:
    """The step measured: the issue's reference shape by default (Omniglot 5-way 1-shot, 15
    queries, meta-batch 32, Conv4 with 64 filters and max-pool, one inner step at alpha 0.4)."""

    variants: tuple[str, ...] = ("loop", "vmap", "loop+cl", "vmap+cl", "plain-loop")
    ways: int = 5
    shots: int = 1
    queries: int = 15
    tasks: int = 32
    filters: int = 64
    inner_steps: int = 1
    alpha: float = 0.4
    repeats: int = 5  # timed steps per variant, one per round (after an untimed one)
    warmup: int = 2  # untimed steps per variant after its first
    threads: int = 0  # torch threads per worker; 0 = torch's default here
    device: str = "cpu"
    seed: int = 0


def default_variants() -> tuple[str, ...]:
    """The default variants, and learn2learn's MAML beside them when it is installed."""
    extra = ("l2l",) if importlib.util.find_spec("learn2learn") is not None else ()
    return BenchSettings.variants + extra


def parse_variant(name: str) -> tuple[str, frozenset[str]]:
    """``"vmap+cl+compile"`` -> ``("vmap", {"cl", "compile"})``; a one-line error otherwise."""
    base, *mods = name.split("+")
    if base not in BASES:
        raise ConfigError(f"unknown variant {name!r}: start it with one of {', '.join(BASES)}")
    for m in mods:
        if m not in MODIFIERS or mods.count(m) > 1:
            raise ConfigError(
                f"variant {name!r}: {m!r} is not a modifier (once each: {', '.join(MODIFIERS)})"
            )
    if base in ("plain-loop", "l2l") and "compile" in mods:
        raise ConfigError(f"variant {name!r}: +compile is for the loop and vmap backends")
    if base == "l2l" and importlib.util.find_spec("learn2learn") is None:
        raise ConfigError(f"variant {name!r}: learn2learn is not installed here")
    return base, frozenset(mods)


def check_settings(s: BenchSettings) -> None:
    if not s.variants:
        raise ConfigError("--variants is empty: name at least one, e.g. loop,vmap")
    for v in s.variants:
        parse_variant(v)
    if len(set(s.variants)) < len(s.variants):
        raise ConfigError(f"--variants {','.join(s.variants)}: each variant once")
    for f in ("ways", "shots", "queries", "tasks", "filters", "inner_steps", "repeats"):
        if getattr(s, f) < 1:
            raise ConfigError(f"--{f.replace('_', '-')} {getattr(s, f)}: must be at least 1")
    if s.warmup < 0 or s.threads < 0:
        raise ConfigError(f"--warmup {s.warmup}, --threads {s.threads}: must not be negative")
    if s.device != "cpu" and not (s.device.startswith("cuda") and torch.cuda.is_available()):
        raise ConfigError(f"--device {s.device}: use cpu, or cuda on a machine with a GPU")


def meta_batch(s: BenchSettings, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Random 28 x 28 images and labels in the episode layout ``(tasks, images, ...)``."""
    g = torch.Generator().manual_seed(s.seed)
    sx = torch.rand(s.tasks, s.ways * s.shots, 1, 28, 28, generator=g)
    qx = torch.rand(s.tasks, s.ways * s.queries, 1, 28, 28, generator=g)
    sy = torch.arange(s.ways).repeat_interleave(s.shots).repeat(s.tasks, 1)
    qy = torch.arange(s.ways).repeat_interleave(s.queries).repeat(s.tasks, 1)
    return tuple(t.to(device) for t in (sx, sy, qx, qy))


def build_step(
    variant: str, s: BenchSettings, device: torch.device
) -> tuple[Callable[[], None], torch.nn.Module]:
    """The variant's meta-gradient (written into ``.grad``, no optimizer step) and its model."""
    from metalab.arithmetic import images
    from metalab.functional import classification_loss, meta_gradient, write_grads
    from metalab.nets.classifier import Conv4Classifier

    base, mods = parse_variant(variant)
    torch.manual_seed(s.seed)  # every variant starts from the same weights
    model = Conv4Classifier(s.ways, 1, s.filters, pool="max", image_size=28).to(device)
    sx, sy, qx, qy = meta_batch(s, device)
    if "cl" in mods:
        model = model.to(memory_format=torch.channels_last)
        sx, qx = (images(x.flatten(0, 1), {"channels_last": True}).unflatten(0, x.shape[:2])
                  for x in (sx, qx))  # fmt: skip
    first_order = "fo" in mods

    if base == "plain-loop":

        def gradient() -> None:
            names = [n for n, _ in model.named_parameters()]
            for t in range(s.tasks):
                weights = [p for _, p in model.named_parameters()]
                for _ in range(s.inner_steps):
                    out = torch.func.functional_call(model, dict(zip(names, weights)), (sx[t],))
                    g = torch.autograd.grad(
                        F.cross_entropy(out, sy[t]), weights, create_graph=not first_order
                    )
                    weights = [w - s.alpha * gw for w, gw in zip(weights, g)]
                out = torch.func.functional_call(model, dict(zip(names, weights)), (qx[t],))
                (F.cross_entropy(out, qy[t]) / s.tasks).backward()

    elif base == "l2l":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(model, lr=s.alpha, first_order=first_order)

        def gradient() -> None:
            for t in range(s.tasks):
                learner = maml.clone()
                for _ in range(s.inner_steps):
                    learner.adapt(F.cross_entropy(learner(sx[t]), sy[t]))
                (F.cross_entropy(learner(qx[t]), qy[t]) / s.tasks).backward()

    else:
        loss_fn = classification_loss(model)
        query_loss = loss_fn
        if base == "loop" and "compile" in mods:
            query_loss = torch.compile(loss_fn)

        def gradient() -> None:
            params = dict(model.named_parameters())
            out = meta_gradient(loss_fn, params, (sx, sy), (qx, qy), s.inner_steps, s.alpha,
                                first_order, base, query_loss_fn=query_loss)  # fmt: skip
            write_grads(params, out.grads)

        if base == "vmap" and "compile" in mods:
            gradient = torch.compile(gradient)

    if "bf16" in mods:
        plain = gradient

        def gradient() -> None:
            with torch.autocast(device.type, torch.bfloat16):
                plain()

    return gradient, model


class _Timed:
    """One step of a variant: zero the gradients, the meta-gradient, Adam; in seconds."""

    def __init__(self, variant: str, s: BenchSettings, device: torch.device) -> None:
        self.gradient, self.model = build_step(variant, s, device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), 1e-3)
        self.device = device

    def __call__(self) -> float:
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.gradient()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def step_flops(s: BenchSettings) -> int:
    """FLOPs of one fp32 loop step (forward, meta-gradient with its second-order terms)."""
    from torch.utils.flop_counter import FlopCounterMode

    gradient, _ = build_step("loop", s, torch.device(s.device))
    with FlopCounterMode(display=False) as counter:
        gradient()
    return counter.get_total_flops()


def gemm_rate(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048
) -> float:
    """GFLOP/s of a large matrix product on ``device`` with the current threads: the best of ten
    after three warm-ups (a floor is what the machine can do; on a shared VM the median of the
    same ten moved by 20% between runs)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for k in range(13):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= 3:  # the first products warm up
            times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def _memory_mib(device: torch.device, peak: bool) -> float:
    """Torch's allocations on a GPU, the resident size on a CPU; now or at the peak."""
    from metalab.runtime import peak_rss_mib, rss_mib

    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(
            device
        ) / 2**20
    mib = peak_rss_mib() if peak else rss_mib()
    return float("nan") if mib is None else mib


def _worker(conn, variant: str, settings: dict, threads: int) -> None:
    """A variant's process: build, first step, warm-up, report; then per request one untimed
    step (the heap warms up again) and one timed step, and its free heap goes back to the kernel
    while the others run; when told to stop, its peak memory."""
    from metalab.runtime import keep_freed_memory, trim_heap

    keep_freed_memory()  # as `metalab train` runs
    s = BenchSettings(**settings)
    device = torch.device(s.device)
    torch.set_num_threads(threads)
    try:
        base = _memory_mib(device, peak=False)
        step = _Timed(variant, s, device)
        first = step()
        for _ in range(s.warmup):
            step()
        trim_heap()
        conn.send(("ready", first, base))
        while conn.recv():
            step()
            seconds = step()
            trim_heap()
            conn.send(("time", seconds))
        conn.send(("peak", _memory_mib(device, peak=True)))
    except Exception as error:  # noqa: BLE001 - reported as the variant's row, not a crash
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        conn.send(("failed", f"{type(error).__name__}: {message}"[:200]))


def run_bench(
    s: BenchSettings, progress: Callable[[str], None] | None = None, out: Path | None = None
) -> dict:
    """Time every variant (paired, one process each); return the machine, the floor and a row per
    variant (``failed`` / ``skipped`` say why a variant has no row), also written to ``out`` as
    JSON (atomically) when given."""
    from metalab.arithmetic import capabilities, describe_machine

    check_settings(s)
    say = progress or (lambda line: None)
    device = torch.device(s.device)
    threads = s.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    caps = capabilities(device)
    skipped = {
        v: "no native bf16 kernels on this device"
        for v in s.variants
        if "bf16" in parse_variant(v)[1] and not caps["native_bf16"]
    }
    say("counting the step's FLOPs and the GEMM rate")
    flops = step_flops(s)
    rate = gemm_rate(device)
    floor_ms = 1000 * flops / (rate * 1e9)

    ctx = multiprocessing.get_context("spawn")
    workers, first, base, failed = {}, {}, {}, {}

    def receive(v: str):
        proc, conn = workers[v]
        try:
            message = conn.recv()
        except EOFError:  # killed (out of memory) or crashed
            proc.join(timeout=10)
            message = ("failed", f"its process died (exit code {proc.exitcode})")
        if message[0] == "failed":
            failed[v] = message[1]
            _close(workers.pop(v))
            return None
        return message

    try:
        for v in s.variants:  # started one at a time: no two compile or warm up together
            if v in skipped:
                continue
            say(f"{v}: first step and warm-up")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, v, asdict(s), threads), daemon=True)
            proc.start()
            child.close()  # the worker's end lives in the worker: its death ends recv()
            workers[v] = (proc, parent)
            message = receive(v)
            if message is not None:
                _, first[v], base[v] = message
        times: dict[str, list[float]] = {v: [] for v in workers}
        order = np.random.default_rng(s.seed)
        for r in range(s.repeats):
            say(f"round {r + 1}/{s.repeats}")
            names = sorted(workers)
            for i in order.permutation(len(names)):
                v = names[i]
                if v not in workers:  # failed earlier in this round
                    continue
                workers[v][1].send(True)
                message = receive(v)
                if message is not None:
                    times[v].append(message[1])
        peaks = {}
        for v, (_, conn) in list(workers.items()):
            conn.send(False)
            message = receive(v)
            if message is not None:
                peaks[v] = message[1]
    finally:
        for w in workers.values():
            _close(w)

    rows = {}
    measured = [v for v in s.variants if v in peaks]
    reference = statistics.median(times[measured[0]]) if measured else float("nan")
    for v in measured:
        median = statistics.median(times[v])
        q1, q3 = np.percentile(times[v], [25, 75])
        rows[v] = {
            "median_ms": 1000 * median,
            "iqr_ms": 1000 * float(q3 - q1),
            "first_ms": 1000 * first[v],
            "peak_mib": peaks[v],
            "base_mib": base[v],
            "x_first": median / reference,
            "x_floor": 1000 * median / floor_ms,
            "what": " + ".join(
                [BASES[parse_variant(v)[0]], *(MODIFIERS[m] for m in sorted(parse_variant(v)[1]))]
            ),
        }
    result = {
        "machine": describe_machine(caps),
        "device": device.type,
        "threads": threads,
        "torch": torch.__version__,
        "settings": asdict(s),
        "gflop_per_step": flops / 1e9,
        "gemm_gflops": rate,
        "floor_ms": floor_ms,
        "memory": "peak GPU memory allocated" if device.type == "cuda" else "peak RSS",
        "rows": rows,
        "failed": failed,
        "skipped": skipped,
    }
    if out is not None:
        atomic_write(out, json.dumps(result, indent=2) + "\n")
    return result


def _close(worker) -> None:
    proc, conn = worker
    conn.close()
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
