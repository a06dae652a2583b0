"""Schedules and curricula: learning rates step for step with torch.optim.lr_scheduler, K / active_share / gamma by
round, curricula that follow their pacing and draw only from their pool, budgets, the same parameters in the
sequential and the multi-process engine, a resumed run that continues every schedule, and bad schedules as exit 2."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dol1
from src.Buliding_Units.MeasurementUnit import MeasurementUnit
from src.Buliding_Units.ScheduleUnit import pacing_fraction
from src.Data import PoolBatchStream
from src.reporting import read_report

TINY = ["--model", "mlp", "--config", "[8]", "--dataset_name", "digits_flat", "--rounds", "12", "--batch_size", "32",
        "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "1",
        "--checkpoint_every", "0", "--step_size", "0.05"]
SCHEDULERS = {
    "LinearLR": ("start_factor=0.1 total_iters=5", dict(start_factor=0.1, total_iters=5)),
    "StepLR": ("step_size=4 gamma=0.5", dict(step_size=4, gamma=0.5)),
    "CosineAnnealingLR": ("T_max=12", dict(T_max=12)),
    "OneCycleLR": ("max_lr=0.1 total_steps=13", dict(max_lr=0.1, total_steps=13)),
}


def units(tmp_path: Path, *lines: str) -> list[str]:
    path = tmp_path / "Units.txt"
    path.write_text("\n".join(lines) + "\n")
    return ["--units_file", str(path)]


def reference_lrs(name: str, kwargs: dict, rounds: int, base: float) -> list[float]:
    """The learning rate of each round with torch's scheduler stepped once per round on a real optimiser."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, **kwargs)
    lrs = []
    for _ in range(rounds):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("mode", ["entire", "blockwise_sequential"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_learning_rates_follow_torch_schedulers_step_by_step(tmp_path, name, mode):
    text, kwargs = SCHEDULERS[name]
    seen = []
    original = torch.optim.Adam.step

    def spy(self, *args, **kw):  # the learning rate each optimiser step actually used
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kw)
    torch.optim.Adam.step = spy
    try:
        frame = dol1.main(TINY + units(tmp_path, f"- LearningRateSchedule scheduler={name} {text}")
                          + ["--training_mode", mode, "--output_root", str(tmp_path)])
    finally:
        torch.optim.Adam.step = original
    expected = reference_lrs(name, kwargs, 12, 0.05)
    per_round = len(seen) // 12  # entire: 1 step a round; block-wise: one per block
    assert [seen[r * per_round] for r in range(12)] == pytest.approx(expected, rel=1e-12)
    assert all(seen[r * per_round + b] == seen[r * per_round] for r in range(12) for b in range(per_round))
    assert [rec["lr"] for rec in frame.history[1:]] == pytest.approx(expected, rel=1e-12)  # lr of the round just trained


def test_block_lr_scale_and_plateau_driven_by_progress_checks(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- LearningRateSchedule scheduler=ReduceLROnPlateau factor=0.5 patience=0 "
                                             "monitor=loss block_lr_scale=[1.0,0.25]")
                      + ["--training_mode", "blockwise_sequential", "--output_root", str(tmp_path),
                         "--step_size", "2.0", "--optimizer", "sgd"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    expected = []
    for record in frame.history:  # the reference sees the same losses, after each check
        expected.append(optimizer.param_groups[0]["lr"])
        plateau.step(record["loss"])
    assert [r["lr"] for r in frame.history[1:]] == pytest.approx(expected[1:])
    assert all(r["lr_blocks"] == pytest.approx([r["lr"], 0.25 * r["lr"]]) for r in frame.history[1:])
    assert min(r["lr"] for r in frame.history) < 2.0  # the loss at lr 2 does not keep improving


def test_parameter_schedules_change_k_share_and_gamma(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- ParameterSchedule key=K values=[[0,1],[4,3]]",
                                   "- ParameterSchedule key=gamma shape=linear start=1.0 end=0.5",
                                   "- ParameterSchedule key=active_share values=[[6,0.5]]")
                      + ["--training_mode", "blockwise_sequential", "--output_root", str(tmp_path)])
    Ks = [r["K"] for r in frame.history[1:]]
    assert Ks == [1] * 4 + [3] * 8
    assert [r["gamma"] for r in frame.history[1:]] == pytest.approx([1.0 - 0.5 * r / 12 for r in range(12)])
    assert [r["active_share"] for r in frame.history[1:]] == [1.0] * 6 + [0.5] * 6
    blocks = [2] * 6 + [1] * 6  # ceil(0.5 * 2)
    assert frame.steps == sum(k * b for k, b in zip(Ks, blocks)) and frame.samples == 32 * sum(Ks)
    assert frame.batch_cursor == sum(Ks)  # the data order moves by each round's K


def test_curriculum_pool_follows_its_pacing_and_batches_stay_in_the_pool(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- Curriculum score=loss pacing=root start=0.2 full_at=8")
                      + ["--training_mode", "entire", "--output_root", str(tmp_path)])
    n = len(frame.data.train)
    sizes = [r["pool_size"] for r in frame.history[1:]]
    assert sizes == [max(1, math.ceil(pacing_fraction("root", 0.2, 8, r) * n)) for r in range(12)]
    assert sizes[0] == math.ceil(0.2 * n) and sizes[-1] == n

    inputs, targets = frame.data.train.tensors
    pool = frame.pool_order[:100]
    stream = PoolBatchStream(inputs, targets, pool, 32, seed=3)
    pool_rows = {tuple(inputs[i].tolist()) for i in pool.tolist()}
    for t in range(10):
        x, _ = stream[t]
        assert all(tuple(row.tolist()) in pool_rows for row in x)


@pytest.mark.parametrize("pacing", ["linear", "root", "exponential", "step"])
def test_pacing_functions_start_and_end_where_they_should(pacing):
    assert pacing_fraction(pacing, 0.25, 10, 0) == pytest.approx(0.25)
    assert pacing_fraction(pacing, 0.25, 10, 10) == pytest.approx(1.0)
    values = [pacing_fraction(pacing, 0.25, 10, r) for r in range(12)]
    assert values == sorted(values)


def test_anti_curriculum_and_score_file(tmp_path):
    n = 1438  # the training split of digits_flat
    scores = np.arange(n, dtype=np.float64)[::-1].copy()  # sample i has score n - 1 - i: the last is easiest
    np.save(tmp_path / "scores.npy", scores)
    easy = dol1.main(TINY + units(tmp_path, f"- Curriculum score=file score_file={tmp_path / 'scores.npy'}")
                     + ["--output_root", str(tmp_path / "easy")])
    assert easy.pool_order[:3].tolist() == [n - 1, n - 2, n - 3]
    (tmp_path / "anti").mkdir()
    anti = dol1.main(TINY + units(tmp_path / "anti", f"- Curriculum score=file order=anti "
                                                     f"score_file={tmp_path / 'scores.npy'}")
                     + ["--output_root", str(tmp_path / "anti")])
    assert anti.pool_order[:3].tolist() == [0, 1, 2]


def test_budget_stopper_stops_at_the_budget_and_says_which(tmp_path):
    frame = dol1.main(TINY + units(tmp_path, "- BudgetStopper samples=200")
                      + ["--rounds", "100", "--output_root", str(tmp_path)])
    assert frame.samples == 224 and frame.round == 7  # 7 rounds of 32 samples: the first round past 200
    head = read_report(frame.reporter.path)
    assert head["status"] == "stopped" and "samples budget 200" in head["status_detail"]
    assert frame.history[-1]["round"] == 7


@pytest.mark.parametrize("line, fragment", [
    ("- Curriculum pacing=quadratic", "unknown pacing 'quadratic'"),
    ("- Curriculum score=file score_file={wrong}", "needs (1438,)"),
    ("- ParameterSchedule key=K values=[[0,1],[5,-2]]", "K = -2 at round 5"),
    ("- ParameterSchedule key=gamma shape=linear start=1.0 end=1.5", "gamma = 1.04167 at round 1"),
    ("- LearningRateSchedule scheduler=CosineAnealingLR", "unknown scheduler 'CosineAnealingLR'"),
    ("- LearningRateSchedule scheduler=StepLR", "step_size"),
    ("- LearningRateSchedule block_lr_scale=[1.0]", "block_lr_scale needs 2"),
    ("- LearningRateSchedule scheduler=ReduceLROnPlateau monitor=tset_loss", "unknown monitor 'tset_loss'"),
    ("- LearningRateSchedule scheduler=Counter", "unknown scheduler 'Counter'"),
    ("- LearningRateSchedule scheduler=SequentialLR", "unknown scheduler 'SequentialLR'"),
    ("- LearningRateSchedule scheduler=StepLR step_size=2\n- LearningRateSchedule scheduler=ExponentialLR gamma=0.9",
     "two schedules set lr"),
    ("- ParameterSchedule key=K values=[[0,2],[0.7,4]]", "whole rounds"),
    ("- Curriculum score=file score_file={nan}", "non-finite values"),
])
def test_bad_schedules_exit_2_before_training(tmp_path, capsys, line, fragment):
    np.save(tmp_path / "wrong.npy", np.zeros(10))
    np.save(tmp_path / "nan.npy", np.where(np.arange(1438) % 2, np.nan, 1.0))
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path, line.format(wrong=tmp_path / "wrong.npy", nan=tmp_path / "nan.npy"))
                  + ["--training_mode", "blockwise_sequential", "--output_root", str(tmp_path / "out")])
    assert info.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "out" / "reports").exists()


