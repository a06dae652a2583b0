"""Worker processes of the multi-process engine: start, watch, stop — never a hang, never an orphan.

The calling process (rank 0) starts ranks 1 … n−1 once per run with the ``spawn`` start method (CUDA does not
survive ``fork``). ``WorkerPool`` watches them from a monitor thread, because rank 0's main thread cannot be
interrupted while it is blocked inside a gloo collective:

* a worker that raises writes its traceback to ``<error dir>/rank<k>.txt`` and exits with status 1; a worker that
  dies (SIGKILL, out of memory) leaves only its exit code;
* the first of the two threads to notice a failure *claims* it. The main thread claims it when a collective
  raises (a dead peer closes its sockets) and turns it into a ``WorkerFailed`` exception carrying the worker's
  traceback, which ``dol1.py`` records in the report. When the main thread does not react within
  ``MONITOR_GRACE_S`` (it is stuck in a collective that never returns, or busy in a long measurement), the
  monitor records the failure through the ``on_failure`` callback, kills every worker and ends the process with
  ``os._exit(1)``;
* workers ignore SIGINT and SIGTERM (rank 0 handles Ctrl-C and a group-wide SIGTERM, checkpoints, then kills
  them), and die with the parent: Linux's
  ``PR_SET_PDEATHSIG`` plus a thread that polls ``os.getppid()`` (which also covers other systems).
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

logger = logging.getLogger(__name__)

MONITOR_POLL_S = 0.2  # how often the monitor thread looks at the workers
MONITOR_GRACE_S = 5.0  # how long the monitor leaves a failure to the main thread before ending the process
FAILURE_WAIT_S = 3.0  # how long the main thread waits for a worker's exit code after a collective raised
STOP_JOIN_S = 10.0  # how long a clean shutdown waits for the workers to exit on their own
KILL_JOIN_S = 5.0  # how long to wait after SIGTERM before SIGKILL, and after SIGKILL
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerFailed(RuntimeError):
    """A worker process raised or died; the message holds its rank, pid, exit code and traceback."""

    def __init__(self, rank: int, pid: int | None, exitcode: int | None, detail: str):
        self.rank, self.pid, self.exitcode, self.detail = rank, pid, exitcode, detail
        lines = [line.strip() for line in detail.splitlines() if line.strip()] or ["(no detail)"]
        body = "\n" + detail.rstrip() if len(lines) > 1 else ""  # the header already holds a one-line detail
        who = f"worker rank {rank}" + (f" (pid {pid})" if pid is not None else "")
        how = describe_exit(exitcode) if exitcode is not None else "failed"  # torchrun: only the traceback is known
        super().__init__(f"{who} {how}: {lines[-1]}{body}")


def describe_exit(exitcode: int | None) -> str:
    """Human words for a ``Process.exitcode`` (negative = killed by that signal)."""
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with status {exitcode}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to port 0 and let the OS choose), for one run's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While spawned single-machine ranks join their group: gloo's sockets on the loopback interface only
    (``GLOO_SOCKET_IFNAME=lo``, inherited by the spawned workers), unless the user chose an interface."""
    chosen = "GLOO_SOCKET_IFNAME" in os.environ or "lo" not in {name for _, name in socket.if_nameindex()}
    if not chosen:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        yield
    finally:
        if not chosen:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)


def available_cpus() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_budget(environ: Mapping[str, str] | None = None) -> int:
    """The threads a whole run may use: the cores it may run on, capped by ``OMP_NUM_THREADS`` when that is set
    (master.py sets it per slot): a multi-process run shares this among its workers, so 8 slots x 4 workers on
    16 cores run 16 threads (1 each at a cap of 2, with 2 auto workers), not 8 x 4 x 4."""
    env = os.environ if environ is None else environ
    cap = env.get("OMP_NUM_THREADS", "").strip()
    return min(available_cpus(), int(cap)) if cap.isdigit() and int(cap) > 0 else available_cpus()


# --------------------------------------------------------------------------------------------------------------------
# Inside a worker
# --------------------------------------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError) as err:
            logger.warning("prctl(PR_SET_PDEATHSIG) unavailable (%s); relying on the parent-pid watchdog", err)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def worker_entry(rank: int, target: Callable[..., None], args: tuple, error_dir: str, parent_pid: int) -> None:
    """Body of a spawned worker: guard the process, run ``target(*args)``, report a failure and exit non-zero.

    Args:
        rank: this worker's rank (1 … n−1).
        target: a module-level function (it travels by reference to the spawned interpreter).
        args: its arguments.
        error_dir: where ``rank<k>.txt`` receives the traceback of a failure.
        parent_pid: rank 0's pid; the worker ends itself when that process is gone.
    """
    # Ctrl-C and a SIGTERM to the whole process group (Slurm, torchrun, master.py): rank 0 handles them — it finishes
    # the round, gathers every rank's state for a checkpoint and reports interrupted — then kills the workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    try:
        target(*args)
    except BaseException:  # noqa: B036 - anything that ends a worker must reach rank 0's report
        text = traceback.format_exc()
        (Path(error_dir) / f"rank{rank}.txt").write_text(text)
        logger.error("blockwise worker rank %d failed:\n%s", rank, text)
        os._exit(1)  # skip interpreter shutdown: a process-group destructor must not wait for dead peers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the worker has left its process group; skip the slow teardown of torch's globals


