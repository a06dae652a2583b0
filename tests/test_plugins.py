"""Measurement plugins: memory against a hand count, the Hessian units end to end, sampling-rate semantics."""
import copy
import json

import pytest
import torch

import dol1
from src.Buliding_Units import hessian
from src.Buliding_Units.MeasurementUnit import (HessianBlockInteractionMeasurement, MeasurementUnit,
                                                Working_memory_usage)
from src.Buliding_Units.Model_frames import RunContext, generate_ModelFrame
from src.reporting import Paths
from src.Optimizer_Engines.BCD_engine import train_blockwise_sequential, train_entire

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "32",
        "--report_sampling_rate", "2", "--cuda_core", "-1"]


class Counter(MeasurementUnit):
    """Test plugin: records the rounds at which it was called."""

    def measure(self, frame):
        return {"seen": frame.round}


def units_file(tmp_path, *lines):
    f = tmp_path / "Units.txt"
    f.write_text("\n".join(lines) + "\n")
    return str(f)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("rate, rounds, expected", [(1, 4, [1, 2, 3, 4]), (0, 4, []), (3, 7, [3, 6, 7]),
                                                    (2, 4, [2, 4]), (399, 5, [5])])
def test_measurement_sampling_rate(tmp_path, rate, rounds, expected):
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", units_file(tmp_path, "- test_plugins.Counter"),
                              "--measurement_sampling_rate", str(rate), "--rounds", str(rounds)])
    log = tmp_path / "measurements" / f"Counter_{frame.run_id}.jsonl"
    assert (read_jsonl(log) if log.exists() else []) == [{"round": r, "seen": r} for r in expected]


def test_memory_unit_hand_count():
    H = dol1.resolve_config(TINY + ["--training_mode", "blockwise_sequential", "--rounds", "2"])
    frame = train_blockwise_sequential(generate_ModelFrame(H))
    record = Working_memory_usage().measure(frame)
    n = 64 * 6 + 6 + 6 * 5 + 5 + 5 * 10 + 10  # parameters of the 3-block MLP
    sizes = [64 * 6 + 6, 6 * 5 + 5, 5 * 10 + 10]
    mb = 2.0 ** 20
    assert record["center_MB"]["parameters"] == pytest.approx(4 * n / mb)
    assert record["center_MB"]["optimizer_state"] == 0  # block-wise: the centre has no optimiser
    assert record["n_copies"] == 3
    assert record["copies_MB"]["parameters"] == pytest.approx(3 * 4 * n / mb)
    assert record["copies_MB"]["gradients"] == pytest.approx(4 * sum(sizes) / mb)  # each copy: its own block
    # Adam: exp_avg + exp_avg_sq per parameter of the block, plus a scalar step per tensor (2 per block)
    state = sum(2 * 4 * s for s in sizes) + 3 * 2 * frame.block_optimizers[0].state[
        next(iter(frame.block_optimizers[0].state))]["step"].element_size()
    assert record["copies_MB"]["optimizer_state"] == pytest.approx(state / mb)
    assert record["total_MB"] == pytest.approx(sum(record["center_MB"].values()) + sum(record["copies_MB"].values()))


def test_memory_unit_entire_mode_counts_the_optimizer():
    H = dol1.resolve_config(TINY + ["--training_mode", "entire", "--rounds", "2"])
    frame = train_entire(generate_ModelFrame(H))
    record = Working_memory_usage().measure(frame)
    n = sum(p.numel() for p in frame.center_model.parameters())
    assert record["n_copies"] == 0 and record["center_MB"]["gradients"] == pytest.approx(4 * n / 2**20)
    assert record["center_MB"]["optimizer_state"] > 2 * 4 * n / 2**20


