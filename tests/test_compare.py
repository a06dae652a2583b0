"""Comparisons at equal compute: the training curve's x-axis, the sweep's best step size at an equal budget, the
grid-edge warning, mean ± std over seeds and the summary files. Hand-made metrics files; no runs."""
import csv
import json
import math
import statistics

import pytest

import dol1
import master
from src import Sweeps as sweep
from src.plots import X_AXES, curve_panels, scheduled_series, training_curve
from src.Sweeps import compare

HISTORY = [{"round": r, "steps": 3 * r, "samples": 32 * r, "forward_sample_passes": 96 * r, "wall_time": 0.5 * r,
            "train_time": 0.375 * r,
            "virtual_time": 0.25 * r,  # only the simulator's records have it
            "loss": 2.0 / (r + 1), "test_loss": 2.1 / (r + 1), "accuracy": r / 10, "test_accuracy": r / 11,
            "lr": 0.01 if r < 2 else 0.001} for r in range(4)]


@pytest.mark.parametrize("x", sorted(X_AXES))
def test_curve_panels_plot_the_logged_values_against_the_chosen_axis(x):
    panels = curve_panels(HISTORY, x)
    right = "round" if x == "train_time" else "train_time"  # the training time, measurement left out
    assert [(p["metric"], p["x"]) for p in panels] == [("loss", x), ("loss", right), ("accuracy", x),
                                                       ("accuracy", right)]
    for panel in panels:
        for label, (xs, ys) in panel["series"].items():
            key = ("test_" if label.startswith("test") else "") + panel["metric"]
            assert xs == [h[panel["x"]] for h in HISTORY] and ys == [h[key] for h in HISTORY]
    assert scheduled_series(HISTORY, x)["lr"] == ([h[x] for h in HISTORY], [h["lr"] for h in HISTORY])


def test_curve_panels_default_to_samples_and_skip_records_without_the_axis():
    old = [{k: v for k, v in h.items() if k != "forward_sample_passes"} for h in HISTORY[:2]] + HISTORY[2:]
    assert curve_panels(HISTORY)[0]["x"] == "samples"
    xs, _ = curve_panels(old, "forward_sample_passes")[0]["series"]["train loss"]
    assert xs == [96 * 2, 96 * 3]


