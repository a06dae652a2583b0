"""The engine table: ``--training_mode`` name → where the engine function lives, and what the frame must hold for it.

An engine is a plain function ``train_x(frame, progress=None) -> frame``. The table names its module as a string, so
``dol1.py --help`` and the settings check list every engine without importing one; the module is imported when the
engine is chosen (:func:`resolve_engine`, the one way to look an engine up). A new engine is one more entry of the
tuple in ``ENGINES`` below::

    EngineSpec("my_mode", "mypackage.mymodule.train_my_mode", "What it does.", block_copies=True),

or, without editing the table, its dotted path on the command line (``--training_mode mypackage.mymodule.train_x``);
options for such an engine are attached with :func:`engine_options`.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from src.cli import ConfigError

_PARALLEL = "src.Optimizer_Engines.parallel"


@dataclass(frozen=True)
class EngineSpec:
    """One engine and what it needs; dotted paths are imported by :meth:`load`.

    Attributes:
        name: the ``--training_mode`` value.
        path: ``package.module.function`` of the engine.
        summary: one line for ``--help``.
        block_copies: the frame holds one model copy per block (a ``Disributed_frame``).
        block_updates: the ``--block_update`` values it accepts; empty = it ignores the key.
        torchrun_worker: dotted path of ``worker(H)``, run by torchrun ranks > 0 (None: a single-process engine).
        torchrun_path: what the engine hands rank 0's work to under torchrun with several ranks (``entire``:
            the data-parallel baseline), named here so the core never imports the parallel wing.
        check: dotted path of ``check(frame)``, raising ValueError on settings it cannot run (exit 2).
        function: the loaded engine (set by :meth:`load`).
    """

    name: str
    path: str
    summary: str = ""
    block_copies: bool = False
    block_updates: tuple[str, ...] = ()
    torchrun_worker: Any = None
    torchrun_path: str | None = None
    check: Any = None
    function: Callable[..., Any] | None = None

    def load(self) -> "EngineSpec":
        """This spec with the engine, its torchrun worker and its check imported."""
        worker, check = (load_path(x) if isinstance(x, str) else x for x in (self.torchrun_worker, self.check))
        return replace(self, function=self.function or load_path(self.path), torchrun_worker=worker, check=check)

    def run(self, frame: Any, progress: Callable[[int, int], None] | None = None) -> Any:
        """Call the engine, passing ``progress`` only to engines that accept it."""
        function = self.function or load_path(self.path)
        try:
            inspect.signature(function).bind(frame, progress)
        except TypeError:
            return function(frame)
        return function(frame, progress)


ENGINES: dict[str, EngineSpec] = {spec.name: spec for spec in (
    EngineSpec("entire", "src.Optimizer_Engines.BCD_engine.train_entire",
               "vanilla training of the whole model: one optimiser step per round (DistributedDataParallel under "
               "torchrun)", torchrun_worker=f"{_PARALLEL}.ddp_engine.ddp_worker",
               torchrun_path=f"{_PARALLEL}.ddp_engine.train_data_parallel"),
    EngineSpec("blockwise_sequential", "src.Optimizer_Engines.BCD_engine.train_blockwise_sequential",
               "block-wise training in one process: K local steps per active block per round (Jacobi or "
               "Gauss-Seidel)", block_copies=True, block_updates=("gauss_seidel", "jacobi")),
    EngineSpec("blockwise", f"{_PARALLEL}.distributed_engine.train_blockwise_distributed",
               "one worker process per block (or group of blocks) on torch.distributed; the Jacobi algorithm",
               block_copies=True, block_updates=("jacobi",),
               torchrun_worker=f"{_PARALLEL}.distributed_engine.torchrun_worker"),
    EngineSpec("async", f"{_PARALLEL}.async_engine.train_async",
               "asynchronous block updates for real: a server rank and one worker process per block or group",
               block_copies=True, block_updates=("jacobi",), torchrun_worker=f"{_PARALLEL}.async_engine.torchrun_worker",
               check=f"{_PARALLEL}.async_engine.check_async_engine"),
    EngineSpec("async_sequential", f"{_PARALLEL}.async_sim.train_async_sequential",
               "asynchronous block updates simulated exactly in virtual time (one process; bound --max_staleness)",
               block_copies=True, block_updates=("jacobi",), check=f"{_PARALLEL}.async_sim.check_async"),
)}


def engine_options(*, block_copies: bool = False, block_updates: tuple[str, ...] = (),
                   torchrun_worker: Callable[[dict[str, Any]], None] | None = None,
                   check: Callable[[Any], None] | None = None) -> Callable[[Callable], Callable]:
    """Decorator for an engine named by its dotted path: what the frame must hold for it (see :class:`EngineSpec`)."""
    def attach(function: Callable[..., Any]) -> Callable[..., Any]:
        _check_signature(function, f"@engine_options on {function.__qualname__}", ValueError)
        function.engine_options = dict(block_copies=block_copies, block_updates=tuple(block_updates),  # type: ignore
                                       torchrun_worker=torchrun_worker, check=check)
        return function
    return attach


def torchrun_world(environ: Mapping[str, str] | None = None) -> int:
    """The number of processes torchrun started for this run (1 when not under torchrun)."""
    env = os.environ if environ is None else environ
    return int(env["WORLD_SIZE"]) if "RANK" in env and "WORLD_SIZE" in env else 1


def load_path(path: str) -> Any:
    """The object at ``package.module.name``, importing its module."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _check_signature(function: Any, what: str, error: type[Exception]) -> None:
    """An engine is a Python function (or method) that can be called with one positional argument, the Frame."""
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        kind = "a class" if inspect.isclass(function) else f"a {type(function).__name__}"
        raise error(f"{what} is {kind}, not a Python function that takes a Frame")
    try:
        inspect.signature(function).bind(object())
    except TypeError as err:
        raise error(f"{what} cannot be called with a Frame: {err}") from err


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
    _check_signature(function, f"--training_mode {path!r}", ConfigError)
    for spec in ENGINES.values():  # a table engine named by its path is that engine
        if spec.path == path:
            return spec.load()
    summary = (inspect.getdoc(function) or "").split("\n")[0]
    return EngineSpec(path, path, summary, function=function, **getattr(function, "engine_options", {}))


def resolve_engine(name: str) -> EngineSpec:
    """The engine for ``--training_mode name`` (a name of the table or a dotted path), with its module imported.

    Raises:
        ConfigError: an unknown name (with a did-you-mean and the valid names), or a dotted path that does not
            import or is not a function of a Frame.
    """
    if name in ENGINES:
        try:
            return ENGINES[name].load()
        except Exception as err:  # an engine module of the table that does not import: name it
            raise ConfigError(f"--training_mode {name}: its module {ENGINES[name].path.rpartition('.')[0]} cannot "
                              f"be imported: {type(err).__name__}: {err}") from err
    if _DOTTED.fullmatch(name):
        return _from_dotted_path(name)
    close = difflib.get_close_matches(name, ENGINES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--training_mode {name!r} is not valid.{hint} Valid: {sorted(ENGINES)}, or a dotted path "
                      f"package.module.function to a function that takes a Frame")
