"""The Hessian units end to end: the spectrum unit and the Gauss-Newton option, named in a units file."""
import copy
import json

import pytest
import torch

import dol1
from src.Buliding_Units import hessian
from src.Buliding_Units.MeasurementUnit import HessianBlockInteractionMeasurement, HessianSpectrumMeasurement
from src.Buliding_Units.plugins import available_plugins

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "4", "--batch_size", "32",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--measurement_sampling_rate", "2"]


def _run(tmp_path, *lines):
    units = tmp_path / "Units.txt"
    units.write_text("\n".join(lines) + "\n")
    frame = dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", str(units)])
    model = copy.deepcopy(frame.center_model).double().eval()
    x, y = frame.data.sample_batch("train", 64, 0)
    return frame, model, x.double(), y


def _log(tmp_path, name, frame):
    path = tmp_path / "measurements" / f"{name}_{frame.run_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spectrum_unit_is_known_by_name():
    assert available_plugins()["HessianSpectrumMeasurement"] is HessianSpectrumMeasurement


def test_spectrum_unit_end_to_end_matches_exact(tmp_path):
    frame, model, x, y = _run(tmp_path, "- HessianSpectrumMeasurement k=2 tol=1e-9 max_steps=200 batch_size=64")
    records = _log(tmp_path, "HessianSpectrumMeasurement", frame)
    assert [r["round"] for r in records] == [2, 4]
    last = records[-1]
    H = hessian.exact_hessian(model, frame.criterion, x, y)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    torch.testing.assert_close(torch.tensor(last["eigenvalues"], dtype=torch.float64), exact, rtol=1e-6, atol=0)
    assert last["converged"] and last["curvature"] == "hessian" and last["batch_samples"] == 64
    assert abs(last["trace"] - H.trace().item()) <= 3 * last["trace_se"]
    assert len(last["block_lambda_max"]) == len(last["block_trace"]) == 3 and last["hvps"] > last["probes"]
    edges = [0, *torch.tensor(last["block_sizes"]).cumsum(0).tolist()]
    for b in range(3):
        block = H[edges[b]:edges[b + 1], edges[b]:edges[b + 1]]
        assert last["block_lambda_max"][b] == pytest.approx(torch.linalg.eigvalsh(block).max().item(), rel=1e-6)


def test_ggn_block_norms_unit(tmp_path):
    frame, model, x, y = _run(tmp_path, "- HessianBlockInteractionMeasurement curvature=ggn tol=1e-8 max_steps=100 "
                                        "method=krylov batch_size=64")
    last = _log(tmp_path, "HessianBlockInteractionMeasurement", frame)[-1]
    G = hessian.exact_hessian(model, frame.criterion, x, y, curvature="ggn")
    exact = hessian.block_spectral_norms(G, hessian.block_sizes(model))
    torch.testing.assert_close(torch.tensor(last["norms"], dtype=torch.float64), exact, rtol=1e-6, atol=1e-12)
    assert last["curvature"] == "ggn" and all(all(row) for row in last["converged"])
    assert max(v for row in last["residual"] for v in row) <= 1e-8
    assert max(v for row in last["coupling"] for v in row) <= 1 + 1e-6  # PSD: coupling at most 1


def test_bad_curvature_in_units_file_exits_2(tmp_path, capsys):
    units = tmp_path / "Units.txt"
    units.write_text("- HessianSpectrumMeasurement curvature=fisher\n")
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--output_root", str(tmp_path), "--units_file", str(units)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "'fisher'" in err and "['ggn', 'hessian']" in err
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=1.5), dict(tol=0), dict(trace_probes=1), dict(max_steps=0),
                                    dict(curvature="fisher"), dict(mode="sideways"), dict(dtype="float16")])
def test_spectrum_unit_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HessianSpectrumMeasurement(**kwargs)


def test_block_unit_rejects_unknown_curvature():
    with pytest.raises(ValueError, match="'fisher'"):
        HessianBlockInteractionMeasurement(curvature="fisher")
