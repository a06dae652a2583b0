"""Sweeps beyond one machine: each run one SLURM job through submitit (``master.py --launcher slurm``), or one
submitit local job (``--launcher submitit_local``: the same submitit code path, jobs as processes on this machine).

Each run is one job named by its run id, running the same ``dol1.py`` command line as a local sweep (under
``torchrun`` for a multi-GPU block-parallel run), its output appended to the run's ``.log``; submitit's files (the
sbatch script, pickles, its own logs) go to ``<folder>/<run id>/``. The job's result is dol1.py's exit status. The
attempt's token (``$DOL1_ATTEMPT``) travels in the job's environment and, on SLURM, as the job's comment; a resumed
master finds queued and running jobs by name (``squeue``; on this machine, the job controller by its folder), so a
run is never submitted twice, even when the master was killed between the submission and its tracker write.

Preemption and time limits: SLURM signals the job (USR2, ``signal_delay_s`` before the end); submitit calls
:meth:`RunCommand.checkpoint`, which asks dol1.py to checkpoint and stop (SIGTERM) and requeues the same command,
which resumes from that checkpoint (``--resume=auto``). A preemption that sends SIGTERM instead (SLURM's default)
stops dol1.py itself (exit 130, written as the job's result) and SLURM requeues the same job: the master finds it
queued again and waits for it, ignoring that earlier result. master.py imports this module only for those launchers (it
needs ``submitit``, pinned in requirements.txt). Nothing here prints.
"""
from __future__ import annotations

import collections.abc
import contextlib
import getpass
import inspect
import json
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union, get_args, get_origin

from submitit import AutoExecutor
from submitit.core.utils import DelayedSubmission, JobPaths, pickle_load
from submitit.helpers import Checkpointable, CommandFunction
from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string  # the renderer SlurmExecutor submits with

from src.cli import ConfigError
from src.reporting import ATTEMPT_ENV
from src.records import lock_holder
from src.Sweeps.launchers import Handle, cmdline_of, parent_of, token_processes

CLUSTERS = {"slurm": "slurm", "submitit_local": "local"}  # --launcher -> submitit's cluster name
CHECKPOINT_WAIT_S = 60.0  # how long a signalled job waits for dol1.py to checkpoint before it is requeued
INTERRUPTED_EXIT = 130  # dol1.py's exit status when a signal (SLURM's preemption SIGTERM, scancel) stopped it
SQUEUE_EVERY_S = 30.0  # how often squeue is asked whether a preempted job is still queued
_OWN_KEYS = {"job_name", "partition", "time", "gpus_per_node", "cpus_per_task", "array_parallelism", "comment",
             "setup", "nodes", "ntasks_per_node"}  # set from master.py's own flags: not in --slurm_extra


@dataclass(frozen=True)
class JobOptions:
    """What every job of a sweep asks for (master.py's ``--slurm_*``, ``--gpus_per_run``, ``--cpus_per_run``)."""

    partition: str = ""  # "" = the cluster's default partition
    time_min: int = 60  # the job's time limit in minutes (a job reaching it is requeued and resumes)
    gpus_per_run: int = 0  # GPUs per job (0: a CPU job)
    cpus_per_run: int = 0  # CPUs per job (0: the cluster's default)
    array_parallelism: int = 16  # jobs in flight (queued or running) at a time
    extra: Mapping[str, Any] = field(default_factory=dict)  # more SlurmExecutor parameters (account, qos, ...)


def parse_extra(text: str) -> dict[str, Any]:
    """``--slurm_extra``: a JSON object of SlurmExecutor parameters.

    Raises:
        ConfigError: not JSON, not an object, an unknown key (the valid ones are listed) or a key set by a flag.
    """
    try:
        extra = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise ConfigError(f"--slurm_extra is not valid JSON ({err}): {text!r}") from err
    if not isinstance(extra, dict):
        raise ConfigError(f"--slurm_extra must be a JSON object such as '{{\"account\": \"proj\"}}', got {text!r}")
    valid = sorted(SlurmExecutor._valid_parameters() - _OWN_KEYS)
    unknown = sorted(set(extra) - set(valid))
    if unknown:
        own = sorted(set(unknown) & _OWN_KEYS)
        hint = f" ({own} come from master.py's own flags: --slurm_partition, --slurm_time_min, --gpus_per_run, " \
               f"--cpus_per_run, --slurm_array_parallelism)" if own else ""
        raise ConfigError(f"--slurm_extra: unknown SLURM option(s) {unknown}{hint}; valid: {valid}")
    for key, value in extra.items():
        kinds = _json_kinds(inspect.signature(_make_sbatch_string).parameters[key].annotation)
        if type(value) not in kinds:  # type(): a boolean is no integer here
            raise ConfigError(f"--slurm_extra: {key!r} must be {' or '.join(dict.fromkeys(kinds.values()))}, got "
                              f"{value!r}")
    return extra