# --------------------------------------------------------------------------------------------------------------------
# In rank 0
# --------------------------------------------------------------------------------------------------------------------
class WorkerPool:
    """Ranks 1 … n−1 as spawned processes, with a monitor thread that ends the run when one fails.

    Args:
        error_dir: an existing folder for the workers' traceback files.
        on_failure: called once with the ``WorkerFailed`` before the monitor ends the process (e.g. the report's
            ``fail``); it must not block on the workers.
    """

    def __init__(self, error_dir: str | Path, on_failure: Callable[[WorkerFailed], None] | None = None):
        self.error_dir = Path(error_dir)
        self.on_failure = on_failure
        self.processes: dict[int, Any] = {}
        self._claimed_by: str | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()  # set on shutdown: the monitor stops looking
        self._stop_sent = False  # after the stop command, a worker exiting with status 0 is expected
        self._monitor: threading.Thread | None = None

    @property
    def pids(self) -> dict[int, int]:
        """Rank → pid of every started worker."""
        return {rank: p.pid for rank, p in self.processes.items()}

    def start(self, ranks: range, target: Callable[..., None], args_of: Callable[[int], tuple]) -> None:
        """Spawn one process per rank running ``target(*args_of(rank))``, then start the monitor thread."""
        ctx = mp.get_context("spawn")
        for rank in ranks:
            proc = ctx.Process(target=worker_entry, name=f"blockwise-rank{rank}", daemon=True,
                               args=(rank, target, args_of(rank), str(self.error_dir), os.getpid()))
            proc.start()
            self.processes[rank] = proc
        self._monitor = threading.Thread(target=self._watch, name="blockwise-monitor", daemon=True)
        self._monitor.start()

    def expect_exit(self) -> None:
        """The stop command was sent: workers now exit with status 0."""
        self._stop_sent = True

    def first_failure(self) -> WorkerFailed | None:
        """The failed worker with the lowest rank, if any (a non-zero exit, or an early exit with status 0)."""
        for rank, proc in sorted(self.processes.items()):
            code = proc.exitcode
            if code is None or (code == 0 and self._stop_sent):
                continue
            err_file = self.error_dir / f"rank{rank}.txt"
            detail = err_file.read_text() if err_file.exists() else "(no traceback: the process was killed or " \
                                                                    "exited before it could write one)"
            if code == 0:
                detail = "exited before the stop command (without an error)"
            return WorkerFailed(rank, proc.pid, code, detail)
        return None

    def _claim(self, who: str) -> bool:
        with self._lock:
            if self._claimed_by is None:
                self._claimed_by = who
            return self._claimed_by == who

    def claim_failure(self, wait_s: float = FAILURE_WAIT_S) -> WorkerFailed | None:
        """Called by the main thread when it caught an exception: the worker failure behind it, if any.

        Waits up to ``wait_s`` for a worker to exit (a collective raises as soon as a peer's socket closes, a moment
        before the peer's exit code is visible). The main thread then owns the failure; the monitor stands down.
        """
        if not self._claim("main"):
            while True:  # the monitor is already reporting it and will end the process
                time.sleep(1.0)
        deadline = time.monotonic() + wait_s
        while True:
            failure = self.first_failure()
            if failure is not None or time.monotonic() >= deadline:
                return failure
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self._done.wait(MONITOR_POLL_S):
            failure = self.first_failure()
            if failure is None:
                continue
            if self._done.wait(MONITOR_GRACE_S) or not self._claim("monitor"):
                return  # the main thread took over (or shut down)
            try:
                if self.on_failure is not None:
                    self.on_failure(failure)
            finally:
                logger.error("ending the run: %s", failure)
                self.terminate()
                os._exit(1)

    def join(self, timeout_s: float = STOP_JOIN_S) -> None:
        """Wait for the workers to exit on their own after the stop command."""
        deadline = time.monotonic() + timeout_s
        for proc in self.processes.values():
            proc.join(max(0.0, deadline - time.monotonic()))

    def terminate(self) -> None:
        """SIGKILL every live worker (they ignore SIGTERM, and rank 0 holds everything worth keeping) and reap them."""
        live = [p for p in self.processes.values() if p.exitcode is None]
        for proc in live:
            proc.kill()
        for proc in live:
            proc.join(KILL_JOIN_S)

    def shutdown(self) -> None:
        """Stop the monitor, then terminate and reap whatever is still running."""
        self._done.set()
        self._claim("main")
        self.terminate()

