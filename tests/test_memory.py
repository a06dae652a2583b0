"""The memory unit: autograd's saved bytes against a hand count, the CUDA peaks per interval (mocked on the CPU), and
the multi-process engine's record summing every rank (copies, centres and scratch blocks)."""
import json
import resource

import pytest
import torch
from torch import nn

import dol1
from src.Buliding_Units import memory
from src.Buliding_Units.MeasurementUnit import Working_memory_usage
from src.Buliding_Units.Model_frames import generate_ModelFrame

TINY = ["--model", "mlp", "--config", "[6, 5]", "--dataset_name", "digits_flat", "--rounds", "2", "--batch_size", "32",
        "--report_sampling_rate", "2", "--cuda_core", "-1", "--eval_samples", "128", "--K", "2"]
MB = 2.0 ** 20


class ThreeBlocks(nn.Module):
    """Linear(4→3)+ReLU, Linear(3→3)+ReLU, Linear(3→2): the hand-count model (float64, batch 5)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 3), nn.ReLU()),
                                     nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 2)]).double()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_saved_bytes_hand_count():
    model, x, y = ThreeBlocks(), torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    hidden, out = 5 * 3 * 8, 5 * 2 * 8  # bytes of one (5, 3) activation and of the (5, 2) output
    # a full step saves both ReLU outputs (each also saved by the next Linear: one storage, counted once) and the
    # output for the MSE; x, y and the weights are not counted (they exist without the graph)
    # block 0 or 1 alone: the graph starts at block 0 or 1 and still covers both ReLUs; block 2 alone: only the
    # second ReLU's output (saved by its Linear for the weight gradient) and the output
    expected = {"full_step": 2 * hidden + out, "block_steps": [2 * hidden + out, 2 * hidden + out, hidden + out]}
    assert memory.step_activation_bytes(model, nn.MSELoss(), x, y) == expected
    assert all(p.requires_grad for p in model.parameters())  # measured on a copy: the flags are untouched
    model.requires_grad_(False)
    assert memory.saved_tensor_bytes(model, nn.MSELoss(), x, y) == 0


def test_memory_record_has_activations_and_peak_rss():
    H = dol1.resolve_config(TINY + ["--training_mode", "entire"])
    frame = generate_ModelFrame(H)
    record = Working_memory_usage().measure(frame)
    saved = record["autograd_saved_MB"]
    assert saved["batch_size"] == 32 and len(saved["block_steps"]) == 3
    # mlp [6, 5] on 64 inputs, batch 32, float32: activations after each hidden layer (linear out + activation out),
    # and the logits; a block-local step of the last block keeps only what follows block 1
    assert 0 < saved["block_steps"][2] < saved["block_steps"][0] <= saved["full_step"]
    assert saved["block_step_max"] == max(saved["block_steps"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    assert 0 < record["cpu_peak_rss_MB"] <= rss
    assert "cuda_peak_allocated_MB" not in record and "per_rank" not in record
    assert "autograd_saved_MB" not in Working_memory_usage(autograd=False).measure(frame)


def test_cuda_peaks_per_interval_with_mocked_cuda(monkeypatch):
    H = dol1.resolve_config(TINY + ["--training_mode", "entire"])
    frame = generate_ModelFrame(H)
    frame.device = torch.device("cuda", 0)  # the model stays on the CPU; only the CUDA read-outs are exercised
    peaks = {"allocated": 300 * MB, "reserved": 512 * MB}
    calls = []

    def reset(device):
        calls.append(("reset", device))
        peaks.update(allocated=0.0, reserved=0.0)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("read", device)) or
                        peaks["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: peaks["reserved"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    unit = Working_memory_usage()
    first = unit.measure(frame)
    assert (first["cuda_peak_allocated_MB"], first["cuda_peak_reserved_MB"]) == (300, 512)
    peaks.update(allocated=40 * MB, reserved=64 * MB)  # the next interval's own peaks
    second = unit.measure(frame)
    assert (second["cuda_peak_allocated_MB"], second["cuda_peak_reserved_MB"]) == (40, 64)
    # read, reset after the read, reset again after the activation probe: the probe belongs to no interval
    assert calls == [("read", frame.device), ("reset", frame.device), ("reset", frame.device)] * 2


def memory_records(root, frame):
    log = root / "measurements" / f"Working_memory_usage_{frame.run_id}.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_multiprocess_record_sums_every_rank(tmp_path):
    units = tmp_path / "Units.txt"
    units.write_text("- Working_memory_usage autograd=False\n")
    argv = TINY + ["--units_file", str(units), "--measurement_sampling_rate", "1"]
    sequential = dol1.main(argv + ["--training_mode", "blockwise_sequential", "--output_root", str(tmp_path / "s")])
    spawned = dol1.main(argv + ["--training_mode", "blockwise", "--n_workers", "2",
                                "--output_root", str(tmp_path / "d")])
    seq, dis = memory_records(tmp_path / "s", sequential)[-1], memory_records(tmp_path / "d", spawned)[-1]
    assert dis["n_copies"] == seq["n_copies"] == 3  # rank 0 holds blocks 0 and 2, rank 1 block 1
    assert [(r["rank"], r["n_copies"]) for r in dis["per_rank"]] == [(0, 2), (1, 1)]
    assert dis["copies_MB"] == pytest.approx(seq["copies_MB"], rel=1e-12)  # the same copies, spread over ranks
    assert dis["center_MB"]["parameters"] == pytest.approx(2 * seq["center_MB"]["parameters"], rel=1e-12)
    centre_bytes = sum(p.numel() * p.element_size() for p in sequential.center_model.parameters()) / MB
    assert dis["scratch_MB"] == pytest.approx(2 * centre_bytes, rel=1e-12) and seq["scratch_MB"] == 0
    assert dis["total_MB"] == pytest.approx(sum(r["center_MB"] + r["copies_MB"] + r["scratch_MB"]
                                                for r in dis["per_rank"]), rel=1e-12)
    assert dis["total_MB"] == pytest.approx(seq["total_MB"] + seq["center_MB"]["parameters"] + 2 * centre_bytes,
                                            rel=1e-12)
    assert all(r["cpu_peak_rss_MB"] > 0 for r in dis["per_rank"])