class InterruptAt(MeasurementUnit):
    """Test plugin: asks the run to stop (as SIGTERM would) when it measures at round ``at``."""

    def __init__(self, at: int = 5):
        super().__init__()
        self.at = at

    def measure(self, frame):
        if frame.round == self.at and not getattr(frame, "_resumed", False):
            frame.run.interrupt = 15
        return {}


ALL_SCHEDULES = ("- LearningRateSchedule scheduler=CosineAnnealingLR block_lr_scale=[1.0,0.5]",
                 "- ParameterSchedule key=K values=[[0,1],[3,2]]", "- ParameterSchedule key=gamma shape=cosine "
                 "start=1.0 end=0.6", "- Curriculum score=loss pacing=linear start=0.3 full_at=9 rescore_every=4")


def test_a_resumed_run_continues_every_schedule_at_the_right_point(tmp_path, capsys):
    common = TINY + ["--training_mode", "blockwise_sequential", "--checkpoint_every", "3",
                     "--measurement_sampling_rate", "1"]
    whole = dol1.main(common + units(tmp_path, *ALL_SCHEDULES) + ["--output_root", str(tmp_path / "whole")])
    (tmp_path / "cut").mkdir()
    cut_units = units(tmp_path / "cut", *ALL_SCHEDULES, "- test_schedules.InterruptAt at=5")
    with pytest.raises(SystemExit) as info:
        dol1.main(common + cut_units + ["--output_root", str(tmp_path / "cut")])
    assert info.value.code == 130
    InterruptAt.measure = lambda self, frame: {}  # the resumed attempt is not interrupted again
    resumed = dol1.main(common + cut_units + ["--output_root", str(tmp_path / "cut"), "--resume"])
    assert "Resumed at round 5" in resumed.reporter.path.read_text()
    for key, value in whole.center_model.state_dict().items():
        assert torch.equal(value, resumed.center_model.state_dict()[key]), key
    timing = {"wall_time", "compute_time", "communication_time", "compute_time_share", "train_time", "measure_time",
              "eval_time"}
    strip = [{k: v for k, v in r.items() if k not in timing} for r in whole.history]
    assert strip == [{k: v for k, v in r.items() if k not in timing} for r in resumed.history]


