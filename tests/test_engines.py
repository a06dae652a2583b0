"""Frames and the single-process engines against references: entire training, the data-order contract, damping."""
import copy

import pytest
import torch
from torch import nn

import dol1
from src.Buliding_Units.Model_frames import (ImageClassifier_frame_blockwise, ImageClassifier_frame_entire,
                                             Regression_frame_blockwis, Regression_frame_entire, generate_ModelFrame)
from src.Data import load_data
from src.Optimizer_Engines import resolve_engine
from src.Optimizer_Engines.BCD_engine import train_blockwise_sequential, train_entire
from src.Optimizer_Engines.loop import active_blocks, evaluate, local_steps

TINY = ["--model", "mlp", "--config", "[16, 12]", "--dataset_name", "digits_flat", "--batch_size", "32",
        "--measurement_sampling_rate", "0", "--cuda_core", "-1", "--report_sampling_rate", "0"]


def H_for(*argv):
    return dol1.resolve_config(TINY + list(argv))


def run(*argv, units=()):
    """Build the frame for TINY + argv and train it with the engine dol1 would pick."""
    frame = generate_ModelFrame(H_for(*argv), units=units)
    return resolve_engine(frame.H["training_mode"]).function(frame)


def params(frame):
    return {k: v.detach().clone() for k, v in frame.center_model.state_dict().items()}


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


def test_jacobi_k1_equals_entire_adam():
    entire = params(run("--training_mode", "entire", "--rounds", "6"))
    blockwise = params(run("--training_mode", "blockwise_sequential", "--rounds", "6", "--K", "1"))
    assert_same(entire, blockwise)


def test_jacobi_k1_equals_entire_sgd_with_batchnorm():
    common = ["--model", "cnn", "--config", "[4, 4]", "--dataset_name", "digits", "--optimizer", "sgd",
              "--step_size", "0.05", "--rounds", "4"]
    entire = params(run("--training_mode", "entire", *common))
    blockwise = params(run("--training_mode", "blockwise_sequential", *common))
    assert any("running_mean" in k for k in entire)
    assert_same(entire, blockwise)


class OneBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))])

    def forward(self, x):
        return self.blocks[0](x)


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("update", ["jacobi", "gauss_seidel"])
def test_single_block_model_blockwise_equals_entire(K, update):
    rounds = 4
    H_block = H_for("--training_mode", "blockwise_sequential", "--K", str(K), "--rounds", str(rounds),
                    "--block_update", update)
    H_entire = H_for("--training_mode", "entire", "--rounds", str(rounds * K))
    data = load_data("digits_flat", seed=0)
    torch.manual_seed(0)
    model = OneBlock()
    blockwise = ImageClassifier_frame_blockwise(H=H_block, device=torch.device("cpu"),
                                                center_model=copy.deepcopy(model), data=data,
                                                criterion=nn.CrossEntropyLoss())
    entire = ImageClassifier_frame_entire(H=H_entire, device=torch.device("cpu"), center_model=copy.deepcopy(model),
                                          data=data, criterion=nn.CrossEntropyLoss())
    train_blockwise_sequential(blockwise)
    train_entire(entire)
    assert blockwise.steps == entire.steps == rounds * K
    assert_same(params(blockwise), params(entire), atol=1e-7)


def test_gauss_seidel_differs_from_jacobi_and_uses_latest_centre():
    jacobi = params(run("--training_mode", "blockwise_sequential", "--rounds", "3", "--K", "2"))
    gs = params(run("--training_mode", "blockwise_sequential", "--rounds", "3", "--K", "2",
                    "--block_update", "gauss_seidel"))
    assert any(not torch.allclose(jacobi[k], gs[k]) for k in jacobi)


def test_damping_moves_the_centre_by_gamma():
    H = H_for("--training_mode", "blockwise_sequential", "--rounds", "1", "--K", "3")
    before = params(generate_ModelFrame(H))
    full = params(run("--training_mode", "blockwise_sequential", "--rounds", "1", "--K", "3"))
    half = params(run("--training_mode", "blockwise_sequential", "--rounds", "1", "--K", "3", "--gamma", "0.5"))
    for k in before:
        torch.testing.assert_close(half[k], before[k] + 0.5 * (full[k] - before[k]), atol=1e-6, rtol=1e-5)


