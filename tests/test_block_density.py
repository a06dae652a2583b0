"""Per-block spectral densities (``BlockSpectrumDensity``): stochastic Lanczos quadrature against the exact block
spectra, the densities and JS distances, the unit's keys and records, and the benchmark's smoke run."""
import copy
import inspect
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import dol1
from hessian_helpers import F64, Sequential, one_thread  # noqa: F401 - one_thread: this module's autouse fixture
from src.Buliding_Units import hessian
from src.Buliding_Units.hessian import density
from src.Buliding_Units.hessian import figures as hfig
from src.Buliding_Units.MeasurementUnit import BlockSpectrumDensity
from src.Buliding_Units.plugins import available_plugins

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_density  # noqa: E402

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "32",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--measurement_sampling_rate", "2"]


def tiny_problem(seed=0):
    """Blocks of 15, 12 and 8 parameters (tanh MLP, cross-entropy: the head has a repeated zero eigenvalue)."""
    torch.manual_seed(seed)
    model = Sequential([nn.Sequential(nn.Linear(4, 3), nn.Tanh()), nn.Sequential(nn.Linear(3, 3), nn.Tanh()),
                        nn.Linear(3, 2)]).to(F64).eval()
    x, y = torch.randn(24, 4, dtype=F64), torch.randint(0, 2, (24,))
    return model, nn.CrossEntropyLoss(), x, y


def exact_blocks(model, criterion, x, y, curvature="hessian"):
    H = hessian.exact_hessian(model, criterion, x, y, curvature=curvature)
    edges = [0, *torch.tensor(hessian.block_sizes(model)).cumsum(0).tolist()]
    return [H[a:b, a:b] for a, b in zip(edges[:-1], edges[1:])]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_with_as_many_steps_as_parameters_the_ritz_values_are_the_eigenvalues(curvature):
    model, criterion, x, y = tiny_problem()
    hvp = hessian.make_batched_hvp(model, criterion, x, y, curvature=curvature)
    result = hessian.block_slq(hvp, hvp.block_sizes, probes=3, steps=100, seed=1)
    assert result.steps == hvp.block_sizes == [15, 12, 8]  # capped by the block size
    assert result.calls == 15 and result.hvps == 3 * (15 + 12 + 8)  # every block in each call
    for block, values, weights in zip(exact_blocks(model, criterion, x, y, curvature), result.ritz_values,
                                      result.ritz_weights):
        exact = torch.linalg.eigvalsh(block)
        for probe in values:  # every probe alone: all eigenvalues, repeated ones included
            torch.testing.assert_close(probe, exact, atol=1e-8, rtol=0)
        torch.testing.assert_close(weights.sum(1), torch.ones(3, dtype=F64), atol=1e-12, rtol=0)


def test_each_probe_quadrature_is_exact_for_low_moments():
    """Three steps integrate polynomials up to degree 5 exactly: Σ w θ^k = vᵀ H_bb^k v for k <= 4, per probe."""
    model, criterion, x, y = tiny_problem()
    hvp = hessian.make_batched_hvp(model, criterion, x, y)
    starts = density.rademacher_starts(hvp.block_sizes, 5, seed=3)
    result = hessian.block_slq(hvp, hvp.block_sizes, steps=3, starts=starts)
    for block, v, values, weights in zip(exact_blocks(model, criterion, x, y), starts, result.ritz_values,
                                         result.ritz_weights):
        for k in range(5):
            expected = ((v @ torch.linalg.matrix_power(block, k)) * v).sum(1)
            torch.testing.assert_close((weights * values ** k).sum(1), expected, rtol=1e-9, atol=1e-13)


