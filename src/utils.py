"""Shared utilities: the command line, seeds, parameter copies, the batch-size probe and the run Reporter.

Nothing here runs at import time; every path is anchored on ``PROJECT_ROOT`` unless the caller passes one.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import subprocess
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A user-supplied setting is invalid; the command-line entry points turn it into exit status 2."""


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------
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
        except (ValueError, SyntaxError):
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


def key_comments(source: str) -> dict[str, str]:
    """Read the trailing ``# comment`` of every ``"key": value,`` line of a defaults dict written in ``source``."""
    pattern = re.compile(r'^\s*["\'](\w+)["\']\s*:.*?#\s*(.+?)\s*$')
    return {m.group(1): m.group(2) for line in source.splitlines() if (m := pattern.match(line))}


def parse_arguments(defaults: Mapping[str, Any], argv: Sequence[str] | None = None,
                    help_texts: Mapping[str, str] | None = None, description: str | None = None,
                    prog: str | None = None) -> dict[str, Any]:
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

    Returns:
        A new dict: the defaults with the given flags applied.
    """
    help_texts = help_texts or {}
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, default in defaults.items():
        parser.add_argument(f"--{key}", dest=key, default=default, type=_converter(key, default),
                            metavar="VALUE" if default is None else _type_name(default).split(" ")[0].upper(),
                            help=help_texts.get(key, " "))
    return vars(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------------------------------
# Seeds and parameter copies
# --------------------------------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _copy_state(src: nn.Module, dst: nn.Module, what: str) -> None:
    src_state = dict(src.named_parameters()) | dict(src.named_buffers())
    dst_state = dict(dst.named_parameters()) | dict(dst.named_buffers())
    if src_state.keys() != dst_state.keys():
        missing = sorted(src_state.keys() ^ dst_state.keys())
        raise ValueError(f"cannot copy {what}: tensor names differ ({missing[:5]}...)")
    with torch.no_grad():
        for name, tensor in src_state.items():
            target = dst_state[name]
            if target.shape != tensor.shape:
                raise ValueError(f"cannot copy {what}: {name} has shape {tuple(tensor.shape)} in the source "
                                 f"and {tuple(target.shape)} in the destination")
            target.copy_(tensor)  # in place: storage is never shared


def copy_block(src_block: nn.Module, dst_block: nn.Module) -> None:
    """Copy parameters and buffers (e.g. BatchNorm running statistics) of one block into another, in place.

    Raises:
        ValueError: when the blocks' tensor names or shapes differ.
    """
    _copy_state(src_block, dst_block, "block")


def copy_model(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into the block-compatible model ``dst``, in place."""
    _copy_state(src, dst, "model")


# --------------------------------------------------------------------------------------------------------------------
# Batch-size probe
# --------------------------------------------------------------------------------------------------------------------
def _largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> int:
    """Largest b in [low, high] with ``fits(b)``, assuming monotonicity: doubling, then bisection. 0 if none."""
    if not fits(low):
        return 0
    good, bad = low, None
    while bad is None and good < high:
        trial = min(good * 2, high)
        if fits(trial):
            good = trial
        else:
            bad = trial
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _cuda_fits(model: nn.Module, sample: torch.Tensor, device: torch.device,
               criterion: Callable | None) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            x = sample.to(device).unsqueeze(0).expand(batch, *sample.shape).contiguous()
            out = model(x)
            loss = criterion(out) if criterion is not None else out.float().pow(2).mean()
            loss.backward()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return fits


