"""Where and how a sweep's runs execute: device slots, and launchers that start, watch, stop and find a run.

A :class:`Slot` is a place for one run (a device label and the environment its process gets); :func:`plan_slots`
packs runs on the visible GPUs (``gpus_per_run`` each), or on the CPU; :func:`job_slots` are a cluster's jobs in
flight. A :class:`Launcher` starts a run's ``dol1.py`` command in a slot and watches it; :class:`LocalLauncher` runs
it as a child process on this machine (Linux ``/proc`` finds it again after the master was killed, by the attempt's
token in its environment). Cluster launchers plug in on the same seam (:mod:`src.Sweeps.slurm`).

Nothing here prints.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from src.records import lock_holder
from src.reporting import ATTEMPT_ENV


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


def plan_slots(gpus: Sequence[str], runs_per_gpu: int, cpu_slots: int, cores: int, gpus_per_run: int = 1,
               cpus_per_run: int = 0) -> list[Slot]:
    """Slots: ``runs_per_gpu`` per group of ``gpus_per_run`` GPUs (groups interleaved, so runs spread first), else
    ``cpu_slots`` on the CPU.

    Each child's threads are capped at ``cpus_per_run`` or else ``max(1, cores // slots)`` (OMP_NUM_THREADS,
    MKL_NUM_THREADS) so parallel runs do not oversubscribe the cores; a multi-process run shares its cap among its
    workers (``worker_pool.thread_budget``). A CPU child gets ``CUDA_VISIBLE_DEVICES=""`` (dol1.py then falls back
    to the CPU) and a GPU child only its own GPUs: one for ``gpus_per_run=1``, which dol1.py's default cuda_core 0
    then names; N for a multi-process run (``--training_mode blockwise`` then starts one worker per GPU, NCCL).
    GPUs left over when their number is not a multiple of ``gpus_per_run`` stay unused.

    Raises:
        ValueError: ``gpus_per_run`` is below 1, or more than the GPUs given.
    """
    if gpus_per_run < 1 or (gpus and gpus_per_run > len(gpus)):
        raise ValueError(f"--gpus_per_run {gpus_per_run}: must be between 1 and the {len(gpus)} visible GPU(s) "
                         f"{list(gpus)}")
    if gpus:
        groups = [",".join(gpus[i:i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
        devices = [(f"cuda:{group}", group) for _ in range(runs_per_gpu) for group in groups]
    else:
        devices = [("cpu", "")] * cpu_slots
    threads = str(cpus_per_run or max(1, cores // len(devices)))
    return [Slot(label, (("CUDA_VISIBLE_DEVICES", visible), ("OMP_NUM_THREADS", threads),
                         ("MKL_NUM_THREADS", threads))) for label, visible in devices]


def job_slots(label: str, in_flight: int, cpus_per_run: int = 0) -> list[Slot]:
    """``in_flight`` slots for a cluster launcher: a slot is a job allowed in flight (queued or running), its
    resources the job's; the children's threads capped at ``cpus_per_run`` when given (else the job's CPUs)."""
    threads = (("OMP_NUM_THREADS", str(cpus_per_run)), ("MKL_NUM_THREADS", str(cpus_per_run))) if cpus_per_run else ()
    return [Slot(label, threads) for _ in range(in_flight)]


# --------------------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Handle:
    """A started (or adopted) attempt of a run, identified by its ``token`` whatever executes it.

    ``pid`` is the local launcher's process; ``job_id`` a cluster launcher's job (None locally); ``returncode`` is
    set once known (None if never: a job that was cancelled, or an adopted process that is not our child).
    """

    pid: int | None
    process: subprocess.Popen | None = None  # None when adopted from an earlier master
    command: tuple[str, ...] = ()
    returncode: int | None = None
    lock: tuple[Path, str] | None = None  # (reports folder, run id) of an adopted run: alive while its lock is held
    token: str | None = None  # $DOL1_ATTEMPT of this attempt (None: a run started by hand, outside any sweep)
    job_id: str | None = None  # the cluster's job id (SLURM), or the job's controller pid (submitit_local)
    job: Any = None  # the launcher's own object for the job (a submitit Job), None when adopted


class Launcher(Protocol):
    """Starts and watches runs: the seam between the sweep loop and whatever executes a ``dol1.py`` command.

    An attempt is identified by its token, not by a process id: the scheduler puts a fresh token in the child's
    environment (``$DOL1_ATTEMPT``, :data:`src.reporting.ATTEMPT_ENV`), and ``dol1.py`` writes it back into its
    status file and report, so the outcome of an attempt is read from the run's own files on any launcher.
    :class:`LocalLauncher` starts processes on this machine; :class:`src.Sweeps.slurm.SubmititLauncher` submits
    each run as a SLURM job (or a submitit local job) named by its run id.
    """

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path, name: str = "") -> Handle:
        """Start ``command`` (run ``name``) with ``env`` (the token among it) added to the environment, output
        appended to ``log_path``."""

    def poll(self, handle: Handle) -> bool:
        """True while the attempt is alive (queued counts); sets ``handle.returncode`` when it ended and the code
        is known."""

    def terminate(self, handle: Handle) -> None:
        """Ask the attempt to stop (dol1.py checkpoints, closes its report as interrupted and exits 130)."""

    def kill(self, handle: Handle) -> None:
        """Stop the attempt and everything it started, now."""

    def find(self, name: str, command: Sequence[str]) -> Handle | None:
        """A live attempt of run ``name`` started by a launcher of this kind (by its token or job name), or a live
        process of exactly ``command``: what keeps a run from ever being started twice."""