def _json_kinds(annotation: Any) -> dict[type, str]:
    """The JSON values a parameter of submitit's sbatch renderer takes, from its annotation (numbers as text)."""
    kinds: dict[type, str] = {}
    for arg in get_args(annotation) if get_origin(annotation) is Union else (annotation,):
        origin = get_origin(arg) or arg
        if origin in (list, collections.abc.Iterable):
            kinds[list] = "a list"
        elif origin is dict:
            kinds[dict] = "an object"
        elif arg is str:
            kinds.update({str: "a string", int: "a string", float: "a string"})
        elif arg in (int, bool):
            kinds[arg] = "an integer" if arg is int else "a boolean"
    return kinds


def check_cluster(launcher: str) -> None:
    """Refuse ``--launcher slurm`` where there is no SLURM (before anything is submitted).

    Raises:
        ConfigError: ``sbatch`` is not on PATH (the message names ``--launcher submitit_local``).
    """
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: no SLURM here (sbatch is not on PATH); to rehearse the cluster sweep "
                          "on this machine, use --launcher submitit_local (the same submitit code path, jobs as "
                          "local processes)")


def executor_parameters(options: JobOptions, cluster: str, name: str, token: str | None,
                        project_root: Path) -> dict[str, Any]:
    """``AutoExecutor.update_parameters`` keyword arguments of one run's job on ``cluster`` (slurm or local)."""
    setup = [f"export PYTHONPATH={shlex.quote(str(project_root))}${{PYTHONPATH:+:$PYTHONPATH}}"]  # unpickles us
    params: dict[str, Any] = {"name": name, "timeout_min": options.time_min, "nodes": 1, "tasks_per_node": 1}
    if cluster == "local":  # placement on this machine comes from master.py's slots (CUDA_VISIBLE_DEVICES)
        return {**params, "local_setup": setup}
    params.update(slurm_setup=setup, slurm_comment=token or name,
                  slurm_array_parallelism=options.array_parallelism)
    if options.gpus_per_run:
        params["gpus_per_node"] = options.gpus_per_run
    if options.cpus_per_run:
        params["cpus_per_task"] = options.cpus_per_run
    if options.partition:
        params["slurm_partition"] = options.partition
    return {**params, **{f"slurm_{k}": v for k, v in options.extra.items()}}


def make_executor(cluster: str, folder: Path, parameters: Mapping[str, Any]) -> Any:
    """submitit's ``AutoExecutor`` for one job, with ``cluster`` given explicitly (AutoExecutor alone would fall
    back to local processes where no SLURM is found)."""
    executor = AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    return executor


def _slurm_names(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """AutoExecutor's parameters in SlurmExecutor's names (``timeout_min`` -> ``time``, ``slurm_qos`` -> ``qos``)."""
    generic = SlurmExecutor._equivalence_dict()
    converted = {generic[k]: v for k, v in parameters.items() if k in generic}
    converted.update({k.removeprefix("slurm_"): v for k, v in parameters.items() if k.startswith("slurm_")})
    return converted


def sbatch_script(options: JobOptions, folder: Path, name: str, project_root: Path, token: str | None = None,
                  python: str = "python") -> str:
    """The sbatch script the SLURM launcher submits for run ``name``, rendered by submitit without submitting
    anything (works without SLURM): for checks, and to check ``--slurm_extra`` values before a sweep starts.

    Raises:
        ConfigError: submitit refuses a value (its message).
    """
    parameters = _slurm_names(executor_parameters(options, "slurm", name, token, project_root))
    try:
        return _make_sbatch_string(command=f"{python} -u -m submitit.core._submit {shlex.quote(str(folder))}",
                                   folder=folder, **parameters)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"SLURM options {sorted(options.extra)}: {err}") from err


