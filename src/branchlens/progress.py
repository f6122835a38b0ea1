"""One progress bar for every long loop: rate, ETA and free-form counters (skips, vectors)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, prog: Progress | None, task, unit: str):
        self.prog, self.task, self.unit = prog, task, unit

    def update(self, advance: float = 1, **info) -> None:
        if self.prog is None:
            return
        extra = "  ".join(f"{k}={v}" for k, v in info.items())
        self.prog.update(self.task, advance=advance, info=extra)


@contextmanager
def progress(total: float | None, desc: str, unit: str = "it", disable: bool = False):
    """``with progress(n, "harvest", "img") as bar: bar.update(k, skipped=3)``.

    Writes to stderr so ``--json`` output on stdout stays machine-readable.
    """
    if disable or os.environ.get("BRANCHLENS_QUIET") == "1":  # `branchlens -q`, ranks > 0
        yield _Bar(None, None, unit)
        return
    from rich.console import Console

    prog = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        _RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=Console(file=sys.stderr), transient=False,
    )
    with prog:
        task = prog.add_task(desc, total=total, info="")
        yield _Bar(prog, task, unit)


class _RateColumn(TextColumn):
    def __init__(self, unit: str):
        super().__init__("")
        self.unit = unit

    def render(self, task):
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")