def cmdline_of(pid: int) -> tuple[str, ...] | None:
    """The process's argument list (None if gone, a zombie, or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return tuple(raw.decode(errors="replace").split("\0")[:-1]) or None


def token_of(pid: int) -> str | None:
    """The ``$DOL1_ATTEMPT`` token in a process's environment (None if none, gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    prefix = f"{ATTEMPT_ENV}=".encode()
    return next((item[len(prefix):].decode(errors="replace") for item in raw.split(b"\0") if item.startswith(prefix)),
                None)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def parent_of(pid: int) -> int | None:
    """The parent's pid of a process (None if gone or unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def token_processes(prefix: str) -> dict[int, str]:
    """pid -> token of the processes whose ``$DOL1_ATTEMPT`` starts with ``prefix`` (e.g. ``"<run id>."``),
    outermost first: a process whose parent carries the same token (a worker, a torchrun rank) comes after it."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        token = token_of(int(entry.name))
        if token is not None and token.startswith(prefix):
            found[int(entry.name)] = token
    return dict(sorted(found.items(), key=lambda item: found.get(parent_of(item[0]) or 0) == item[1]))


def _same_command(cmdline: Sequence[str] | None, command: Sequence[str]) -> bool:
    # the interpreter's path may differ (symlinks); the script and its arguments must not
    return bool(cmdline) and tuple(cmdline[1:]) == tuple(command[1:])


class LocalLauncher:
    """Runs each command as a child process in its own session (it survives a killed master; Linux /proc to find
    it again, by the token in its environment or by its command line)."""

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path, name: str = "") -> Handle:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                                       start_new_session=True, close_fds=True)
        return Handle(process.pid, process, tuple(command), token=env.get(ATTEMPT_ENV))

    def poll(self, handle: Handle) -> bool:
        if handle.process is not None:
            handle.returncode = handle.process.poll()
            return handle.returncode is None
        if handle.lock is not None and lock_holder(*handle.lock) == handle.pid:
            handle.command = cmdline_of(handle.pid) or handle.command  # it may have been started by hand, not by us
            return True
        if handle.token is not None:  # found by its token: alive while that process still carries it
            return token_of(handle.pid) == handle.token
        # no lock (yet, or any more): alive while the process still runs its command; a run that has released its
        # lock is still writing its last files and exiting, and a sweep is over only when its processes are gone.
        # Right after its exec a process may show no command line yet: alive if it runs (not a zombie).
        cmdline = cmdline_of(handle.pid)
        return _same_command(cmdline, handle.command) if cmdline is not None else _running(handle.pid)

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

    def find(self, name: str, command: Sequence[str]) -> Handle | None:
        tokens = token_processes(f"{name}.")  # started by a master (ours or another), whatever its command line
        if tokens:
            pid, token = next(iter(tokens.items()))
            return Handle(pid, None, cmdline_of(pid) or tuple(command), token=token)
        for entry in Path("/proc").glob("[0-9]*"):
            if _same_command(cmdline_of(int(entry.name)), command):
                return Handle(int(entry.name), None, tuple(command))
        return None