def _ignore_usr2() -> None:
    # SLURM's --signal=USR2@... reaches every process of the job step; its default action would kill dol1.py
    # outright. Ignored in the run (inherited through exec, and by its workers); submitit's job process handles it
    # and asks the run to checkpoint (SIGTERM).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RunCommand(CommandFunction, Checkpointable):
    """A job's body: run one ``dol1.py`` command line, output appended to the run's log; returns its exit status.

    A ``submitit.helpers.CommandFunction`` whose output goes to the run's log as it comes (not buffered), and
    ``Checkpointable``: submitit requeues it after a preemption or time-limit signal, and :meth:`checkpoint` first
    asks the run to checkpoint and stop (SIGTERM), so the requeued command resumes (``--resume=auto``).
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str], log_path: Path):
        super().__init__(list(command), verbose=False, env=dict(env))
        self.log_path = str(log_path)
        self._process: subprocess.Popen | None = None

    def __call__(self) -> int:
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                             preexec_fn=_ignore_usr2)
            # poll, never a blocking wait(): submitit's signal handler (checkpoint) must be able to reap the child
            while (code := self._process.poll()) is None:
                time.sleep(0.2)
            return code

    def checkpoint(self) -> Any:
        """Called by submitit in the job when SLURM signals preemption or the time limit: stop the run at a
        checkpoint, then requeue this same command."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)  # dol1.py checkpoints at the next round boundary, exits 130
            deadline = time.monotonic() + CHECKPOINT_WAIT_S
            while self._process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        return DelayedSubmission(type(self)(self.command, self.env, Path(self.log_path)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_process": None}  # a process handle does not travel in a pickle


def _result(folder: Path, job_id: str) -> tuple[str, Any, int] | None:
    """(outcome, value, mtime in ns) of the result submitit's job process wrote (None: none yet, or unreadable)."""
    path = JobPaths(folder, job_id).result_pickle
    try:
        mtime = path.stat().st_mtime_ns
        outcome, value = pickle_load(path)
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError):
        return None
    return outcome, value, mtime


def _exit_code(folder: Path, job_id: str) -> int | None:
    """dol1.py's exit status from a finished job's result (None: no result, the job was cancelled or died)."""
    outcome, value, _ = _result(folder, job_id) or (None, None, 0)
    return value if outcome == "success" and isinstance(value, int) else None


def _local_controllers(folder: Path) -> list[int]:
    """Live submitit local job controllers of ``folder`` (outermost first: the shell that submitit started)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        joined = " ".join(cmdline_of(int(entry.name)) or ())
        if "submitit.local._local" in joined and joined.rstrip("'\"").endswith(str(folder)):
            found.append(int(entry.name))
    return sorted(found, key=lambda pid: parent_of(pid) in found)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        parent = parent_of(int(entry.name))
        if parent is not None:
            children.setdefault(parent, []).append(int(entry.name))
    todo, found = [pid], []
    while todo:
        found.extend(todo)
        todo = [child for p in todo for child in children.get(p, [])]
    return found


def _squeue(name: str) -> list[tuple[str, str, str]]:
    """(job id, state, comment) of this user's queued and running SLURM jobs named ``name``."""
    try:
        out = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", f"--name={name}",
                              "--format=%i|%T|%k"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as err:  # an OSError like a failed squeue: the master looks again later
        raise OSError(f"squeue did not answer within {err.timeout} s") from err
    if out.returncode != 0:
        raise OSError(f"squeue failed (exit {out.returncode}): {out.stderr.strip()}")
    return [tuple(line.split("|", 2)) for line in out.stdout.splitlines() if line.count("|") >= 2]


class SubmititLauncher:
    """Each run one submitit job named by its run id: on SLURM (``slurm``) or as local processes
    (``submitit_local``); see the module docstring.

    Args:
        launcher: ``slurm`` or ``submitit_local``.
        root: the folder of submitit's files, one sub-folder per run (on SLURM: a folder every node sees).
        options: what every job asks for.
        project_root: the folder of ``src`` (the job unpickles its command through it).
    """

    def __init__(self, launcher: str, root: Path, options: JobOptions, project_root: Path):
        self.cluster, self.root, self.options, self.project_root = CLUSTERS[launcher], root, options, project_root
        self._names: dict[str, str] = {}  # job id -> run id
        # job id -> mtime of an earlier execution's result (interrupted, then requeued by SLURM), found in adopting it
        self._stale: dict[str, int] = {}
        self._queued: dict[str, tuple[float, bool]] = {}  # job id -> (when squeue was asked, whether it listed it)

    def start(self, command: Sequence[str], env: Mapping[str, str], log_path: Path, name: str = "") -> Handle:
        token = env.get(ATTEMPT_ENV)
        parameters = executor_parameters(self.options, self.cluster, name, token, self.project_root)
        try:
            executor = make_executor(self.cluster, self.root / name, parameters)
            job = executor.submit(RunCommand(command, {"PYTHONUNBUFFERED": "1", **env}, log_path))
        except (RuntimeError, ValueError, subprocess.SubprocessError) as err:
            raise OSError(f"submitit could not submit run {name} ({self.cluster}): {err}") from err
        self._names[str(job.job_id)] = name
        return Handle(None, None, tuple(command), token=token, job_id=str(job.job_id), job=job)

    def _still_queued(self, job_id: str) -> bool:
        """Whether squeue still lists the job (asked at most every SQUEUE_EVERY_S; alive if squeue fails)."""
        asked, listed = self._queued.get(job_id, (float("-inf"), True))
        if time.monotonic() - asked >= SQUEUE_EVERY_S:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                listed = any(job[0] == job_id for job in _squeue(self._names.get(job_id, "")))
            self._queued[job_id] = (time.monotonic(), listed)
        return listed

    def _alive(self, handle: Handle, folder: Path) -> bool:
        if handle.job_id in self._stale:  # SLURM requeued it after a preemption: its old result says nothing
            if (_result(folder, handle.job_id) or (None, None, None))[2] == self._stale[handle.job_id]:
                return self._still_queued(handle.job_id)
            del self._stale[handle.job_id]  # it ran again and wrote a new result
        if handle.job is not None:
            return not handle.job.done()  # a local job: its controller process; SLURM: the job's state (sacct)
        if self.cluster == "local":  # adopted from an earlier master: is its controller still there?
            return int(handle.job_id) in _local_controllers(folder)
        handle.job = SlurmExecutor.job_class(folder=folder, job_id=handle.job_id)
        return not handle.job.done()

    def poll(self, handle: Handle) -> bool:
        if handle.job_id is None:  # a run started by hand, adopted by its lock: alive while the lock is held
            return handle.lock is not None and lock_holder(*handle.lock) is not None
        folder = self.root / self._names.get(handle.job_id, "")
        if self._alive(handle, folder):
            return True
        handle.returncode = _exit_code(folder, handle.job_id)
        return False

    def _signal_local(self, handle: Handle, sig: int) -> bool:
        """Signal the job's outermost process carrying the attempt's token (dol1.py, or torchrun); False if none."""
        pids = list(token_processes(handle.token or "\0"))
        for pid in pids[:1]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        return bool(pids)

    def _signal_adopted(self, handle: Handle, sig: int) -> None:
        """A run started by hand and adopted by its lock: signal it on this machine (submitit_local only; on SLURM
        its pid may be another node's)."""
        if self.cluster == "local" and handle.pid is not None and self.poll(handle):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(handle.pid, sig)

    def terminate(self, handle: Handle) -> None:
        if handle.job_id is None:
            self._signal_adopted(handle, signal.SIGTERM)
            return
        if not self.poll(handle):
            return
        if self.cluster == "slurm":
            subprocess.run(["scancel", handle.job_id], capture_output=True, timeout=60)  # SIGTERM, later SIGKILL
        elif not self._signal_local(handle, signal.SIGTERM):  # not started yet: nothing to checkpoint
            self.kill(handle)

    def kill(self, handle: Handle) -> None:
        if handle.job_id is None:
            self._signal_adopted(handle, signal.SIGKILL)
            return
        if not self.poll(handle):
            return
        if self.cluster == "slurm":
            subprocess.run(["scancel", "--signal=KILL", "--full", handle.job_id], capture_output=True, timeout=60)
            subprocess.run(["scancel", handle.job_id], capture_output=True, timeout=60)
            return
        for pid in reversed(_descendants(int(handle.job_id))):  # the controller and everything under it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _queued_job(self, name: str) -> tuple[str | None, str]:
        """(job id, comment) of the job named ``name`` that squeue lists and that may still run: not one whose
        result is written (squeue shows a job COMPLETING for a while after its end), unless that result is an
        interrupted run's (a preemption's SIGTERM), which SLURM may have requeued; (None, "") if none."""
        for job_id, _, comment in _squeue(name):
            result = _result(self.root / name, job_id)
            if result is None:
                return job_id, comment
            if result[:2] == ("success", INTERRUPTED_EXIT):
                self._stale[job_id] = result[2]
                return job_id, comment
        return None, ""

    def find(self, name: str, command: Sequence[str]) -> Handle | None:
        if self.cluster == "slurm":
            job_id, comment = self._queued_job(name)
            if job_id is None:
                return None
            token = comment if comment.startswith(f"{name}.") else None
        else:
            controllers = _local_controllers(self.root / name)
            if not controllers:
                return None
            job_id = str(controllers[0])
            token = next(iter(token_processes(f"{name}.").values()), None)
        self._names[job_id] = name
        return Handle(None, None, tuple(command), token=token, job_id=job_id)
