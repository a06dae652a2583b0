"""Command line, copies, seeds, the batch-size probe, the Reporter and the Units.txt parser."""
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from src.batch_probe import get_max_batch_size
from src.blocks import copy_block, copy_model
from src.Buliding_Units.plugins import parse_measurement_units
from src.cli import ConfigError, key_comments, parse_arguments
from src.reporting import Reporter, read_report, run_id
from src.utils import set_seed

DEFAULTS = {"config": [8, 8], "step_size": 0.01, "rounds": 3, "flag": False, "name": "cnn", "target": None,
            "table": {"a": 1}}


@pytest.mark.parametrize("argv, key, expected", [
    (["--config", "[[16,16],[32,32],[32,64]]"], "config", [[16, 16], [32, 32], [32, 64]]),
    (["--config=[4, 5]"], "config", [4, 5]),
    (["--step_size", "1"], "step_size", 1.0),
    (["--step_size", "1e-3"], "step_size", 1e-3),
    (["--rounds", "7"], "rounds", 7),
    (["--flag", "True"], "flag", True),
    (["--flag", "true"], "flag", True),
    (["--flag", "1"], "flag", True),
    (["--flag", "False"], "flag", False),
    (["--flag", "0"], "flag", False),
    (["--name", "residual_cnn"], "name", "residual_cnn"),
    (["--target", "0.9"], "target", 0.9),
    (["--table", "{'b': 2}"], "table", {"b": 2}),
    ([], "config", [8, 8]),
])
def test_parse_arguments_values(argv, key, expected):
    H = parse_arguments(DEFAULTS, argv)
    assert H[key] == expected and type(H[key]) is type(expected)
    assert set(H) == set(DEFAULTS)