def test_active_share_updates_only_the_drawn_blocks():
    H = H_for("--training_mode", "blockwise_sequential", "--rounds", "1", "--active_share", "0.3")
    frame = generate_ModelFrame(H)
    before = [copy.deepcopy(b.state_dict()) for b in frame.center_model.blocks]
    train_blockwise_sequential(frame)
    drawn = active_blocks(0, 3, 0.3, 0)
    assert len(drawn) == 1 and drawn == active_blocks(0, 3, 0.3, 0)
    for b, block in enumerate(frame.center_model.blocks):
        changed = any(not torch.equal(v, before[b][k]) for k, v in block.state_dict().items())
        assert changed == (b in drawn)
    assert frame.steps == 1


def test_active_blocks_is_seeded_and_varies():
    draws = {tuple(active_blocks(r, 10, 0.3, seed=1, order="random")) for r in range(20)}
    assert len(draws) > 5 and all(len(d) == 3 for d in draws)
    assert active_blocks(4, 10, 0.3, 1, "random") == active_blocks(4, 10, 0.3, 1, "random")
    assert active_blocks(0, 5, 1.0, 0) == [0, 1, 2, 3, 4]


def test_local_step_computes_gradients_for_its_block_only():
    frame = generate_ModelFrame(H_for("--training_mode", "blockwise_sequential"))
    b = 1
    replica = frame.distributed_models[b]
    local_steps(replica, frame.block_optimizers[b], frame.criterion, [frame.train_batches[0]])
    for i, block in enumerate(replica.blocks):
        for p in block.parameters():
            assert (p.grad is not None) == (i == b)
    assert all(p.requires_grad == (i == b) for i, blk in enumerate(replica.blocks) for p in blk.parameters())
    # the centre is untouched until the communication stage, and its parameters all train in entire mode
    assert all(p.requires_grad for p in frame.center_model.parameters())


def test_deviation_is_measured_before_the_gather():
    frame = run("--training_mode", "blockwise_sequential", "--rounds", "2", "--report_sampling_rate", "1")
    assert frame.history[0]["deviation"] == 0.0  # round 0: nothing trained
    assert all(h["deviation"] > 0 for h in frame.history[1:])


def test_optimizer_state_survives_rounds():
    frame = run("--training_mode", "blockwise_sequential", "--rounds", "3", "--K", "2")
    for opt in frame.block_optimizers.values():
        states = list(opt.state.values())
        assert states and all(int(s["step"]) == 6 for s in states)


@pytest.mark.parametrize("mode, cls", [("entire", Regression_frame_entire),
                                       ("blockwise_sequential", Regression_frame_blockwis)])
def test_regression_uses_mse_in_every_mode(mode, cls):
    frame = run("--training_mode", mode, "--dataset_name", "diabetes", "--rounds", "3")
    assert type(frame) is cls and isinstance(frame.criterion, nn.MSELoss)
    assert "accuracy" not in frame.history[-1] and frame.history[-1]["test_loss"] > 0


def test_evaluation_in_eval_mode_leaves_batchnorm_untouched():
    frame = generate_ModelFrame(H_for("--model", "cnn", "--config", "[4]", "--dataset_name", "digits",
                                      "--training_mode", "entire"))
    frame.center_model.train()
    before = copy.deepcopy(frame.center_model.state_dict())
    evaluate(frame, "test")
    assert frame.center_model.training
    for k, v in frame.center_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_counters_and_sampling():
    frame = run("--training_mode", "blockwise_sequential", "--rounds", "7", "--K", "2", "--report_sampling_rate", "3")
    assert [h["round"] for h in frame.history] == [0, 3, 6, 7]
    assert frame.steps == 7 * 2 * 3 and frame.samples == 7 * 2 * 32
    last = frame.history[-1]
    assert last["compute_time"] > 0 and 0 < last["compute_time_share"] <= 1


def test_batch_size_zero_probes_the_largest_that_fits():
    frame = generate_ModelFrame(H_for("--batch_size", "0", "--training_mode", "entire"))
    assert frame.H["batch_size"] == len(frame.data.train)  # a tiny MLP: the whole training set fits on the CPU
    assert len(frame.train_batches[0][1]) == frame.H["batch_size"]


@pytest.mark.parametrize("dataset", ["ones", "synthetic_regression", "diabetes"])
@pytest.mark.parametrize("mode", ["entire", "blockwise_sequential"])
def test_regression_datasets_build_in_every_mode(dataset, mode):
    frame = run("--training_mode", mode, "--dataset_name", dataset, "--rounds", "2")
    assert frame.task == "regression" and isinstance(frame.criterion, nn.MSELoss)
    assert frame.history[-1]["loss"] >= 0
