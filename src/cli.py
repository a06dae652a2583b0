"""The command line generated from a dict of defaults, and the error type every entry point turns into exit status 2.

Ground floor: imports nothing of the project.
"""
from __future__ import annotations

import argparse
import ast
import os
import re
from typing import Any, Callable, Mapping, Sequence


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the command-line entry points turn it into exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: …``, exit status 2) without the usage block; with
    ``raise_errors``, a ConfigError with the same message instead of the exit."""

    def __init__(self, *args: Any, raise_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raise_errors = raise_errors

    def error(self, message: str) -> None:  # type: ignore[override]
        if self.raise_errors:
            raise ConfigError(message)
        self.exit(2, f"{self.prog}: error: {message}\n")


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _type_name(default: Any) -> str:
    return "float (an int is accepted)" if isinstance(default, float) else type(default).__name__


def _converter(key: str, default: Any) -> Callable[[str], Any]:
    """Return an argparse ``type`` callable that parses a value of the same type as ``default``."""

    def fail(value: str) -> None:
        raise argparse.ArgumentTypeError(
            f"expected {_type_name(default)} for --{key}, got {value!r} (default: {default!r})")

    def convert(value: str) -> Any:
        if isinstance(default, bool):
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            fail(value)
        if isinstance(default, str):
            return value
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):  # pathological nesting too
            if default is None:
                return value  # a None default takes any literal, or else the raw string
            fail(value)
        if default is None:
            return parsed
        if isinstance(default, float) and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
            return float(parsed)
        if isinstance(default, int) and isinstance(parsed, int) and not isinstance(parsed, bool):
            return parsed
        if isinstance(default, (list, tuple)) and isinstance(parsed, (list, tuple)):
            return type(default)(parsed)
        if isinstance(default, dict) and isinstance(parsed, dict):
            return parsed
        fail(value)

    return convert


def check_value(key: str, default: Any, value: Any) -> Any:
    """A value from a file (not a command line) for the key whose default is ``default``, under the command line's
    type rules; returns it converted (an int for a float key becomes a float).

    Raises:
        ConfigError: a value of another type, naming the key, the value and the expected type.
    """
    if isinstance(default, str) or default is None:
        if default is None or isinstance(value, str):
            return value
    else:
        try:
            return _converter(key, default)(value if isinstance(value, str) and isinstance(default, bool)
                                            else repr(value))
        except argparse.ArgumentTypeError:
            pass
    raise ConfigError(f"{key}: expected {_type_name(default)}, got {value!r} (default: {default!r})")


def key_comments(source: str) -> dict[str, str]:
    """Read the trailing ``# comment`` of every ``"key": value,`` line of a defaults dict written in ``source``."""
    pattern = re.compile(r'^\s*["\'](\w+)["\']\s*:.*?#\s*(.+?)\s*$')
    return {m.group(1): m.group(2) for line in source.splitlines() if (m := pattern.match(line))}


def parse_arguments(defaults: Mapping[str, Any], argv: Sequence[str] | None = None,
                    help_texts: Mapping[str, str] | None = None, description: str | None = None,
                    prog: str | None = None, bare: Mapping[str, Any] | None = None,
                    raise_errors: bool = False) -> dict[str, Any]:
    """Turn a dict of defaults into a strict command line and parse ``argv``.

    Every key becomes ``--key VALUE`` (or ``--key=VALUE``). Values are Python literals, so
    ``--config "[[16,16],[32,32]]"`` gives a nested list; an int is accepted for a float; booleans take
    True/False/true/false/1/0. Unknown or abbreviated flags and values of the wrong type exit with status 2
    and a message naming the flag, the expected type and the default.

    Args:
        defaults: key -> default value; the type of each default fixes the type of its flag.
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.
        help_texts: key -> one line of help for ``--help``.
        description: shown at the top of ``--help``.
        prog: program name for messages.
        bare: key -> the value a flag given without a value stands for (``--resume`` alone = ``yes``).
        raise_errors: raise ConfigError with the message instead of exiting (the notebook API, ``dol1.run``).

    Returns:
        A new dict: the defaults with the given flags applied.
    """
    help_texts, bare = help_texts or {}, bare or {}
    parser = OneLineParser(prog=prog, description=description, allow_abbrev=False, raise_errors=raise_errors,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, default in defaults.items():
        optional = {"nargs": "?", "const": bare[key]} if key in bare else {}
        parser.add_argument(f"--{key}", dest=key, default=default, type=_converter(key, default),
                            metavar="VALUE" if default is None else _type_name(default).split(" ")[0].upper(),
                            help=help_texts.get(key, " "), **optional)
    return vars(parser.parse_args(_join_negative_values(argv, defaults)))


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a numpy or torch scalar
        value = value.item()
    return repr(value)


def settings_argv(settings: Mapping[str, Any]) -> list[str]:
    """The command line ``--key=value …`` that sets ``settings`` (a notebook call's keyword arguments), so they are
    checked by exactly the command line's rules and get its messages (an unknown key: ``unrecognized arguments``).

    A string is passed as it is, a path as its text, anything else as its Python literal (``repr``): ``rounds=50``
    is ``--rounds=50``, ``config=[8, 8]`` is ``--config=[8, 8]``.
    """
    return [f"--{key}={_as_text(value)}" for key, value in settings.items()]


def _join_negative_values(argv: Sequence[str] | None, defaults: Mapping[str, Any]) -> Sequence[str] | None:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a value that starts with '-' and is not a plain number
    (``-1e-3``, ``-.5e2``, ``-inf``) for an unknown flag."""
    if argv is None:
        return None
    flags, out, i = {f"--{key}" for key in defaults}, [], 0
    argv = list(argv)
    while i < len(argv):
        token = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token in flags and following is not None and following.startswith("-") and following not in flags \
                and following not in ("-h", "--help") and not following.startswith("--"):
            out.append(f"{token}={following}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out

