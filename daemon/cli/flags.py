"""One --flag per config setting, grouped like the config's sections, with real defaults in --help."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

from ..config import ENV_PREFIX, SECTIONS, Config, field_type, parse_value


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        value = ",".join(value)
    return "(empty)" if value == "" else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; unset flags stay None so env vars and defaults apply.

    Booleans are --x/--no-x; enumerations list their choices; secrets' help says to prefer files.
    """
    starts = {first: title for title, first in SECTIONS}
    group: Any = parser
    for f in dataclasses.fields(Config):
        if f.name in starts:
            group = parser.add_argument_group(f"{starts[f.name]} settings")
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]
        if f.metadata["secret"]:
            text += f" Prefer --{f.name.replace('_', '-')}-file: flags show in ps."
        text = f"{text} (default: {_default(f)}; env {ENV_PREFIX}{f.name.upper()})".replace("%", "%%")
        if field_type(f) is bool:
            group.add_argument(flag, dest=f.name, default=None, help=text,
                               action=argparse.BooleanOptionalAction)
            continue
        choices = f.metadata["choices"]
        group.add_argument(flag, dest=f.name, default=None, type=_flag_parser(f), help=text,
                           choices=choices, metavar="{" + ",".join(choices) + "}" if choices
                           else f.name.upper())


def _flag_parser(f: dataclasses.Field):
    def parse(raw: str) -> Any:
        try:
            return parse_value(f, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def from_args(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Config:
    """Build the config from parsed flags over the environment."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config.from_env(environ, **{k: v for k, v in vars(ns).items() if k in names})
