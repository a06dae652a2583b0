"""The loop that runs a sweep: start runs on free slots, watch them, record every outcome, resume after a crash.

The state of every run lives in the tracker, rewritten after every change, so that a master killed by ``kill -9``
can be started again: runs that are done are skipped, runs whose process is still alive are adopted (waited on,
never started twice), failed runs are retried up to ``max_attempts`` failures. Where runs execute (device slots)
and how they are started and watched (launchers) is :mod:`src.Sweeps.launchers`.

Every attempt gets a token (``<run id>.<attempt>.<random>``), saved in the tracker before the start and handed to
the child as ``$DOL1_ATTEMPT``; ``dol1.py`` writes it into the run's status file and report. An attempt's outcome is
read from the report that carries its token, so it is judged the same way whatever ran it (a local process, a
SLURM job on another host whose process id means nothing here).

Nothing here prints: the loop reports through an ``on_event(kind, run, entry)`` callback.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from src.records import lock_holder
from src.reporting import ATTEMPT_ENV, read_metrics, read_report, read_status, write_json_atomic
from src.Sweeps.grid import Run
from src.Sweeps.launchers import Handle, Launcher, LocalLauncher, Slot
from src.Sweeps.tracker import STATES, now, read_tracker

STATUSES = STATES  # a run's status in the tracker
ENDED = ("done", "diverged")  # final: never run again (a diverged run is a result, not a failure to retry)
BAD_INPUT = 2  # dol1.py's exit status for bad input: such a run is never retried
RUN_LOCKED = 3  # dol1.py's exit status when another process runs the same run id: wait for that one
INTERRUPTED = 130
_REPORT_OUTCOME = {"finished": "done", "stopped": "done", "diverged": "diverged", "failed": "failed",
                   "interrupted": "interrupted", "died": "failed",
                   "alive": "failed"}  # "alive" from an old report whose process is gone: killed hard
_DONE_ELSEWHERE = {"finished": "done", "stopped": "done", "diverged": "diverged"}  # a report's final statuses


@dataclass
class _Active:
    run: Run
    handle: Handle
    slot: Slot | None
    since: float  # epoch seconds of the start (older metrics files are a previous attempt's)
    killed: bool = False  # SIGKILLed by the master's shutdown: interrupted, whatever its report says


def _fresh_round(run: Run, since: float) -> int | None:
    """The last round in the run's metrics file, if that file was written by the attempt started at ``since``."""
    last = read_metrics(run.metrics, last_only=True)
    try:
        fresh = bool(last) and run.metrics.stat().st_mtime >= since - 1
    except OSError:
        return None
    return last[0].get("round") if fresh else None


