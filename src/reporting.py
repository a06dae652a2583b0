"""Where a run writes and what it writes: output paths, the report, its status file, its metrics and its config.

Files of run ``R<hash>`` under ``<output root>/reports/`` (``--output_root``, default the project folder):
``R<hash>.txt`` — the seed's readable report: a header (``Process ID``, ``Status``, ``Attempt``,
``Hyperparameters: {json}``, ``Run info: {json}``, …) then ``[YYYY-MM-DD HH:MM:SS] message`` lines;
``R<hash>.status.json`` — the machine-readable status, rewritten atomically, which every reader takes the status
from (``attempt`` is the token a sweep master gave this attempt in :data:`ATTEMPT_ENV`, echoed back);
``R<hash>.metrics.jsonl`` — one JSON record per progress check; ``R<hash>.config.json`` — the resolved settings.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import subprocess
import tempfile
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import torch

from src.cli import ConfigError
from src.records import lock_holder

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ATTEMPT_ENV = "DOL1_ATTEMPT"  # a sweep master's token for one attempt of a run, echoed in the status and the report


@dataclass(frozen=True)
class Paths:
    """Where a run writes: reports, figures, measurement logs and checkpoints, all under one root."""

    root: Path = PROJECT_ROOT

    @classmethod
    def for_output_root(cls, output_root: str | Path | None) -> "Paths":
        """The paths for ``--output_root`` (empty or None = the project folder)."""
        return cls(Path(output_root).resolve() if output_root else PROJECT_ROOT)

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def measurements(self) -> Path:
        return self.root / "measurements"

    def report(self, run: str) -> Path:
        return self.reports / f"{run}.txt"

    def status(self, run: str) -> Path:
        return self.reports / f"{run}.status.json"

    def metrics(self, run: str) -> Path:
        return self.reports / f"{run}.metrics.jsonl"

    def config(self, run: str) -> Path:
        return self.reports / f"{run}.config.json"

    def model(self, run: str) -> Path:
        """The centre model's ``state_dict`` at the end of the run."""
        return self.reports / f"{run}.model.pt"

    def checkpoints(self, run: str) -> Path:
        return self.root / "checkpoints" / run

    def check_writable(self) -> None:
        """Check, creating nothing, that each output folder (or its deepest existing ancestor) is a folder in which
        a temporary file can be made.

        Raises:
            ConfigError: the output root (or a folder on the way) is a file, or a folder cannot be written.
        """
        for folder in (self.reports, self.figures, self.measurements, self.root / "checkpoints"):
            existing = folder
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            try:
                if not existing.is_dir():
                    raise NotADirectoryError(20, f"{str(existing)!r} is a file, not a folder")
                with tempfile.TemporaryFile(dir=existing):
                    pass
            except OSError as err:
                raise ConfigError(f"--output_root {str(self.root)!r}: cannot write to {str(folder)!r} "
                                  f"({err.strerror or err})") from err


def run_id(H: Mapping[str, Any]) -> str:
    """``R`` + the first 8 hex digits of the md5 of ``H`` as sorted JSON."""
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


RUN_FILE_SUFFIXES = (".txt", ".status.json", ".metrics.jsonl", ".config.json", ".model.pt")  # R<hash><suffix>


def _archived(reports_dir: Path, run: str, suffix: str, n: int) -> Path:
    """The n-th archived copy of a run file: ``R<hash>.<n>.txt``, ``R<hash>.metrics.<n>.jsonl``, …"""
    kind, _, ext = suffix[1:].rpartition(".")
    return reports_dir / (f"{run}.{kind}.{n}.{ext}" if kind else f"{run}.{n}.{ext}")


