"""Asynchronous block updates: the bookkeeping, the exact simulator (async_sequential) and the real engine (async).

Exact references: s = 0 must equal the synchronous Jacobi engine bit for bit; the simulator must follow a schedule
computed by hand and an independent brute-force reference of the stale-synchronous rule.
"""

import pytest
import torch

import dol1
from src.Buliding_Units.Model_frames import generate_ModelFrame
from src.Optimizer_Engines import resolve_engine
from src.Optimizer_Engines.parallel.async_book import StalenessBook, assign_blocks, check_speeds, staleness_limit
from src.Optimizer_Engines.parallel.async_sim import Simulator

TINY = ["--model", "mlp", "--config", "[16, 12, 8]", "--dataset_name", "digits_flat", "--batch_size", "32",
        "--measurement_sampling_rate", "0", "--cuda_core", "-1", "--report_sampling_rate", "2", "--rounds", "6",
        "--K", "2", "--gamma", "0.7"]
BN_CNN = ["--model", "cnn", "--config", "[4, 4]", "--dataset_name", "digits", "--batch_size", "32",
          "--measurement_sampling_rate", "0", "--cuda_core", "-1", "--report_sampling_rate", "2", "--rounds", "5",
          "--K", "2", "--gamma", "0.6", "--optimizer", "sgd", "--step_size", "0.05"]


def frame_for(*argv, units=()):
    return generate_ModelFrame(dol1.resolve_config(list(argv)), units=units)


def train(*argv, units=()):
    frame = frame_for(*argv, units=units)
    for unit in frame.schedule_units:
        unit.prepare(frame)
    return resolve_engine(frame.H["training_mode"]).function(frame)


def assert_bit_identical(a, b):
    sa, sb = a.center_model.state_dict(), b.center_model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert [r["deviation"] for r in a.history] == [r["deviation"] for r in b.history]
    assert (a.round, a.steps, a.samples) == (b.round, b.steps, b.samples)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------------
# Bookkeeping (pure)
# --------------------------------------------------------------------------------------------------------------------
def test_bound_zero_lets_nobody_run_ahead():
    book = StalenessBook(3, 0, [[0], [1], [2]])
    for w in range(3):
        book.on_read(w)
    book.on_write(0)
    assert not book.may_start(0)  # the others have not finished their first update
    book.on_write(1)
    book.on_write(2)
    assert [book.may_start(w) for w in range(3)] == [True] * 3
    assert book.record()["staleness_histogram"] == [1, 1, 1]  # 0, 1 and 2 other updates landed meanwhile


def test_unbounded_book_and_limits():
    book = StalenessBook(2, -1, [[0, 2], [1]])
    for _ in range(5):
        book.on_read(0)
        book.on_write(0)
    assert book.may_start(0) and book.done == [5, 0] and book.block_updates == 10
    assert book.record()["updates_per_block"] == [5, 0, 5]
    assert staleness_limit(-1, 4) is None and staleness_limit(0, 4) == 3 and staleness_limit(2, 3) == 10
    with pytest.raises(RuntimeError):
        book.on_write(1)  # nothing in flight: a write without a read is a bug, not a silent count


def test_assign_and_speeds():
    assert assign_blocks(5, 0) == [[0], [1], [2], [3], [4]] and assign_blocks(5, 2) == [[0, 2, 4], [1, 3]]
    assert check_speeds([], 3) == [1.0, 1.0, 1.0] and check_speeds([1, 4], 2) == [1.0, 4.0]
    for bad in ([1, 2], [1, 0, 1], [1, -2, 1], [1, float("nan"), 1], "fast"):
        with pytest.raises(ValueError, match="worker_speeds"):
            check_speeds(bad, 3)


# --------------------------------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------------------------------
def traced(frame):
    """Run the simulator engine on ``frame`` and return its writes as (virtual time, worker, staleness)."""
    trace = []
    original = Simulator._write

    def write(self, w, K):
        original(self, w, K)
        trace.append((float(self.clock), w, self.book.writes - 1 - self.book.read_at_last))

    def on_write_tracking(book, w, _orig=StalenessBook.on_write):
        book.read_at_last = book.read_at[w]
        return _orig(book, w)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Simulator, "_write", write)
        mp.setattr(StalenessBook, "on_write", on_write_tracking)
        resolve_engine("async_sequential").function(frame)
    return trace


