"""What the sweep tests (tests/test_master.py, tests/test_submitit_sweeps.py) share: a tiny run's settings, the
master's arguments, the tracker, and a patient wait.

``from sweep_helpers import ...`` (pytest puts tests/ on sys.path).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]  # where master.py is


def tiny(out: Path, **extra) -> dict:
    """Fixed settings of a run that trains for a fraction of a second (start-up dominates)."""
    return {"model": "mlp", "config": [16], "dataset_name": "digits_flat", "rounds": 20, "report_sampling_rate": 5,
            "measurement_sampling_rate": 0, "batch_size": 64, "eval_samples": 256, "output_root": str(out), **extra}


def master_args(tmp_path: Path, grid: dict, fixed: dict, *more: str) -> list[str]:
    """master.py's command line for a CPU sweep of ``grid`` over ``fixed`` on 2 slots, tracked in tmp_path."""
    return ["--grid", json.dumps(grid), "--fixed", json.dumps(fixed), "--tracker", str(tmp_path / "tracker.json"),
            "--cpu", "--cpu_slots", "2", "--poll_interval", "0.1", *more]


def tracker(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "tracker.json").read_text())


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; a file being written (OSError, half-written JSON, missing key or entry) counts
    as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, json.JSONDecodeError, KeyError, IndexError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_master(tmp_path: Path, argv: list[str]) -> subprocess.Popen:
    """master.py in its own process (to be killed by the test), its output in tmp_path/master.log."""
    with open(tmp_path / "master.log", "w") as log:
        return subprocess.Popen([sys.executable, str(PROJECT / "master.py"), *argv], stdout=log,
                                stderr=subprocess.STDOUT)
