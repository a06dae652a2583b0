"""Where and how a sweep's runs execute: device slots, and launchers that start, watch, stop and find a run.

A :class:`Slot` is a place for one run (a device label and the environment its process gets); :func:`plan_slots`
packs runs on the visible GPUs, or on the CPU. A :class:`Launcher` starts a run's ``dol1.py`` command in a slot and
watches it; :class:`LocalLauncher` runs it as a child process on this machine (Linux ``/proc`` finds it again after
the master was killed). A cluster launcher plugs in on the same seam: see :class:`Launcher`.

Nothing here prints.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from src.records import lock_holder


# --------------------------------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    """A place for one run: a device label for the tracker and the environment the child gets."""

    device: str  # "cpu" or "cuda:<id as the master sees it>"
    env: tuple[tuple[str, str], ...]


def visible_gpus() -> list[str]:
    """The GPUs torch sees, as ids for the children's CUDA_VISIBLE_DEVICES (honouring the master's own)."""
    import torch  # lazily: a CPU sweep never needs CUDA initialised in the master

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return listed[:count]
    return [str(i) for i in range(count)]


def plan_slots(gpus: Sequence[str], runs_per_gpu: int, cpu_slots: int, cores: int) -> list[Slot]:
    """Slots: ``runs_per_gpu`` per GPU (GPUs interleaved, so runs spread first), else ``cpu_slots`` on the CPU.

    Each child's threads are capped at ``max(1, cores // slots)`` (OMP_NUM_THREADS, MKL_NUM_THREADS) so parallel
    runs do not oversubscribe the cores; a CPU child gets ``CUDA_VISIBLE_DEVICES=""`` (dol1.py then falls back to
    the CPU) and a GPU child only its own GPU, which dol1.py's default cuda_core 0 then names.
    """
    if gpus:
        devices = [(f"cuda:{gpu}", gpu) for _ in range(runs_per_gpu) for gpu in gpus]
    else:
        devices = [("cpu", "")] * cpu_slots
    threads = str(max(1, cores // len(devices)))
    return [Slot(label, (("CUDA_VISIBLE_DEVICES", visible), ("OMP_NUM_THREADS", threads),
                         ("MKL_NUM_THREADS", threads))) for label, visible in devices]


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Handle:
    """A started (or adopted) run: ``pid`` for the local launcher; ``returncode`` once known (None if never)."""

    pid: int
    process: subprocess.Popen | None = None  # None when adopted from an earlier master
    command: tuple[str, ...] = ()
    returncode: int | None = None
    lock: tuple[Path, str] | None = None  # (reports folder, run id) of an adopted run: alive while its lock is held


class Launcher(Protocol):
    """Starts and watches runs: the seam between the sweep loop and whatever executes a ``dol1.py`` command.

    :class:`LocalLauncher` starts processes on this machine. A cluster launcher (e.g. SLURM through submitit) would
    implement the same five methods: ``start`` submits the same ``dol1.py`` command line as a job and returns a
    handle with the job id, ``poll`` asks the scheduler whether it still runs (and its exit code), ``terminate`` /
    ``kill`` cancel it, and ``find`` looks a run's command up among the queued and running jobs (e.g. by job name =
    run id), which is what keeps a resumed master from submitting a run twice. Device slots then become job
    resources (one slot per job allowed in flight) instead of local GPUs.
    """

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> Handle:
        """Start ``command`` with ``env`` added to the master's environment, output appended to ``log_path``."""

    def poll(self, handle: Handle) -> bool:
        """True while the run is alive; sets ``handle.returncode`` when the run ended and its code is known."""

    def terminate(self, handle: Handle) -> None:
        """Ask the run to stop (dol1.py closes its report as interrupted and exits 130)."""

    def kill(self, handle: Handle) -> None:
        """Stop the run and everything it started, now."""

    def find(self, command: Sequence[str]) -> Handle | None:
        """A live run of exactly this command, started by anyone (so that no run is ever started twice)."""


def _cmdline(pid: int) -> tuple[str, ...] | None:
    """The process's argument list (None if gone, a zombie, or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(raw.decode(errors="replace").split("\0")[:-1]) or None


def _same_command(cmdline: Sequence[str] | None, command: Sequence[str]) -> bool:
    # the interpreter's path may differ (symlinks); the script and its arguments must not
    return bool(cmdline) and tuple(cmdline[1:]) == tuple(command[1:])


class LocalLauncher:
    """Runs each command as a child process in its own session (it survives a killed master; Linux /proc to find
    it again)."""

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path) -> Handle:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                       start_new_session=True, close_fds=True)
        return Handle(process.pid, process, tuple(command))

    def poll(self, handle: Handle) -> bool:
        if handle.process is not None:
            handle.returncode = handle.process.poll()
            return handle.returncode is None
        if handle.lock is not None and lock_holder(*handle.lock) == handle.pid:
            handle.command = _cmdline(handle.pid) or handle.command  # it may have been started by hand, not by us
            return True
        # no lock (yet, or any more): alive while the process still runs its command; a run that has released its
        # lock is still writing its last files and exiting, and a sweep is over only when its processes are gone
        return _same_command(_cmdline(handle.pid), handle.command)

    def _signal(self, handle: Handle, sig: int, group: bool) -> None:
        if not self.poll(handle):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group and os.getpgid(handle.pid) == handle.pid:  # our children lead their group (workers included)
                os.killpg(handle.pid, sig)
            else:
                os.kill(handle.pid, sig)

    def terminate(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGTERM, group=False)

    def kill(self, handle: Handle) -> None:
        self._signal(handle, signal.SIGKILL, group=True)

    def find(self, command: Sequence[str]) -> Handle | None:
        for entry in Path("/proc").glob("[0-9]*"):
            if _same_command(_cmdline(int(entry.name)), command):
                return Handle(int(entry.name), None, tuple(command))
        return None