def test_simulator_follows_the_hand_computed_schedule():
    """3 blocks, speeds [1, 2, 3], step_time 1, K 1, link latency 0.0625 per message (two per update: the centre
    out, the blocks back): durations 1.125, 2.125, 3.125 (no ties)."""
    frame = frame_for(*TINY[:-6], "--K", "1", "--rounds", "3", "--config", "[8, 8]", "--training_mode",
                      "async_sequential", "--worker_speeds", "[1, 2, 3]", "--step_time", "1",
                      "--link_latency", "0.0625")
    trace = traced(frame)
    # unbounded: worker 0 writes at 1.125, 2.25, 3.375, 4.5, 5.625; worker 1 at 2.125, 4.25; worker 2 at 3.125, 6.25
    assert [(t, w) for t, w, _ in trace] == [(1.125, 0), (2.125, 1), (2.25, 0), (3.125, 2), (3.375, 0), (4.25, 1),
                                             (4.5, 0), (5.625, 0), (6.25, 2)]
    assert [s for _, _, s in trace] == [0, 1, 1, 3, 1, 3, 1, 0, 4]  # other writes between each read and write
    record = frame.history[-1]
    assert record["updates_per_block"] == [5, 2, 2] and record["virtual_time"] == 6.25
    assert record["staleness_histogram"] == [2, 4, 0, 2, 1] and record["staleness_max"] == 4


def reference_schedule(speeds, bound, delay, writes):
    """An independent brute-force reference of the stale-synchronous rule (no ties in its inputs)."""
    n, done, busy, now, out, read_count = len(speeds), [0] * len(speeds), {}, 0.0, [], {}
    total = 0
    while len(out) < writes:
        for w in range(n):
            others = [done[v] for v in range(n) if v != w]
            if w not in busy and (bound < 0 or done[w] - min(others) <= bound):
                busy[w], read_count[w] = now + speeds[w] + delay, total
        w = min(busy, key=busy.get)
        now = busy.pop(w)
        out.append((now, w, total - read_count[w]))
        total += 1
        done[w] += 1
    return out


@pytest.mark.parametrize("bound", [0, 1, 2, -1])
def test_simulator_matches_a_brute_force_reference_and_respects_the_bound(bound):
    speeds = [1, 2.5, 4.25]
    frame = frame_for(*TINY[:-6], "--K", "1", "--rounds", "6", "--config", "[8, 8]", "--training_mode",
                      "async_sequential", "--worker_speeds", str(speeds), "--step_time", "1",
                      "--link_latency", "0.03125", "--max_staleness", str(bound))
    trace = traced(frame)
    expected = reference_schedule(speeds, bound, 2 * 0.03125, 18)  # two messages per update
    assert [(w, s) for _, w, s in trace] == [(w, s) for _, w, s in expected]
    assert [t for t, _, _ in trace] == pytest.approx([t for t, _, _ in expected])
    record = frame.history[-1]
    limit = staleness_limit(bound, 3)
    assert limit is None or record["staleness_max"] <= limit
    assert bound < 0 or record["clock_gap_max"] <= bound
    assert sum(record["updates_per_block"]) == record["block_updates"] == 18  # nothing lost, nothing counted twice


@pytest.mark.parametrize("argv", [TINY, BN_CNN], ids=["mlp", "batchnorm_cnn"])
def test_simulator_with_bound_zero_is_jacobi_bit_for_bit(argv):
    jacobi = train(*argv, "--training_mode", "blockwise_sequential")
    simulated = train(*argv, "--training_mode", "async_sequential", "--max_staleness", "0",
                      "--worker_speeds", "[1, 3, 2]" if argv is BN_CNN else "[1, 3, 1, 2]")
    assert any("running_var" in k for k in simulated.center_model.state_dict()) == (argv is BN_CNN)
    assert_bit_identical(jacobi, simulated)


def test_simulator_with_a_learning_rate_schedule_is_jacobi_bit_for_bit(tmp_path):
    from src.Buliding_Units.plugins import parse_units
    text = "- LearningRateSchedule scheduler=StepLR step_size=2 gamma=0.5\n"
    jacobi = train(*TINY, "--training_mode", "blockwise_sequential", units=parse_units(text, "test"))
    simulated = train(*TINY, "--training_mode", "async_sequential", "--max_staleness", "0",
                      units=parse_units(text, "test"))
    assert [r["lr"] for r in simulated.history] != [0.01] * len(simulated.history)
    assert_bit_identical(jacobi, simulated)


def test_simulator_is_deterministic_with_ties_and_differs_from_synchronous():
    argv = [*TINY, "--training_mode", "async_sequential", "--step_time", "1", "--worker_speeds", "[1, 1, 2, 1]"]
    a, b = train(*argv), train(*argv)
    assert_bit_identical(a, b)
    assert a.history[-1]["worker_updates"] == b.history[-1]["worker_updates"]
    sync = train(*TINY, "--training_mode", "async_sequential", "--max_staleness", "0", "--step_time", "1")
    assert a.history[-1]["loss"] != sync.history[-1]["loss"]
    assert a.history[-1]["staleness_max"] > sync.history[-1]["staleness_max"]


