"""Compute counters: the same meaning in every engine (steps, block updates, forward and backward sample-passes),
in every progress record, in the report line and across a checkpoint."""
import pytest
import torch

import dol1
from src.Runs.checkpoint import frame_state, restore
from src.Buliding_Units.Model_frames import COUNTERS, generate_ModelFrame
from src.Optimizer_Engines import resolve_engine
from src.Optimizer_Engines.loop import active_blocks, count_step
from src.reporting import format_progress

BATCH = 32
TINY = ["--model", "mlp", "--config", "[16, 12]", "--dataset_name", "digits_flat", "--batch_size", str(BATCH),
        "--measurement_sampling_rate", "0", "--cuda_core", "-1", "--report_sampling_rate", "2", "--eval_samples",
        "64"]


def build(*argv):
    return generate_ModelFrame(dol1.resolve_config(TINY + list(argv)))


def train(*argv):
    frame = build(*argv)
    return resolve_engine(frame.H["training_mode"]).function(frame)


def counters(frame):
    return {key: getattr(frame, key) for key in COUNTERS}


def test_count_step_adds_exactly_what_it_is_told():
    frame = build("--training_mode", "entire", "--rounds", "0")
    count_step(frame, 32, 3, new_samples=32)
    count_step(frame, 16, 2, steps=5, new_samples=0)
    assert counters(frame) == {"steps": 6, "samples": 32, "block_updates": 3 + 2,
                               "forward_sample_passes": 32 + 5 * 16, "backward_sample_passes": 32 + 5 * 16}


def test_jacobi_k1_all_blocks_counts_the_passes_of_entire_times_the_blocks():
    """Bit-identical trajectories (tests/test_engines.py); same samples and block updates; every block-local step
    ran its own forward and backward, so the sample-passes are B times entire's, and so are the steps."""
    rounds = 5
    entire = train("--training_mode", "entire", "--rounds", str(rounds))
    jacobi = train("--training_mode", "blockwise_sequential", "--rounds", str(rounds), "--K", "1")
    B = entire.n_blocks
    assert B == 3
    for key in entire.center_model.state_dict():
        torch.testing.assert_close(entire.center_model.state_dict()[key], jacobi.center_model.state_dict()[key],
                                   atol=1e-6, rtol=1e-5)
    assert counters(entire) == {"steps": rounds, "samples": rounds * BATCH, "block_updates": rounds * B,
                                "forward_sample_passes": rounds * BATCH, "backward_sample_passes": rounds * BATCH}
    assert counters(jacobi) == {"steps": B * rounds, "samples": rounds * BATCH, "block_updates": rounds * B,
                                "forward_sample_passes": B * rounds * BATCH,
                                "backward_sample_passes": B * rounds * BATCH}


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_gauss_seidel_counts_like_jacobi(share):
    args = ["--training_mode", "blockwise_sequential", "--rounds", "4", "--K", "3", "--active_share", str(share)]
    jacobi = train(*args, "--block_update", "jacobi")
    gauss_seidel = train(*args, "--block_update", "gauss_seidel")
    active = sum(len(active_blocks(r, jacobi.n_blocks, share, 0)) for r in range(4))
    assert counters(jacobi) == counters(gauss_seidel) == {
        "steps": 3 * active, "samples": 4 * 3 * BATCH, "block_updates": active,
        "forward_sample_passes": 3 * active * BATCH, "backward_sample_passes": 3 * active * BATCH}


@pytest.mark.parametrize("mode", ["entire", "blockwise_sequential"])
def test_every_progress_record_carries_the_counters_of_its_round(mode):
    frame = train("--training_mode", mode, "--rounds", "4", "--K", "2")
    assert [h["round"] for h in frame.history] == [0, 2, 4]
    per_round = {"entire": (1, 1), "blockwise_sequential": (2 * frame.n_blocks, 2)}[mode]  # (steps, batches)
    for record in frame.history:
        r = record["round"]
        assert record["steps"] == r * per_round[0] and record["samples"] == r * per_round[1] * BATCH
        assert record["forward_sample_passes"] == record["backward_sample_passes"] == record["steps"] * BATCH
        assert record["block_updates"] == r * frame.n_blocks  # every block once per round; all B per step
    line = format_progress(frame.history[-1])
    last = frame.history[-1]
    assert f"BlockUpdates = {last['block_updates']}" in line
    assert f"SamplePasses = {last['forward_sample_passes']} forward / {last['backward_sample_passes']}" in line


def test_report_line_of_an_old_record_without_the_new_counters():
    old = {"round": 3, "loss": 1.0, "test_loss": 1.0, "steps": 9, "samples": 96, "wall_time": 1.0,
           "compute_time_share": 1.0, "deviation": 0.0}
    assert "SamplePasses" not in format_progress(old) and "Steps = 9" in format_progress(old)


def test_checkpoint_keeps_the_counters():
    frame = train("--training_mode", "blockwise_sequential", "--rounds", "3", "--K", "2", "--active_share", "0.5")
    state = frame_state(frame)
    fresh = build("--training_mode", "blockwise_sequential", "--rounds", "3", "--K", "2", "--active_share", "0.5")
    assert counters(fresh) == dict.fromkeys(COUNTERS, 0)
    restore(fresh, state)
    assert counters(fresh) == counters(frame) and frame.forward_sample_passes > 0
    old = {k: v for k, v in state.items() if k not in ("block_updates", "forward_sample_passes",
                                                       "backward_sample_passes")}
    restore(fresh, old)  # a checkpoint from before these counters: steps and samples kept, the new ones from 0
    assert (fresh.steps, fresh.samples, fresh.block_updates) == (frame.steps, frame.samples, 0)
