"""Hardening: every bad input is one clear line and exit status 2 before anything is written; faults never leave a
report that lies; plugins cannot name arbitrary callables; the rendezvous stays on loopback; memory does not grow
with K. One table per entry point, then one test per fault."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import dol1
import master
from src.Data.batching import TensorBatchStream
from src.Optimizer_Engines import loop
from src.reporting import read_report

PROJECT = Path(dol1.__file__).resolve().parent
TINY = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--rounds", "6", "--batch_size", "32",
        "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "2",
        "--checkpoint_every", "0"]
PLUGIN_MODULES = {
    "syntax_error_plugin": "def broken(:\n",
    "raising_plugin": ("from src.Buliding_Units.MeasurementUnit import MeasurementUnit\n\n\n"
                       "class Raises(MeasurementUnit):\n    def __init__(self):\n"
                       "        raise RuntimeError('constructor fails on purpose')\n\n"
                       "    def measure(self, frame):\n        return {}\n"),
}


def write_units(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "Units.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# case -> (extra argv, or a function of tmp_path returning it; message fragments)
DOL1_CASES = {
    "negative momentum": (["--momentum", "-1"], ["--momentum", "-1"]),
    "negative seed with subsets": (["--seed", "-1", "--active_share", "0.5"], ["--seed", "-1"]),
    "huge seed": (["--seed", "100000000000000000000"], ["--seed", "100000000000000000000"]),
    "infinite step size": (["--step_size", "1e999"], ["--step_size", "inf", "finite"]),
    "infinite delay": (["--communication_delay", "1e999"], ["--communication_delay", "finite"]),
    "infinite gamma": (["--gamma", "1e999"], ["--gamma", "finite"]),
    "infinite target": (["--target_value", "-1e999"], ["--target_value", "finite"]),
    "model too big": (["--config", "[10000000000]"], ["--config", "parameters", "GiB"]),
    "conv model, flat data": (["--model", "cnn", "--config", "[4]"], ["--model cnn", "--dataset_name digits_flat"]),
    "staleness below -1": (["--training_mode", "async", "--max_staleness", "-2"], ["--max_staleness", ">= -1"]),
    "speeds of the wrong length": (["--training_mode", "async_sequential", "--worker_speeds", "[1, 4, 1]"],
                                   ["--worker_speeds [1, 4, 1]", "3 entries", "2 workers"]),
    "non-positive speed": (["--training_mode", "async", "--worker_speeds", "[1, 0]"], ["--worker_speeds", "> 0"]),
    "async with gauss_seidel": (["--training_mode", "async", "--block_update", "gauss_seidel"],
                                ["--block_update gauss_seidel", "async", "jacobi"]),
    "async with block subsets": (["--training_mode", "async_sequential", "--active_share", "0.5"],
                                 ["--active_share 0.5", "every block"]),
    "lone dash": (lambda t: ["--units_file", write_units(t, "-\n")], ["Units.txt:1", "must name a plugin"]),
    "non-UTF-8 units": (lambda t: ["--units_file", write_units(t, b"- Working\xff\xfe\n")], ["UTF-8"]),
    "plugin module syntax error": (lambda t: ["--units_file", write_units(t, "- syntax_error_plugin.X\n")],
                                   ["cannot import plugin", "SyntaxError"]),
    "plugin constructor raises": (lambda t: ["--units_file", write_units(t, "- raising_plugin.Raises\n")],
                                  ["rejected its arguments", "constructor fails on purpose"]),
    "not a plugin class": (lambda t: ["--units_file", write_units(t, "- os.system command=ls\n")],
                           ["'os.system' is not a plugin", "MeasurementUnit"]),
    "unparsable argument": (lambda t: ["--units_file", write_units(t, "- HessianBlockInteractionMeasurement tol=abc\n")],
                            ["tol='abc'", "'abc' is not a number"]),
    "output root is a file": (lambda t: ["--output_root", str(t / "plain_file" / "out")], ["is a file"]),
    "units file is a folder": (lambda t: ["--units_file", str(t)], ["is not a file"]),
    "unknown flag": (["--bogus", "1"], ["--bogus"]),
    "bool for an int": (["--rounds", "True"], ["--rounds", "int"]),
    "nested literal": (["--rounds=" + "-" * 5000 + "1"], ["--rounds"]),
    "bool target": (["--target_value", "True"], ["--target_value", "True"]),
    "cuda core below -1": (["--cuda_core", "-5"], ["--cuda_core", "-5"]),
    "monitor typo while off": (["--early_stop_monitor", "bogus"], ["--early_stop_monitor", "bogus", "test_loss"]),
    "delay beyond an hour": (["--communication_delay", "1e300"], ["--communication_delay", "3600"]),
    "en dash in units": (lambda t: ["--units_file", write_units(t, "\u2013 Working_memory_usage\n")],
                         ["Units.txt:1", "plugin lines start with '-'"]),
    "duplicate plugin argument": (lambda t: ["--units_file", write_units(
        t, "- HessianBlockInteractionMeasurement tol=1e-3 tol=0.5\n")], ["'tol'", "given twice"]),
    "settings file of wrong types": (lambda t: ["--settings_file", write_settings(t, {"rounds": 2.5})],
                                     ["--settings_file", "rounds", "2.5", "int"]),
    "settings file not UTF-8": (lambda t: ["--settings_file", write_units(t, b"\xff\xfe{}")], ["cannot read"]),
    "settings file is a folder": (lambda t: ["--settings_file", str(t)], ["is not a file"]),
}


def write_settings(tmp_path: Path, settings: dict) -> str:
    path = tmp_path / "R00000000.config.json"
    path.write_text(json.dumps({"settings": {**{k: v for k, v in dol1.DEFAULTS.items()}, **settings}}))
    return str(path)


@pytest.mark.parametrize("case", sorted(DOL1_CASES))
def test_dol1_bad_input_exits_2_with_one_line(tmp_path, capsys, monkeypatch, case):
    extra, fragments = DOL1_CASES[case]
    (tmp_path / "plain_file").write_text("not a folder")
    for name, source in PLUGIN_MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = TINY + ["--output_root", str(out)] + (extra(tmp_path) if callable(extra) else extra)
    with pytest.raises(SystemExit) as info:
        dol1.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dol1.py: error"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (out / "reports").exists()


MASTER_CASES = {
    "poll interval nan": (["--poll_interval", "nan"], "--poll_interval"),
    "poll interval huge": (["--poll_interval", "1e300"], "--poll_interval"),
    "grace nan": (["--grace", "nan"], "--grace"),
    "grace infinite": (["--grace", "inf"], "--grace"),
    "tracker under a file": (["--tracker", "/dev/null/t.json"], "does not exist or is a file"),
    "tracker is a folder": (["--tracker", "{tmp}"], "is not a file"),
    "damaged tracker entry": (["--tracker", "{tmp}/bad.json"], "is damaged"),
    "sweep file grid not an object": (["--sweep", "{tmp}/sweep.json"], "'grid' must be a JSON object"),
    "NUL in a grid value": (["--grid", '{"tag": ["ok", "a\\u0000b"]}'], "NUL character"),
    "unknown plugin in a run": (["--fixed", '{"units_file": "{tmp}/Units.txt"}'], "unknown plugin 'NoSuchUnit'"),
    "unknown flag": (["--gird", "x"], "--gird"),
}


@pytest.mark.parametrize("case", sorted(MASTER_CASES))
def test_master_bad_input_exits_2(tmp_path, capsys, case):
    extra, fragment = MASTER_CASES[case]
    (tmp_path / "bad.json").write_text(json.dumps({"runs": {"R8ebd9a77": 5}, "sweeps": {}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"grid": [1, 2]}))
    (tmp_path / "Units.txt").write_text("- NoSuchUnit\n")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    base = ["--tracker", str(tmp_path / "t.json")] + ([] if "--sweep" in extra else ["--grid", '{"step_size": [0.1]}'])
    with pytest.raises(SystemExit) as info:
        master.main(base + extra + (["--grid", '{"step_size": [0.1]}'] if "--sweep" in extra else []))
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "t.json").exists()


def test_master_help_and_flag_errors_answer_without_torch(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch must not be imported')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    for argv, code in ((["--help"], 0), (["--gird", "x"], 2), (["--cpu_slots", "0"], 2)):
        done = subprocess.run([sys.executable, str(PROJECT / "master.py"), *argv], capture_output=True, text=True,
                              env=env, timeout=60)
        assert done.returncode == code and "torch must not" not in done.stderr, (argv, done.stderr)


def test_units_file_with_a_byte_order_mark_is_read(tmp_path):
    units = write_units(tmp_path, "\ufeff- Working_memory_usage\n".encode("utf-8"))
    frame = dol1.main(TINY + ["--output_root", str(tmp_path / "out"), "--units_file", units,
                              "--measurement_sampling_rate", "6"])
    assert [type(u).__name__ for u in frame.measure_units] == ["Working_memory_usage"]


def test_read_only_output_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import src.reporting as runs
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only folder stops only non-root users
        out.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:  # root writes anywhere: simulate the read-only disk at the one place the check writes
        monkeypatch.setattr(runs.tempfile, "TemporaryFile",
                            lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(out)])
    assert info.value.code == 2 and "Permission denied" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_help_and_misspelled_flags_answer_without_torch(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch must not be imported for --help')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    helped = subprocess.run([sys.executable, str(PROJECT / "dol1.py"), "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert helped.returncode == 0 and "blockwise_sequential" in helped.stdout and "--checkpoint_every" in helped.stdout
    typo = subprocess.run([sys.executable, str(PROJECT / "dol1.py"), "--round", "3"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert typo.returncode == 2 and "--round" in typo.stderr and "torch must not" not in typo.stderr


# --- faults that must not leave a lie ---------------------------------------------------------------------------
def test_status_is_written_before_the_traceback_on_a_full_disk(tmp_path, monkeypatch):
    import src.reporting as reporting

    def full(self, message):
        if message.startswith("Failed"):
            raise OSError(28, "No space left on device")
        with open(self.path, "a") as f:
            f.write(message + "\n")
    monkeypatch.setattr(reporting.Reporter, "log", full)
    monkeypatch.setattr(dol1, "_finish_files", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        dol1.main(TINY + ["--output_root", str(tmp_path)])
    head = read_report(next((tmp_path / "reports").glob("R*.txt")))
    assert head["status"] == "failed" and "No space left" in head["status_detail"]


def test_unwritable_figure_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(dol1, "training_curve",
                        lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    frame = dol1.main(TINY + ["--output_root", str(tmp_path)])
    head = read_report(frame.reporter.path)
    assert head["status"] == "finished"
    assert "Warning: the training curve could not be written" in frame.reporter.path.read_text()


def test_alive_with_a_dead_process_reads_died(tmp_path):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path)])
    path = frame.reporter.path
    state = json.loads(frame.reporter.status_path.read_text())
    frame.reporter.status_path.write_text(json.dumps({**state, "status": "alive"}))  # as after a SIGKILL
    head = read_report(path)
    assert head["status"] == "died" and f"process {state['pid']}" in head["status_detail"]


def test_diverged_run_has_its_own_status_skips_measurements_and_writes_strict_json(tmp_path, capsys):
    units = write_units(tmp_path, "- Working_memory_usage\n")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--step_size", "1e30", "--optimizer", "sgd",
                              "--rounds", "30", "--units_file", units, "--measurement_sampling_rate", "1"])
    assert read_report(frame.reporter.path)["status"] == "diverged"
    assert "Measurements skipped" in frame.reporter.path.read_text()
    log = tmp_path / "measurements" / f"Working_memory_usage_{frame.run_id}.jsonl"
    assert not log.exists() or all(json.loads(line)["round"] < frame.round for line in log.read_text().splitlines())

    def refuse(constant):
        raise ValueError(f"strict JSON has no {constant}")
    records = [json.loads(line, parse_constant=refuse) for line in frame.reporter.metrics_path.read_text().splitlines()]
    assert records[-1]["loss"] is None and "loss" in records[-1]  # NaN written as null, the name kept


def test_cpu_fallback_is_quiet_at_the_default_and_one_line_for_a_typed_gpu(tmp_path, capsys):
    argv = [a for a in TINY if a not in ("--cuda_core", "-1")]
    dol1.main(argv + ["--output_root", str(tmp_path / "a")])
    assert "warning" not in capsys.readouterr().err.lower()
    if torch.cuda.device_count() <= 3:
        dol1.main(argv + ["--output_root", str(tmp_path / "b"), "--cuda_core", "3"])
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert warnings == [f"dol1.py: warning: --cuda_core 3: no such GPU ({torch.cuda.device_count()} visible); "
                            f"running on the CPU"]


def test_rerun_archives_figures_with_the_report(tmp_path):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path)])
    dol1.main(TINY + ["--output_root", str(tmp_path)])
    figures = tmp_path / "figures"
    assert (figures / f"training_curve_{frame.run_id}.1.pdf").exists()
    assert (figures / f"training_curve_{frame.run_id}.pdf").exists()
    assert (tmp_path / "reports" / f"{frame.run_id}.1.txt").exists()


def test_run_info_has_the_effective_batch_size_and_no_units_that_never_run(tmp_path):
    units = write_units(tmp_path, "- Working_memory_usage\n")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--batch_size", "0", "--units_file", units])
    info = read_report(frame.reporter.path)["run_info"]
    assert info["batch_size"] == frame.train_batches.batch_size and info["batch_size"] > 0
    assert not any("Working_memory_usage" in p for p in info["plugins"]) and "measurement_sampling_rate" in \
        info["not_run"]


def test_hessian_measurement_does_not_leak_torchs_jit_warning(tmp_path, recwarn):
    units = write_units(tmp_path, "- HessianBlockInteractionMeasurement batch_size=16\n")
    dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units, "--measurement_sampling_rate", "6"])
    assert not [w for w in recwarn if "jit" in str(w.message)]


def test_missing_dataset_message_offers_nothing_that_does_not_exist(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--dataset_name", "cifar10", "--model", "cnn", "--config", "[4]", "--data_root",
                          str(tmp_path), "--output_root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "cifar10" in err and "'digits'" in err and "download=" not in err.split("e.g.")[0]


# --- resources and security -------------------------------------------------------------------------------------
def test_round_batches_are_fetched_when_used_and_memory_is_capped(monkeypatch):
    x, y = torch.randn(64, 4), torch.arange(64) % 3
    stream = TensorBatchStream(x, y, batch_size=8, seed=0)
    fetched = []
    original = TensorBatchStream.__getitem__

    def counting(self, t):
        fetched.append(t)
        return original(self, t)
    monkeypatch.setattr(TensorBatchStream, "__getitem__", counting)
    monkeypatch.setattr(loop, "ROUND_CACHE_BYTES", 3 * (8 * 4 * 4 + 8 * 8))  # room for three batches
    batches = loop.RoundBatches(stream, start=2 * 10**9, K=10**9)  # a huge K costs nothing up front
    assert len(batches) == 10**9 and fetched == [] and batches.samples == 8 * 10**9
    for t in range(5):
        assert torch.equal(batches[t][0], original(stream, 2 * 10**9 + t)[0])
    assert batches._cached_bytes <= loop.ROUND_CACHE_BYTES and len(batches._cache) == 3
    fetched.clear()
    [batches[t] for t in range(5)]  # a second block of the round: three from the cache, two fetched again
    assert fetched == [2 * 10**9 + 3, 2 * 10**9 + 4]


@pytest.mark.slow
def test_spawned_rendezvous_listens_on_loopback_only(tmp_path):
    argv = TINY + ["--training_mode", "blockwise", "--n_workers", "2", "--rounds", "100000", "--report_sampling_rate",
                   "50", "--output_root", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(PROJECT / "dol1.py"), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len((tmp_path / "reports").glob("*.metrics.jsonl").__iter__()
                                                  .__next__().read_text().splitlines() if (tmp_path / "reports").exists()
                                                  and list((tmp_path / "reports").glob("*.metrics.jsonl")) else []) < 2:
            time.sleep(0.2)
        pids = {proc.pid} | {int(p.parent.name) for p in Path("/proc").glob("[0-9]*/stat")
                             if p.read_text().split(") ")[-1].split()[3] == str(proc.pid)}
        inodes = set()
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").glob("*"):
                try:
                    match = re.match(r"socket:\[(\d+)\]", os.readlink(fd))
                except OSError:
                    continue
                if match:
                    inodes.add(match.group(1))
        listening = [line.split()[1] for table in ("/proc/net/tcp", "/proc/net/tcp6")
                     for line in Path(table).read_text().splitlines()[1:]
                     if line.split()[3] == "0A" and line.split()[9] in inodes]
        assert len(pids) >= 2 and listening  # gloo's pair sockets
        loopback = ("0100007F:", "00000000000000000000000001000000:")  # 127.0.0.1, ::1
        assert all(address.startswith(loopback) for address in listening), listening
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
