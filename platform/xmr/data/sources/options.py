"""Command-line options generated from a data source's config dataclass.

Each option is typed, and its default is read from the dataclass itself, so a default is
never restated in argparse. An option the user does not give is absent from the namespace
(``argparse.SUPPRESS``), and ``given`` passes on only the options that were given, so the
dataclass applies its own default. This matters where two configs share an option but
default differently (``synth vcmr --max-queries``: 4 a video, or with ``--queries-from`` all of them).
The help text is the one thing written by hand, one line per field.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def _scalar(tp: Any) -> Any:
    """The scalar type behind ``X | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _default_of(config: Any, name: str) -> Any:
    """A field's default: the dataclass's, or the value an instance (a nested default) holds."""
    if not isinstance(config, type):
        return getattr(config, name)
    return _default(next(x for x in dataclasses.fields(config) if x.name == name))


def add_options(parser: argparse.ArgumentParser, *configs: Any, helps: dict[str, str],
                choices: dict[str, tuple] | None = None, metavars: dict[str, str] | None = None,
                when: dict[Any, str] | None = None) -> None:
    """``--field-name`` for every field named in ``helps``, from the first of ``configs`` (a
    dataclass, or an instance whose values are the defaults) that has it; its default (and
    another config's, where they differ, with ``when[config]`` saying when it applies) is
    shown in the help."""
    for name, text in helps.items():
        owners = [c for c in configs if name in {f.name for f in dataclasses.fields(c)}]
        if not owners:
            raise ValueError(f"{name}: no field of {configs}")
        first = owners[0] if isinstance(owners[0], type) else type(owners[0])
        tp = _scalar(typing.get_type_hints(first)[name])
        defaults: list[tuple[Any, Any]] = []
        for owner in owners:
            value = _default_of(owner, name)
            if not defaults or value != defaults[0][1]:
                defaults.append((owner, value))
        shown = _shown(defaults[0][1]) + "".join(
            f"; {_shown(v)} {(when or {}).get(o) or 'for ' + (o if isinstance(o, type) else type(o)).__name__}"
            for o, v in defaults[1:])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": f"{text} (default: {shown})", "dest": name}
        if tp is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(tp) is dict:
            kwargs.update(nargs="*", metavar=(metavars or {}).get(name, "NAME=N"))
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if choices and name in choices:
                kwargs["choices"] = choices[name]
            if metavars and name in metavars:
                kwargs["metavar"] = metavars[name]
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def given(ns: argparse.Namespace, config: type, convert: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options given on the command line that are fields of ``config`` (converted by
    ``convert[name]`` where given), for ``config(**given(...))``."""
    names = {f.name for f in dataclasses.fields(config)}
    out = {}
    for name, value in vars(ns).items():
        if name in names:
            out[name] = (convert or {}).get(name, lambda v: v)(value)
    return out
