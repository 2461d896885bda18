"""``--compile``: ``torch.compile`` for a method's training and evaluation step (issue 20).

A method says what compiles (:meth:`metalab.methods.base.Method.enable_compile`): the embedding
methods their encoder's forward, MAML its meta-gradient (vmap backend: the whole of it; loop
backend: each task's query loss, since the inner loop's double backward does not compile). Each
piece is a :class:`Compiled`: when a graph does not compile, it says so in one line and runs the
piece eagerly from then on, so ``--compile`` never stops a run.

Compilation costs minutes on a CPU (MAML's vmap step: 116-197 s) and pays only when the compiled
step is faster: :class:`CompileClock` times two eager steps, the first compiled one and ten more, and
reports the compile time and after how many steps it has paid for itself (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

BACKEND = "inductor"  # torch.compile's backend for every piece (tests may use a lighter one)


def _one_line(error: BaseException) -> str:
    """The root cause, in one line (dynamo wraps a backend's error in BackendCompilerFailed and
    keeps it as ``inner_exception``)."""
    while isinstance(getattr(error, "inner_exception", None), BaseException):
        error = error.inner_exception
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:160]


class Compiled:
    """``fn`` under ``torch.compile``; if compiling fails, ``fn`` itself from then on, after one
    warning line. An error that ``fn`` raises eagerly too (bad input) is raised as it is."""

    def __init__(self, fn: Callable, name: str, announce: bool = False, **options: Any) -> None:
        self.fn, self.name, self.announce = fn, name, announce
        self.compiled = torch.compile(fn, **{"backend": BACKEND, **options})
        self.failed: str | None = None  # why it runs eagerly
        self.first_s: float | None = None  # the first compiled call, compilation included

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is not None:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back
            out = self.fn(*args, **kwargs)  # a genuine error raises here, as it would eagerly
            self.failed = _one_line(error)
            print(f"metalab: --compile: {self.name} did not compile ({self.failed}); runs eagerly")
            return out
        if self.first_s is None:
            self.first_s = time.perf_counter() - start
            if self.announce:
                print(f"metalab: --compile: {self.name}: first call {self.first_s:.1f} s")
        return out


def compile_forward(module: torch.nn.Module, name: str, announce: bool = False) -> Compiled:
    """Compile ``module``'s forward in place (its parameters, state dict and checkpoints are
    unchanged); returns the wrapper. Compiling it again keeps the wrapper it has."""
    if isinstance(module.forward, Compiled):
        return module.forward
    wrapper = Compiled(module.forward, name, announce)
    module.forward = wrapper  # an instance attribute: nn.Module.__call__ calls it
    return wrapper


class CompileClock:
    """The cost of ``--compile`` in a run: times the first ``eager`` steps (the last is the eager
    step time), then calls ``enable`` (which compiles lazily), then times the first compiled step
    (compilation included) and ``compiled`` more. :meth:`record` returns the report once."""

    def __init__(self, enable: Callable[[], list[Compiled]], eager: int = 2, compiled: int = 10):
        self.enable, self.eager, self.compiled = enable, eager, compiled
        self.times: list[float] = []
        self.parts: list[Compiled] = []
        self.done = False

    def record(self, seconds: float) -> dict | None:
        if self.done:
            return None
        self.times.append(seconds)
        if len(self.times) == self.eager:
            self.parts = self.enable()
        if len(self.times) < self.eager + 1 + self.compiled:
            return None
        self.done = True
        return self.report()

    def report(self) -> dict:
        """Compile time (the first compiled step minus a compiled step), eager and compiled step
        times, and the steps after which compiling has paid (None: it does not pay)."""
        eager = self.times[self.eager - 1]
        first = self.times[self.eager]
        compiled = statistics.median(self.times[self.eager + 1 :])
        compile_s = max(first - compiled, 0.0)
        saved = eager - compiled
        failed = {p.name: p.failed for p in self.parts if p.failed}
        return {
            "compile_s": round(compile_s, 2),
            "eager_ms": round(1000 * eager, 2),
            "compiled_ms": round(1000 * compiled, 2),
            "speedup": round(eager / compiled, 3),
            "pays_after_steps": round(compile_s / saved) if saved > 0 and not failed else None,
            "failed": failed,
        }


def describe_compile(report: dict) -> str:
    """One line for the run's output."""
    if report["failed"]:
        names = ", ".join(report["failed"])
        return f"compile: {names} did not compile; ran eagerly"
    pays = report["pays_after_steps"]
    verdict = f"pays after {pays:,} steps" if pays is not None else "does not pay here"
    return (
        f"compile: {report['compile_s']:.1f} s; step {report['compiled_ms']:.1f} ms compiled vs "
        f"{report['eager_ms']:.1f} ms eager ({report['speedup']:.2f}x): {verdict}"
    )
