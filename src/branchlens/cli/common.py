"""The app, its global options, output helpers and the one error path every command takes."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
from typer.core import TyperGroup

from branchlens.cli.defaults import Default, Home

_GLOBAL_FLAG = re.compile(r"--quiet|--verbose|--debug|-[qv]+")  # the callback's flags


class _Group(TyperGroup):
    """The global flags (``-q``, ``-v``, ``--debug``) also work after the command
    (``branchlens classify -q``): they are moved in front of it before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _globals_first(self, ctx, list(args)))


def _globals_first(group: TyperGroup, ctx: Any, args: list[str]) -> list[str]:
    """``args`` with the global flags that follow the command moved before it; an option's
    value (``--out -q``) and anything after ``--`` stay where they are."""
    at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    cmd = group.get_command(ctx, args[at]) if at is not None else None
    if cmd is None:
        return args
    valued = {o for p in cmd.params if p.param_type_name == "option" and not p.is_flag
              and not p.count for o in p.opts}
    moved, rest, tail, i = [], [], args[at + 1:], 0
    while i < len(tail):
        if tail[i] == "--":
            rest += tail[i:]
            break
        if tail[i] in valued:
            rest += tail[i:i + 2]
            i += 2
            continue
        (moved if _GLOBAL_FLAG.fullmatch(tail[i]) else rest).append(tail[i])
        i += 1
    return args[:at] + moved + [args[at]] + rest


app = typer.Typer(cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="TopK SAEs on InceptionV1 and branch specialization. Errors are one line "
                       "on stderr (exit 2); --debug shows the traceback. Global options may "
                       "also follow the command (branchlens classify -q).")
USER_ERROR_RC = 2  # what every refused input or failed stage exits with
DEBUG_ENV = "BRANCHLENS_DEBUG"
QUIET_ENV = "BRANCHLENS_QUIET"  # read by branchlens.progress: no progress bars
_debug_set_here = False  # DEBUG_ENV came from a --debug of this process (not the user's shell)
log = logging.getLogger("branchlens")


def rank() -> int:
    """This process's rank under torchrun (``RANK``); 0 when not distributed."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        return msg if rank() == 0 else f"[rank {rank()}] {msg}"


def _version(value: bool) -> None:
    if value:
        from branchlens import __version__

        typer.echo(f"branchlens {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="show tracebacks of errors"),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                help="debug messages on stderr too"),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="only warnings and errors on stderr; no progress bars"),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="print the version and exit"),
) -> None:
    """Global options. Under torchrun only rank 0 prints results (other ranks: warnings)."""
    global _debug_set_here
    if debug:
        os.environ[DEBUG_ENV] = "1"
        _debug_set_here = True
    elif _debug_set_here:  # an earlier call in this process said --debug; this one did not
        os.environ.pop(DEBUG_ENV, None)
        _debug_set_here = False
    level = logging.DEBUG if verbose else logging.INFO
    os.environ.pop(QUIET_ENV, None)
    if quiet or rank() != 0:
        level = logging.WARNING
        os.environ[QUIET_ENV] = "1"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def say(message: str) -> None:
    """A stage's progress line (stderr; hidden by -q and on ranks other than 0)."""
    log.info(message)


def emit(text: str = "", **kw: Any) -> None:
    """A result on stdout: rank 0 only."""
    if rank() == 0:
        typer.secho(text, **kw)


def echo_json(obj: Any) -> None:
    emit(json.dumps(obj, indent=None))


def result(obj: dict[str, Any], as_json: bool, title: str) -> None:
    """A command's result: one JSON line with ``--json``, else ``title: key value, ...``."""
    if as_json:
        echo_json(obj)
    else:
        emit(f"{title}: " + ", ".join(f"{k} {v}" for k, v in obj.items()))