def test_simulator_resumes_exactly_after_an_interrupt(tmp_path):
    """Stopped (as SIGTERM would) at round 5 with updates in flight, then resumed: the uninterrupted run, exactly."""
    import json

    from tests_helpers_interrupt import install
    argv = [*TINY, "--training_mode", "async_sequential", "--step_time", "1", "--worker_speeds", "[1, 2, 1, 3]",
            "--rounds", "9", "--checkpoint_every", "4", "--report_sampling_rate", "1", "--max_staleness", "2"]
    whole = dol1.main([*argv, "--output_root", str(tmp_path / "whole")])
    with install(5):
        with pytest.raises(SystemExit) as info:
            dol1.main([*argv, "--output_root", str(tmp_path / "cut")])
    assert info.value.code == 130
    resumed = dol1.main([*argv, "--output_root", str(tmp_path / "cut"), "--resume"])
    assert resumed.round == whole.round == 9

    def history(root):
        (path,) = (root / "reports").glob("R*.metrics.jsonl")
        wall = {"wall_time", "compute_time", "communication_time", "compute_time_share", "train_time", "measure_time",
                "eval_time"}
        return [{k: v for k, v in json.loads(line).items() if k not in wall} for line in path.read_text().splitlines()]
    cut = history(tmp_path / "cut")
    assert cut == history(tmp_path / "whole") and cut[5]["updates_in_flight"] > 0
    assert cut[-1]["virtual_time"] > 0
    figure = tmp_path / "whole" / "figures" / f"staleness_{whole.run_id}.png"
    assert figure.stat().st_size > 0 and f"Staleness histogram: {figure.with_suffix('.pdf')}" in \
        whole.reporter.path.read_text()


def test_simulator_schedule_is_independent_of_the_time_unit():
    """Virtual time is exact: rescaling step_time (no delay) changes no tie and so no trajectory."""
    argv = [*TINY[:-6], "--config", "[16]", "--rounds", "12", "--K", "1", "--training_mode", "async_sequential",
            "--worker_speeds", "[1, 3]"]
    a = train(*argv, "--step_time", "0.008459776330097977")
    b = train(*argv, "--step_time", "0.0078125")
    assert a.history[-1]["staleness_histogram"] == b.history[-1]["staleness_histogram"]
    assert all(torch.equal(x, y) for x, y in zip(a.center_model.state_dict().values(),
                                                   b.center_model.state_dict().values()))


def test_grouped_workers_with_a_random_model_are_jacobi_bit_for_bit():
    """Workers owning several blocks compute them in block order at a synchronous read, as Jacobi does, so a model
    that draws random numbers in training still matches."""
    argv = ["--model", "feedforward_ensemble", "--config", "[[16], [8, 8]]", "--voting_method", "random",
            "--dataset_name", "digits_flat", "--batch_size", "32", "--measurement_sampling_rate", "0",
            "--cuda_core", "-1", "--report_sampling_rate", "2", "--rounds", "4", "--K", "2"]
    jacobi = train(*argv, "--training_mode", "blockwise_sequential")
    simulated = train(*argv, "--training_mode", "async_sequential", "--max_staleness", "0", "--n_workers", "2")
    assert_bit_identical(jacobi, simulated)


def test_n_workers_enters_the_id_of_multi_worker_runs_only():
    """n_workers changes what the multi-worker engines measure (time and memory per worker): a sweep over it must
    give distinct runs there; elsewhere it is unused and leaves the id alone. The asynchronous keys enter only the
    asynchronous ids."""
    from src.records import experiment_id
    base = dol1.resolve_config(TINY + ["--training_mode", "async_sequential"])
    assert experiment_id({**base, "n_workers": 2}, "") != experiment_id(base, "")
    sync = dol1.resolve_config(TINY + ["--training_mode", "blockwise"])
    assert experiment_id({**sync, "n_workers": 2}, "") != experiment_id(sync, "")
    assert experiment_id({**sync, "max_staleness": 3, "worker_speeds": [1, 9]}, "") == experiment_id(sync, "")
    single = dol1.resolve_config(TINY + ["--training_mode", "blockwise_sequential"])
    assert experiment_id({**single, "n_workers": 2}, "") == experiment_id(single, "")


def test_a_checkpoint_describes_the_state_after_the_remote_work():
    """The asynchronous server applies the updates in flight inside ``ranks_state``: the counters saved must be
    those after it."""
    from src.Optimizer_Engines.loop import EngineState, attach_engine
    from src.Runs.checkpoint import frame_state
    frame = frame_for(*TINY, "--training_mode", "async_sequential")

    class Remote(EngineState):
        def ranks_state(self):
            frame.steps += 7
            return {"copies": {}, "block_optimizers": {}, "rng": {}}
    attach_engine(frame, Remote())
    assert frame_state(frame)["steps"] == 7
