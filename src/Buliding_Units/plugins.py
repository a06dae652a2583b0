"""The plugin registry and the ``Units.txt`` parser.

A plugin is a concrete subclass of one of the plugin bases (:func:`plugin_bases`): a ``MeasurementUnit``, a
``ScheduleUnit`` or a ``StopperUnit``. Plugins defined in this package's plugin modules are known by their class name; any other is
named by a dotted path ``package.module.Class``.

``Units.txt``: lines starting with ``-`` name a plugin, optionally followed by ``key=value`` arguments (values are
Python literals, else strings): ``- HessianBlockInteractionMeasurement tol=1e-3 max_steps=30``. Every other line
(headers, blank lines, ``#`` comments) is ignored.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any

from src.cli import ConfigError
from src.reporting import PROJECT_ROOT

DEFAULT_UNITS_FILE = PROJECT_ROOT / "measurements" / "Units.txt"
PLUGIN_MODULES = ("MeasurementUnit", "StopperUnit", "ScheduleUnit")  # of this package, imported on first use


def _modules() -> list[Any]:
    return [importlib.import_module(f"src.Buliding_Units.{name}") for name in PLUGIN_MODULES]


def plugin_bases() -> tuple[type, ...]:
    """The plugin base classes: ``MeasurementUnit``, ``StopperUnit`` and ``ScheduleUnit``."""
    return tuple(getattr(module, name) for module, name in zip(_modules(), PLUGIN_MODULES))


def core_plugins() -> dict[str, type]:
    """The concrete plugin classes defined in the core plugin modules, by class name (no wing is imported)."""
    found, bases = {}, plugin_bases()
    for module in _modules():
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and issubclass(cls, bases) and not inspect.isabstract(cls) \
                    and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def plugin_names() -> list[str]:
    """Every plugin known by its class name: the core's and the wings' (``MeasurementUnit.WING_UNITS``), importing
    no wing."""
    return sorted({*core_plugins(), *_modules()[0].WING_UNITS})


def available_plugins() -> dict[str, type]:
    """Every plugin class known by its class name, the wings' imported."""
    return {name: resolve_plugin(name) for name in plugin_names()}


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):  # pathological nesting too
        return text


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def resolve_plugin(name: str, where: str = "Units.txt", plugins: dict[str, type] | None = None) -> type:
    """The plugin class named ``name`` (a class name or a dotted path).

    Raises:
        ConfigError: unknown name (with a did-you-mean and the available names), an import that fails.
    """
    if "." in name:
        module_name, _, cls_name = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module_name), cls_name)
        except Exception as err:  # a missing module or name, or a module that raises while it is imported
            raise ConfigError(f"{where}: cannot import plugin {name!r}: {type(err).__name__}: {err}") from err
        if not (inspect.isclass(found) and issubclass(found, plugin_bases())) or inspect.isabstract(found):
            raise ConfigError(f"{where}: {name!r} is not a plugin: a plugin is a concrete subclass of "
                              f"{sorted(base.__name__ for base in plugin_bases())}")
        return found
    measurement_module = _modules()[0]
    if name in measurement_module.WING_UNITS:
        return getattr(measurement_module, name)  # imports its wing
    plugins = core_plugins() if plugins is None else plugins
    if name not in plugins:
        names = plugin_names()
        raise ConfigError(f"{where}: unknown plugin {name!r}.{_did_you_mean(name, names)} Available: {names}")
    return plugins[name]


def _arguments(cls: type, name: str, args: list[str], where: str) -> dict[str, Any]:
    kwargs = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"{where}: argument {arg!r} of {name} is not of the form key=value")
        if key in kwargs:
            raise ConfigError(f"{where}: argument {key!r} of {name} is given twice")
        kwargs[key] = _literal(value)
    signature = inspect.signature(cls).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())  # passes extras on
    parameters = {k: p for k, p in signature.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for key, value in kwargs.items():
        if key not in parameters and open_ended:
            continue
        if key not in parameters:
            raise ConfigError(f"{where}: {name} has no argument {key!r}.{_did_you_mean(key, list(parameters))} "
                              f"Valid: {list(parameters)}")
        default = parameters[key].default
        if _is_number(default) and not _is_number(value):
            raise ConfigError(f"{where}: {name} argument {key}={value!r}: {str(value)!r} is not a number "
                              f"(default {default!r})")
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{where}: {name} argument {key}={value!r} must be True or False")
    return kwargs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_measurement_units(path: str | Path | None = None) -> list[Any]:
    """Read a ``Units.txt`` file (default ``measurements/Units.txt``) and instantiate the plugins it lists.

    Raises:
        ConfigError: naming the file and line, for an unknown plugin (with a did-you-mean and the available
            names), an unknown or malformed argument, or an argument value the plugin rejects.
    """
    return parse_units(read_units_text(path), str(path) if path else str(DEFAULT_UNITS_FILE))


def read_units_text(path: str | Path | None = None) -> str:
    """The text of a units file (default ``measurements/Units.txt``).

    Raises:
        ConfigError: the file does not exist, is not a file, or is not UTF-8 text.
    """
    path = Path(path) if path else DEFAULT_UNITS_FILE
    if not path.is_file():
        raise ConfigError(f"units file {str(path)!r} " + ("is not a file" if path.exists() else "does not exist"))
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark (some editors write one) is not text
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"units file {str(path)!r} cannot be read as UTF-8 text: {err}") from err


def parse_units(text: str, source: str) -> list[Any]:
    """Instantiate the plugins listed in the ``Units.txt``-format ``text``; ``source`` names it in messages.

    Raises:
        ConfigError: as :func:`parse_measurement_units`.
    """
    plugins: dict[str, type] | None = None  # the plugin modules load with the first plugin line
    units, measured_at = [], {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line[:1] in ("\u2013", "\u2014", "\u2212"):  # an en dash, em dash or minus sign, as word processors write
            raise ConfigError(f"{source}:{number}: the line starts with {line[0]!r}; plugin lines start with '-'")
        if not line.startswith("-"):
            continue
        where = f"{source}:{number}"
        if not line[1:].split():
            raise ConfigError(f"{where}: a '-' line must name a plugin (e.g. '- Working_memory_usage')")
        name, *args = line[1:].split()
        plugins = core_plugins() if plugins is None else plugins
        cls = resolve_plugin(name, where, plugins)
        kwargs = _arguments(cls, name, args, where)
        if cls.plugin_kind == "measure":  # its log and figures are named by class and run id
            if cls in measured_at:
                raise ConfigError(f"{where}: {name} is listed twice (line {measured_at[cls]} too): a measurement "
                                  "unit's log and figures are named by its class and the run id, so two would "
                                  "overwrite each other; measure the other settings in a second run (--tag, or "
                                  "--measure_only with another --units_file)")
            measured_at[cls] = number
        try:
            units.append(cls(**kwargs))
            units[-1].units_line = where  # named in the messages of checks made later (``prepare``)
        except Exception as err:  # a plugin's constructor may fail in any way: name the line instead of a traceback
            raise ConfigError(f"{where}: {name}({', '.join(args)}) rejected its arguments: "
                              f"{type(err).__name__}: {err}") from err
    return units