def archive_run(reports_dir: Path, run: str) -> None:
    """Move an earlier run's files aside together, with the first archive number free for all of them: report,
    status, metrics, config, model, training curve, measurement figures and checkpoints."""
    present = [s for s in RUN_FILE_SUFFIXES if (reports_dir / f"{run}{s}").exists()]
    if not present:
        return
    n = 1
    while any(_archived(reports_dir, run, s, n).exists() for s in RUN_FILE_SUFFIXES):
        n += 1
    for suffix in present:
        (reports_dir / f"{run}{suffix}").rename(_archived(reports_dir, run, suffix, n))
    figures = reports_dir.parent / "figures"
    for suffix in (".pdf", ".png"):
        curve = figures / f"training_curve_{run}{suffix}"
        if curve.exists():
            curve.rename(curve.with_name(f"training_curve_{run}.{n}{suffix}"))
    for folder in (figures / "Measurements" / "Hessian_Measurement" / run, reports_dir.parent / "checkpoints" / run):
        if folder.is_dir():  # a fresh attempt never resumes an archived checkpoint
            folder.rename(folder.with_name(f"{run}.{n}"))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that a reader in another process sees the old or the new file, never a partial one; a
    failed write leaves no temporary file behind."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".tmp")
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes the file private; a tracker or status is for everyone
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_text_atomic` of ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def read_metrics(path: Path, last_only: bool = False) -> list[dict[str, Any]]:
    """The records of a metrics file (complete lines only: the run may be writing), or only the last one."""
    try:
        with open(path, "rb") as f:
            if last_only:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode(errors="replace").split("\n")[:-1]  # the last piece may be partial
    except OSError:
        return []
    records = []
    for line in lines[-1:] if last_only else lines:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def strict_json(value: Any) -> Any:
    """``value`` with non-finite floats as None and tensors or arrays as lists (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return strict_json(value.tolist()) if hasattr(value, "tolist") else value


def json_line(record: Mapping[str, Any]) -> str:
    """One line of a ``.jsonl`` file in strict JSON (see :func:`strict_json`)."""
    return json.dumps(strict_json(dict(record)), allow_nan=False, default=str) + "\n"


def format_progress(m: Mapping[str, Any]) -> str:
    """The report's readable progress line (the seed's ``Energy = …, Accuracy = …``, extended)."""
    parts = [f"Energy = {m['loss']:.4g}"] + ([f"Accuracy = {m['accuracy']:.4f}"] if "accuracy" in m else [])
    parts += [f"Test Loss = {m['test_loss']:.4g}"]
    parts += [f"Test Accuracy = {m['test_accuracy']:.4f}"] if "test_accuracy" in m else []
    parts += [f"BitsPerChar = {m['bits_per_char']:.4g}, Test BitsPerChar = {m['test_bits_per_char']:.4g}"] \
        if "test_bits_per_char" in m else []
    parts += [f"Steps = {m['steps']}", f"Samples = {m['samples']}"]
    if "forward_sample_passes" in m:
        parts.append(f"BlockUpdates = {m['block_updates']}, SamplePasses = {m['forward_sample_passes']} forward"
                     f" / {m['backward_sample_passes']} backward")
    parts += [f"Time = {m['wall_time']:.2f}", f"ComputeTimeShare = {m['compute_time_share']:.2f}",
              f"Deviation = {m['deviation']:.4g}"]
    return f"Round {m['round']}: " + ", ".join(parts)


def _replace_header(path: Path, values: Mapping[str, str]) -> None:
    """Rewrite the header lines ``Key: value`` named in ``values`` (first occurrence each), atomically."""
    lines, todo = path.read_text().splitlines(keepends=True), dict(values)
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if key in todo:
            lines[i] = f"{key}: {todo.pop(key)}\n"
        if not todo:
            break
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text("".join(lines))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


STATUS_BYTES = 2048  # a status file keeps this many bytes, so its last word can be rewritten on a full disk


def write_status(reports_dir: Path, run: str, status: str, detail: str | None = None, pid: int | None = None,
                 attempt: str | None = None) -> None:
    """Set a run's status: the status file first, then the report's ``Status:`` line.

    The status file is replaced atomically and padded to ``STATUS_BYTES``; when the disk is full it is rewritten in
    place instead, in the blocks it already holds, so a failure for lack of space still says ``failed``.
    """
    path = reports_dir / f"{run}.status.json"
    text = json.dumps({"run_id": run, "status": status, "detail": detail, "updated": datetime.now().isoformat(),
                       "pid": os.getpid() if pid is None else pid, "attempt": attempt}, sort_keys=True, default=str)
    text = text[:STATUS_BYTES - 1] if len(text) < STATUS_BYTES else json.dumps(
        {"run_id": run, "status": status, "detail": str(detail)[:STATUS_BYTES // 2], "attempt": attempt})
    padded = text.ljust(STATUS_BYTES - 1) + "\n"  # trailing spaces are valid JSON whitespace
    try:
        write_text_atomic(path, padded)
    except OSError as err:
        if err.errno != errno.ENOSPC or not path.exists() or path.stat().st_size < len(padded):
            raise
        with open(path, "r+") as f:  # no space for a new file: overwrite the old one's bytes
            f.write(padded)
            f.flush()
            os.fsync(f.fileno())
    report = reports_dir / f"{run}.txt"
    if report.exists():
        try:
            _replace_header(report, {"Status": status + (f" ({detail})" if detail else "")})
        except OSError as err:  # a full disk: the status file, which every reader takes, has it already
            if err.errno != errno.ENOSPC:
                raise


def read_status(reports_dir: Path, run: str) -> dict[str, Any] | None:
    """A run's status file, or None when there is none (or it is unreadable or not a status)."""
    try:
        state = json.loads((reports_dir / f"{run}.status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("status"), str) else None


class Reporter:
    """The run's logger: the report ``R<hash>.txt``, its status file and its metrics file.

    A report of the same run id that exists already is moved aside first (``R<hash>.<n>.txt``, with the run's other
    files), so re-running never destroys an earlier result — unless ``resume``: then it is continued.

    Args:
        H: the settings, written in the header.
        reports_dir: where the files go (default ``<project>/reports``).
        run_info: facts about the run for the ``Run info`` line.
        run: the run id (default: ``run_id(H)``).
        resume: continue an existing report instead of archiving it.
        extra_header: more ``Key: {json}`` header lines for a new report.
        attempt: the sweep master's token of this attempt, written in the status file and the report.
    """

    STATUSES = ("alive", "finished", "stopped", "diverged", "failed", "interrupted")

    def __init__(self, H: Mapping[str, Any], reports_dir: str | Path | None = None,
                 run_info: Mapping[str, Any] | None = None, *, run: str | None = None, resume: bool = False,
                 extra_header: Mapping[str, Any] | None = None, attempt: str | None = None):
        self.H, self.attempt, self.status = dict(H), attempt or None, "alive"
        self.run_id = run or run_id(self.H)
        self.dir = Path(reports_dir) if reports_dir else Paths().reports
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{self.run_id}.txt"
        self.status_path = self.dir / f"{self.run_id}.status.json"
        self.metrics_path = self.dir / f"{self.run_id}.metrics.jsonl"
        if resume and self.path.exists():
            _replace_header(self.path, {"Process ID": str(os.getpid()), "Attempt": self.attempt or "-"})
        else:
            archive_run(self.dir, self.run_id)
            info = {"torch": torch.__version__, "git_commit": git_commit(), **(run_info or {})}
            extra = "".join(f"{k}: {json.dumps(v, sort_keys=True, default=str)}\n"
                            for k, v in (extra_header or {}).items())
            self.path.write_text(f"Process ID: {os.getpid()}\nStatus: alive\nAttempt: {self.attempt or '-'}\n"
                                 f"Hyperparameters: {json.dumps(self.H, sort_keys=True)}\n"
                                 f"Run info: {json.dumps(info, sort_keys=True, default=str)}\n" + extra)
            self.metrics_path.touch()
        write_status(self.dir, self.run_id, "alive", attempt=self.attempt)

    def log(self, message: str) -> None:
        """Append ``[YYYY-MM-DD HH:MM:SS] message``."""
        with open(self.path, "a") as f:
            f.write(f"[{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] {message}\n")

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to the metrics file (at once, for readers such as master.py)."""
        with open(self.metrics_path, "a") as f:
            f.write(json_line(record))

    def rewrite_metrics(self, history: list[Mapping[str, Any]]) -> None:
        """Replace the metrics file by ``history`` (a resume drops what an interrupted attempt wrote after its
        checkpoint)."""
        write_text_atomic(self.metrics_path, "".join(json_line(r) for r in history))

    def set_status(self, status: str, detail: str | None = None) -> None:
        """Record a new status: the status file, then the report's ``Status:`` line (both atomically replaced)."""
        if status not in self.STATUSES:
            raise ValueError(f"unknown status {status!r}; valid: {list(self.STATUSES)}")
        self.status = status
        write_status(self.dir, self.run_id, status, detail, attempt=self.attempt)

    def finish(self, status: str = "finished", reason: str | None = None) -> None:
        """Close the run with a final status and, where given, the reason."""
        if reason:
            self.log(f"{status.capitalize()}: {reason}")
        self.set_status(status, reason)

    def fail(self, exc: BaseException, exit_code: int = 1) -> None:
        """Record a failure: the status first (a small atomic write, so that even on a full disk the report does not
        keep saying ``alive``), then the traceback."""
        chain, no_space = exc, False
        while chain is not None and not no_space:  # torch.save reports a full disk as a RuntimeError
            no_space = getattr(chain, "errno", None) == errno.ENOSPC or "No space left on device" in str(chain)
            chain = chain.__cause__ or chain.__context__
        detail = f"exit code {exit_code}: {type(exc).__name__}: {exc}".splitlines()[0]
        self.set_status("failed", f"no space left on device ({detail})" if no_space else detail)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            self.log(f"Failed with exit code {exit_code}:\n{tb.rstrip()}")
        except OSError as err:  # the disk is full: the status says failed, the traceback does not fit
            if err.errno != errno.ENOSPC:
                raise


def write_config(paths: Paths, run: str, H: Mapping[str, Any], units_text: str, record: Mapping[str, Any]) -> None:
    """``R<hash>.config.json``: what ``dol1.py --settings_file`` needs to run the experiment again exactly."""
    write_json_atomic(paths.config(run), {"run_id": run, "settings": dict(H), "units_text": units_text,
                                          "identity_excludes_placement": True, "reproducibility": dict(record)})


def recover_dead_holder(paths: Paths, run: str) -> str | None:
    """Close the report of an earlier holder of this run that died without closing it (call with the run's lock
    held); returns a sentence for the new report, or None when there was nothing to recover."""
    state = read_status(paths.reports, run)
    if state is None or state.get("status") != "alive" or state.get("pid") == os.getpid():
        return None
    detail = (f"died: process {state.get('pid')} ended without closing its report (SIGKILL, out of memory or "
              f"power loss); found by the next run of {run}")
    write_status(paths.reports, run, "failed", detail, pid=state.get("pid"), attempt=state.get("attempt"))
    return f"The previous attempt (pid {state.get('pid')}) had died without closing its report: marked failed"


def status_path(report: Path) -> Path:
    """The status file of a report, current (``R<hash>.txt``) or archived (``R<hash>.<n>.txt``)."""
    stem = report.name.removesuffix(".txt")
    run, _, n = stem.rpartition(".")
    return report.with_name(f"{run}.status.{n}.json" if run and n.isdigit() else f"{stem}.status.json")


def process_alive(reports_dir: Path, run: str, pid: int) -> bool:
    """Whether the process that wrote an ``alive`` status still runs: its run lock is held, or (no lock file) the
    pid exists."""
    if (reports_dir / f"{run}.lock").exists():
        return lock_holder(reports_dir, run) is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_report(path: str | Path) -> dict[str, Any]:
    """A run's header and status: ``pid``, ``status``, ``status_detail``, ``attempt`` (the sweep's token, or None),
    ``H``, ``run_info``, ``reproducibility``. The status comes from the status file beside the report (a report
    without one falls back to its ``Status:`` line); ``alive`` with a dead process reads ``died``.

    Raises:
        OSError: the report cannot be read.
        ValueError: it is not a report (no ``Process ID`` or ``Hyperparameters`` line).
    """
    path = Path(path)
    header: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in path.read_text().splitlines()[:8]):
        header.setdefault(key, value.strip())
    pid, hyper = header.get("Process ID"), header.get("Hyperparameters")
    if pid is None or hyper is None:
        raise ValueError(f"{path} is not a report (no 'Process ID' or 'Hyperparameters' line)")
    try:
        state = json.loads(status_path(path).read_text())
        status, detail, attempt = state["status"], state.get("detail"), state.get("attempt")
        if not isinstance(status, str):
            raise TypeError(f"status {status!r} is not a string")
    except (OSError, json.JSONDecodeError, KeyError, TypeError):  # missing or damaged: the report's own line
        name, _, rest = header.get("Status", "unknown").partition(" (")
        status, detail, attempt = name, rest.rstrip(")") or None, header.get("Attempt")
    if status == "alive" and not process_alive(path.parent, path.name.removesuffix(".txt"), int(pid)):
        status, detail = "died", f"process {pid} is gone without closing its report (killed, out of memory, …)"
    return {"pid": int(pid), "status": status, "status_detail": detail, "H": json.loads(hyper),
            "attempt": attempt if attempt not in (None, "-") else None,
            "run_info": json.loads(header["Run info"]) if "Run info" in header else {},
            "reproducibility": json.loads(header["Reproducibility"]) if "Reproducibility" in header else {}}