@pytest.mark.slow
def test_schedules_give_the_same_parameters_in_the_multi_process_engine(tmp_path):
    common = TINY + units(tmp_path, *ALL_SCHEDULES) + ["--n_workers", "2"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the spawned ranks run one thread each
    try:
        sequential = dol1.main(common + ["--training_mode", "blockwise_sequential",
                                         "--output_root", str(tmp_path / "seq")])
    finally:
        torch.set_num_threads(before)
    multi = dol1.main(common + ["--training_mode", "blockwise", "--output_root", str(tmp_path / "multi")])
    for key, value in sequential.center_model.state_dict().items():
        assert torch.allclose(value.double(), multi.center_model.state_dict()[key].double(), rtol=0, atol=1e-6), key
    keys = ("lr", "lr_blocks", "K", "gamma", "pool_size", "samples", "steps")
    assert [{k: r[k] for k in keys} for r in sequential.history[1:]] == \
        [{k: r[k] for k in keys} for r in multi.history[1:]]
    assert json.loads(multi.reporter.metrics_path.read_text().splitlines()[-1])["pool_size"] == 1438


def test_training_curve_draws_the_logged_schedule_values(tmp_path):
    from src.plots import scheduled_series
    frame = dol1.main(TINY + units(tmp_path, *ALL_SCHEDULES) + ["--training_mode", "blockwise_sequential",
                                                                 "--output_root", str(tmp_path)])
    series = scheduled_series(frame.history)
    assert set(series) == {"lr", "K", "gamma", "pool_size"}  # active_share never changed
    logged = [json.loads(line) for line in frame.reporter.metrics_path.read_text().splitlines()]
    assert series["K"] == ([r["round"] for r in logged if "K" in r], [r["K"] for r in logged if "K" in r])
    assert (tmp_path / "figures" / f"training_curve_{frame.run_id}.png").stat().st_size > 0


def test_k_schedule_needs_a_block_wise_mode_and_the_first_record_shows_round_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + units(tmp_path, "- ParameterSchedule key=K values=[[0,2]]")
                  + ["--training_mode", "entire", "--output_root", str(tmp_path / "a")])
    assert info.value.code == 2 and "needs a block-wise mode" in capsys.readouterr().err
    frame = dol1.main(TINY + units(tmp_path, "- LearningRateSchedule scheduler=LinearLR start_factor=0.1")
                      + ["--output_root", str(tmp_path / "b")])
    assert frame.history[0]["lr"] == pytest.approx(0.005)  # round 0 trains at 0.1 x 0.05, and its record says so
