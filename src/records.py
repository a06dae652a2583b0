"""What identifies a run, what it takes to reproduce it, and the lock that makes a run id one live run.

* **Identity.** A run id hashes the experiment — every setting that changes what is computed or recorded — and the
  text of its units file, never where it runs: :data:`PLACEMENT_KEYS` (device, folders, checkpoint cadence, resume
  and measure-only switches, the training curve's x-axis; the worker count except in :data:`WORKER_MODES`) are left
  out, so the same experiment on another GPU or into another folder keeps its id, and an edited ``Units.txt`` gets
  a new one. Keys that matter to some models or data sets only (:data:`SCOPED_KEYS`: ``heads``, ``context``)
  enter only those runs' ids. Thread counts are left out as well but recorded: a trajectory is bit-reproducible only
  at the same threads, device and library versions. ``--tag`` enters the id, for deliberate repeats.
* **Record.** :func:`reproducibility_record`: argv, threads and the thread variables, host, Python / torch /
  torchvision / numpy versions, CUDA and cuDNN, git commit with a dirty flag and a hash of the diff.
* **Claim.** :class:`RunClaim` holds an exclusive ``flock`` on ``reports/R<hash>.lock`` for the run's whole life;
  the kernel releases it when the process dies, however it dies.

Ground floor: imports nothing of the project.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# settings that say where or how a run executes, not what it computes: they never change the run id
PLACEMENT_KEYS = ("cuda_core", "data_root", "output_root", "units_file", "n_workers", "checkpoint_every", "resume",
                  "settings_file", "measure_only", "plot_x",
                  "tensorboard")  # plot_x: how the curve is drawn, not what is computed
# n_workers changes what these engines measure (time and memory per worker; in the asynchronous ones also which blocks
# share a read), so it enters their run ids; elsewhere it is unused. The asynchronous engines' own keys enter only
# their ids.
WORKER_MODES = ("blockwise", "async", "async_sequential")
ASYNC_MODES = ("async", "async_sequential")
ASYNC_KEYS = ("max_staleness", "worker_speeds", "step_time")
BLOCKWISE_KEYS = ("K", "active_share", "gamma", "block_update", "block_order")  # unused by entire training
# keys that change only some models or data sets enter only their run ids (key -> (setting, values where it counts)),
# so a run of any other model or data set keeps the id it had before the key existed
SCOPED_KEYS = {"heads": ("model", ("vit", "gpt")), "context": ("dataset_name", ("python_docs",))}
RESUME_MODES = ("no", "yes", "auto")  # --resume: or a run id R<hash>
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class RunLocked(RuntimeError):
    """Another live process holds the run's lock."""


def identity(H: Mapping[str, Any], units_text: str) -> dict[str, Any]:
    """The settings a run id hashes: H without the placement keys, plus the units file's text."""
    mode = str(H.get("training_mode", ""))
    kept = {k: v for k, v in H.items() if k not in PLACEMENT_KEYS or (mode in WORKER_MODES and k == "n_workers")}
    for key in BLOCKWISE_KEYS if mode == "entire" else ("block_order",) if mode in ASYNC_MODES else ():
        kept.pop(key, None)  # whole-model steps (or every block, every round): these change nothing there
    if mode not in ASYNC_MODES:  # the asynchronous engines' keys change nothing elsewhere: they never split a run id
        kept = {k: v for k, v in kept.items() if k not in ASYNC_KEYS}
    kept = {k: v for k, v in kept.items() if k not in SCOPED_KEYS or H.get(SCOPED_KEYS[k][0]) in SCOPED_KEYS[k][1]}
    return {**kept, "units_text": units_text}


def experiment_id(H: Mapping[str, Any], units_text: str) -> str:
    """``R`` + 8 hex digits of the md5 of :func:`identity` as sorted JSON."""
    blob = json.dumps(identity(H, units_text), sort_keys=True, default=str)
    return "R" + hashlib.md5(blob.encode()).hexdigest()[:8]


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings dicts (a key missing on one side differs)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, object()) != b.get(k, object()))


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace") if out.returncode == 0 else None


def git_state(root: Path) -> dict[str, Any]:
    """The checked-out commit, whether tracked files differ from it, and the md5 of that diff."""
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_md5": None}
    diff = _git(root, "diff", "HEAD") or ""
    return {"commit": commit.strip(), "dirty": bool(diff),
            "diff_md5": hashlib.md5(diff.encode()).hexdigest() if diff else None}


def _version(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = __import__(module_name)
        except ImportError:
            return None
    return getattr(module, "__version__", None)


def reproducibility_record(argv: Sequence[str], root: Path, deterministic: bool = False) -> dict[str, Any]:
    """Everything besides the settings that decides whether a run can be reproduced bit for bit."""
    cuda = torch.cuda.is_available()
    return {
        "argv": list(argv), "host": socket.gethostname(), "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "python": platform.python_version(), "torch": torch.__version__, "torchvision": _version("torchvision"),
        "numpy": np.__version__, "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "deterministic": deterministic,
        "git": git_state(root),
    }


class RunClaim:
    """An exclusive lock on ``<reports>/<run>.lock`` held until :meth:`release` or the end of the process.

    Raises:
        RunLocked: another live process holds it (its pid is in the message).
    """

    def __init__(self, reports_dir: Path, run: str):
        self.path = reports_dir / f"{run}.lock"
        reports_dir.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: not inherited
        for attempt in range(3):  # lock_holder() probes with a shared lock for microseconds: try again briefly
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 2:
                    time.sleep(0.05)
                    continue
                holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(self._fd)
                self._fd = None
                raise RunLocked(holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would race with a process that opened it meanwhile)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_holder(reports_dir: Path, run: str) -> int | None:
    """The pid holding the run's lock, or None when no live process holds it."""
    path = reports_dir / f"{run}.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None