def message(e: Exception) -> str:
    """The one line an error is shown as. Refusals (``ValueError``, ``RuntimeError``,
    ``OSError`` and a ``KeyError`` worded as a sentence, like ``unknown variant 'x'; ...``)
    are their text; anything else is named with its type (``KeyError: 'counts'``)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and " " in str(e.args[0]):
        msg = str(e.args[0])
    elif isinstance(e, (ValueError, RuntimeError, OSError)):
        msg = str(e)
    else:
        msg = f"{type(e).__name__}: {e}"
    return "; ".join(ln.strip() for ln in msg.strip().splitlines() if ln.strip())


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The one error path: an error becomes one line on stderr and exit code 2; ``--debug``
    re-raises it for the traceback; usage errors are left to typer (also exit 2)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_common(kwargs)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get(DEBUG_ENV) == "1" or _is_click_error(e):
                raise
            where = "" if rank() == 0 else f"[rank {rank()}] "
            typer.secho(f"{where}error: {message(e)}", fg="red", err=True)
            raise typer.Exit(USER_ERROR_RC) from None
    return wrapper


def command(name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command of :data:`app` behind :func:`friendly`."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        app.command(name)(friendly(fn))
        return fn
    return register


def _check_common(options: dict[str, Any]) -> None:
    """``--seed`` and ``--device`` of any command, refused before it reads or writes anything
    (a bad seed would otherwise fail after the harvest; a missing GPU would blame the SAE)."""
    if options.get("seed") is not None:
        from branchlens.config import check_seed

        check_seed(options["seed"], "--seed")
    if options.get("device") is not None:
        from branchlens.devices import resolve_device

        resolve_device(options["device"])


def _is_click_error(e: Exception) -> bool:
    """Usage errors (bad option values) are printed by typer itself, with exit code 2."""
    return type(e).__module__.split(".")[0] in ("click", "typer")


@contextlib.contextmanager
def run_lock(run: str) -> Iterator[None]:
    """The run folder's lock while a stage command writes into it, the one ``branchlens run``
    holds, so a stage beside a running pipeline is refused instead of mixing results. A folder
    that is no run gets no ``.lock`` (the stage itself says what is missing); ranks other than
    0 of torchrun do not lock, like the pipeline's."""
    from branchlens.run import is_run_folder
    from branchlens.store import RunLock

    if rank() != 0 or not is_run_folder(run):
        yield
        return
    lock = RunLock(run, "run folder").acquire()
    try:
        yield
    finally:
        lock.release()


def names(s: str | None) -> list[str] | None:
    """A comma-separated ``--layers`` as a list; ``None`` (the stage's default) when not given."""
    return [t.strip() for t in s.split(",") if t.strip()] if s else None


def int_list(s: str | None) -> list[int] | None:
    try:
        return [int(t) for t in s.split(",") if t.strip()] if s else None
    except ValueError:
        raise ValueError(f"expected comma-separated integer ids, got {s!r}") from None


SOURCE = Home("branchlens.data:open_source")
VARIANT_HELP = "bvlc_googlenet | inception5h"
VariantOpt = typer.Option(Default("branchlens.variants:DEFAULT_VARIANT"), "--variant",
                          help=VARIANT_HELP)
WEIGHTS_HELP = ("weights file (.safetensors / .pth), or 'random' for a smoke run; default: the "
                "variant's env var ($BRANCHLENS_BVLC_WEIGHTS / $BRANCHLENS_INCEPTION5H_WEIGHTS), "
                "the cache, or a download")
RUN_WEIGHTS_HELP = "the weights the store was harvested with (default: as the run recorded)"
DEVICE_HELP = "auto | cpu | cuda[:N]"
# a stage run alone computes where `branchlens run` would, not on its library's cpu
RunDeviceOpt = typer.Option(Default("branchlens.settings:RUN_DEVICE"), "--device",
                            help=DEVICE_HELP)
ImageKeyOpt = SOURCE.opt("image_key", "--image-key", help="hf: sources: the image column")
LabelKeyOpt = SOURCE.opt("label_key", "--label-key", help="hf: sources: the label column")
JsonOpt = typer.Option(False, "--json", help="the result as one JSON line on stdout, nothing else")
