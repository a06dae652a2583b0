"""From runs to answers: the record table of a sweep, seed bands, targets, time honestly split, the link model, linked
grids and the figures' defects (no empty axes, readable ticks, legends outside the data)."""
import json
import math
import time
from pathlib import Path

import pytest

import dol1
import master
from figure_helpers import overlapping_tick_labels
from src.plots import X_AXES, pyplot, training_curve
from src.Sweeps import analysis
from src.Sweeps.grid import Run, Spec, load_spec
from sweep_helpers import master_args, tiny, tracker

TINY = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--rounds", "12", "--batch_size", "32",
        "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "3",
        "--checkpoint_every", "0", "--eval_samples", "128"]


def units(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "Units.txt"
    path.write_text(text)
    return ["--units_file", str(path)]


def fake_run(root: Path, run_id: str, H: dict, records: list[dict], measurements: dict[str, list[dict]] = ()) -> Run:
    (root / "reports").mkdir(parents=True, exist_ok=True)
    (root / "reports" / f"{run_id}.metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for unit, lines in dict(measurements).items():
        (root / "measurements").mkdir(exist_ok=True)
        (root / "measurements" / f"{unit}_{run_id}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return Run(run_id, {}, {}, [], H, root / "reports")


def progress(rounds, seed, K=1):
    return [{"round": r, "samples": 100 * r * K, "steps": r, "train_time": 0.5 * r, "loss": 2.0 / (1 + r + seed),
             "test_accuracy": min(1.0, 0.1 * r + 0.01 * seed)} for r in rounds]


def test_load_sweep_is_one_row_per_run_and_record_with_settings_and_measurements(tmp_path):
    runs = [fake_run(tmp_path, f"R{seed}{K}", {"seed": seed, "K": K, "config": [8]}, progress([0, 4, 8], seed, K),
                     {"HessianBlockInteractionMeasurement": [{"round": 6, "coupling_max": 0.2 * (seed + 1),
                                                              "norms": [[1, 2], [2, 1]]}]})
            for seed in (0, 1, 2) for K in (1, 5)]
    frame = analysis.load_sweep(runs)
    assert len(frame) == 6 * 4  # three progress checks and one measurement round each
    assert set(frame["K"]) == {1, 5} and set(frame["config"]) == {"[8]"}  # settings as columns, lists as text
    measured = frame[frame["round"] == 6]
    assert list(measured["coupling_max"].round(6)) == [0.2, 0.2, 0.4, 0.4, 0.6, 0.6] and "norms" not in frame
    assert list(measured["samples"]) == [600, 3000] * 3  # interpolated between the checks at rounds 4 and 8
    assert analysis.varied_keys(frame, ["seed", "K", "config"]) == ["seed", "K"]
    drawn = analysis.curves(frame, "test_accuracy", "samples", ["seed", "K"])
    assert list(drawn) == ["K=1", "K=5"]
    k1 = drawn["K=1"].set_index("round")
    assert k1.loc[8, "y"] == pytest.approx(0.81) and k1.loc[8, "std"] == pytest.approx(0.01)
    assert list(k1["n"]) == [3, 3, 3]
    table = analysis.final_table(frame, ["seed", "K"], ["test_accuracy", "coupling_max"])
    assert list(table["seeds"]) == [3, 3] and table["test_accuracy_mean"].tolist() == pytest.approx([0.81, 0.81])


def test_the_curves_figure_has_bands_a_legend_outside_and_readable_ticks(tmp_path):
    runs = [fake_run(tmp_path, f"R{seed}{K}", {"seed": seed, "K": K},
                     [{**r, "samples": r["samples"] * 1000} for r in progress(range(0, 40, 4), seed, K)])
            for seed in (0, 1) for K in (1, 3)]
    frame = analysis.load_sweep(runs)
    plt = pyplot()
    written = analysis.draw_curves(frame, "loss", "samples", ["seed", "K"], tmp_path / "c")
    assert [p.suffix for p in written] == [".pdf", ".png"]
    fig = plt.figure()  # redraw in memory to read the axes
    ax = fig.add_subplot()
    for label, stats in analysis.curves(frame, "loss", "samples", ["seed", "K"]).items():
        ax.plot(stats["x"], stats["y"], label=label)
    assert overlapping_tick_labels(fig) == []
    plt.close(fig)


def test_training_curves_have_no_empty_panel_and_no_colliding_ticks(tmp_path):
    plt = pyplot()
    base = [{"round": r, "samples": 10000 + 1000 * r, "train_time": 0.1 * r, "loss": 1 / (r + 1),
             "accuracy": 0.05 * r, "test_loss": 1 / (r + 1), "test_accuracy": 0.05 * r} for r in range(12)]
    for extra in ({"pool_size": lambda r: 100 + r}, {"lr": lambda r: math.cos(r / 12)}, {"K": lambda r: 1 + r // 6}):
        (key, f), = extra.items()
        history = [{**h, key: f(h["round"])} for h in base]
        drawn = {}
        real_save = plt.Figure.savefig

        def keep(fig, *args, **kwargs):
            drawn["fig"] = fig
            return real_save(fig, *args, **kwargs)
        plt.Figure.savefig = keep
        try:
            training_curve(history, tmp_path / key, x="samples")
        finally:
            plt.Figure.savefig = real_save
        fig = drawn["fig"]
        assert all(ax.lines for ax in fig.axes), key  # every panel drawn has data
        assert len(fig.axes) == 5 and overlapping_tick_labels(fig) == [], key


def test_train_time_leaves_out_measurement_time_and_wall_time_keeps_it(tmp_path):
    dol1.main(TINY + ["--rounds", "3", "--output_root", str(tmp_path / "warm")])  # first-call costs out of the way
    measured = ["--measurement_sampling_rate", "0", "--measurement_rounds", "[3, 6]"]
    plain = dol1.main(TINY + units(tmp_path, "# none\n") + measured + ["--output_root", str(tmp_path / "a")])
    slow = dol1.main(TINY + units(tmp_path, "- tests.engine_plugins.SlowUnit seconds=3.0\n") + measured
                     + ["--output_root", str(tmp_path / "b")])
    a, b = plain.history[-1], slow.history[-1]
    assert b["measure_time"] >= 2 * 3.0 and a["measure_time"] < 0.1  # rounds 3 and 6, before the last record
    assert all(r["wall_time"] >= r["train_time"] + r["measure_time"] for r in slow.history)
    # the unit moved the wall clock by its 6 s; the training clock moved by timing noise only
    assert abs(b["train_time"] - a["train_time"]) < (b["wall_time"] - a["wall_time"]) / 2
    assert "train_time" in X_AXES


def test_targets_record_the_first_check_that_reached_them(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "# none\n") + ["--rounds", "30", "--step_size", "0.01", "--targets",
                                                             "{'test_accuracy': 0.5, 'loss': 0.1, 'accuracy': 0.2}",
                                                             "--output_root", str(tmp_path)])
    met = frame.history[-1]["targets_met"]
    first = next(r for r in frame.history if r["test_accuracy"] >= 0.5)
    assert met["test_accuracy"]["round"] == first["round"] and met["test_accuracy"]["samples"] == first["samples"]
    assert "loss" not in met  # not reached in 30 rounds of a tiny MLP
    assert met["accuracy"]["round"] <= met["test_accuracy"]["round"]
    assert f"Target test_accuracy >= 0.5 reached at round {first['round']}" in frame.reporter.path.read_text()


@pytest.mark.parametrize("bad", ["{'test_accuracy': 1.5}", "{'nope': 0.1}", "[0.9]", "{'loss': float('nan')}"])
def test_bad_targets_are_refused(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--targets", bad, "--output_root", str(tmp_path)])
    assert info.value.code == 2 and "--targets" in capsys.readouterr().err


def test_targets_table_counts_the_seeds_that_reached_each_target(tmp_path):
    def run(seed, reached):
        met = {"test_accuracy": {"target": 0.9, "value": 0.95, "round": 10 + seed, "samples": 1000 + seed,
                                 "steps": 10, "train_time": 1.0, "wall_time": 2.0}} if reached else {}
        return fake_run(tmp_path, f"R{seed}", {"seed": seed, "targets": {"test_accuracy": 0.9}},
                        [{"round": 20, "loss": 1.0, "targets_met": met}])
    frame = analysis.load_sweep([run(0, True), run(1, True), run(2, False)])
    (row,) = analysis.targets_table(frame, ["seed"]).to_dict("records")
    assert row["reached"] == "2/3" and row["samples_mean"] == 1000.5 and row["round_std"] == pytest.approx(0.7071, 1e-3)


def test_targets_table_reads_virtual_time_where_runs_record_it_and_counts_the_others(tmp_path):
    base = {"target": 0.9, "value": 0.95, "round": 10, "samples": 1000, "steps": 10, "train_time": 1.0,
            "wall_time": 2.0}
    runs = [fake_run(tmp_path, f"R{seed}", {"seed": seed, "targets": {"test_accuracy": 0.9}},
                     [{"round": 20, "loss": 1.0, "targets_met": {"test_accuracy": {**base, **extra}}}])
            for seed, extra in enumerate([{"virtual_time": 3.0}, {"virtual_time": 5.0}, {}])]
    (row,) = analysis.targets_table(analysis.load_sweep(runs), ["seed"]).to_dict("records")
    assert row["reached"] == "3/3" and row["virtual_time_mean"] == 4.0  # over the two runs that record it


def test_an_async_simulator_target_records_its_virtual_time(tmp_path):
    frame = dol1.main(TINY + ["--training_mode", "async_sequential", "--rounds", "6", "--targets",
                              "{'accuracy': 0.05}", "--output_root", str(tmp_path)])
    met = frame.history[-1]["targets_met"]["accuracy"]
    first = next(r for r in frame.history if r["accuracy"] >= 0.05)
    assert met["virtual_time"] == first["virtual_time"] and met["round"] == first["round"]


def test_the_link_model_charges_latency_plus_bytes_over_bandwidth_per_message_exactly_in_the_simulator(tmp_path):
    argv = ["--training_mode", "async_sequential", "--step_time", "0.01", "--link_latency", "0.003",
            "--link_bandwidth", "1e6", "--rounds", "5", "--report_sampling_rate", "5"]
    frame = dol1.main(TINY + argv + ["--output_root", str(tmp_path)])
    last = frame.history[-1]
    centre = sum(p.numel() * p.element_size() for p in frame.center_model.parameters())
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in frame.center_model.blocks]
    pushes = last["worker_updates"]  # one message back per update written; one out per update read
    reads = [m - p for m, p in zip(last["worker_messages"], pushes)]
    expected = sum(reads[w] * (0.003 + centre / 1e6) + pushes[w] * (0.003 + blocks[w] / 1e6)
                   for w in range(len(blocks)))
    assert last["link_time"] == pytest.approx(expected, rel=1e-12)
    assert last["messages"] == sum(last["worker_messages"]) and last["bytes_sent"] == sum(last["worker_bytes"])
    # one worker per block, unbounded staleness: worker 0's updates follow each other without waiting, each taking
    # exactly K · step_time of compute plus its two messages
    w0 = 1 * 0.01 + 0.003 + centre / 1e6 + 0.003 + blocks[0] / 1e6  # K = 1
    assert last["virtual_time"] >= pushes[0] * w0 - 1e-12


def test_sequential_block_updates_sleep_and_count_the_link_time(tmp_path):
    frame = dol1.main(TINY + ["--rounds", "4", "--report_sampling_rate", "4", "--link_latency", "0.02",
                              "--output_root", str(tmp_path)])
    last = frame.history[-1]
    assert last["messages"] == 4 * frame.n_blocks and last["link_time"] == pytest.approx(4 * frame.n_blocks * 0.02)
    assert last["communication_time"] >= last["link_time"] and last["train_time"] >= last["link_time"]


def test_communication_delay_is_the_deprecated_name_of_the_latency(tmp_path, capsys):
    a = dol1.main(TINY + ["--rounds", "2", "--communication_delay", "0.01", "--output_root", str(tmp_path / "a")])
    assert a.history[-1]["link_time"] == pytest.approx(2 * a.n_blocks * 0.01)
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--communication_delay", "0.01", "--link_latency", "0.01", "--output_root", str(tmp_path)])
    assert info.value.code == 2 and "--link_latency" in capsys.readouterr().err


def test_linked_grids_cross_their_blocks_with_the_grid(tmp_path, capsys):
    spec = load_spec('{"seed": [0, 1]}', '{"rounds": 3}', None,
                     '[{"model": "mlp", "config": [8], "dataset_name": "digits_flat"},'
                     ' {"model": "cnn", "config": [4], "dataset_name": "digits"}]')
    assert isinstance(spec, Spec) and len(spec.points()) == 4
    assert spec.varied == {"seed": [0, 1], "model": ["mlp", "cnn"], "config": [[8], [4]],
                           "dataset_name": ["digits_flat", "digits"]}
    fixed = {k: v for k, v in tiny(tmp_path / "out").items() if k not in ("model", "config")}
    master.main(master_args(tmp_path, {"seed": [0, 1]}, fixed, "--dry_run", "--zip",
                            json.dumps([{"model": "mlp", "config": [8]}, {"model": "mlp", "config": [16]}])))
    assert "4 runs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        master.main(master_args(tmp_path, {"model": ["mlp"]}, tiny(tmp_path / "out"), "--zip",
                                json.dumps([{"model": "mlp"}, {"model": "cnn"}])))
    assert info.value.code == 2


@pytest.mark.slow
def test_summarize_draws_seed_bands_and_a_targets_table_for_a_2x3_sweep(tmp_path, capsys):
    fixed = tiny(tmp_path / "out", rounds=30, targets={"test_accuracy": 0.6}, report_sampling_rate=3)
    assert master.main(master_args(tmp_path, {"K": [1, 2], "seed": [0, 1, 2]}, fixed)) == 0
    capsys.readouterr()
    assert master.main(["--summarize", str(tmp_path / "tracker.json"), "--y", "test_accuracy", "--x", "samples"]) == 0
    out = capsys.readouterr().out
    assert "Targets" in out and "/3" in out and "Final values" in out
    (sweep_id,) = tracker(tmp_path)["sweeps"]
    figures = tmp_path / "out" / "figures"
    assert (figures / f"sweep_{sweep_id}_test_accuracy_vs_samples.png").stat().st_size > 0
    records = (figures / f"sweep_records_{sweep_id}.csv").read_text().splitlines()
    assert len(records) == 1 + 6 * 11  # one row per run and progress check
    for entry in tracker(tmp_path)["runs"].values():
        assert entry["status"] == "done"
    with pytest.raises(SystemExit) as info:
        master.main(["--summarize", str(tmp_path / "tracker.json"), "--y", "no_such_field"])
    assert info.value.code == 2 and "test_accuracy" in capsys.readouterr().err


@pytest.mark.slow
def test_a_measurement_field_is_the_y_of_a_sweep_figure(tmp_path, capsys):
    units_file = tmp_path / "u.txt"
    units_file.write_text("- HessianBlockInteractionMeasurement batch_size=32 dtype=float32\n")
    fixed = tiny(tmp_path / "out", rounds=6, measurement_rounds=[0, 3, 6], units_file=str(units_file))
    assert master.main(master_args(tmp_path, {"seed": [0, 1]}, fixed, "--y", "coupling_max", "--x", "round")) == 0
    (sweep_id,) = tracker(tmp_path)["sweeps"]
    assert (tmp_path / "out" / "figures" / f"sweep_{sweep_id}_coupling_max_vs_round.png").stat().st_size > 0
    frame = analysis.load_sweep(tmp_path / "tracker.json")
    assert frame["coupling_max"].notna().sum() == 2 * 3


@pytest.mark.slow
def test_the_multi_process_engine_sleeps_the_link_time_within_timing_noise(tmp_path):
    common = TINY + ["--training_mode", "blockwise", "--n_workers", "2", "--rounds", "6", "--report_sampling_rate",
                     "6", "--config", "[8, 8]"]
    quiet = dol1.main(common + ["--output_root", str(tmp_path / "a")])
    slow = dol1.main(common + ["--link_latency", "0.05", "--link_bandwidth", "1e7", "--output_root",
                               str(tmp_path / "b")])
    a, b = quiet.history[-1], slow.history[-1]
    assert b["messages"] == a["messages"] == 6 * 2 and b["bytes_sent"] == a["bytes_sent"]
    expected = 6 * 2 * 0.05 + b["bytes_sent"] / 1e7  # two owners broadcast per round; bytes = payload × 1 receiver
    assert b["link_time"] == pytest.approx(expected, rel=1e-9)
    extra = b["communication_time"] - a["communication_time"]
    assert expected * 0.9 <= extra <= expected + 0.5


@pytest.mark.slow
def test_the_real_asynchronous_engine_applies_the_link_model(tmp_path):
    common = TINY + ["--training_mode", "async", "--n_workers", "2", "--rounds", "6", "--report_sampling_rate", "6",
                     "--config", "[8, 8]"]
    quiet = dol1.main(common + ["--output_root", str(tmp_path / "a")])
    slow = dol1.main(common + ["--link_latency", "0.05", "--output_root", str(tmp_path / "b")])
    a, b = quiet.history[-1], slow.history[-1]
    updates = sum(b["worker_updates"]) + b["updates_in_flight"]
    assert b["link_time"] >= 2 * 0.05 * sum(b["worker_updates"])  # two messages per update, each 0.05 s
    # slept by the workers, two at a time at most: at least 0.05 s of wall time per update, less the two runs' own
    # timing noise (a quarter of the bound; without the sleep the difference would be about 0)
    assert b["wall_time"] - a["wall_time"] >= 0.75 * 0.05 * updates