def test_moments_estimate_the_exact_block_traces_within_their_standard_error():
    model, criterion, x, y = tiny_problem()
    hvp = hessian.make_batched_hvp(model, criterion, x, y)
    result = hessian.block_slq(hvp, hvp.block_sizes, probes=64, steps=40, seed=0)
    blocks = exact_blocks(model, criterion, x, y)
    for k in range(5):
        for b, ((estimate, se), block) in enumerate(zip(hessian.quadrature_moments(result, k), blocks)):
            exact = torch.trace(torch.linalg.matrix_power(block, k)).item() / block.shape[0]
            assert abs(estimate - exact) <= 3 * se + 1e-12, (k, b, estimate, exact, se)
            if k == 0:
                assert estimate == pytest.approx(1, abs=1e-12) and se < 1e-12
            elif k % 2 == 0:
                assert se <= 0.25 * exact  # a meaningful test: the error bar is small against the value
    for (trace, se), (moment, moment_se), n in zip(hessian.trace_estimates(result),
                                                   hessian.quadrature_moments(result, 1), result.block_sizes):
        assert trace == pytest.approx(n * moment) and se == pytest.approx(n * moment_se)


def test_full_reorthogonalisation_leaves_no_ghost_eigenvalues():
    """The plain three-term recurrence finds 13 copies of the top eigenvalue of this operator in 100 steps."""
    eigenvalues = torch.cat([torch.tensor([100.0, 50.0]), torch.linspace(0, 1, 198)]).to(F64)
    result = hessian.block_slq(lambda v: v * eigenvalues, [200], probes=3, steps=100, seed=0)
    values = result.ritz_values[0]
    assert ((values - 100).abs() < 1e-6).sum(1).tolist() == [1, 1, 1]
    assert ((values - 50).abs() < 1e-6).sum(1).tolist() == [1, 1, 1]
    assert values.min() >= -1e-12 and values.max() <= 100 + 1e-10


def test_breakdown_keeps_the_quadrature_and_the_multiplicities():
    """A start meeting only 4 distinct eigenvalues breaks down after 4 steps; the restart adds zero-weight nodes."""
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=F64, generator=torch.Generator().manual_seed(0)))
    spectrum = torch.tensor([0.0, 0, 0, 1, 1, 2, 3], dtype=F64)
    a = q @ torch.diag(spectrum) @ q.T
    result = hessian.block_slq(lambda v: v @ a, [7], probes=2, steps=7, seed=0)
    for values, weights in zip(result.ritz_values[0], result.ritz_weights[0]):
        torch.testing.assert_close(values, spectrum, atol=1e-12, rtol=0)
        assert weights.sum().item() == pytest.approx(1, abs=1e-12)
    starts = density.rademacher_starts([7], 2, 0)[0]
    for k in range(5):
        expected = ((starts @ torch.linalg.matrix_power(a, k)) * starts).sum(1)
        torch.testing.assert_close((result.ritz_weights[0] * result.ritz_values[0] ** k).sum(1), expected)


def test_all_blocks_at_once_equals_one_block_at_a_time():
    model, criterion, x, y = tiny_problem()
    hvp = hessian.make_batched_hvp(model, criterion, x, y)
    sizes = hvp.block_sizes
    starts = density.rademacher_starts(sizes, 4, seed=5)
    together = hessian.block_slq(hvp, sizes, steps=6, starts=starts)
    values, hvps, calls = bench_density.one_at_a_time(hvp, sizes, starts, 6, batch_probes=False)
    assert (hvps, calls, together.hvps, together.calls) == (4 * 18, 4 * 18, 4 * 18, 6)
    for alone, joint in zip(values, together.ritz_values):
        torch.testing.assert_close(alone, joint, atol=1e-12, rtol=0)


def _slq(*blocks):
    values = [None if b is None else torch.tensor([b], dtype=F64) for b in blocks]
    weights = [None if v is None else torch.full_like(v, 1 / v.shape[1]) for v in values]
    return density.BlockSLQ(values, weights, [0 if b is None else 3 for b in blocks],
                            [0 if b is None else 3 for b in blocks], 1, 0, 0)


