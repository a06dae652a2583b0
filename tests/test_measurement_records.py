"""Review of issue 13: what a Hessian unit's figures say and what its log records mean must match what it measured
(the Gauss-Newton option must not be titled "Hessian"; ``samples`` means training samples in every Hessian unit's log;
two units of one class cannot share a log)."""
import json

import numpy as np
import pytest

import dol1
from src.Buliding_Units.hessian import units as units_module

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "2", "--batch_size", "32",
        "--report_sampling_rate", "1", "--cuda_core", "-1", "--eval_samples", "128",
        "--measurement_rounds", "[0, 1]", "--measurement_sampling_rate", "0"]


def _run(tmp_path, *lines, record_heatmaps=None):
    units = tmp_path / "Units.txt"
    units.write_text("\n".join(lines) + "\n")
    real = units_module.heatmap

    def recording(matrix, path, **kwargs):
        record_heatmaps.append({"matrix": np.array(matrix), "path": str(path), **kwargs})
        return real(matrix, path, **kwargs)

    if record_heatmaps is not None:
        units_module.heatmap = recording
    try:
        return dol1.main(TINY + ["--units_file", str(units), "--output_root", str(tmp_path)])
    finally:
        units_module.heatmap = real


def _log(tmp_path, name, frame):
    path = tmp_path / "measurements" / f"{name}_{frame.run_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("curvature, says, never", [("ggn", "Gauss-Newton", "Hessian"), ("hessian", "Hessian", "Gauss")])
def test_norm_heatmap_title_names_the_measured_matrix(tmp_path, curvature, says, never):
    calls = []
    _run(tmp_path, f"- HessianBlockInteractionMeasurement batch_size=32 curvature={curvature}", record_heatmaps=calls)
    norms = [c for c in calls if "offdiag" in c["path"]]
    assert norms, [c["path"] for c in calls]
    for call in calls:
        text = call["title"] + " " + call["subtitle"] + " " + call["colorbar_label"]
        assert never not in text, text
        assert "H_{ij}" not in text or curvature == "hessian", text
    for call in norms:
        assert says in call["title"], call["title"]


def test_samples_means_training_samples_in_every_hessian_units_log(tmp_path):
    frame = _run(tmp_path, "- HessianSpectrumMeasurement batch_size=16 k=1 trace_probes=4",
                 "- HessianBlockInteractionMeasurement batch_size=16")
    progress = {r["round"]: r["samples"] for r in frame.history if "round" in r}
    for name in ("HessianSpectrumMeasurement", "HessianBlockInteractionMeasurement"):
        records = _log(tmp_path, name, frame)
        assert [r["round"] for r in records] == [0, 1, 2]
        assert [r["samples"] for r in records] == [progress[r] for r in (0, 1, 2)] == [0, 32, 64], name
    assert all(r["batch_samples"] == 16 for r in _log(tmp_path, "HessianSpectrumMeasurement", frame))


def test_two_units_of_one_class_are_refused_before_anything_runs(tmp_path, capsys):
    """Their logs (``<Class>_<run id>.jsonl``) and figures would be one file: the second archived the first's round-0
    record and then both appended to one log, Hessian and Gauss-Newton records interleaved in one coupling figure."""
    units = tmp_path / "Units.txt"
    units.write_text("- HessianBlockInteractionMeasurement\n- Working_memory_usage\n"
                     "- HessianBlockInteractionMeasurement curvature=ggn\n")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--units_file", str(units), "--output_root", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Units.txt:3" in err and "HessianBlockInteractionMeasurement" in err and "line 1" in err, err
    assert not (tmp_path / "reports").exists() and not (tmp_path / "measurements").exists()


@pytest.mark.parametrize("unit", ["HessianBlockInteractionMeasurement", "HessianSpectrumMeasurement"])
def test_an_infinite_tol_is_refused(unit):
    """tol=1e999 (inf) passed 'tol > 0' and flagged every entry converged whatever its error."""
    with pytest.raises(ValueError, match="tol"):
        getattr(units_module, unit)(tol=float("inf"))
