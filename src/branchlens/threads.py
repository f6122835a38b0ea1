"""How many threads a heavy stage runs on, chosen once per stage and set explicitly.

torch (and our numba kernels, which split work over ``torch.get_num_threads()``) default to
every core of the machine. Beside another busy process that oversubscribes the cores: the
threads wait for each other at every parallel region, and a 2-core machine ran feature
visualization at 0.2× its speed. So each stage takes, in order: an explicit request (the run
setting ``threads`` or ``$BRANCHLENS_THREADS``), ``$OMP_NUM_THREADS``, else the cores this
process may use (``sched_getaffinity``) shared among the ranks of this node, less the cores
other processes kept busy just before the stage started (measured from ``/proc/stat``).
Results do not depend on the count beyond float rounding (reductions are split by rows).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

ENV = "BRANCHLENS_THREADS"
P = ParamSpec("P")
R = TypeVar("R")
SAMPLE_S = 0.5  # how long the load of other processes is sampled at a stage's start


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def _busy_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of all CPUs, ticks of this process) now; None off Linux."""
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = cpu[3] + (cpu[4] if len(cpu) > 4 else 0)  # idle + iowait
    return sum(cpu[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime


def _others_busy(a: tuple[int, int], b: tuple[int, int], seconds: float) -> float:
    """Cores other processes kept busy between two :func:`_busy_ticks` readings."""
    ticks = (b[0] - a[0]) - (b[1] - a[1])
    return max(0.0, ticks / os.sysconf("SC_CLK_TCK") / seconds)


def _free_cores(busy: float) -> int:
    return max(1, min(usable_cores(), round(usable_cores() - busy)))


def busy_elsewhere(window: float = SAMPLE_S) -> float:
    """Cores other processes kept busy over the next ``window`` seconds (0.0 if unknown)."""
    a = _busy_ticks()
    if a is None:
        return 0.0
    t0 = time.perf_counter()
    time.sleep(window)
    b = _busy_ticks()
    return 0.0 if b is None else _others_busy(a, b, time.perf_counter() - t0)


def _positive_int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() and int(text) > 0 else None


def _fixed_threads(requested: int | None) -> tuple[int, str] | None:
    """(threads, why) when no load measurement decides: a request, the environment, or the
    ranks of one node sharing its cores (they are the other busy processes, counted already)."""
    if requested:
        return int(requested), "requested"
    env = _positive_int(os.environ.get(ENV))
    if env:
        return env, f"${ENV}"
    omp = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if omp:
        return omp, "$OMP_NUM_THREADS"
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if ranks > 1:
        return max(1, usable_cores() // ranks), f"{usable_cores()} cores / {ranks} ranks"
    return None


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, why) for a stage about to start; see the module docstring for the order."""
    fixed = _fixed_threads(requested)
    if fixed is not None:
        return fixed
    busy = busy_elsewhere()
    return _free_cores(busy), f"{usable_cores()} cores, {busy:.1f} busy elsewhere"


class Governor:
    """Re-chooses the thread count while a long stage runs (the training loop asks at every
    log step): from the CPU time other processes used since the last check, so nothing waits.
    A stage that started beside a short-lived busy process gets its cores back, and one that
    meets a new busy process gives one up. Inactive when :func:`_fixed_threads` decides."""

    def __init__(self, requested: int | None = None) -> None:
        ticks = _busy_ticks() if _fixed_threads(requested) is None else None
        self.last = None if ticks is None else (ticks, time.perf_counter())

    def check(self) -> int | None:
        """Set and return a new thread count when the free cores changed, else None."""
        import torch

        if self.last is None:
            return None
        (a, t0), b, t1 = self.last, _busy_ticks(), time.perf_counter()
        if b is None or t1 - t0 < SAMPLE_S:
            return None
        self.last = (b, t1)
        n = _free_cores(_others_busy(a, b, t1 - t0))
        if n == torch.get_num_threads():
            return None
        torch.set_num_threads(n)
        return n


@contextlib.contextmanager
def stage_threads(stage: str, requested: int | None = None,
                  log: Callable[[str], None] | None = None) -> Iterator[int]:
    """Run the block on :func:`choose_threads` torch threads; the caller's count is restored."""
    import torch

    n, why = choose_threads(requested)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    if log is not None:
        log(f"{stage}: {n} thread{'s' if n > 1 else ''} ({why})")
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def heavy_stage(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a stage's entry point to run under :func:`stage_threads` (logged with -v)."""
    import functools
    import logging

    log = logging.getLogger("branchlens.threads").debug  # shown with -v

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with stage_threads(name, log=log):
                return fn(*args, **kwargs)
        return run
    return wrap
