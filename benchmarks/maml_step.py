"""Time one second-order MAML meta-training step, per backend (issue 3, benchmarks/RESULTS.md).

The configuration of the issue's reference figures: Omniglot-shaped 5-way 1-shot episodes with 15
queries per class, meta-batch 32, Conv4 with 64 filters and max-pool (28x28 -> 64 features), batch
norm on batch statistics, 1 or 5 inner steps at alpha = 0.4, Adam. Each variant runs in its own
process (so its peak memory is its own) for ``--repeats`` timed steps after ``--warmup`` untimed
ones, on real Omniglot episodes when the data root has them (random images otherwise: the
arithmetic is the same). The FLOPs of one step are counted with torch's FlopCounterMode and the
floor is FLOPs / (the measured fp32 GEMM rate).

    python benchmarks/maml_step.py                 # all variants, 1 and 5 steps, 2 threads
    python benchmarks/maml_step.py --variants loop,vmap --inner-steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalab.functional import classification_loss, meta_gradient, write_grads
from metalab.nets.classifier import Conv4Classifier

WAYS, SHOTS, QUERIES, TASKS, ALPHA = 5, 1, 15, 32, 0.4
VARIANTS = {
    "plain-loop": "autograd.grad(create_graph=True) per task, nn.Module weights swapped in",
    "loop": "metalab loop backend (vmap-free torch.func per task)",
    "loop-cl": "loop backend, channels-last activations",
    "vmap": "metalab vmap backend, vmap(grad(task_loss)) over 32 tasks",
    "vmap-cl": "vmap backend, channels-last activations",
    "vmap-compile": "vmap backend under torch.compile",
    "loop-fo": "loop backend, first order",
    "vmap-fo": "vmap backend, first order",
}


def batch(device: torch.device):
    """One meta-batch of real Omniglot episodes if the data root has them, else random images."""
    try:
        from metalab.data.omniglot import omniglot
        from metalab.tasks.episodes import EpisodeSampler

        data = omniglot("vinyals", "train", download=False)
        b = EpisodeSampler(data, WAYS, SHOTS, QUERIES, seed=0).sample_batch(TASKS)
        tensors, source = b.tensors(), "omniglot"
    except Exception:  # no data here: the same shapes
        gen = torch.Generator().manual_seed(0)
        sx = torch.rand(TASKS, WAYS * SHOTS, 1, 28, 28, generator=gen)
        qx = torch.rand(TASKS, WAYS * QUERIES, 1, 28, 28, generator=gen)
        sy = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
        qy = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1)
        tensors, source = (sx, sy, qx, qy), "random"
    return tuple(t.to(device) for t in tensors), source


def plain_loop_step(model, tensors, steps, names):
    """The textbook loop (what learn2learn/higher do, minus their bookkeeping)."""
    sx, sy, qx, qy = tensors
    theta = dict(model.named_parameters())
    for t in range(TASKS):
        weights = [theta[n] for n in names]
        for _ in range(steps):
            logits = functional_call(model, dict(zip(names, weights)), (sx[t],))
            g = torch.autograd.grad(F.cross_entropy(logits, sy[t]), weights, create_graph=True)
            weights = [w - ALPHA * gw for w, gw in zip(weights, g)]
        loss = F.cross_entropy(functional_call(model, dict(zip(names, weights)), (qx[t],)), qy[t])
        (loss / TASKS).backward()


def make_step(variant: str, model, steps: int):
    names = [n for n, _ in model.named_parameters()]
    if variant == "plain-loop":
        return lambda tensors: plain_loop_step(model, tensors, steps, names)
    backend = "vmap" if variant.startswith("vmap") else "loop"
    first_order = variant.endswith("-fo")
    loss_fn = classification_loss(model)

    def step(tensors):
        sx, sy, qx, qy = tensors
        params = dict(model.named_parameters())
        out = meta_gradient(loss_fn, params, (sx, sy), (qx, qy), steps, ALPHA, first_order, backend)
        write_grads(params, out.grads)

    if variant == "vmap-compile":
        return torch.compile(step)
    return step


def run_variant(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Conv4Classifier(WAYS, 1, 64, pool="max", image_size=28).to(device)
    tensors, source = batch(device)
    if args.variant.endswith("-cl"):
        model = model.to(memory_format=torch.channels_last)
        tensors = (_cl(tensors[0]), tensors[1], _cl(tensors[2]), tensors[3])
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    step = make_step(args.variant, model, args.inner_steps)

    def one():
        optimizer.zero_grad(set_to_none=True)
        step(tensors)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    one()
    first = time.perf_counter() - start  # includes compilation for vmap-compile
    for _ in range(args.warmup):
        one()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    flops = None
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            one()
        flops = counter.get_total_flops()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": args.variant,
        "inner_steps": args.inner_steps,
        "median_ms": 1000 * statistics.median(times),
        "first_ms": 1000 * first,
        "peak_mib": peak,
        "flops": flops,
        "data": source,
    }


def _cl(x: torch.Tensor) -> torch.Tensor:
    """(T, B, C, H, W): each task's images channels-last."""
    t, b = x.shape[:2]
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (t, b))


def gemm_rate(threads: int, device: str) -> float:
    """GFLOP/s of a large fp32 matrix product: the peak the floor is computed against."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--inner-steps", default="1,5")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        args.inner_steps = int(args.inner_steps)
        print(json.dumps(run_variant(args)))
        return
    rate = gemm_rate(args.threads, args.device)
    rows = []
    for steps in args.inner_steps.split(","):
        for variant in args.variants.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--inner-steps",
                steps,
                "--repeats",
                str(args.repeats),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
            ]
            if variant == "loop":
                cmd.append("--count-flops")
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
            if out.returncode:
                print(f"{variant} ({steps} steps) failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    from metalab.arithmetic import capabilities, describe_machine

    print(f"\n{args.device}: {describe_machine(capabilities(args.device))}")
    print(
        f"fp32 GEMM 2048^3: {rate:.0f} GFLOP/s; device {args.device}, {args.threads} threads, "
        f"torch {torch.__version__}, {TASKS} tasks {WAYS}-way {SHOTS}-shot {QUERIES} queries"
    )
    flops = {r["inner_steps"]: r["flops"] for r in rows if r["flops"]}
    print(
        f"{'steps':>5} {'variant':<14} {'median ms':>10} {'first ms':>9} {'peak MiB':>9} "
        f"{'x floor':>8}"
    )
    for r in rows:
        f = flops.get(r["inner_steps"])
        floor_ms = 1000 * f / (rate * 1e9) if f else float("nan")
        print(
            f"{r['inner_steps']:>5} {r['variant']:<14} {r['median_ms']:>10.0f} "
            f"{r['first_ms']:>9.0f} {r['peak_mib']:>9.0f} {r['median_ms'] / floor_ms:>8.2f}"
        )
    for s, f in flops.items():
        print(
            f"{s} inner step(s): {f / 1e9:.1f} GFLOP per step, floor {1000 * f / (rate * 1e9):.0f} ms"
        )


if __name__ == "__main__":
    main()
