"""The engine table: training mode name → engine function and what it needs.

An engine is a plain function that takes a Frame (and optionally a ``progress(done, total)`` callback) and trains
it. It enters the table with one line::

    @register_engine("my_mode", block_copies=True)
    def train_my_mode(frame, progress=None): ...

placed in any module of this package (the table imports every module of the package when it is first asked for,
so nothing else needs editing), or anywhere else and named on the command line by its dotted path
(``--training_mode mypackage.mymodule.train_my_mode``). ``dol1.py``'s validation and ``--help``, the frame
factory and the tests all read this table; nothing else lists the modes.

This module imports nothing of the project: the engines import it (to register), never the other way round.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from src.cli import ConfigError


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its name, its function and what the frame must hold for it.

    Attributes:
        name: the ``--training_mode`` value.
        function: ``function(frame, progress=None) -> frame``.
        block_copies: the frame holds one model copy per block (a ``Disributed_frame``).
        block_updates: the ``--block_update`` values the engine accepts; empty = it ignores the key.
        torchrun_worker: for multi-process engines, the function that ``torchrun`` ranks > 0 run with ``H``
            (rank 0 runs ``function``); None = a single-process engine.
    """

    name: str
    function: Callable[..., Any]
    block_copies: bool = False
    block_updates: tuple[str, ...] = ()
    torchrun_worker: Callable[[dict[str, Any]], None] | None = None

    @property
    def summary(self) -> str:
        """The first line of the function's docstring."""
        return (inspect.getdoc(self.function) or "").split("\n")[0]

    def run(self, frame: Any, progress: Callable[[int, int], None] | None = None) -> Any:
        """Call the engine, passing ``progress`` only to engines that accept it."""
        try:
            inspect.signature(self.function).bind(frame, progress)
        except TypeError:
            return self.function(frame)
        return self.function(frame, progress)


ENGINES: dict[str, EngineSpec] = {}  # filled by register_engine; engine_table() makes it complete


def register_engine(name: str | Callable[..., Any] | None = None, *, block_copies: bool = False,
                    block_updates: tuple[str, ...] = (),
                    torchrun_worker: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Decorator: enter a function in the engine table under ``name`` (default: the function's name).

    Usable bare (``@register_engine``) or with arguments (see :class:`EngineSpec`). The function gets an
    ``engine_spec`` attribute, so a dotted path to it resolves to the same spec.

    Raises:
        ValueError: another function is already registered under that name.
    """
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        spec = EngineSpec(name if isinstance(name, str) else function.__name__, function, block_copies,
                          tuple(block_updates), torchrun_worker)
        known = ENGINES.get(spec.name)
        if known is not None and (known.function.__module__, known.function.__qualname__) != \
                (function.__module__, function.__qualname__):
            raise ValueError(f"engine name {spec.name!r} is taken by {known.function.__module__}."
                             f"{known.function.__qualname__}")
        ENGINES[spec.name] = spec
        function.engine_spec = spec  # type: ignore[attr-defined]
        return function

    return decorate(name) if callable(name) else decorate


def engine_table() -> dict[str, EngineSpec]:
    """Every registered engine by name, after importing each module of this package once (sorted by name)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return dict(sorted(ENGINES.items()))


def _from_dotted_path(path: str) -> EngineSpec:
    module_name, _, attr = path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"--training_mode {path!r}: cannot import {attr!r} from {module_name!r}: {err}") \
            from err
    if not callable(function):
        raise ConfigError(f"--training_mode {path!r} is a {type(function).__name__}, not a function that takes "
                          f"a Frame")
    try:
        inspect.signature(function).bind(object())
    except TypeError as err:
        raise ConfigError(f"--training_mode {path!r} cannot be called with a Frame: {err}") from err
    except ValueError:  # no signature available (a builtin): let the call decide
        pass
    spec = getattr(function, "engine_spec", None)
    return spec if isinstance(spec, EngineSpec) else EngineSpec(path, function)


def resolve_engine(name: str) -> EngineSpec:
    """The engine for ``--training_mode name``: a name in the table or a dotted path ``package.module.function``.

    Raises:
        ConfigError: an unknown name (with a did-you-mean and the valid names), or a dotted path that does not
            import or is not a function of a Frame.
    """
    table = engine_table()
    if name in table:
        return table[name]
    if "." in name.strip(".") and " " not in name:
        return _from_dotted_path(name)
    close = difflib.get_close_matches(name, table, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--training_mode {name!r} is not valid.{hint} Valid: {sorted(table)}, or a dotted path "
                      f"package.module.function to a function that takes a Frame")