@pytest.mark.parametrize("argv, needle", [
    (["--nope", "1"], "--nope"),
    (["--conf", "[1]"], "--conf"),  # abbreviations are refused
    (["--rounds", "0.1"], "--rounds"),
    (["--rounds", "abc"], "--rounds"),
    (["--step_size", "[1]"], "--step_size"),
    (["--flag", "maybe"], "--flag"),
    (["--config", "7"], "--config"),
    (["--config", "[1,"], "--config"),
])
def test_parse_arguments_rejects(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        parse_arguments(DEFAULTS, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err


def test_wrong_type_message_names_type_and_default(capsys):
    with pytest.raises(SystemExit):
        parse_arguments(DEFAULTS, ["--rounds", "0.1"])
    err = capsys.readouterr().err
    assert "expected int" in err and "default: 3" in err and "'0.1'" in err


def test_help_lists_every_key_with_comment(capsys):
    source = 'D = {\n    "rounds": 3,  # rounds to train\n    "flag": False,  # a switch\n}\n'
    with pytest.raises(SystemExit) as info:
        parse_arguments({"rounds": 3, "flag": False}, ["--help"], help_texts=key_comments(source))
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--rounds" in out and "rounds to train" in out and "--flag" in out and "a switch" in out


def _bn_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_copy_block_copies_parameters_and_buffers_without_sharing():
    src, dst = _bn_net(), _bn_net()
    src.train()
    src(torch.randn(4, 3, 8, 8))  # changes running statistics
    copy_block(src, dst)
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name
        assert a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        src[0].weight.add_(1.0)
    assert not torch.equal(src[0].weight, dst[0].weight)


def test_copy_block_checks_shapes_and_names():
    with pytest.raises(ValueError, match="shape"):
        copy_block(nn.Linear(3, 4), nn.Linear(3, 5))
    with pytest.raises(ValueError, match="names"):
        copy_model(nn.Linear(3, 4), nn.Linear(3, 4, bias=False))


def test_set_seed_reproduces():
    set_seed(3)
    a = torch.randn(5)
    set_seed(3)
    assert torch.equal(a, torch.randn(5))


@pytest.mark.parametrize("limit", [1, 7, 64, 100, 1000])
def test_max_batch_size_search_with_injected_limit(limit):
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= limit

    got = get_max_batch_size(nn.Linear(2, 2), torch.zeros(2), fits=fits, safety=1.0, high=4096)
    assert got == limit
    assert len(calls) < 30  # doubling + bisection, not a linear scan
    assert get_max_batch_size(nn.Linear(2, 2), torch.zeros(2), fits=lambda b: b <= limit, safety=0.5) \
        == max(1, limit // 2)


def test_max_batch_size_none_fits():
    assert get_max_batch_size(nn.Linear(2, 2), torch.zeros(2), fits=lambda b: False) == 0


def test_max_batch_size_cpu_estimate_scales_with_memory():
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    small = get_max_batch_size(model, torch.zeros(100), free_bytes=10 * 2**20, high=10**9)
    large = get_max_batch_size(model, torch.zeros(100), free_bytes=100 * 2**20, high=10**9)
    assert 0 < small < large
    # the saved activations are ~ (100 + 1000 + 1000) floats per sample: the estimate is within 2x of that
    per_sample = (100 * 2**20 - 10 * 2**20) * 0.8 / (large - small)
    assert 2100 * 4 / 2 < per_sample < 2100 * 4 * 2


def test_reporter_header_status_and_archive(tmp_path):
    H = {"a": 1, "b": [1, 2]}
    rep = Reporter(H, tmp_path)
    assert rep.path.name == f"{run_id(H)}.txt" and len(run_id(H)) == 9
    rep.log("Round 1: Energy = 1.0")
    rep.log_metrics({"round": 1, "loss": 1.0})
    head = read_report(rep.path)
    assert head["status"] == "alive" and head["H"] == H and head["pid"] == os.getpid()
    assert "torch" in head["run_info"]
    rep.finish("stopped", "TargetStopper: reached")
    head = read_report(rep.path)
    assert head["status"] == "stopped" and "TargetStopper" in head["status_detail"]
    # an identical configuration never destroys the earlier report
    rep2 = Reporter(H, tmp_path)
    assert rep2.path == rep.path
    archived = tmp_path / f"{run_id(H)}.1.txt"
    assert read_report(archived)["status"] == "stopped"
    assert json.loads((tmp_path / f"{run_id(H)}.metrics.1.jsonl").read_text())["loss"] == 1.0


def test_reporter_fail_records_traceback(tmp_path):
    rep = Reporter({"x": 1}, tmp_path)
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        rep.fail(err, exit_code=1)
    text = rep.path.read_text()
    assert read_report(rep.path)["status"] == "failed"
    assert "Traceback" in text and "RuntimeError: boom" in text and "exit code 1" in text


def test_parse_units_with_arguments_and_comments(tmp_path):
    f = tmp_path / "Units.txt"
    f.write_text("Header line\n\n# - Hidden\n- Working_memory_usage\n"
                 "- EarlyStoppingStopper monitor=test_accuracy patience=3 min_delta=0.01\n"
                 "- src.Buliding_Units.StopperUnit.TargetStopper threshold=0.5\n")
    units = parse_measurement_units(f)
    assert [type(u).__name__ for u in units] == ["Working_memory_usage", "EarlyStoppingStopper", "TargetStopper"]
    assert units[1].patience == 3 and units[1].mode == "max" and units[2].threshold == 0.5


@pytest.mark.parametrize("line, needles", [
    ("- Working_memory_usag", ["Did you mean 'Working_memory_usage'", "Available", ":1"]),
    ("- EarlyStoppingStopper patiense=3", ["Did you mean 'patience'", ":1"]),
    ("- EarlyStoppingStopper patience", ["key=value"]),
    ("- EarlyStoppingStopper monitor=nope", ["nope", "valid"]),
    ("- no.such.module.Unit", ["cannot import"]),
])
def test_parse_units_errors(tmp_path, line, needles):
    f = tmp_path / "Units.txt"
    f.write_text(line + "\n")
    with pytest.raises(ConfigError) as info:
        parse_measurement_units(f)
    for needle in needles:
        assert needle in str(info.value)
    assert str(f) in str(info.value) or "cannot import" in str(info.value)


def test_max_batch_size_cuda_probe_catches_out_of_memory():
    """The CUDA probe's forward+backward and OOM handling, run on the CPU with a model that 'runs out' above 37."""
    from src.batch_probe import _cuda_fits

    class Greedy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            if x.shape[0] > 37:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.lin(x)

    model = Greedy()
    fits = _cuda_fits(model, torch.zeros(3), torch.device("cpu"), None)
    assert get_max_batch_size(model, torch.zeros(3), fits=fits, safety=1.0, high=1000) == 37
    assert all(p.grad is None for p in model.parameters())  # probes leave no gradients behind


def test_every_help_text_of_dol1_is_the_comment_of_its_default():
    """--help reads the trailing comment of "key": lines in dol1.py; another table's line must not overwrite one."""
    import dol1
    source = Path(dol1.__file__).read_text()
    block = source[source.index("DEFAULTS: dict"):source.index("\n}\n", source.index("DEFAULTS: dict"))]
    assert key_comments(source) == {k: v for k, v in key_comments(block).items()}
    assert "mlp" in key_comments(source)["model"]