def test_densities_integrate_to_one_and_js_distances_lie_in_the_unit_interval():
    scaled = _slq([1.0, 2.0, 3.0], [10.0, 20.0, 30.0], None, [-3.0, 0.0, 3.0])
    shape = hessian.spectral_densities(scaled, sigma=0.02, grid_points=500)
    assert shape.normalisation == "spectral_radius" and shape.scales == [3.0, 30.0, None, 3.0]
    assert shape.densities[2] is None and math.isnan(shape.js[2, 0]) and math.isnan(shape.js[2, 2])
    for d in (shape.densities[0], shape.densities[1], shape.densities[3]):
        assert torch.trapezoid(d, shape.grid).item() == pytest.approx(1, abs=1e-12)
    assert shape.js[0, 1] < 1e-12  # the same shape at another scale
    assert shape.js[0, 3] == shape.js[3, 0] and 0.5 < shape.js[0, 3] <= 1
    assert shape.js0 == pytest.approx((shape.js[0, 1] + shape.js[0, 3] + shape.js[1, 3]).item() / 3)
    common = hessian.spectral_densities(scaled, sigma=0.02, grid_points=500, normalisation="common")
    assert common.scales == [30.0, 30.0, None, 30.0] and common.js[0, 1] > 0.9  # relative sizes kept
    far = torch.linspace(-1, 1, 101, dtype=F64)
    assert hessian.js_distance(torch.exp(-far ** 2), torch.exp(-far ** 2)) == 0.0
    assert hessian.js_distance((far < 0).double(), (far > 0).double()) == 1.0


def test_zero_spectrum_is_a_point_mass_at_zero():
    result = hessian.block_slq(lambda v: torch.zeros_like(v), [5, 4], probes=2, steps=10, seed=0)
    assert all((v == 0).all() for v in result.ritz_values)
    dens = hessian.spectral_densities(result)
    assert dens.scales == [1.0, 1.0] and dens.js0 == 0.0


def test_keyword_only_and_known_by_name():
    assert available_plugins()["BlockSpectrumDensity"] is BlockSpectrumDensity
    parameters = inspect.signature(BlockSpectrumDensity).parameters.values()
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in parameters)
    assert BlockSpectrumDensity().config()["js_normalisation"] == "spectral_radius"


@pytest.mark.parametrize("key, value", [("probes", 0), ("probes", -2), ("probes", 1.5), ("lanczos_steps", 0),
                                        ("lanczos_steps", -1), ("sigma", 0), ("sigma", -0.1), ("sigma", math.inf),
                                        ("sigma", math.nan), ("curvature", "fisher"), ("js_normalisation", "lambda10"),
                                        ("grid_points", 50), ("mode", "sideways"), ("dtype", "float16")])
def test_bad_keys_raise_value_error_naming_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        BlockSpectrumDensity(**{key: value})


def test_bad_key_in_units_file_exits_2_naming_the_line(tmp_path, capsys):
    units = tmp_path / "Units.txt"
    units.write_text("# spectra\n- BlockSpectrumDensity probes=0\n")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", str(units)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{units}:2" in err and "probes must be an integer >= 1" in err
    assert not (tmp_path / "reports").exists()


def _frame(model, x, y, tmp_path):
    return SimpleNamespace(center_model=model, criterion=nn.CrossEntropyLoss(), round=3, run_id="Rtest",
                           data=SimpleNamespace(sample_batch=lambda split, n, seed: (x[:n], y[:n])),
                           paths=SimpleNamespace(figures=tmp_path / "figures", measurements=tmp_path / "measurements"),
                           log=print, samples=96, history=[])


def test_prepare_refuses_dropout_in_train_mode_and_bases_over_budget(tmp_path):
    model, _, x, y = tiny_problem()
    dropout = Sequential([nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)), nn.Linear(3, 2)]).to(F64)
    BlockSpectrumDensity().prepare(_frame(dropout, x, y, tmp_path))  # eval mode by default: no dropout
    with pytest.raises(ValueError, match="dropout"):
        BlockSpectrumDensity(mode="train").prepare(_frame(dropout, x, y, tmp_path))
    with pytest.raises(ValueError, match="max_basis_mb"):
        BlockSpectrumDensity(max_basis_mb=1e-4).prepare(_frame(model, x, y, tmp_path))


