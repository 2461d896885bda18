"""One ProtoNet training episode (60-way 5-shot 5-query, Conv4, 28x28): median step time, peak
memory, FLOPs and the distance to this machine's GEMM floor, for each speed change on its own.

Usage: python benchmarks/protonet_step.py [--threads 2] [--steps 20] [--ways 60 --shots 5]

Each variant runs in a fresh subprocess (so peak memory is its own). "plain" is the textbook loop:
fp32, contiguous NCHW, prototypes by a Python loop over classes and ``torch.cdist(...) ** 2``.
"allocator" is :func:`metalab.runtime.keep_freed_memory`, which the CLI applies. The CPU's model
and PyTorch's kernel level head the table; on a device without native bf16 kernels
(:func:`metalab.arithmetic.capabilities`) the bf16 variants and the bf16 GEMM are skipped with a
one-line reason (there, one bf16 step takes seconds and the GEMM minutes). The last rows are what
``auto`` picks on this machine (metalab.arithmetic.choose on the same episode).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

WAYS, SHOTS, QUERIES = 60, 5, 5  # (--ways, --shots, --queries)
VARIANTS = {
    # name: (metalab ProtoNet?, channels_last, bf16, keep freed memory)
    "plain PyTorch loop": (False, False, False, False),
    "metalab fp32": (True, False, False, False),
    "metalab + channels-last": (True, True, False, False),
    "metalab + bf16 autocast": (True, False, True, False),
    "metalab + channels-last + bf16": (True, True, True, False),
    "plain PyTorch loop + allocator": (False, False, False, True),
    "metalab + channels-last + allocator": (True, True, False, True),
    "metalab + channels-last + bf16 + allocator": (True, True, True, True),
}


def episode() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    support = torch.rand(WAYS * SHOTS, 1, 28, 28, generator=g)
    query = torch.rand(WAYS * QUERIES, 1, 28, 28, generator=g)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES)
    return support, support_y, query, query_y


def auto_choice(threads: int) -> dict:
    """What ``auto`` decides for this episode on this machine (with the CLI's allocator)."""
    from metalab.arithmetic import choose, key
    from metalab.methods.protonet import ProtoNet, ProtoNetConfig
    from metalab.runtime import keep_freed_memory
    from metalab.tasks.episodes import Episode

    keep_freed_memory()
    torch.set_num_threads(threads)
    method = ProtoNet(ProtoNetConfig())
    decision = choose(method, Episode(*episode()), torch.device("cpu"))
    return {"choice": key(decision["settings"]), "probe_ms": decision["probe_ms"]}


def plain_step_fn():
    from metalab.nets.conv4 import Conv4

    encoder = Conv4()
    optimizer = torch.optim.Adam(encoder.parameters(), 1e-3)

    def step(support, support_y, query, query_y):
        z = encoder(torch.cat([support, query]))
        zs, zq = z[: len(support)], z[len(support) :]
        protos = torch.stack([zs[support_y == c].mean(0) for c in range(WAYS)])
        loss = F.cross_entropy(-(torch.cdist(zq, protos) ** 2), query_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, encoder


def metalab_step_fn(channels_last: bool, bf16: bool):
    from metalab.methods.protonet import ProtoNet, ProtoNetConfig
    from metalab.tasks.episodes import Episode

    method = ProtoNet(ProtoNetConfig(channels_last=channels_last, bf16=bf16))
    optimizer = torch.optim.Adam(method.parameters(), 1e-3)

    def step(support, support_y, query, query_y):
        loss, _ = method.meta_loss(Episode(support, support_y, query, query_y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step, method


def run_variant(name: str, threads: int, steps: int) -> dict:
    from metalab.runtime import keep_freed_memory

    is_metalab, channels_last, bf16, allocator = VARIANTS[name]
    if allocator:
        keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    step, _ = metalab_step_fn(channels_last, bf16) if is_metalab else plain_step_fn()
    data = episode()
    for _ in range(5):
        step(*data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(*data)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "median_ms": 1000 * statistics.median(times),
        "peak_rss_mib": peak / 1024,
        "growth_mib": (peak - before) / 1024,
    }


def floor(threads: int, bf16: bool) -> dict:
    """FLOPs of one fp32 step and this machine's large-GEMM throughput (fp32, and bf16 where the
    CPU has native bf16 kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    from metalab.bench import gemm_rate

    torch.set_num_threads(threads)
    step, _ = plain_step_fn()
    with FlopCounterMode(display=False) as counter:
        step(*episode())
    result = {"gflop_per_step": counter.get_total_flops() / 1e9}
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        rate = gemm_rate(
            "cpu", dtype
        )  # the best of ten 2048^3 products (before issue 20: the mean)
        result[f"gemm_gflops_{dtype}".replace("torch.", "")] = rate
    return result


def main() -> None:
    global WAYS, SHOTS, QUERIES
    from metalab.arithmetic import capabilities, describe_machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ways", type=int, default=WAYS)
    parser.add_argument("--shots", type=int, default=SHOTS)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one in this process
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--auto", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    WAYS, SHOTS, QUERIES = args.ways, args.shots, args.queries
    caps = capabilities("cpu")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.threads, args.steps)))
        return
    if args.floor:
        print(json.dumps(floor(args.threads, caps["native_bf16"])))
        return
    if args.auto:
        print(json.dumps(auto_choice(args.threads)))
        return

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--steps", str(args.steps)]
        cmd += ["--ways", str(WAYS), "--shots", str(SHOTS), "--queries", str(QUERIES)]
        out = subprocess.run([*cmd, *extra], capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    f = child("--floor")
    print(f"CPU: {describe_machine(caps)}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed steps after 5 "
        f"warm-up; {WAYS}-way {SHOTS}-shot {QUERIES}-query episodes"
    )
    bf16_rate = f.get("gemm_gflops_bfloat16")
    print(
        f"one step = {f['gflop_per_step']:.1f} GFLOP (fp32 count); 2048^3 GEMM: "
        f"{f['gemm_gflops_float32']:.0f} GFLOP/s fp32, "
        + (f"{bf16_rate:.0f} GFLOP/s bf16" if bf16_rate else "bf16 skipped (no native kernels)")
    )
    print()
    print(
        "| variant | median step (ms) | vs plain | GEMM-floor ms (fp32 / bf16) | peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|")
    base = None
    floor_ms = 1000 * f["gflop_per_step"] / f["gemm_gflops_float32"]
    floor_bf = f"{1000 * f['gflop_per_step'] / bf16_rate:.0f}" if bf16_rate else "-"
    for name, (_, _, bf16, _) in VARIANTS.items():
        if bf16 and not caps["native_bf16"]:
            print(f"| {name} | skipped: this CPU has no native bf16 kernels | | | |")
            continue
        r = child("--variant", name)
        base = base or r["median_ms"]
        print(
            f"| {name} | {r['median_ms']:.0f} | {base / r['median_ms']:.2f}x | "
            f"{floor_ms:.0f} / {floor_bf} | {r['peak_rss_mib']:.0f} |"
        )
    auto = child("--auto")
    probe = ", ".join(f"{k} {v:.0f} ms" for k, v in auto["probe_ms"].items())
    print()
    print(f"auto picks: {auto['choice']} (its probe, best of 3 steps: {probe})")


if __name__ == "__main__":
    main()
