"""Episodes per second drawn from the cached Omniglot array (no model): is sampling ever the
bottleneck?  Usage: METALAB_DATA=../shared/data python benchmarks/sampler_throughput.py"""

from __future__ import annotations

import time

import torch

from metalab.data.omniglot import omniglot
from metalab.tasks.episodes import EpisodeSampler


def rate(sampler: EpisodeSampler, seconds: float = 3.0) -> float:
    for _ in range(50):
        sampler.sample()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sampler.sample()
        n += 1
    return n / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dataset | ways | shots | queries | episodes/s |")
    print("|---|---:|---:|---:|---:|")
    for part in ("train", "test"):
        data = omniglot("vinyals", part)
        for ways, shots, queries in ((5, 1, 15), (20, 5, 15), (60, 5, 5)):
            r = rate(EpisodeSampler(data, ways, shots, queries, seed=0))
            print(f"| {data.name} | {ways} | {shots} | {queries} | {r:,.0f} |")


if __name__ == "__main__":
    main()
