"""The meta-training loop: episodes in, checkpoints, validation and logs out.

The run directory it fills is described in :mod:`metalab.rundir`. Checkpoints carry the optimizer,
scheduler and every random generator, so ``resume=True`` continues the run exactly where it
stopped (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import metalab
from metalab.arithmetic import choose, describe, requested, resolve_device, settle
from metalab.compiling import CompileClock, describe_compile
from metalab.data.datasets import load_dataset
from metalab.errors import ConfigError, TrainingError
from metalab.evaluate import EVAL_SEED
from metalab.methods import get_method
from metalab.methods.base import Method, MethodConfig
from metalab.rundir import load_checkpoint, save_checkpoint, write_config
from metalab.tasks.cactus import cactus_episodes
from metalab.tasks.episodes import EpisodeSampler, TaskBatch
from metalab.tasks.nme import NMEEpisodes
from metalab.tasks.oneshot import AlphabetTrials
from metalab.tasks.transforms import augment_episode

LOG_EVERY = 50  # episodes between metrics.jsonl lines
# Wall-clock seconds between checkpoints of a run that does not validate (regression tasks, the
# method's own task streams), so that a crash or a killed process loses at most this much; a
# validating run checkpoints at every validation.
CHECKPOINT_SECONDS = 600


@dataclass
class TrainSummary:
    run_dir: Path
    episodes: int
    best_val: float | None
    stopped: str  # "episodes" | "minutes" | "interrupted"


class Trainer:
    """Trains one method in one run directory. Use :func:`train`."""

    def __init__(self, method: Method, run_dir: Path, device: torch.device, data_root=None) -> None:
        self.method, self.config, self.run_dir, self.device = method, method.config, run_dir, device
        c = self.config
        if c.compile:
            method.check_compile()
        self.method.to(device)
        for note in settle(method, device):  # a stored decision this device cannot follow
            print(f"metalab: {note}")
        self.rank, self.world = _rank_and_world()
        if self.world > 1 and c.meta_batch < self.world:
            raise ConfigError(
                f"{self.world} processes share the tasks of each meta-batch, but meta_batch="
                f"{c.meta_batch}: use --meta-batch {self.world} or more, or fewer processes"
            )
        if c.train_part not in ("train", "trainval"):
            raise ConfigError(f"train_part={c.train_part!r}: train on train or trainval")
        self.sampler: EpisodeSampler  # or the method's own tasks (Method.task_sampler)
        self.val_sampler = None
        custom = method.task_sampler(c, "train", data_root)
        if custom is not None:  # e.g. optimisation problems or regression tasks, drawn on the fly
            levers = {
                "alphabet-episodes": c.alphabet_episodes,
                "augment": c.augment,
                "stroke": c.stroke,
                "val-protocol": c.val_protocol if c.val_protocol != "episodes" else None,
                "nme-episodes": c.nme_episodes,
                "cactus": c.cactus if c.cactus != "off" else None,
            }
            used = [f"--{k} {v}" for k, v in levers.items() if v]
            if used:
                raise ConfigError(
                    f"{' and '.join(used)}: for image episodes, and {method.name} trains on its "
                    "own tasks: leave it out"
                )
            self.sampler = custom
            if c.val_every > 0:
                self.val_sampler = method.task_sampler(c, "val", data_root)
        else:
            train_set = load_dataset(c.data, c.split, c.train_part, c.image_size, data_root)
            if c.cactus != "off":  # pseudo-classes of the unlabelled images (tasks.cactus)
                self.sampler = cactus_episodes(c, train_set, data_root, device)
            else:
                episodes = NMEEpisodes if c.nme_episodes else method.sampler
                self.sampler = episodes(
                    train_set, c.ways, c.shots, c.queries, seed=c.seed, labelled=c.labelled
                )
            if c.alphabet_episodes:
                if not method.supports_ways(c.alphabet_ways):
                    raise ConfigError(
                        f"alphabet_ways={c.alphabet_ways}: {method.name} answers {c.ways}-way "
                        f"episodes only: use --alphabet-ways {c.ways}"
                    )
                self.sampler.mix_alphabets(c.alphabet_episodes, c.alphabet_ways)
            if c.train_part != "trainval" and c.val_every > 0:
                self.val_sampler = self._validation(data_root)
        # --compile: two eager steps, then compiled ones; the clock reports what compiling cost
        self.clock = CompileClock(method.enable_compile) if c.compile else None
        self.optimizer = self.method.make_optimizer()
        step = c.lr_decay_every if c.lr_decay_every > 0 else 10**12
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step, gamma=c.lr_decay)
        self.episode = 0
        self.best_val: float | None = None
        self.compile_report: dict | None = None

    def _validation(self, data_root):
        """What validation scores: fixed episodes of the ``val`` part (``val_protocol``
        ``episodes``), or within-alphabet trials on its upright characters."""
        c, method = self.config, self.method
        if c.val_protocol not in ("episodes", "within-alphabet"):
            raise ConfigError(f"val_protocol={c.val_protocol!r}: use episodes or within-alphabet")
        val_set = load_dataset(c.data, c.split, "val", c.image_size, data_root)
        if c.val_protocol == "episodes":
            return method.sampler(
                val_set, c.eval_ways, c.eval_shots, c.eval_queries, EVAL_SEED, c.eval_labelled
            )
        if (c.data, c.split) != ("omniglot", "lake") or not method.supports_ways(20):
            raise ConfigError(
                "--val-protocol within-alphabet is for 20-way one-shot models trained with "
                "--split lake (trials on the held-out background alphabets): use "
                "--val-protocol episodes"
            )
        return AlphabetTrials.unrotated(val_set)

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "method": self.method.name,
            "config": asdict(self.config),
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "episode": self.episode,
            "best_val": self.best_val,
            "sampler": self.sampler.state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "metalab_version": metalab.__version__,
        }

    def restore(self, checkpoint: dict) -> None:
        self.method.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.episode, self.best_val = checkpoint["episode"], checkpoint["best_val"]
        self.sampler.set_state(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if checkpoint["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])

    def save(self, name: str = "checkpoint.pt") -> None:
        save_checkpoint(self.state(), self.run_dir / name)

    # -- the loop ------------------------------------------------------------------------------
    def draw(self):
        """The next batch of this process (the whole batch in a single process), on the device,
        and its share of the meta-batch."""
        c = self.config
        if c.meta_batch > 1 or self.method.task_batches:
            batch = self.sampler.sample_batch(c.meta_batch)
        else:
            batch = self.sampler.sample()
        share = 1.0
        if self.world > 1:  # every rank draws the whole batch (same stream), and takes its share
            mine = np.array_split(np.arange(c.meta_batch), self.world)[self.rank]
            batch = TaskBatch(*(t[mine[0] : mine[-1] + 1] for t in batch.tensors()))
            share = len(mine) / c.meta_batch
        batch = batch.to(self.device)
        if c.augment or c.stroke:
            batch = augment_episode(batch, c.augment, c.stroke)
        return batch, share

    def choose_arithmetic(self) -> dict | None:
        """Decide the method's ``auto`` speed switches by timing its step on the first batch
        (metalab.arithmetic.choose), unless the run already holds a decision; the batch is drawn
        and put back, so training starts from it as it would have. With several processes rank 0
        decides for all. Returns the new decision (stored in the config), or None."""
        c = self.config
        switches = self.method.speed_switches()
        if c.arithmetic is not None or "auto" not in requested(c, switches).values():
            return None
        decision = None
        if self.rank == 0:
            state = self.sampler.state()
            batch, _ = self.draw()
            self.sampler.set_state(state)
            decision = choose(self.method, batch, self.device)
        if self.world > 1:
            import torch.distributed as dist

            shared = [decision]
            dist.broadcast_object_list(shared, src=0)
            decision = shared[0]
            self.method.set_arithmetic(decision["settings"])
        self.config = self.method.config = c.updated(arithmetic=decision)
        return decision

    def step(self) -> tuple[float, dict[str, float]]:
        c = self.config
        batch, share = self.draw()
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        value, metrics = self.method.meta_step(batch)
        if self.world > 1:
            value, metrics = self._all_reduce(share, value, metrics)
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at episode {self.episode + 1}; the last good checkpoint "
                f"(episode {self._saved_episode}) is {self.run_dir / 'checkpoint.pt'}: "
                f"start a new run with a lower --lr (this one used {c.lr:g})"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.episode += 1
        if self.clock is not None:  # value came back through .item(): the step has finished
            self.compile_report = self.clock.record(time.perf_counter() - start)
        return value, metrics

    def _all_reduce(
        self, share: float, value: float, metrics: dict[str, float]
    ) -> tuple[float, dict[str, float]]:
        """Sum the ranks' meta-gradients, each weighted by its share of the tasks, so the step is
        the one a single process takes with the whole meta-batch; the same for loss and metrics."""
        import torch.distributed as dist

        # The parameters that received a gradient are the same on every rank (the same method on
        # tasks of the same shape); those without one stay without, as Adam skips them.
        grads = [p.grad for p in self.method.parameters() if p.grad is not None]
        flat = torch.cat([g.flatten() for g in grads]) * share
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        names = sorted(metrics)
        scalars = torch.tensor([value, *(metrics[k] for k in names)], device=flat.device) * share
        dist.all_reduce(scalars)
        total, *rest = scalars.tolist()
        return total, dict(zip(names, rest))

    def validate(self) -> float:
        score = self.method.validation_score(
            self.val_sampler, self.config.val_episodes, self.device
        )
        if self.best_val is None or score > self.best_val:
            self.best_val = score
            self.save("best.pt")
        return score

    def run(self, minutes: float | None = None, progress: bool = True) -> TrainSummary:
        """Train until the episode budget, the time budget or Ctrl-C; checkpoint on the way out.

        With several processes (torch.distributed) only rank 0 validates, logs and writes
        checkpoints, and rank 0's decision to stop is shared, so all ranks stop at the same step.
        """
        from torch.utils.tensorboard import SummaryWriter

        c = self.config
        lead = self.rank == 0
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        self._saved_episode, saved_at = self.episode, time.monotonic()
        window: list[tuple[float, dict[str, float]]] = []
        window_start = time.perf_counter()
        stopped = "episodes"
        bar = progress_bar("ep", disable=not (progress and lead))
        with (
            stop_on_sigint() as interrupted,
            open(self.run_dir / "metrics.jsonl", "a") if lead else contextlib.nullcontext() as log,
            SummaryWriter(str(self.run_dir / "tb"), purge_step=self.episode or None)
            if lead
            else contextlib.nullcontext() as writer,
            bar,
        ):
            task = bar.add_task(
                self.method.name, total=c.episodes, completed=self.episode, status=""
            )
            while self.episode < c.episodes:
                stop = (
                    "interrupted"  # Ctrl-C: finish the episode, checkpoint, say how to resume
                    if interrupted
                    else "minutes"
                    if time.monotonic() > deadline
                    else None
                )
                if self._agreed(stop is not None):
                    stopped = stop or "interrupted"
                    break
                loss, metrics = self.step()
                window.append((loss, metrics))
                if self.compile_report is not None and lead:
                    print(describe_compile(self.compile_report))
                    log.write(json.dumps({"kind": "compile", "episode": self.episode,
                                          **self.compile_report}) + "\n")  # fmt: skip
                    self.compile_report = None
                if self.episode % LOG_EVERY == 0:
                    elapsed = time.perf_counter() - window_start
                    row = {"episode": self.episode, "loss": sum(w[0] for w in window) / len(window)}
                    for key in window[0][1]:
                        row[key] = sum(w[1][key] for w in window) / len(window)
                    row["lr"] = self.scheduler.get_last_lr()[0]
                    row["episodes_per_s"] = len(window) / elapsed
                    _log(log, writer, row, "train")
                    status = f"loss {row['loss']:.3f}"
                    if "acc" in row:
                        status += f" acc {100 * row['acc']:.1f}%"
                    bar.update(
                        task,
                        completed=self.episode,
                        status=f"{status} {row['episodes_per_s']:.1f} ep/s",
                    )
                    window, window_start = [], time.perf_counter()
                validating = self.val_sampler is not None
                if lead and validating and self.episode % c.val_every == 0:
                    acc = self.validate()
                    _log(log, writer, {"episode": self.episode, "acc": acc}, "val")
                    status = _val_status(acc, self.best_val)
                    bar.update(task, status=status)
                    self.save()
                    self._saved_episode, saved_at = self.episode, time.monotonic()
                elif lead and not validating and time.monotonic() - saved_at >= CHECKPOINT_SECONDS:
                    self.save()
                    self._saved_episode, saved_at = self.episode, time.monotonic()
            bar.update(task, completed=self.episode)
            if lead:
                self._finish(log, writer)
        return TrainSummary(self.run_dir, self.episode, self.best_val, stopped)

    def _agreed(self, stop: bool) -> bool:
        """Rank 0's stop decision, on every rank (just ``stop`` in a single process)."""
        if self.world == 1:
            return stop
        import torch.distributed as dist

        flag = torch.tensor([float(stop and self.rank == 0)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _finish(self, log, writer) -> None:
        """Validate the last weights (logged like every validation) unless that just happened,
        and write the final checkpoint."""
        if self.val_sampler is not None and self.episode % self.config.val_every:
            _log(log, writer, {"episode": self.episode, "acc": self.validate()}, "val")
        self.save()
        if not (self.run_dir / "best.pt").exists():
            self.save("best.pt")  # no validation (trainval, regression): the final weights


def _val_status(score: float, best: float) -> str:
    """Accuracies in percent; other validation scores (e.g. a negated loss) as they are."""
    if 0.0 <= score <= 1.0 and 0.0 <= best <= 1.0:
        return f"val {100 * score:.2f}% (best {100 * best:.2f}%)"
    return f"val {score:.4g} (best {best:.4g})"


def _log(log, writer, row: dict, kind: str) -> None:
    if log is None:  # not rank 0
        return
    log.write(json.dumps({"kind": kind, **row}) + "\n")
    log.flush()
    for key, value in row.items():
        if key != "episode":
            writer.add_scalar(f"{kind}/{key}", value, row["episode"])


def progress_bar(unit: str, disable: bool) -> Progress:
    """The training bar every loop shows: name, bar, done/total ``unit``, a status, elapsed time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} " + unit),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        disable=disable,
    )


@contextlib.contextmanager
def stop_on_sigint():
    """Turn Ctrl-C into a flag the loop checks between episodes, so no step is torn in half."""
    flag: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.signal(signal.SIGINT, lambda *_: flag.append(True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(
    method_name: str,
    config: MethodConfig,
    run_dir: Path,
    *,
    minutes: float | None = None,
    resume: bool = False,
    device: str = "auto",
    data_root=None,
    progress: bool = True,
) -> TrainSummary:
    """Train ``method_name`` with ``config`` in ``run_dir`` (created), or resume the run there.

    On resume the saved config wins (the budget ``config.episodes`` may be raised), so a resumed
    run is the same run. Started by ``torchrun`` (``WORLD_SIZE`` > 1), each process takes a share
    of every meta-batch and the meta-gradients are summed (gloo on CPU, NCCL on GPUs).
    """
    cls = get_method(method_name)
    if config.compile:
        cls.check_compile()  # before the run directory is made
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path, method_name)
        kept = checkpoint["config"]  # the budget and --compile are this invocation's
        config = cls.Config(**{**kept, "episodes": config.episodes, "compile": config.compile})
    elif checkpoint_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-dir"
        )
    with _process_group(device) as dev:
        lead = _rank_and_world()[0] == 0
        if lead:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir, method_name, config)
        torch.manual_seed(config.seed)
        trainer = Trainer(cls(config), run_dir, dev, data_root)
        if checkpoint is not None:
            trainer.restore(checkpoint)
        decision = trainer.choose_arithmetic()
        if lead and decision is not None:
            write_config(run_dir, method_name, trainer.config)
            print(describe(decision))
        elif lead and trainer.config.arithmetic and progress:
            print(f"{describe(trainer.config.arithmetic)} (kept from the run)")
        summary = trainer.run(minutes=minutes, progress=progress)
        del trainer  # release the model before the process group goes (see _process_group)
    return summary


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _process_group(device: str):
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1); yield the device.

    On GPUs each process takes ``cuda:LOCAL_RANK`` and NCCL; on CPUs gloo. Before
    ``destroy_process_group`` everything that held tensors is released and garbage-collected:
    with torch 2.13 + gloo, about a third of 2-process runs otherwise aborted with SIGABRT at exit
    after all work had succeeded."""
    import gc

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        yield resolve_device(device)
        return
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dev
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
