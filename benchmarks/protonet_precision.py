"""Does the fast path change accuracy? Train ProtoNet twice from the same seed and episodes, fp32
NCHW vs bf16 autocast + channels-last, and compare on the same fixed test episodes.

Usage: METALAB_DATA=../shared/data python benchmarks/protonet_precision.py [--episodes 800]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from metalab.data.omniglot import omniglot
from metalab.evaluate import EVAL_SEED, evaluate
from metalab.methods.protonet import ProtoNetConfig
from metalab.rundir import load_method
from metalab.tasks.episodes import EpisodeSampler
from metalab.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=800, help="training episodes per run")
    parser.add_argument("--test-episodes", type=int, default=1000)
    args = parser.parse_args()
    test = omniglot("vinyals", "test")
    print(
        f"60-way 1-shot 5-query training, {args.episodes} episodes, seed 0; Vinyals test split, "
        f"{args.test_episodes} episodes x 15 queries, seed {EVAL_SEED}"
    )
    print("| precision | train (s) | 5-way 1-shot | 20-way 1-shot |")
    print("|---|---:|---:|---:|")
    for fast in (False, True):
        config = ProtoNetConfig(
            ways=60,
            shots=1,
            queries=5,
            episodes=args.episodes,
            val_every=0,
            lr_decay_every=2000,
            bf16=fast,
            channels_last=fast,
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            train("protonet", config, Path(tmp), progress=False)
            seconds = time.perf_counter() - start
            method, _ = load_method(Path(tmp) / "best.pt")
        cells = []
        for ways in (5, 20):
            sampler = EpisodeSampler(test, ways, 1, 15, seed=EVAL_SEED)
            cells.append(str(evaluate(method, sampler, args.test_episodes)))
        name = "bf16 autocast + channels-last" if fast else "fp32"
        print(f"| {name} | {seconds:.0f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
