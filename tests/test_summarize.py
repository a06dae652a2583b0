"""``master.py --summarize TRACKER``: a finished tiny sweep's table, CSVs and figure rebuilt from its tracker alone,
and the refusals (missing, invalid or empty tracker; sweep flags given with it)."""
import csv
import json
import shutil
from pathlib import Path

import pytest

import master

GRID = {"seed": [0, 1]}


def fixed(out: Path) -> dict:
    return {"model": "mlp", "config": [16], "dataset_name": "digits_flat", "rounds": 6, "report_sampling_rate": 3,
            "measurement_sampling_rate": 0, "batch_size": 64, "eval_samples": 256, "output_root": str(out),
            "checkpoint_every": 0}


@pytest.mark.slow
def test_summarize_rebuilds_a_finished_sweep_without_running_anything(tmp_path, capsys):
    out, tracker = tmp_path / "out", tmp_path / "tracker.json"
    argv = ["--grid", json.dumps(GRID), "--fixed", json.dumps(fixed(out)), "--tracker", str(tracker), "--cpu",
            "--cpu_slots", "2", "--poll_interval", "0.1"]
    assert master.main(argv) == 0
    first = capsys.readouterr().out
    data = json.loads(tracker.read_text())
    (sweep_id, _), = data["sweeps"].items()
    made = sorted(p.name for p in (out / "figures").glob("sweep*"))
    assert made == sorted([f"sweep_summary_{sweep_id}.md", f"sweep_summary_{sweep_id}.csv",
                           f"sweep_seeds_{sweep_id}.csv", f"sweep_{sweep_id}.pdf", f"sweep_{sweep_id}.png",
                           f"sweep_records_{sweep_id}.csv", f"sweep_{sweep_id}_loss_vs_samples.pdf",
                           f"sweep_{sweep_id}_loss_vs_samples.png"])
    expected = {name: (out / "figures" / name).read_text() for name in made if not name.endswith(("pdf", "png"))}
    shutil.rmtree(out / "figures")
    reports = sorted(p.stat().st_mtime_ns for p in (out / "reports").iterdir())

    assert master.main(["--summarize", str(tracker)]) == 0
    again = capsys.readouterr().out
    assert sorted(p.name for p in (out / "figures").glob("sweep*")) == made
    assert {name: (out / "figures" / name).read_text() for name in expected} == expected  # the same files
    assert sorted(p.stat().st_mtime_ns for p in (out / "reports").iterdir()) == reports  # nothing ran
    assert json.loads(tracker.read_text()) == data
    assert again.split("summary:")[0] == first[first.index("| run"):].split("summary:")[0]
    with open(out / "figures" / f"sweep_summary_{sweep_id}.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    for rid, entry in data["runs"].items():
        last = json.loads(Path(entry["report"]).with_suffix(".metrics.jsonl").read_text().splitlines()[-1])
        assert int(rows[rid]["forward_sample_passes"]) == last["forward_sample_passes"] == 6 * 2 * 64
        assert float(rows[rid]["loss"]) == last["loss"] and rows[rid]["status"] == "done"
    with open(out / "figures" / f"sweep_seeds_{sweep_id}.csv") as f:
        (row,) = list(csv.DictReader(f))
    losses = [float(rows[rid]["loss"]) for rid in rows]
    assert row["n"] == "2" and float(row["loss_mean"]) == pytest.approx(sum(losses) / 2, rel=1e-12)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, needle", [
    (lambda d: str(d / "missing.json"), "no such tracker file"),
    (lambda d: write(d / "t.json", "{not json"), "is unreadable"),
    (lambda d: write(d / "t.json", '{"format": 1, "runs": {}, "sweeps": {}}'), "holds no sweep"),
    (lambda d: write(d / "t.json", json.dumps({"format": 1, "runs": {}, "sweeps": {
        "S1": {"grid": {}, "fixed": {}, "runs": ["R1"]}}})), "no entry for: ['R1']"),
])
def test_summarize_refuses_a_missing_or_invalid_tracker(tmp_path, capsys, make, needle):
    with pytest.raises(SystemExit) as info:
        master.main(["--summarize", make(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and needle in err and err.count("\n") == 1
    assert not list(tmp_path.glob("**/figures"))


def test_summarize_refuses_sweep_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        master.main(["--summarize", str(tmp_path / "t.json"), "--grid", '{"K": [1]}'])
    assert info.value.code == 2 and "drop --grid" in capsys.readouterr().err