def _saved_bytes(model: nn.Module, sample: torch.Tensor, batch: int) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one forward at ``batch``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = sample.unsqueeze(0).expand(batch, *sample.shape).contiguous()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def get_max_batch_size(model: nn.Module, sample: torch.Tensor, device: torch.device | str = "cpu", *,
                       criterion: Callable | None = None, low: int = 1, high: int = 65536, safety: float = 0.8,
                       fits: Callable[[int], bool] | None = None, free_bytes: int | None = None) -> int:
    """Largest training batch size that fits in memory, times a safety margin.

    On CUDA: real forward+backward probes, doubling then bisection, catching out-of-memory (the first
    implementation divided memory by one input's size and ignored the model). On CPU: an estimate,
    ``free memory / measured per-sample footprint``, where the footprint is the bytes autograd saves per sample
    (measured from forwards at batch 1 and 2) plus the input itself; parameters, gradients and optimiser state
    are subtracted from the free memory first (3 × parameter bytes, as for Adam).

    Args:
        model: the model, already on ``device``.
        sample: one input without the batch dimension.
        device: where to probe.
        criterion: maps the output to a scalar loss (default: mean square of the output).
        low, high: search range.
        safety: fraction of the found size that is returned.
        fits: inject a ``batch -> bool`` probe (tests; custom memory limits). Overrides the device probe.
        free_bytes: inject the free memory for the CPU estimate.

    Returns:
        The batch size (at least ``low`` if any fits, else 0).
    """
    device = torch.device(device)
    if fits is None and device.type == "cuda":
        fits = _cuda_fits(model, sample, device, criterion)
    if fits is not None:
        best = _largest_fitting(fits, low, high)
        return max(min(low, best), int(best * safety))
    with torch.enable_grad():
        per_sample = _saved_bytes(model, sample, 2) - _saved_bytes(model, sample, 1)
    per_sample = max(per_sample, 0) + sample.numel() * sample.element_size()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = (free_bytes if free_bytes is not None else _available_host_bytes()) - 3 * param_bytes
    estimate = int(safety * free / max(per_sample, 1))
    return max(0, min(high, estimate)) if estimate >= low else 0


# --------------------------------------------------------------------------------------------------------------------
# Reporter
# --------------------------------------------------------------------------------------------------------------------
def run_id(H: Mapping[str, Any]) -> str:
    """``R`` + the first 8 hex digits of the md5 of ``H`` as sorted JSON: the report's and the sweep's run id."""
    return "R" + hashlib.md5(json.dumps(H, sort_keys=True).encode()).hexdigest()[:8]


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """The checked-out git commit of ``root``, or None outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def archive_existing(path: Path) -> None:
    """Move an existing file aside as ``<stem>.<n><suffix>`` (first free n), so nothing is silently replaced."""
    if not path.exists():
        return
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)


class Reporter:
    """Run logger: ``reports/R<hash>.txt`` with a header and timestamped lines, plus a JSON-lines metrics file.

    Header lines: ``Process ID``, ``Status`` (alive, then finished / stopped / failed / interrupted),
    ``Hyperparameters: {json}``, and ``Run info: {json}`` (torch version, device, git commit, plugins...).
    A report of the same configuration that already exists is renamed ``R<hash>.<n>.txt`` first, together with
    its metrics file, so re-running never destroys an earlier result.
    """

    STATUSES = ("alive", "finished", "stopped", "failed", "interrupted")

    def __init__(self, H: Mapping[str, Any], reports_dir: str | Path | None = None,
                 run_info: Mapping[str, Any] | None = None):
        self.H = dict(H)
        self.run_id = run_id(self.H)
        self.dir = Path(reports_dir) if reports_dir else PROJECT_ROOT / "reports"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{self.run_id}.txt"
        self.metrics_path = self.dir / f"{self.run_id}.metrics.jsonl"
        archive_existing(self.path)
        archive_existing(self.metrics_path)
        self.status = "alive"
        info = {"torch": torch.__version__, "git_commit": git_commit(), **(run_info or {})}
        self.path.write_text(f"Process ID: {os.getpid()}\nStatus: alive\n"
                             f"Hyperparameters: {json.dumps(self.H, sort_keys=True)}\n"
                             f"Run info: {json.dumps(info, sort_keys=True, default=str)}\n")
        self.metrics_path.touch()

    def log(self, message: str) -> None:
        """Append ``[YYYY-MM-DD HH:MM:SS] message``."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as f:
            f.write(f"[{stamp}] {message}\n")

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to the run's metrics file (flushed at once, for readers such as master.py)."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(dict(record), default=float) + "\n")

    def set_status(self, status: str, detail: str | None = None) -> None:
        """Rewrite the ``Status:`` line (atomically: temporary file, then rename)."""
        if status not in self.STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {list(self.STATUSES)}")
        self.status = status
        lines = self.path.read_text().splitlines(keepends=True)
        lines[1] = f"Status: {status}" + (f" ({detail})" if detail else "") + "\n"
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(lines))
        os.replace(tmp, self.path)

    def finish(self, status: str = "finished", reason: str | None = None) -> None:
        """Close the run with a final status and, where given, the reason."""
        if reason:
            self.log(f"{status.capitalize()}: {reason}")
        self.set_status(status, reason)

    def fail(self, exc: BaseException, exit_code: int = 1) -> None:
        """Record a failure with its exit code and traceback."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.log(f"Failed with exit code {exit_code}:\n{tb.rstrip()}")
        self.set_status("failed", f"exit code {exit_code}: {type(exc).__name__}: {exc}".splitlines()[0])


def read_report(path: str | Path) -> dict[str, Any]:
    """Parse a report's header: process id, status (and its detail), hyper-parameters and run info."""
    lines = Path(path).read_text().splitlines()
    status = lines[1].split(":", 1)[1].strip()
    name, _, detail = status.partition(" (")
    return {"pid": int(lines[0].split(":", 1)[1]), "status": name, "status_detail": detail.rstrip(")") or None,
            "H": json.loads(lines[2].split(":", 1)[1]),
            "run_info": json.loads(lines[3].split(":", 1)[1]) if len(lines) > 3 and lines[3].startswith("Run info")
            else {}}


