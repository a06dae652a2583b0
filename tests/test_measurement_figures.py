"""Measurement figures: honest heat-maps (fixed [0, 1] coupling scale, masked diagonal, values above 1 flagged, one
log range for a run's norms, conditions in the subtitle) and the coupling over training, whose plotted series must
equal the logged ones (the data behind the figure is tested, not pixels)."""
import json
import math

import numpy as np
import pytest

import dol1
from src.Buliding_Units.hessian import units as units_module
from src.Buliding_Units.hessian import figures as hfig
from src.Buliding_Units.MeasurementUnit import HessianBlockInteractionMeasurement
from src.Buliding_Units.hessian.figures import OVER_COLOUR, draw_heatmap, heatmap_values
from src.plots import pyplot

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "32",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--eval_samples", "128",
        "--measurement_rounds", "[0, 1, 3]", "--measurement_sampling_rate", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run measured at rounds 0, 1, 3 and 4, with every heat-map call recorded."""
    root = tmp_path_factory.mktemp("figures")
    units = root / "Units.txt"
    units.write_text("- HessianBlockInteractionMeasurement batch_size=32 dtype=float64 tol=1e-3\n")
    calls, real = [], units_module.heatmap

    def recording(matrix, path, **kwargs):
        calls.append({"matrix": np.array(matrix), "path": str(path), **kwargs})
        return real(matrix, path, **kwargs)

    units_module.heatmap = recording
    try:
        frame = dol1.main(TINY + ["--units_file", str(units), "--output_root", str(root)])
    finally:
        units_module.heatmap = real
    log = root / "measurements" / f"HessianBlockInteractionMeasurement_{frame.run_id}.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return frame, records, calls, root


def test_coupling_heatmap_values_are_on_a_fixed_scale_with_the_diagonal_masked():
    coupling = np.array([[1.0, 0.3, 1.4], [0.3, 1.0, np.nan], [1.4, np.nan, 1.0]])
    shown, low, high = heatmap_values(coupling, "coupling", mask_diagonal=True)
    assert (low, high) == (0.0, 1.0)
    assert shown.mask.tolist() == [[True, False, False], [False, True, True], [False, True, True]]
    assert shown[0, 2] == 1.4  # above 1 keeps its value (drawn in the over colour)
    fig = draw_heatmap(coupling, scale="coupling", mask_diagonal=True, subtitle="conditions")
    image = fig.axes[0].images[0]
    assert image.get_clim() == (0.0, 1.0)
    assert np.allclose(image.cmap.get_over(), pyplot().matplotlib.colors.to_rgba(OVER_COLOUR))
    assert image.get_array().mask[1, 1] and "conditions" in fig.axes[0].get_title()
    pyplot().close(fig)


def test_log_scale_uses_the_given_range_and_masks_non_positive_values():
    shown, low, high = heatmap_values([[2.0, 0.0], [0.0, 4.0]], "log", value_range=(1e-3, 10.0))
    assert (low, high) == (1e-3, 10.0) and shown.mask.tolist() == [[False, True], [True, False]]
    assert heatmap_values([[2.0, 0.0], [0.0, 4.0]], "log")[1:] == (2.0, 4.0)
    with pytest.raises(ValueError, match="valid: \\['linear', 'log', 'coupling'\\]"):
        heatmap_values([[1.0]], "sqrt")


def test_every_coupling_heatmap_of_a_run_is_fixed_and_masked(run):
    frame, records, calls, _ = run
    coupling_calls = [c for c in calls if "coupling" in c["path"]]
    assert len(coupling_calls) == len(records) == 4
    for call in coupling_calls:
        assert call["scale"] == "coupling" and call["mask_diagonal"] and call["value_range"] is None
        bound = "lower bounds (Krylov)" in call["subtitle"]
        assert bound or call["subtitle"].startswith("exact")
        for words in ("32 samples", "eval mode", "float64", "round ") + (("tol 0.001",) if bound else ()):
            assert words in call["subtitle"], call["subtitle"]


def test_norm_heatmaps_share_one_log_range_over_the_run(run):
    frame, records, calls, _ = run
    positive = [v for r in records for row in r["norms"] for v in row if v > 0]
    expected = [min(positive), max(positive)]
    unit = frame.measure_units[0]
    assert unit.norm_range == pytest.approx(expected, rel=1e-12)
    assert unit.state_dict()["norm_range"] == unit.norm_range  # a resume keeps the range
    last = {}
    for call in calls:
        if "offdiag" in call["path"]:
            assert call["scale"] == "log" and not call["mask_diagonal"]
            last[call["path"]] = call["value_range"]
    assert len(last) == 4  # every norm heat-map of the run was last drawn on the final range
    for value_range in last.values():
        assert value_range == pytest.approx(expected, rel=1e-12)
    restored = HessianBlockInteractionMeasurement()
    restored.load_state_dict({**unit.state_dict(), "log_name": None}, frame)
    assert restored.norm_range == unit.norm_range


def test_coupling_summary_by_hand():
    nan = math.nan
    summary = hfig.coupling_summary([[1.0, 0.2, 0.5], [0.2, 1.0, 1.3], [0.5, 1.3, 1.0]])
    assert summary["coupling_max"] == 1.3
    assert summary["coupling_mean"] == pytest.approx((0.2 + 0.5 + 1.3) / 3, abs=0)
    assert summary["top_pairs"] == [[1, 2, 1.3], [0, 2, 0.5], [0, 1, 0.2]]
    assert hfig.coupling_summary([[1.0, nan], [nan, 1.0]]) == {"coupling_max": None, "coupling_mean": None,
                                                              "top_pairs": []}
    assert hfig.coupling_summary([[1.0, None, 0.4], [None, 1.0, 0.1], [0.4, 0.1, 1.0]])["coupling_mean"] == 0.25


def test_coupling_over_training_plots_the_logged_series(run):
    frame, records, _, root = run
    folder = root / "figures" / "Measurements" / "Hessian_Measurement" / frame.run_id
    for suffix in (".pdf", ".png"):
        assert (folder / f"coupling_over_training{suffix}").stat().st_size > 0
    data = hfig.coupling_over_training(records, frame.history)
    assert data["rounds"] == [r["round"] for r in records] == [0, 1, 3, 4]
    assert data["samples"] == [r["samples"] for r in records] == [0, 32, 96, 128]  # K = 1, batch 32
    off = [[r["coupling"][i][j] for i in range(3) for j in range(i + 1, 3)] for r in records]
    assert data["max"] == [r["coupling_max"] for r in records] == [max(o) for o in off]
    assert data["mean"] == [r["coupling_mean"] for r in records]
    assert data["mean"] == pytest.approx([sum(o) / 3 for o in off], rel=1e-15)
    assert len(data["pairs"]) == 3 and all(
        data["pairs"][f"{i}-{j}"] == [r["coupling"][i][j] for r in records] for i, j in ((0, 1), (0, 2), (1, 2)))
    assert records[-1]["top_pairs"][0][2] == records[-1]["coupling_max"]
    assert data["loss"] == ([h["round"] for h in frame.history], [h["samples"] for h in frame.history],
                            [h["loss"] for h in frame.history])
    assert data["deviation"][2] == [h["deviation"] for h in frame.history]


def test_top_pairs_are_the_largest_at_any_measurement():
    records = [{"round": 0, "samples": 0, "coupling": [[1, 0.9, 0.1, 0.1], [0.9, 1, 0.1, 0.1], [0.1, 0.1, 1, 0.2],
                                                       [0.1, 0.1, 0.2, 1]]},
               {"round": 5, "samples": 50, "coupling": [[1, 0.1, 0.1, 0.1], [0.1, 1, 0.1, 0.8], [0.1, 0.1, 1, 0.3],
                                                        [0.1, 0.8, 0.3, 1]]}]
    again = {**records[1], "round": 5, "samples": None, "measure_only": True, "coupling": [[1, 0.95], [0.95, 1]]}
    data = hfig.coupling_over_training(records + [again], [], top=2)  # a --measure_only record is not training
    assert list(data["pairs"]) == ["0-1", "1-3"] and data["pairs"]["1-3"] == [0.1, 0.8]
    assert data["rounds"] == [0, 5] and data["samples"] == [0, 50]
    assert data["loss"] == ([], [], [])


def test_conditions_say_exact_or_lower_bound():
    config = {"tol": 0.01, "batch_size": 64, "mode": "eval", "dtype": "float32"}
    assert hfig.conditions({"lower_bound": True}, config, 7) == \
        "lower bounds (Krylov), tol 0.01, 64 samples, eval mode, float32, round 7"
    assert hfig.conditions({"lower_bound": False, "method": "dense"}, config, 0).startswith("exact (dense), 64")
    assert hfig.conditions({"method": "finite_difference"}, config, 2).startswith("finite differences")
