"""The report stage: ``build_report(run_dir)`` -> ``RUN/report/index.html`` + ``assets/``.

Gathers the run folder (:func:`branchlens.report.builder.gather`), has :mod:`branchlens.report`
write the assets and render the page, and swaps them into the report folder atomically under an
exclusive lock, replacing only what an earlier build wrote.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from branchlens.artifacts import atomic_path
from branchlens.layout import REPORT_INDEX, RunLayout
from branchlens.report import ASSETS, GENERATOR, MARKER, OLD_TITLE, render, write_assets
from branchlens.report.builder import gather
from branchlens.run import check_run_folder
from branchlens.settings import ReportConfig
from branchlens.threads import heavy_stage


@heavy_stage("report")
def build_report(run_dir: str | Path, out: str | Path | None = ReportConfig.out,
                 cards_per_layer: int = ReportConfig.cards_per_layer,
                 log: Callable[[str], None] | None = None) -> Path:
    """Write the report of ``run_dir``; returns the path of its ``index.html``.

    ``out``: a folder (default ``RUN/report``) or an ``.html`` file name in one. The folder gets
    ``index.html`` and ``assets/``; an existing ``assets/`` or page is replaced only if an
    earlier build made it, and ``run_dir`` must be a run folder. Works on partial runs: what a
    stage has not made is named with its command.
    ``cards_per_layer`` is accepted for configuration compatibility; every latent is browsable.
    """
    del cards_per_layer
    run_dir = check_run_folder(run_dir)
    out = Path(out) if out is not None else RunLayout(run_dir).report_dir
    folder, entry = ((out.parent, out.name) if out.suffix.lower() in (".html", ".htm")
                     else (out, REPORT_INDEX))
    final = folder / ASSETS
    if final.exists() and not (final / MARKER).is_file():
        raise FileExistsError(f"{final} exists and was not written by branchlens; "
                              "choose another report folder")
    _check_page(folder / entry)
    folder.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = folder / f".{ASSETS}-new-{tag}", folder / f".{ASSETS}-old-{tag}"
    with _building(folder):
        _sweep(folder, entry)
        try:
            ctx = gather(run_dir)
            browser = write_assets(ctx, tmp, log or (lambda s: None))
            page = render(ctx, browser)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            _public(final)
            path = folder / entry
            with atomic_path(path) as t:
                t.write_text(page, encoding="utf-8")
                t.chmod(0o644)  # a report is for sharing (the temp file starts private)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def _building(folder: Path) -> Iterator[None]:
    """An exclusive lock on the report folder while one build writes it (``flock`` on the
    folder itself: no lock file, and the kernel drops it when its holder dies, even by
    ``kill -9``), so whatever temp folders a build finds are a dead build's."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"another branchlens report is being written into {folder}; "
                                  "wait for it to finish") from None
        yield
    finally:
        os.close(fd)


def _sweep(folder: Path, entry: str) -> None:
    """Remove what a killed build left (under :func:`_building`): its new or old assets
    folders and the temp file of its page."""
    left = re.compile(rf"\.{ASSETS}-(new|old)-[0-9a-f]{{8}}|\.{re.escape(entry)}\.\w+\.tmp")
    for p in folder.iterdir():
        if not left.fullmatch(p.name) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file():
            p.unlink()


def _check_page(page: Path) -> None:
    """Refuse to replace a page (or a file or folder in its place) that no earlier build wrote:
    ``--out`` may name a folder that holds someone's own ``index.html``."""
    if page.parent.exists() and not page.parent.is_dir():
        raise FileExistsError(f"{page.parent} is a file, not a report folder; pass another "
                              "--out or delete the file")
    if not page.exists() or (page.is_file() and _generated(page)):
        return
    raise FileExistsError(f"{page} exists and was not written by branchlens report; pass "
                          "another --out or delete the file")


def _generated(page: Path) -> bool:
    """Whether a page's head is that of a branchlens report (any version)."""
    with open(page, "rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return GENERATOR in head or OLD_TITLE in head


def _public(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