# --------------------------------------------------------------------------------------------------------------------
# Plugins from Units.txt
# --------------------------------------------------------------------------------------------------------------------
def available_plugins() -> dict[str, type]:
    """Every concrete MeasurementUnit and StopperUnit class defined in the two plugin modules, by name."""
    import inspect

    from src.Buliding_Units import MeasurementUnit as measurement_module
    from src.Buliding_Units import StopperUnit as stopper_module

    found = {}
    for module, base in ((measurement_module, measurement_module.MeasurementUnit),
                         (stopper_module, stopper_module.StopperUnit)):
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and issubclass(cls, base) and not inspect.isabstract(cls) \
                    and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _resolve_plugin(name: str, where: str, plugins: dict[str, type]) -> type:
    import difflib
    import importlib

    if "." in name:
        module_name, _, cls_name = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{where}: cannot import plugin {name!r}: {err}") from err
    if name not in plugins:
        close = difflib.get_close_matches(name, plugins, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown plugin {name!r}.{hint} Available: {sorted(plugins)}")
    return plugins[name]


def parse_measurement_units(path: str | Path | None = None) -> list[Any]:
    """Read a ``Units.txt`` file and instantiate the plugins it lists.

    Lines starting with ``-`` name a plugin, optionally followed by ``key=value`` arguments (values are Python
    literals, else strings): ``- HessianBlockInteractionMeasurement tol=1e-3 max_steps=30``. A name is a class of
    ``MeasurementUnit.py`` or ``StopperUnit.py``, or a dotted path ``package.module.Class``. Every other line
    (headers, blank lines, ``#`` comments) is ignored.

    Raises:
        ConfigError: naming the file and line, for an unknown plugin (with a did-you-mean and the available
            names), an unknown or malformed argument, or an argument value the plugin rejects.
    """
    import difflib
    import inspect

    path = Path(path) if path else PROJECT_ROOT / "measurements" / "Units.txt"
    if not path.is_file():
        raise ConfigError(f"units file {str(path)!r} does not exist")
    plugins = available_plugins()
    units = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("-"):
            continue
        where = f"{path}:{number}"
        name, *args = line[1:].split()
        cls = _resolve_plugin(name, where, plugins)
        kwargs = {}
        for arg in args:
            key, sep, value = arg.partition("=")
            if not sep or not key:
                raise ConfigError(f"{where}: argument {arg!r} of {name} is not of the form key=value")
            kwargs[key] = _literal(value)
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        for key in kwargs:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: {name} has no argument {key!r}.{hint} Valid: {accepted}")
        try:
            units.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {name}({', '.join(args)}) rejected its arguments: {err}") from err
    return units
