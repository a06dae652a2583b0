"""Every study in studies/ runs from its spec, tiny (one seed, a few rounds, overrides on the command line), and
produces its summary: the figure of its quantity, the record table, and the view its question needs."""
import json
from pathlib import Path

import pytest

import master
from sweep_helpers import PROJECT, tracker

STUDIES = PROJECT / "studies"
UNITS = STUDIES / "units"
TINY = {  # study -> command-line overrides that keep its shape but make it tiny
    "coupling": ["--grid", '{"seed": [0]}', "--fixed", '{"rounds": 3}'],
    "async_straggler": ["--grid", '{"max_staleness": [0, -1], "seed": [0]}', "--fixed", '{"rounds": 6}'],
    "memory_communication": ["--grid", '{"n_workers": [1, 2], "K": [1]}', "--fixed",
                             '{"rounds": 2, "measurement_rounds": [2]}', "--zip",
                             '[{"link_latency": 0.01, "link_bandwidth": 1e7, "tag": "slow link"}]'],
    "schedules": ["--grid", json.dumps({"units_file": [str(UNITS / f"{u}.txt") for u in ("none", "cosine",
                                                                                           "curriculum")],
                                        "seed": [0]}), "--fixed", '{"rounds": 6}'],
    "jacobi_gauss_seidel": ["--grid", '{"block_update": ["jacobi", "gauss_seidel"], "seed": [0]}', "--zip",
                            '[{"K": 1, "rounds": 4}, {"K": 2, "rounds": 2}]'],
}


def test_every_study_has_a_tiny_version_and_its_spec_reads():
    assert sorted(p.stem for p in STUDIES.glob("*.json")) == sorted(TINY)
    for name in TINY:
        spec = json.loads((STUDIES / f"{name}.json").read_text())
        assert spec["about"].startswith("Study") and spec["summary"]["y"] and spec["summary"]["x"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_a_study_runs_from_its_spec_and_draws_its_answer(tmp_path, capsys, name):
    spec = json.loads((STUDIES / f"{name}.json").read_text())
    argv = ["--sweep", str(STUDIES / f"{name}.json"), "--tracker", str(tmp_path / "tracker.json"), "--cpu",
            "--cpu_slots", "2", "--poll_interval", "0.1", *TINY[name]]
    fixed = json.loads(argv[argv.index("--fixed") + 1]) if "--fixed" in argv else {}
    argv = [a for a in argv if a not in ("--fixed", json.dumps(fixed))] if fixed else argv
    if name == "coupling":  # the study's measurement on 8 samples, not 64: the same unit, a fraction of the cost
        (tmp_path / "coupling.txt").write_text("- HessianBlockInteractionMeasurement batch_size=8 dtype=float32\n")
        fixed["units_file"] = str(tmp_path / "coupling.txt")
    argv += ["--fixed", json.dumps({**fixed, "output_root": str(tmp_path / "out")})]
    assert master.main(argv) == 0
    out = capsys.readouterr().out
    (sweep_id,) = tracker(tmp_path)["sweeps"]
    figures = tmp_path / "out" / "figures"
    y, xs = spec["summary"]["y"], spec["summary"]["x"]
    for x in xs:
        assert (figures / f"sweep_{sweep_id}_{y}_vs_{x}.png").stat().st_size > 0, x
    assert (figures / f"sweep_records_{sweep_id}.csv").exists() and "Final values" in out
    if name == "memory_communication":
        assert (figures / f"sweep_{sweep_id}_resources.png").stat().st_size > 0
    if "targets" in spec["fixed"]:
        assert "Targets" in out
