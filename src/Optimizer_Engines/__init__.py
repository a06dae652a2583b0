"""The engine table: training mode name → engine function and what it needs.

An engine is a plain function that takes a Frame (and optionally a ``progress(done, total)`` callback) and trains
it. It enters the table with one line::

    @register_engine("my_mode", block_copies=True)
    def train_my_mode(frame, progress=None): ...

placed in any module of this package (the table imports every module of the package when it is first asked for,
so nothing else needs editing), or anywhere else and named on the command line by its dotted path
(``--training_mode mypackage.mymodule.train_my_mode``). ``dol1.py``'s validation and ``--help``, the frame
factory and the tests all read this table; nothing else lists the modes.

This module imports only ``src.cli`` (for ``ConfigError``): the engines import it to register, never the other way
round, and the frame factory reads the registered entries without importing any engine.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
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
        check: ``check(frame)`` on the built frame before anything is written; raises ValueError on settings the
            engine cannot run (``dol1.py`` turns it into a usage error, exit 2). None = no check.
    """

    name: str
    function: Callable[..., Any]
    block_copies: bool = False
    block_updates: tuple[str, ...] = ()
    torchrun_worker: Callable[[dict[str, Any]], None] | None = None
    check: Callable[[Any], None] | None = None

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
                    torchrun_worker: Callable[[dict[str, Any]], None] | None = None,
                    check: Callable[[Any], None] | None = None) -> Any:
    """Decorator: enter a function in the engine table under ``name`` (default: the function's name).

    Usable bare (``@register_engine``) or with arguments (see :class:`EngineSpec`). The function gets an
    ``engine_spec`` attribute, so a dotted path to it resolves to the same spec.

    Raises:
        ValueError: another function is already registered under that name.
    """
    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        _check_engine_signature(function, f"@register_engine on {function.__qualname__}", ValueError)
        spec = EngineSpec(name if isinstance(name, str) else function.__name__, function, block_copies,
                          tuple(block_updates), torchrun_worker, check)
        known = ENGINES.get(spec.name)
        if known is not None and (known.function.__module__, known.function.__qualname__) != \
                (function.__module__, function.__qualname__):
            raise ValueError(f"engine name {spec.name!r} is taken by {known.function.__module__}."
                             f"{known.function.__qualname__}")
        ENGINES[spec.name] = spec
        function.engine_spec = spec  # type: ignore[attr-defined]
        return function

    return decorate(name) if callable(name) else decorate


def _check_engine_signature(function: Any, what: str, error: type[Exception]) -> None:
    """An engine is a Python function (or method) that can be called with one positional argument, the Frame."""
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        kind = "a class" if inspect.isclass(function) else f"a {type(function).__name__}"
        raise error(f"{what} is {kind}, not a Python function that takes a Frame")
    try:
        inspect.signature(function).bind(object())
    except TypeError as err:
        raise error(f"{what} cannot be called with a Frame: {err}") from err


def engine_table() -> dict[str, EngineSpec]:
    """Every registered engine by name, after importing each module of this package once (sorted by name).

    Raises:
        ConfigError: a module of the package cannot be imported (its name and the error are in the message).
    """
    for module in pkgutil.iter_modules(__path__):
        name = f"{__name__}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as err:  # a user's engine module may fail in any way: name it instead of a traceback
            raise ConfigError(f"engine module {name} cannot be imported: {type(err).__name__}: {err}") from err
    return dict(sorted(ENGINES.items()))


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _from_dotted_path(path: str) -> EngineSpec:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"--training_mode {path!r}: cannot import {module_name!r} ({err}); dol1.py imports from "
                          f"the project folder and PYTHONPATH, so add your package's folder to PYTHONPATH") from err
    except Exception as err:  # the module itself raised while importing
        raise ConfigError(f"--training_mode {path!r}: importing {module_name!r} failed: "
                          f"{type(err).__name__}: {err}") from err
    if not hasattr(module, attr):
        close = difflib.get_close_matches(attr, [n for n in dir(module) if not n.startswith("_")], n=1)
        hint = f" Did you mean {module_name}.{close[0]}?" if close else ""
        raise ConfigError(f"--training_mode {path!r}: cannot import {attr!r} from {module_name!r}.{hint}")
    function = getattr(module, attr)
    _check_engine_signature(function, f"--training_mode {path!r}", ConfigError)
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
    if _DOTTED.fullmatch(name):
        return _from_dotted_path(name)
    close = difflib.get_close_matches(name, table, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--training_mode {name!r} is not valid.{hint} Valid: {sorted(table)}, or a dotted path "
                      f"package.module.function to a function that takes a Frame")


def registered_engine(name: str) -> EngineSpec | None:
    """The engine registered under ``name`` so far, without importing anything (None if none is)."""
    return ENGINES.get(name)


def declared_engines() -> dict[str, str]:
    """Name → summary of the engines that this package's modules register, read from their source without
    importing them (so ``dol1.py --help`` answers before torch is imported). Sorted by name."""
    found = {}
    for path in sorted(p for folder in __path__ for p in Path(folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if getattr(target, "id", getattr(target, "attr", None)) != "register_engine":
                    continue
                args = decorator.args if isinstance(decorator, ast.Call) else []
                name = args[0].value if args and isinstance(args[0], ast.Constant) else node.name
                found[name] = (ast.get_docstring(node) or "").split("\n")[0]
    return dict(sorted(found.items()))