def test_an_unknown_axis_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'epochs' is not valid; valid: \['forward_sample_passes', 'round'"):
        training_curve(HISTORY, tmp_path / "c", x="epochs")
    assert [p.suffix for p in training_curve(HISTORY, tmp_path / "c", x="steps")] == [".pdf", ".png"]


def test_plot_x_is_checked_by_dol1_and_master_and_is_not_part_of_the_run_id(capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(["--plot_x", "epochs", "--rounds", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--plot_x 'epochs' is not valid" in err and "'wall_time'" in err
    with pytest.raises(SystemExit) as info:
        master.main(["--summarize", "x.json", "--plot_x", "epochs"])
    assert info.value.code == 2 and "invalid choice: 'epochs'" in capsys.readouterr().err
    ids = {dol1.run_identity(dol1.resolve_config(["--plot_x", x])) for x in X_AXES}
    assert len(ids) == 1


def make_run(tmp_path, rid, grid_values, records):
    run = sweep.Run(rid, dict(grid_values), dict(grid_values), [], {"rounds": len(records)}, tmp_path)
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def curve(K, losses, batch=32):
    """Records every round of a block-wise run with K local steps (samples = round · K · batch)."""
    return [{"round": r, "samples": r * K * batch, "steps": 2 * r * K, "loss": v, "test_loss": v}
            for r, v in enumerate(losses)]


def test_best_step_size_is_chosen_at_the_equal_budget_not_at_the_end(tmp_path):
    """K = 4 rounds draw 4x the samples of K = 1 rounds: compared at the K = 1 runs' final budget (96 samples), the
    K = 4 winner is the step size that was best by then, not the one with the lowest final loss."""
    grid = {"step_size": [0.1, 0.01, 0.001], "K": [1, 4]}
    k4 = [[2.0, 1.0, 0.8], [2.0, 1.3, 0.1], [2.0, float("nan")]]  # losses at 0, 64 and 512 samples
    runs = [make_run(tmp_path, "A", {"step_size": 0.1, "K": 1}, curve(1, [2.0, 1.5, 1.2, 1.1])),
            make_run(tmp_path, "B", {"step_size": 0.01, "K": 1}, curve(1, [2.0, 1.4, 1.0, 0.9])),
            make_run(tmp_path, "C", {"step_size": 0.001, "K": 1}, curve(1, [2.0, 1.9, 1.8, 1.7]))] + [
        make_run(tmp_path, rid, {"step_size": s, "K": 4}, [{"round": r, "samples": n, "loss": v}
                                                           for r, (n, v) in enumerate(zip((0, 64, 512), losses))])
        for rid, s, losses in zip("DEF", grid["step_size"], k4)]
    curves = sweep.summary.load_curves(runs)
    assert compare.equal_budget(curves, "samples") == (96, "A")  # F diverged (null loss): it sets no budget
    choices = compare.best_step_sizes(runs, grid, curves, "samples", 96)
    d_at_96 = 1.0 + (0.8 - 1.0) * (96 - 64) / (512 - 64)  # interpolated between D's checks at 64 and 512 samples
    assert [(c.label, c.value, c.score, c.at_edge) for c in choices] == [("K=1", 0.01, 0.9, False),
                                                                          ("K=4", 0.1, d_at_96, True)]
    assert compare.loss_at_budget(curves["E"], "samples", 96) == pytest.approx(1.3 - 1.2 * 32 / 448, rel=1e-15)
    assert compare.loss_at_budget(curves["F"], "samples", 32) == math.inf  # the check after is NaN
    # by the final loss, E (0.1 after 512 samples) would have won K=4
    assert [c.value for c in compare.best_step_sizes(runs, grid, curves, "samples", None)] == [0.01, 0.01]
    shown = master.figure_curves(runs, grid)
    assert [label for label, _ in shown] == ["K=1, best step_size=0.01 (loss 0.9 at 96 training samples)",
                                             "K=4, best step_size=0.1 (loss 0.986 at 96 training samples) [grid edge]"]
    assert shown[1][1] == [(0, 2.0), (64, 1.0), (512, 0.8)]  # the data behind the figure: D's logged losses
    # on the round axis the budget is 2 rounds (D and E), where E leads K=4 and B leads K=1
    by_round = master.figure_curves(runs, grid, "round")
    assert [label for label, _ in by_round] == ["K=1, best step_size=0.01 (loss 1 at round 2)",
                                                "K=4, best step_size=0.01 (loss 0.1 at round 2)"]
    assert by_round[0][1] == [(0, 2.0), (1, 1.4), (2, 1.0), (3, 0.9)]
    written = master.sweep_figure(runs, grid, tmp_path / "figures" / "sweep", "sweep S0", "steps")
    assert [p.suffix for p in written] == [".pdf", ".png"] and all(p.stat().st_size > 0 for p in written)


@pytest.mark.parametrize("losses, warned", [
    ({0.1: 1.0, 0.01: 0.5, 0.001: 0.8}, None),  # best inside the grid: no warning
    ({0.1: 0.2, 0.01: 0.5, 0.001: 0.8}, "largest"),
    ({0.1: 1.0, 0.01: 0.5, 0.001: 0.3}, "smallest"),
    ({0.1: float("nan"), 0.01: 0.5, 0.001: 0.8}, None),  # a diverged edge is not the best
])
def test_grid_edge_warning_appears_exactly_when_the_best_is_at_an_edge(tmp_path, losses, warned):
    grid = {"step_size": [0.1, 0.01, 0.001]}
    runs = [make_run(tmp_path, f"R{i}", {"step_size": s}, curve(1, [2.0, v]))
            for i, (s, v) in enumerate(losses.items())]
    entries = {r.run_id: {"status": "done", "attempts": 1, "rounds_done": 1, "rounds_total": 1} for r in runs}
    summary = sweep.write_summary(runs, entries, grid, {}, "S0", tmp_path)
    text = summary.markdown.read_text()
    if warned is None:
        assert summary.warnings == [] and "warning" not in summary.text and "warning" not in text
    else:
        (line,) = summary.warnings
        assert f"is the {warned} of the grid" in line and line in summary.text and line in text


def test_mean_and_std_over_seeds_from_hand_made_metric_files(tmp_path):
    grid = {"step_size": [0.1, 0.01], "seed": [0, 1, 2]}
    finals = {(0.1, 0): 1.0, (0.1, 1): 2.0, (0.1, 2): 4.0, (0.01, 0): 0.5, (0.01, 1): 0.7, (0.01, 2): None}
    runs = [make_run(tmp_path, f"R{s}_{seed}", {"step_size": s, "seed": seed},
                     [{"round": 0, "samples": 0, "steps": 0, "loss": 3.0, "test_loss": 3.0},
                      {"round": 2, "samples": 64, "steps": 2, "forward_sample_passes": 64, "loss": v,
                       "test_loss": 10 * v if v else None}])
            for (s, seed), v in finals.items()]
    entries = {r.run_id: {"status": "done", "attempts": 1, "rounds_done": 2, "rounds_total": 2} for r in runs}
    summary = sweep.write_summary(runs, entries, grid, {"rounds": 2}, "S1", tmp_path)
    with open(summary.seeds_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(r["step_size"], r["n"], r["seeds"], r["loss_n"]) for r in rows] == [("0.1", "3", "0 1 2", "3"),
                                                                                 ("0.01", "3", "0 1 2", "2")]
    mean, std = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert float(rows[0]["loss_mean"]) == pytest.approx(mean, rel=1e-15)
    assert float(rows[0]["loss_std"]) == pytest.approx(std, rel=1e-15)
    assert float(rows[0]["test_loss_mean"]) == pytest.approx(10 * mean, rel=1e-15)
    assert float(rows[1]["loss_mean"]) == pytest.approx(0.6) and float(rows[1]["loss_std"]) == pytest.approx(
        statistics.stdev([0.5, 0.7]))
    assert f"{mean:.4g} ± {std:.2g}" in summary.text and "0.6 ± 0.14 (n=2)" in summary.text
    # the best step size compares setting means; the diverged seed makes 0.01's mean infinite
    assert "- all runs: step_size=0.1, loss 2.333" in summary.text
    with open(summary.csv) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {"run", "step_size", "seed", "status", "steps", "samples",
                                "forward_sample_passes", "loss"} <= set(table[0])
    assert [float(r["loss"]) if r["loss"] else None for r in table] == list(finals.values())


def test_a_setting_with_one_seed_has_no_deviation():
    assert compare.mean_std([2.0]) == (2.0, None)
    assert compare.mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))


def test_mean_curve_averages_seeds_check_by_check():
    a = [{"samples": 0, "loss": 2.0}, {"samples": 64, "loss": 1.0}, {"samples": 128, "loss": 0.5}]
    b = [{"samples": 0, "loss": 4.0}, {"samples": 64, "loss": 2.0}]
    assert compare.mean_curve([a, b], "samples") == [(0, 3.0), (64, 1.5)]


def test_a_run_with_no_progress_check_inside_the_budget_is_named(tmp_path):
    grid = {"step_size": [0.1, 0.01], "K": [1, 8]}
    runs = [make_run(tmp_path, "Fine", {"step_size": 0.1, "K": 1}, curve(1, [2.0, 1.0, 0.5])),
            make_run(tmp_path, "Also", {"step_size": 0.01, "K": 1}, curve(1, [2.0, 1.5, 1.0])),
            make_run(tmp_path, "Coarse", {"step_size": 0.1, "K": 8}, curve(8, [2.0, 0.2]))]  # checks at 0 and 256
    entries = {r.run_id: {"status": "done", "attempts": 1, "rounds_done": 1, "rounds_total": 1} for r in runs}
    summary = sweep.write_summary(runs, entries, grid, {}, "S2", tmp_path)
    assert "budget of 64 training samples" in summary.text
    assert any(w.startswith("warning: Coarse logged no progress check") for w in summary.warnings)
    assert not any("Fine" in w or "Also" in w for w in summary.warnings)
    assert "- K=8: step_size=0.1, loss 1.55" in summary.text  # 2.0 + (0.2 - 2.0) * 64 / 256


def test_groups_follow_the_grid_order_not_the_text_order(tmp_path):
    grid = {"step_size": [0.1, 0.01], "K": [5, 10, 1]}
    runs = [make_run(tmp_path, f"R{K}_{s}", {"step_size": s, "K": K}, curve(K, [2.0, 1.0 if s == 0.1 else 1.5]))
            for K in grid["K"] for s in grid["step_size"]]
    curves = sweep.summary.load_curves(runs)
    choices = compare.best_step_sizes(runs, grid, curves, "round", 1)
    assert [c.label for c in choices] == ["K=5", "K=10", "K=1"] and {c.value for c in choices} == {0.1}
