"""The meta-training loop: episodes in, checkpoints, validation and logs out.

A run directory holds ``config.json``, ``checkpoint.pt`` (latest) and ``best.pt`` (best validation
accuracy), ``metrics.jsonl`` and TensorBoard events. Checkpoints are written to a temporary file and
renamed, and carry the optimizer, scheduler and every random generator, so ``resume=True``
continues the run exactly where it stopped (bit for bit on the same machine and thread count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import metalab
from metalab.data.datasets import load_dataset
from metalab.errors import CheckpointError, ConfigError, TrainingError
from metalab.evaluate import EVAL_SEED, evaluate
from metalab.methods import METHODS, get_method
from metalab.methods.base import Method, MethodConfig
from metalab.tasks.episodes import EpisodeSampler

LOG_EVERY = 50  # episodes between metrics.jsonl lines


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def save_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".part")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_checkpoint(path: Path, method_name: str | None = None) -> dict:
    """Read a checkpoint, checking it is one of ours (and of ``method_name`` when given)."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: train first or check the run directory")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(checkpoint, dict) or "method" not in checkpoint or "model" not in checkpoint:
        raise CheckpointError(f"{path} is not a metalab checkpoint")
    if method_name is not None and checkpoint["method"] != method_name:
        raise CheckpointError(
            f"{path} is a {checkpoint['method']!r} checkpoint, not {method_name!r}: "
            f"use `metalab train {checkpoint['method']} --resume` or another --run-dir"
        )
    if checkpoint["method"] not in METHODS:
        raise CheckpointError(f"{path} holds unknown method {checkpoint['method']!r}")
    return checkpoint


def load_method(path: Path, method_name: str | None = None) -> tuple[Method, dict]:
    """Rebuild a trained method from a checkpoint; returns it (in eval mode) and the checkpoint."""
    checkpoint = load_checkpoint(path, method_name)
    cls = get_method(checkpoint["method"])
    config = cls.Config(**checkpoint["config"])
    method = cls(config)
    try:
        method.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit {cls.name} with its saved config: {first}"
        ) from None
    return method.eval(), checkpoint


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
        self.method.to(device)
        self.train_set = load_dataset(c.data, c.split, c.train_part, c.image_size, data_root)
        self.sampler = EpisodeSampler(self.train_set, c.ways, c.shots, c.queries, seed=c.seed)
        self.val_sampler = None
        if c.train_part != "trainval" and c.val_every > 0:  # trainval leaves nothing to validate on
            val_set = load_dataset(c.data, c.split, "val", c.image_size, data_root)
            self.val_sampler = EpisodeSampler(
                val_set, c.eval_ways, c.eval_shots, c.eval_queries, seed=EVAL_SEED
            )
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=c.lr)
        step = c.lr_decay_every if c.lr_decay_every > 0 else 10**12
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step, gamma=c.lr_decay)
        self.episode = 0
        self.best_val: float | None = None

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
        save_atomic(self.state(), self.run_dir / name)

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> tuple[float, dict[str, float]]:
        c = self.config
        batch = (
            self.sampler.sample_batch(c.meta_batch) if c.meta_batch > 1 else self.sampler.sample()
        )
        loss, metrics = self.method.meta_loss(batch.to(self.device))
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at episode {self.episode + 1}; the last good checkpoint "
                f"(episode {self._saved_episode}) is {self.run_dir / 'checkpoint.pt'}: "
                f"start a new run with a lower --lr (this one used {c.lr:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.episode += 1
        return value, metrics

    def validate(self) -> float:
        result = evaluate(self.method, self.val_sampler, self.config.val_episodes, self.device)
        if self.best_val is None or result.mean > self.best_val:
            self.best_val = result.mean
            self.save("best.pt")
        return result.mean

    def run(self, minutes: float | None = None, progress: bool = True) -> TrainSummary:
        """Train until the episode budget, the time budget or Ctrl-C; checkpoint on the way out."""
        from torch.utils.tensorboard import SummaryWriter

        c = self.config
        deadline = time.monotonic() + 60 * minutes if minutes else math.inf
        self._saved_episode = self.episode
        window: list[tuple[float, float]] = []
        window_start = time.perf_counter()
        stopped = "episodes"
        bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} ep"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            disable=not progress,
        )
        with (
            _stop_on_sigint() as interrupted,
            open(self.run_dir / "metrics.jsonl", "a") as log,
            SummaryWriter(str(self.run_dir / "tb"), purge_step=self.episode or None) as writer,
            bar,
        ):
            task = bar.add_task(
                self.method.name, total=c.episodes, completed=self.episode, status=""
            )
            while self.episode < c.episodes:
                if interrupted:  # Ctrl-C: finish the episode, checkpoint, say how to resume
                    stopped = "interrupted"
                    break
                if time.monotonic() > deadline:
                    stopped = "minutes"
                    break
                loss, metrics = self.step()
                window.append((loss, metrics.get("acc", float("nan"))))
                if self.episode % LOG_EVERY == 0:
                    elapsed = time.perf_counter() - window_start
                    row = {
                        "episode": self.episode,
                        "loss": sum(w[0] for w in window) / len(window),
                        "acc": sum(w[1] for w in window) / len(window),
                        "lr": self.scheduler.get_last_lr()[0],
                        "episodes_per_s": len(window) / elapsed,
                    }
                    _log(log, writer, row, "train")
                    status = (
                        f"loss {row['loss']:.3f} acc {100 * row['acc']:.1f}% "
                        f"{row['episodes_per_s']:.1f} ep/s"
                    )
                    bar.update(task, completed=self.episode, status=status)
                    window, window_start = [], time.perf_counter()
                if self.val_sampler is not None and self.episode % c.val_every == 0:
                    acc = self.validate()
                    _log(log, writer, {"episode": self.episode, "acc": acc}, "val")
                    status = f"val {100 * acc:.2f}% (best {100 * self.best_val:.2f}%)"
                    bar.update(task, status=status)
                    self.save()
                    self._saved_episode = self.episode
            bar.update(task, completed=self.episode)
        self._finish()
        return TrainSummary(self.run_dir, self.episode, self.best_val, stopped)

    def _finish(self) -> None:
        if self.val_sampler is not None and self.episode % self.config.val_every:
            self.validate()
        self.save()
        if not (self.run_dir / "best.pt").exists():
            self.save("best.pt")  # no validation split (trainval): the final weights


def _log(log, writer, row: dict, kind: str) -> None:
    log.write(json.dumps({"kind": kind, **row}) + "\n")
    log.flush()
    for key, value in row.items():
        if key != "episode":
            writer.add_scalar(f"{kind}/{key}", value, row["episode"])


@contextlib.contextmanager
def _stop_on_sigint():
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
    run is the same run.
    """
    cls = get_method(method_name)
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "checkpoint.pt"
    checkpoint = None
    if resume:
        checkpoint = load_checkpoint(checkpoint_path, method_name)
        config = cls.Config(**{**checkpoint["config"], "episodes": config.episodes})
    elif checkpoint_path.exists():
        raise ConfigError(
            f"{run_dir} already holds a run: pass --resume to continue it or choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps({"method": method_name, **asdict(config)}, indent=2) + "\n"
    )
    torch.manual_seed(config.seed)
    trainer = Trainer(cls(config), run_dir, resolve_device(device), data_root)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    return trainer.run(minutes=minutes, progress=progress)