def test_batchnorm_is_measured_in_eval_mode_on_a_private_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(BlockSpectrumDensity, "_density_figures", lambda self, frame, record: [])  # numbers only
    torch.manual_seed(1)
    model = Sequential([nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Tanh()), nn.Linear(3, 2)]).to(F64)
    x, y = torch.randn(24, 4, dtype=F64), torch.randint(0, 2, (24,))
    model(x)  # running statistics away from their initial values
    before = copy.deepcopy(model.state_dict())
    record = BlockSpectrumDensity(probes=2, lanczos_steps=30, batch_size=24).measure(_frame(model, x, y, tmp_path))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    evaluated = copy.deepcopy(model).eval()
    for block, values in zip(exact_blocks(evaluated, nn.CrossEntropyLoss(), x, y), record["ritz_values"]):
        torch.testing.assert_close(torch.tensor(values[0], dtype=F64), torch.linalg.eigvalsh(block), atol=1e-8,
                                   rtol=0)
    assert record["mode"] == "eval" and record["steps"] == [21, 8]


def test_a_block_without_parameters_is_left_out_and_one_block_has_no_js0(tmp_path, monkeypatch):
    _, _, x, y = tiny_problem()
    torch.manual_seed(0)
    gap = Sequential([nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)]).to(F64)
    record = BlockSpectrumDensity(probes=2, lanczos_steps=4, batch_size=24).measure(_frame(gap, x, y, tmp_path))
    assert record["block_sizes"] == [15, 0, 8] and record["steps"] == [4, 0, 4] and record["hvps"] == 2 * 8
    assert record["density"][1] is None and record["lambda_max"][1] is None and record["trace"][1] is None
    assert record["js_matrix"][1] == [None, None, None] and record["js0"] == record["js_matrix"][0][2] > 0
    assert len(record["figures"]) == 4  # drawn: the missing density left out, its heat-map row masked
    monkeypatch.setattr(BlockSpectrumDensity, "_density_figures", lambda self, frame, record: [])  # numbers only
    single = Sequential([nn.Linear(4, 2)]).to(F64)
    record = BlockSpectrumDensity(probes=2, lanczos_steps=4, batch_size=24).measure(_frame(single, x, y, tmp_path))
    assert record["js0"] is None and record["js_matrix"] == [[0.0]]


def test_each_logged_measurement_redraws_js0_over_training(tmp_path):
    unit, frame = BlockSpectrumDensity(), _frame(None, None, None, tmp_path)
    for round_, js0, only in ((2, 0.25, False), (4, 0.5, False), (4, 0.9, True)):
        frame.round, frame.samples = round_, 32 * round_
        unit.log_measurement(frame, {"js0": js0, "js_normalisation": "spectral_radius", "measure_only": only})
    records = [json.loads(line) for line in unit.log_path.read_text().splitlines()]
    assert [(r["round"], r["samples"]) for r in records] == [(2, 64), (4, 128), (4, None)]
    data = hfig.js0_over_training(records, [])
    assert data["rounds"] == [2, 4] and data["samples"] == [64, 128] and data["js0"] == [0.25, 0.5]
    assert (tmp_path / "figures" / "Measurements" / "Hessian_Measurement" / "Rtest" / "js0_over_training.png").exists()


