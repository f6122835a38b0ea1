"""Each CLI option's default, read from its one home: a field of a config dataclass or a
parameter of the stage function the command calls, so that no default is written twice.

The homes import torch, and ``branchlens --help`` must not; a :class:`Default` therefore reads
its value only when it is first needed (a command's ``--help``, or parsing without the option).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import typer

_UNREAD = object()


def resolve(ref: str) -> Any:
    """``"package.module:Name.attr"`` -> that object (imported now)."""
    module, _, path = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def home_default(home: Any, name: str) -> Any:
    """The default of field ``name`` of a dataclass, or of parameter ``name`` of a function or
    class; ``KeyError`` when it has none."""
    if dataclasses.is_dataclass(home):
        f = {f.name: f for f in dataclasses.fields(home)}.get(name)
        if f is not None and f.default is not dataclasses.MISSING:
            return f.default
        if f is not None and f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
    elif callable(home):
        p = inspect.signature(home).parameters.get(name)
        if p is not None and p.default is not inspect.Parameter.empty:
            return p.default
    raise KeyError(f"{getattr(home, '__qualname__', home)} has no default for {name!r}")


class Default:
    """A lazy default: field or parameter ``name`` of ``home``, or ``home`` itself (a named
    constant) without a name. Click calls it for the value; help prints ``str`` of it (nothing
    for ``None``, as for a literal ``None``)."""

    def __init__(self, home: str, name: str | None = None,
                 convert: Callable[[Any], Any] | None = None):
        self.home, self.name, self.convert = home, name, convert
        self._value: Any = _UNREAD

    def __call__(self) -> Any:
        if self._value is _UNREAD:
            home = resolve(self.home)
            value = home if self.name is None else home_default(home, self.name)
            self._value = self.convert(value) if self.convert else value
        return self._value

    def __str__(self) -> str:
        return "" if self() is None else str(self())

    def __bool__(self) -> bool:  # a boolean flag's help shows the side that is on
        return bool(self())

    def __repr__(self) -> str:
        return f"Default({self.home!r}, {self.name!r})"


class Home:
    """Options whose defaults live in one home, e.g. ``Home("branchlens.x:Config").opt("q",
    "--q", help=...)``: ``typer.Option`` with the field's default."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def opt(self, name: str, *decls: str, convert: Callable[[Any], Any] | None = None,
            **kw: Any) -> Any:
        return typer.Option(Default(self.ref, name, convert), *decls, **kw)

    def arg(self, name: str, **kw: Any) -> Any:
        return typer.Argument(Default(self.ref, name), **kw)

    def default(self, name: str) -> Any:
        """The value itself, for a command that needs it (imports the home)."""
        return home_default(resolve(self.ref), name)
