"""--block_order: which blocks an active subset holds and in which order Gauss–Seidel visits them (cyclic, reverse,
random re-drawn each round, seeded); recorded in the run's settings, resumed bit for bit."""
import json

import pytest
import torch

import dol1
from src.Optimizer_Engines.loop import BLOCK_ORDERS, active_blocks
from tests_helpers_interrupt import install

TINY = ["--model", "mlp", "--config", "[8, 8, 8]", "--dataset_name", "digits_flat", "--rounds", "8", "--batch_size",
        "32", "--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "2",
        "--eval_samples", "128", "--training_mode", "blockwise_sequential"]


def test_cyclic_and_reverse_take_turns_and_random_is_seeded_per_round():
    assert [active_blocks(r, 4, 0.25, 0) for r in range(6)] == [[0], [1], [2], [3], [0], [1]]  # BAdam, ascending
    assert [active_blocks(r, 4, 0.25, 0, "reverse") for r in range(5)] == [[3], [2], [1], [0], [3]]
    assert [active_blocks(r, 5, 0.4, 0) for r in range(3)] == [[0, 1], [2, 3], [4, 0]]
    assert active_blocks(3, 4, 1.0, 0) == [0, 1, 2, 3] and active_blocks(3, 4, 1.0, 0, "reverse") == [3, 2, 1, 0]
    draws = [active_blocks(r, 6, 1.0, 7, "random") for r in range(10)]
    assert all(sorted(d) == list(range(6)) for d in draws) and len({tuple(d) for d in draws}) > 5
    assert draws == [active_blocks(r, 6, 1.0, 7, "random") for r in range(10)]  # seeded: the same again
    assert draws != [active_blocks(r, 6, 1.0, 8, "random") for r in range(10)]
    counts = [0] * 6  # cyclic subsets visit every block equally often
    for r in range(12):
        for b in active_blocks(r, 6, 0.5, 0):
            counts[b] += 1
    assert counts == [6] * 6


@pytest.mark.parametrize("order", BLOCK_ORDERS)
def test_the_order_decides_gauss_seidel_and_is_recorded(tmp_path, order):
    frame = dol1.main(TINY + ["--block_update", "gauss_seidel", "--block_order", order, "--output_root",
                              str(tmp_path)])
    config = json.loads(frame.paths.config(frame.run_id).read_text())
    assert config["settings"]["block_order"] == order and frame.steps == 8 * 4


def test_gauss_seidel_results_depend_on_the_order_jacobi_results_do_not(tmp_path):
    def run(update, order):
        return dol1.main(TINY + ["--block_update", update, "--block_order", order, "--output_root",
                                 str(tmp_path / f"{update}{order}")]).center_model.state_dict()
    up, down = run("gauss_seidel", "cyclic"), run("gauss_seidel", "reverse")
    assert any(not torch.equal(up[k], down[k]) for k in up)
    a, b = run("jacobi", "cyclic"), run("jacobi", "reverse")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # every block from the same centre


def test_a_random_order_resumes_bit_for_bit(tmp_path):
    argv = TINY + ["--block_update", "gauss_seidel", "--block_order", "random", "--active_share", "0.5",
                   "--checkpoint_every", "3", "--rounds", "9"]
    whole = dol1.main(argv + ["--output_root", str(tmp_path / "whole")])
    with install(5):
        with pytest.raises(SystemExit) as info:
            dol1.main(argv + ["--output_root", str(tmp_path / "cut")])
    assert info.value.code == 130
    resumed = dol1.main(argv + ["--output_root", str(tmp_path / "cut"), "--resume"])
    assert resumed.round == whole.round == 9
    for key, value in whole.center_model.state_dict().items():
        assert torch.equal(value, resumed.center_model.state_dict()[key]), key


def test_a_bad_order_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        dol1.main(TINY + ["--block_order", "backwards", "--output_root", str(tmp_path)])
    assert info.value.code == 2 and "'backwards'" in capsys.readouterr().err