def test_interaction_unit_leaves_a_batchnorm_model_unchanged(tmp_path):
    H = dol1.resolve_config(["--model", "cnn", "--config", "[3, 3]", "--training_mode", "entire", "--rounds", "2",
                             "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--batch_size", "16"])
    frame = train_entire(generate_ModelFrame(H, run=RunContext(paths=Paths(tmp_path))))
    frame.center_model.train()
    before = copy.deepcopy(frame.center_model.state_dict())
    grads = [p.grad.clone() for p in frame.center_model.parameters()]
    unit = HessianBlockInteractionMeasurement(batch_size=16, method="krylov", tol=1e-3)
    first = unit.measure(frame)
    assert frame.center_model.training  # measured in eval mode on a private copy
    for k, v in frame.center_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(frame.center_model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert unit.measure(frame)["norms"] == first["norms"]  # one fixed batch, seeded: deterministic


def test_interaction_unit_end_to_end_matches_exact(tmp_path):
    f = units_file(tmp_path, "- HessianBlockInteractionMeasurement tol=1e-8 max_steps=80 method=krylov batch_size=64",
                   "- Hessian_measurement batch_size=64")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f, "--measurement_sampling_rate", "2"])
    krylov = read_jsonl(tmp_path / "measurements" / f"HessianBlockInteractionMeasurement_{frame.run_id}.jsonl")
    brute = read_jsonl(tmp_path / "measurements" / f"Hessian_measurement_{frame.run_id}.jsonl")
    assert [r["round"] for r in krylov] == [2, 4] == [r["round"] for r in brute]
    # reference: exact Hessian of the final centre on the same fixed batch, eval mode, float64
    model = copy.deepcopy(frame.center_model).double().eval()
    x, y = frame.data.sample_batch("train", 64, 0)
    exact = hessian.block_spectral_norms(hessian.exact_hessian(model, frame.criterion, x.double(), y),
                                         hessian.block_sizes(model))
    got = torch.tensor(krylov[-1]["norms"], dtype=torch.float64)
    assert got.shape == (3, 3) and krylov[-1]["hvps"] > 0 and krylov[-1]["method"] == "krylov"
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(torch.tensor(brute[-1]["norms"], dtype=torch.float64), exact, rtol=1e-6, atol=1e-8)
    coupling = torch.tensor(krylov[-1]["coupling"], dtype=torch.float64)
    torch.testing.assert_close(coupling.diagonal(), torch.ones(3, dtype=torch.float64))
    folder = tmp_path / "figures" / "Measurements" / "Hessian_Measurement" / frame.run_id
    for stem in ("block_offdiag_eig_heatmap_002", "block_offdiag_eig_heatmap_004", "block_coupling_heatmap_004",
                 "fd_block_norms_heatmap_002"):  # named by the round measured
        for suffix in (".pdf", ".png"):
            assert (folder / (stem + suffix)).stat().st_size > 0


def test_logged_matrix_is_not_altered_by_plotting(tmp_path):
    from src.Buliding_Units.hessian.figures import heatmap
    m = torch.rand(4, 4, dtype=torch.float64).numpy()
    keep = m.copy()
    heatmap(m, tmp_path / "h", labels=list("abcd"), log_scale=True)
    assert (m == keep).all()


def test_brute_force_unit_refuses_large_models_before_training(tmp_path, capsys):
    f = units_file(tmp_path, "- Hessian_measurement max_params=100")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_params=100" in err and "has 485 parameters" in err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("kwargs", [dict(mode="sideways"), dict(dtype="float16"), dict(tol=0), dict(method="svd"),
                                    dict(batch_size=0)])
def test_interaction_unit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HessianBlockInteractionMeasurement(**kwargs)


class Bare(MeasurementUnit):
    """A user's unit that skips super().__init__() and returns a tensor, not a dict."""

    def __init__(self, scale=2.0):
        self.scale = scale

    def measure(self, frame):
        return torch.full((2,), self.scale)


def test_unit_without_super_init_returning_a_tensor(tmp_path):
    f = units_file(tmp_path, "- test_plugins.Bare scale=3.0")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", f, "--measurement_sampling_rate", "2"])
    records = read_jsonl(tmp_path / "measurements" / f"Bare_{frame.run_id}.jsonl")
    assert records == [{"round": 2, "value": [3.0, 3.0]}, {"round": 4, "value": [3.0, 3.0]}]