@pytest.mark.slow
def test_unit_end_to_end_records_and_figures(tmp_path):
    units = tmp_path / "Units.txt"
    units.write_text("- BlockSpectrumDensity probes=4 lanczos_steps=8 batch_size=64 grid_points=500 sigma=0.02\n")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", str(units)])
    path = tmp_path / "measurements" / f"BlockSpectrumDensity_{frame.run_id}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["round"] for r in records] == [2, 4] and records[-1]["samples"] > records[0]["samples"] > 0
    last = records[-1]
    assert last["js_normalisation"] == "spectral_radius" and "base-2" in last["js_definition"]
    assert last["block_sizes"] == [390, 35, 60] and last["steps"] == [8, 8, 8]
    assert last["hvps"] == 4 * 24 and last["batched_calls"] == 8
    assert last["block_labels"][0].startswith("0:") and len(last["density"]) == 3
    grid = torch.tensor(last["density_grid"], dtype=F64)
    for b in range(3):
        assert len(last["ritz_values"][b]) == len(last["ritz_weights"][b]) == 4
        assert all(sum(w) == pytest.approx(1) for w in last["ritz_weights"][b])
        assert torch.trapezoid(torch.tensor(last["density"][b], dtype=F64), grid).item() == pytest.approx(1)
        assert last["lambda_max"][b] == max(max(v) for v in last["ritz_values"][b]) <= last["scale"][b]
        assert last["trace_se"][b] > 0
    js = torch.tensor(last["js_matrix"], dtype=F64)
    assert torch.equal(js, js.T) and (js.diag() == 0).all() and ((js >= 0) & (js <= 1)).all()
    assert last["js0"] == pytest.approx((js[0, 1] + js[0, 2] + js[1, 2]).item() / 3)
    folder = tmp_path / "figures" / "Measurements" / "Hessian_Measurement" / frame.run_id
    for stem in ("block_density_002", "block_js_heatmap_004", "js0_over_training"):
        assert (folder / f"{stem}.png").exists() and (folder / f"{stem}.pdf").exists()
    assert str(folder / "block_density_004.png") in last["figures"]


def test_bench_smoke(capsys):
    rows = bench_density.main(["--quick"])
    out = capsys.readouterr().out
    assert "1 threads" in out and "machine:" in out
    assert "| " + " | ".join(bench_density.COLUMNS) + " |" in out
    assert [r[:2] for r in rows] == [[m, label] for m in ("MLP", "CNN") for label in (
        "(a) one block, one probe at a time", "(b) one block at a time, probes batched",
        "(c) all blocks at once (BlockSpectrumDensity)")]
    for model in (rows[:3], rows[3:]):
        assert len({r[4] for r in model}) == 1  # the same products
        assert int(model[0][5]) > int(model[1][5]) > int(model[2][5])  # fewer batched calls
        assert all(float(r[8]) <= 1e-8 for r in model)


def test_js0_of_two_identical_blocks_sits_at_the_probe_noise_floor():
    """Two blocks with the same Hessian block: JS0 is the estimator's noise, which js0_floor bounds; both shrink as
    the probes grow."""
    from src.Buliding_Units.hessian import block_slq, exact_hessian, make_batched_hvp, spectral_densities
    torch.manual_seed(0)

    class Twins(torch.nn.Module):
        def __init__(self):
            super().__init__()
            a = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)).double()
            b = copy.deepcopy(a)
            self.blocks = torch.nn.ModuleList([a, b])

        def forward(self, x):
            return self.blocks[0](x) + self.blocks[1](x)
    model, x, y = Twins().eval(), torch.randn(64, 16, dtype=torch.float64), torch.randint(0, 4, (64,))
    H = exact_hessian(model, torch.nn.CrossEntropyLoss(), x, y)
    n = sum(p.numel() for p in model.blocks[0].parameters())
    assert torch.equal(H[:n, :n], H[n:, n:])
    hvp = make_batched_hvp(model, torch.nn.CrossEntropyLoss(), x, y)
    few = spectral_densities(block_slq(hvp, hvp.block_sizes, probes=8, steps=40, seed=0))
    many = spectral_densities(block_slq(hvp, hvp.block_sizes, probes=64, steps=40, seed=0))
    assert 0 < few.js0 <= 1.5 * few.js_floor and many.js0 < few.js0 and many.js_floor < few.js_floor