@dataclass
class Scheduler:
    """Runs a sweep's runs on the slots, keeping the tracker up to date; see :meth:`run`.

    Attempts count every start; ``max_attempts`` bounds the starts that end in failure. An interrupted start (the
    master stopped by SIGINT/SIGTERM, or the run's own process signalled) is run again without counting as a
    failure; a run that exits with dol1.py's bad-input status 2 is never retried.
    """

    runs: list[Run]
    slots: list[Slot]
    tracker_path: Path
    sweep: dict[str, Any]  # {"id", "grid", "fixed"}
    launcher: Launcher = field(default_factory=LocalLauncher)
    dol1: Path = Path("dol1.py")
    python: str = "python"
    max_attempts: int = 2
    grace: float = 30.0
    poll_interval: float = 0.5
    on_event: Callable[[str, Run | None, dict[str, Any] | None], None] = lambda kind, run, entry: None
    torchrun_procs: Callable[[Run], int] = lambda run: 1  # > 1: the run is one torchrun of that many processes
    stop_requests: int = 0

    def __post_init__(self) -> None:
        self.data = read_tracker(self.tracker_path)
        self.active: list[_Active] = []
        self.queue: list[Run] = []
        self._saved_at = 0.0
        self._look_failed = False  # a launcher's look for live attempts failed this round: start nothing more now

    # --- tracker ---
    def entry(self, run: Run) -> dict[str, Any]:
        return self.data["runs"][run.run_id]

    def save(self) -> None:
        self.data["updated"] = now()
        self.data["master_pid"] = os.getpid()
        write_json_atomic(self.tracker_path, self.data)
        self._saved_at = time.monotonic()

    def command(self, run: Run) -> list[str]:
        """The run's ``dol1.py`` command line; under ``torchrun`` (one process per GPU, on one node) for a run that
        ``torchrun_procs`` gives more than one process."""
        procs = self.torchrun_procs(run)
        launch = [self.python, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                  f"--nproc_per_node={procs}"] if procs > 1 else [self.python]
        return [*launch, str(self.dol1), *run.argv]

    def request_stop(self) -> None:
        """Called from a signal handler: the first request stops gracefully, a second one kills at once."""
        self.stop_requests += 1

    # --- outcomes ---
    def _from_report(self, run: Run, entry: dict[str, Any], since: float) -> str:
        """The outcome of an attempt whose exit code the master never saw, from the report that carries its token
        (an attempt adopted without one: the report of its pid, else a report written since it started)."""
        try:
            info = read_report(run.report)
            if entry.get("token"):
                fresh = info["attempt"] == entry["token"]
            else:
                fresh = info["pid"] == entry["pid"] if entry.get("pid") else run.report.stat().st_mtime >= since - 1
        except (OSError, ValueError, IndexError, KeyError):
            info, fresh = None, False
        if info is not None and fresh:
            entry["detail"] = info["status_detail"]
            return _REPORT_OUTCOME.get(info["status"], "failed")
        # no report of this attempt: never confirmed started (interrupted) or died before writing it (failed)
        return "interrupted" if entry.get("pid") is None and entry.get("job_id") is None else "failed"

    def _report_status(self, run: Run) -> str | None:
        try:
            return read_report(run.report)["status"]
        except (OSError, ValueError, KeyError):
            return None

    def _ended_elsewhere(self, run: Run, entry: dict[str, Any]) -> bool:
        """True (and the entry closed) when the run's own report says it ended: run by another master, another
        tracker or by hand. Such a run is never run again."""
        outcome = _DONE_ELSEWHERE.get(self._report_status(run))
        if outcome is None:
            return False
        entry.update(status=outcome, ended=entry.get("ended") or now(), detail="ended outside this tracker "
                     "(its report says so)" if entry["attempts"] == 0 else entry.get("detail"))
        if (rounds := _fresh_round(run, 0.0)) is not None:
            entry["rounds_done"] = rounds
        self.save()
        self.on_event("skip", run, entry)
        return True

    def _live(self, run: Run) -> Handle | None:
        """The attempt running this run now, started by anyone: what the launcher finds by the run's id (an
        attempt's token in a process's environment, a queued or running job of that name) or command line, else the
        holder of the run's lock (a run started by hand claims it before its first write)."""
        found = self.launcher.find(run.run_id, self.command(run))
        return found if found is not None else self._lock_holder(run)

    def _lock_holder(self, run: Run) -> Handle | None:
        """The process holding the run's lock, if any (a local check: no launcher involved)."""
        pid = lock_holder(run.reports_dir, run.run_id)
        if pid is not None and pid > 0:
            state = read_status(run.reports_dir, run.run_id) or {}
            return Handle(pid, None, tuple(self.command(run)), lock=(run.reports_dir, run.run_id),
                          token=state.get("attempt") if state.get("pid") == pid else None)
        return None

    def _finish(self, active: _Active) -> None:
        run, handle, entry = active.run, active.handle, self.entry(active.run)
        code = handle.returncode
        if code == RUN_LOCKED:  # another process held the run: wait for it, or take its outcome if it ended
            try:
                holder = self._live(run)
            except OSError:  # the launcher could not look (squeue failed): the run's lock still tells
                holder = self._lock_holder(run)
            if holder is not None or self._report_status(run) in _DONE_ELSEWHERE:
                self.active.remove(active)
                if holder is not None:
                    self._adopt(run, holder, entry, active.since)
                else:  # it finished before we looked (a race of two masters): its result, not our failure
                    self._ended_elsewhere(run, entry)
                return
        if code is None:
            outcome = self._from_report(run, entry, active.since)
        elif code == 0:
            outcome = "diverged" if self._report_status(run) == "diverged" else "done"
            with contextlib.suppress(OSError, ValueError, KeyError):  # why it ended (a stopper's reason), if it says
                entry["detail"] = read_report(run.report)["status_detail"]
        elif code in (INTERRUPTED, -signal.SIGINT, -signal.SIGTERM):
            outcome = "interrupted"
        else:
            outcome = "failed"
        if active.killed and outcome not in ENDED:
            outcome = "interrupted"
        if (rounds := _fresh_round(run, active.since)) is not None:
            entry["rounds_done"] = rounds
        entry.update(status=outcome, exit_code=code, ended=now())
        if code == BAD_INPUT:  # dol1.py said why in one line, before writing any report
            lines = [line for line in run.log.read_text(errors="replace").splitlines() if line.strip()] \
                if run.log.exists() else []
            entry["detail"] = lines[-1] if lines else None
        if outcome == "failed":
            entry["failures"] += 1
            if code not in (None, BAD_INPUT):  # the reason its report gives (the exception's line), if it wrote one
                self._from_report(run, entry, active.since)
        self.active.remove(active)
        self._settle(run, entry)

    def _settle(self, run: Run, entry: dict[str, Any]) -> None:
        """Queue a run again if it may be (interrupted, or failed with failures left), then save and tell."""
        retry = (entry["status"] == "interrupted" and not self.stop_requests) or (
            entry["status"] == "failed" and entry["failures"] < self.max_attempts and entry["exit_code"] != BAD_INPUT
            and not self.stop_requests)
        self.save()
        self.on_event(entry["status"], run, entry)
        if retry:
            entry["status"] = "pending"
            self.queue.append(run)
            self.save()
            self.on_event("retry", run, entry)

    # --- starting ---
    def _free_slot(self, device: str | None = None) -> Slot | None:
        taken = [a.slot for a in self.active]
        for slot in self.slots:
            if slot in taken:
                taken.remove(slot)
            elif device is None or slot.device == device:
                return slot
        return None

    def _adopt(self, run: Run, handle: Handle, entry: dict[str, Any], since: float) -> None:
        # a job found by name before its run started shows no token yet: it is the attempt this tracker saved
        token = handle.token or (entry.get("token") if handle.job_id is not None else None)
        entry.update(status="running", pid=handle.pid, job_id=handle.job_id, token=token)
        self.active.append(_Active(run, handle, self._free_slot(entry.get("device")), since))
        self.save()
        self.on_event("adopt", run, entry)

    def _launch(self, run: Run, slot: Slot) -> None:
        entry, command = self.entry(run), self.command(run)
        try:
            found = self._live(run)
        except OSError:  # the launcher could not look (squeue failed): never start blind; try again next round
            self.queue.insert(0, run)
            self._look_failed = True
            return
        if found is not None:  # someone else runs it already: wait for that one instead
            self._adopt(run, found, entry, time.time())
            return
        if self._ended_elsewhere(run, entry):  # someone else ran it meanwhile
            return
        token = f"{run.run_id}.{entry['attempts'] + 1}.{secrets.token_hex(3)}"
        entry.update(status="running", attempts=entry["attempts"] + 1, pid=None, job_id=None, token=token,
                     device=slot.device, rounds_done=0, exit_code=None, detail=None, started=now(), ended=None)
        self.save()  # before the start: a master killed in between finds the attempt by its token or job name
        run.log.parent.mkdir(parents=True, exist_ok=True)
        with open(run.log, "a") as log:
            log.write(f"=== {now()} master.py: attempt {entry['attempts']} on {slot.device}: {command}\n")
        since = time.time()
        try:
            handle = self.launcher.start(command, {**dict(slot.env), ATTEMPT_ENV: token}, run.log, run.run_id)
        except OSError as err:
            entry.update(status="failed", failures=entry["failures"] + 1, detail=f"could not start: {err}",
                         ended=now())
            self._settle(run, entry)
            return
        entry.update(pid=handle.pid, job_id=handle.job_id)
        self.active.append(_Active(run, handle, slot, since))
        self.save()
        self.on_event("launch", run, entry)

    # --- the sweep ---
    def prepare(self) -> None:
        """Reconcile the tracker with what is alive: skip done runs, adopt live ones, judge the dead, queue the rest."""
        self.data["sweeps"][self.sweep["id"]] = {
            **self.data["sweeps"].get(self.sweep["id"], {"started": now()}), "grid": self.sweep["grid"],
            "fixed": self.sweep["fixed"], **{k: self.sweep[k] for k in ("zip", "summary") if self.sweep.get(k)},
            "runs": [r.run_id for r in self.runs], "status": "running"}
        for run in self.runs:
            entry = self.data["runs"].setdefault(run.run_id, {
                "status": "pending", "attempts": 0, "failures": 0, "pid": None, "device": None, "exit_code": None,
                "started": None, "ended": None, "detail": None, "rounds_done": 0, "token": None, "job_id": None})
            entry.update(overrides=run.overrides, H=run.H, argv=run.argv, rounds_total=run.H["rounds"],
                         report=str(run.report), log=str(run.log))
            if entry["status"] in ENDED and self._report_status(run) not in _DONE_ELSEWHERE:
                # done, but not where this sweep asks for it (another --output_root) or its files are gone: an entry
                # is done only for the files it points at, so the run is run again there
                entry.update(status="pending", detail=f"its report was not found finished at {run.report}: run again")
            if entry["status"] in ENDED:
                self.on_event("skip", run, entry)
                continue
            if (live := self._live(run)) is None and self._ended_elsewhere(run, entry):
                continue
            since = datetime.fromisoformat(entry["started"]).timestamp() if entry.get("started") else 0.0
            if live is not None:
                self._adopt(run, live, entry, since)
            elif entry["status"] == "running":  # its master died and so did the run since: what became of it?
                entry.update(status=self._from_report(run, entry, since), exit_code=None, ended=now())
                if (rounds := _fresh_round(run, since)) is not None:
                    entry["rounds_done"] = rounds
                if entry["status"] == "failed":
                    entry["failures"] += 1
                self._settle(run, entry)
            elif entry["status"] == "failed" and entry["exit_code"] != BAD_INPUT \
                    and entry["failures"] < self.max_attempts or entry["status"] in ("pending", "interrupted"):
                entry["status"] = "pending"
                self.queue.append(run)
        self.save()

    def _tick(self) -> None:
        """Poll the active runs, refresh their rounds from the metrics files, save at most once a second."""
        changed = False
        for active in list(self.active):
            if not self.launcher.poll(active.handle):
                self._finish(active)
                continue
            entry = self.entry(active.run)
            if (rounds := _fresh_round(active.run, active.since)) is not None and rounds != entry["rounds_done"]:
                entry["rounds_done"], changed = rounds, True
        if changed and time.monotonic() - self._saved_at > 1.0:
            self.save()
        self.on_event("tick", None, None)

    def _shutdown(self) -> None:
        for active in self.active:
            self.launcher.terminate(active.handle)
        deadline = time.monotonic() + (0 if self.stop_requests > 1 else self.grace)
        while self.active and time.monotonic() < deadline and self.stop_requests < 2:
            for active in list(self.active):
                if not self.launcher.poll(active.handle):
                    self._finish(active)
            time.sleep(min(self.poll_interval, 0.2))
        for active in self.active:
            active.killed = True
            self.launcher.kill(active.handle)
        deadline = time.monotonic() + 10.0
        while self.active:
            for active in list(self.active):
                if not self.launcher.poll(active.handle) or time.monotonic() > deadline:
                    self._finish(active)
            time.sleep(0.05)
        for run in self.queue:
            if self.entry(run)["status"] == "pending" and self.entry(run)["attempts"]:
                self.entry(run)["status"] = "interrupted"
        self.queue.clear()

    def run(self) -> dict[str, str]:
        """Run the sweep to the end (or until a stop request); returns run id -> final status."""
        self.prepare()
        while (self.queue or self.active) and not self.stop_requests:
            self._look_failed = False
            while self.queue and not self._look_failed and (slot := self._free_slot()) is not None \
                    and not self.stop_requests:
                self._launch(self.queue.pop(0), slot)
            self._tick()
            if self.queue or self.active:
                time.sleep(self.poll_interval)
        if self.stop_requests:
            self._shutdown()
        self.data["sweeps"][self.sweep["id"]].update(status="interrupted" if self.stop_requests else "ended",
                                                     ended=now())
        self.save()
        return {run.run_id: self.entry(run)["status"] for run in self.runs}
