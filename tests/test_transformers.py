"""The Transformers (vit, gpt), the python_docs text and the language_model task: layouts, checks, the data, the
loss and metrics, every engine, checkpoints, the units that read the task (Hessian, memory, curriculum, stoppers)."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dol1
from src.Architectures.Models import MODELS, build_model
from src.Architectures.transformers import (CharTransformer, Head, PatchEmbedding, TokenEmbedding, TransformerLayer,
                                            VisionTransformer, patch_size)
from src.Buliding_Units.Model_frames import (LanguageModel_frame_blockwise, LanguageModel_frame_entire,
                                             NextTokenCrossEntropy, generate_ModelFrame)
from src.Buliding_Units.StopperUnit import stoppers_from_settings
from src.cli import ConfigError
from src.Data import DATASETS, load_data
from src.Data.text import char_windows, decode, python_docs_text
from src.Optimizer_Engines import resolve_engine
from src.Optimizer_Engines.loop import evaluate, log_progress
from src.records import identity
from src.reporting import format_progress

ROOT = Path(dol1.__file__).resolve().parent
FAST = ["--cuda_core", "-1", "--measurement_sampling_rate", "0", "--report_sampling_rate", "0",
        "--checkpoint_every", "0", "--eval_samples", "32", "--batch_size", "8"]
GPT = ["--model", "gpt", "--config", "[16]", "--dataset_name", "python_docs", "--context", "8"]
VIT = ["--model", "vit", "--config", "[16]", "--dataset_name", "digits"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: torch's intra-op threads only cost time on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frame_for(*argv, units=()):
    return generate_ModelFrame(dol1.resolve_config(FAST + list(argv)), units=units)


def train(*argv, units=()):
    frame = frame_for(*argv, units=units)
    return resolve_engine(frame.H["training_mode"]).function(frame)


# ---------------------------------------------------------------- layouts


def test_vit_layout_patch_rule_and_heads():
    model = build_model("vit", [32, 32, 32], (3, 32, 32), 10)
    assert isinstance(model, VisionTransformer) and model.patch == 4
    kinds = [type(b) for b in model.blocks]
    assert kinds == [PatchEmbedding, TransformerLayer, TransformerLayer, TransformerLayer, Head]
    assert model.blocks[1].heads == 2  # width // 16
    assert model.blocks[0](torch.randn(2, 3, 32, 32)).shape == (2, 1 + 8 * 8, 32)  # class token + 8×8 patches
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("vit", [24], (3, 32, 32), 10, heads=3).blocks[1].heads == 3
    assert [patch_size(s, s) for s in (32, 28, 224, 8)] == [4, 2, 28, 1]
    assert patch_size(32, 24) == 2  # 24 // 8 = 3 does not divide 32: lowered to 2


def test_gpt_layout_and_causality():
    torch.manual_seed(0)
    model = build_model("gpt", [32, 32], (12,), 20).eval()
    assert isinstance(model, CharTransformer) and model.context == 12
    assert [type(b) for b in model.blocks] == [TokenEmbedding, TransformerLayer, TransformerLayer, Head]
    ids = torch.randint(0, 20, (3, 12))
    out = model(ids)
    assert out.shape == (3, 12, 20)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20  # the future of position 6
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :7], out[:, :7], rtol=0, atol=0)
        assert not torch.allclose(model(changed)[:, 7:], out[:, 7:])
    assert build_model("gpt", [16], (12,), 20)(ids[:, :5]).shape == (3, 5, 20)  # shorter sequences too


@pytest.mark.parametrize(("config", "heads", "fragments"), [
    ([16, 32, 32], 0, ["config", "[16, 32, 32]", "all equal", '--config "[64, 64]"']),
    ([8, 8], 0, ["config [8, 8]", "< 16", "--heads 0", "valid --heads for width 8: [1, 2, 4, 8]"]),
    ([50], 0, ["config [50]", "--heads 0 (width // 16 = 3)", "[1, 2, 5, 10, 25, 50]"]),
    ([60], 8, ["config [60]", "--heads 8", "valid --heads for width 60"]),
    ([], 0, ["config", "got []"]),
])
@pytest.mark.parametrize("name", ["vit", "gpt"])
def test_bad_width_or_heads_is_one_sentence_naming_config_and_heads(name, config, heads, fragments):
    with pytest.raises(ValueError) as info:
        build_model(name, config, (3, 32, 32) if name == "vit" else (16,), 10, heads=heads)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_transformers_and_the_text_load_only_when_used():
    code = ("import sys, dol1; dol1.resolve_config([]); import src.Buliding_Units.Model_frames, src.Data; "
            "assert 'src.Architectures.transformers' not in sys.modules; assert 'src.Data.text' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "vit" in MODELS and "gpt" in MODELS and DATASETS["python_docs"].task == "language_model"


# ---------------------------------------------------------------- python_docs


def test_split_vocabulary_and_windows_on_a_tiny_string():
    text = "abcabcabcabcabcabcaXYZ"  # 22 characters; a test fraction of 0.25 cuts at round(16.5) = 16
    train, test, vocab = char_windows(text, context=3, test_fraction=0.25)
    assert vocab == "abc"  # from the training split only
    x, y = train.tensors
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (5, 3)  # (16 − 1) // 3 windows, stride 3
    assert decode(x[0], vocab) == "abc" and decode(y[0], vocab) == "bca"
    assert decode(x[1], vocab) == "abc" and torch.equal(x[:, 1:], y[:, :-1])
    tx, ty = test.tensors  # "bcaXYZ": X, Y, Z are unknown to the training vocabulary
    assert decode(tx[0], vocab) == "bca" and ty[0].tolist() == [2, 0, 3] and decode(ty[0], vocab)[-1] == "\ufffd"
    assert ty.max() == len(vocab) == 3 and train.vocabulary == test.vocabulary == vocab
    with pytest.raises(ValueError, match="no window"):
        char_windows("abcdef", context=8)


def test_python_docs_is_the_local_help_text_as_character_windows():
    text = python_docs_text()
    assert 400_000 < len(text) < 600_000 and 80 < len(set(text)) < 130
    assert 'The "if" statement' in text and "Comparisons" in text
    data = load_data("python_docs")
    vocab = data.train.vocabulary
    assert data.task == "language_model" and data.input_shape == (64,) and data.output_dim == len(vocab) + 1
    cut = round(0.9 * len(text))
    assert len(data.train) == (cut - 1) // 64 and len(data.test) == (len(text) - cut - 1) // 64
    x, y = data.train.tensors
    assert x.dtype == torch.int64 and decode(x[0], vocab) == text[:64] and decode(y[0], vocab) == text[1:65]
    assert decode(data.test.tensors[0][0], vocab) == text[cut:cut + 64].translate(
        {ord(c): "\ufffd" for c in set(text[cut:]) - set(vocab)})
    assert load_data("python_docs", context=16).input_shape == (16,)
    assert load_data("digits_flat").input_shape == (64,)  # the other sets ignore context
    first, again = data.batches(8, seed=3)[5], load_data("python_docs").batches(8, seed=3)[5]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # the seeded batch order


# ---------------------------------------------------------------- the task: loss, accuracy, bits per character


def test_next_token_loss_accuracy_and_bits_per_char():
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    loss = NextTokenCrossEntropy()
    torch.testing.assert_close(loss(logits, targets), F.cross_entropy(logits.reshape(15, 7), targets.reshape(15)))
    loss.reduction = "none"
    assert loss(logits, targets).shape == (3, 5)
    frame = frame_for(*GPT)
    assert isinstance(frame, LanguageModel_frame_blockwise) and isinstance(frame.criterion, NextTokenCrossEntropy)
    result = evaluate(frame, "test")
    with torch.no_grad():
        x, y = next(frame.data.eval_batches("test", 32))
        out = frame.center_model.eval()(x)
    assert result["accuracy"] == pytest.approx((out.argmax(-1) == y).double().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).item())
    assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2))
    record = log_progress(frame)
    assert record["test_bits_per_char"] == pytest.approx(record["test_loss"] / math.log(2))
    assert "BitsPerChar = " in format_progress(record) and "Test BitsPerChar = " in format_progress(record)
    assert isinstance(frame_for("--training_mode", "entire", *GPT), LanguageModel_frame_entire)


# ---------------------------------------------------------------- settings and refusals


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--model", "gpt"], ["--model gpt", "python_docs", "digits"]),
    (["--model", "vit", "--dataset_name", "python_docs"], ["python_docs", "language_model", "--model gpt", "vit"]),
    (["--model", "mlp", "--dataset_name", "python_docs"], ["python_docs", "not mlp"]),
    (["--model", "vit", "--config", "[16, 32, 32]"], ["--config", "all equal", '"[64, 64]"']),
    (["--model", "vit", "--config", "[24]", "--heads", "5"], ["--config", "--heads 5", "valid --heads"]),
    (["--model", "vit", "--config", "[8]"], ["--heads 0", "< 16"]),
    (["--heads", "-1"], ["--heads", ">= 0"]),
    (["--context", "1"], ["--context", ">= 2"]),
    (["--model", "gpt", "--dataset_name", "python_docs", "--context", "5000"], ["--context", "at most 512", "5000"]),
    (["--model", "vit", "--config", "[0]"], ["--config [0]", "positive width", '"[64, 64]"']),
])
def test_dol1_refuses_with_exit_2_and_one_line(tmp_path, capsys, argv, fragments):
    with pytest.raises(SystemExit) as info:
        dol1.main(FAST + ["--rounds", "1", "--output_root", str(tmp_path)] + argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dol1.py: error"), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "reports").exists()


def test_transformers_get_their_own_default_config_and_keys_scope_the_run_id():
    assert dol1.resolve_config(["--model", "vit"])["config"] == [64, 64]
    assert dol1.resolve_config(["--model", "gpt", "--dataset_name", "python_docs"])["config"] == [64, 64]
    assert dol1.resolve_config(["--model", "vit", "--config", "[32]"])["config"] == [32]
    with pytest.raises(ConfigError, match="all equal"):  # the shared default, given explicitly, is refused
        generate_ModelFrame(dol1.resolve_config(["--model", "vit", "--config", "[16, 32, 32]", "--cuda_core", "-1"]))
    assert dol1.resolve_config([])["config"] == [16, 32, 32]
    plain = identity(dol1.resolve_config([]), "")
    assert "heads" not in plain and "context" not in plain  # other runs keep the ids they had before these keys
    text = identity(dol1.resolve_config(["--model", "gpt", "--dataset_name", "python_docs"]), "")
    assert text["heads"] == 0 and text["context"] == 64
    assert "heads" in identity(dol1.resolve_config(["--model", "vit"]), "")


# ---------------------------------------------------------------- engines, checkpoints


@pytest.mark.parametrize("mode", ["entire", "blockwise_sequential", "async_sequential"])
@pytest.mark.parametrize("model", ["gpt", "vit"])
def test_single_process_engines_train_the_transformers(mode, model):
    frame = train("--training_mode", mode, "--rounds", "3", *(GPT if model == "gpt" else VIT))
    assert frame.round == 3 and frame.n_blocks == 3 and frame.steps > 0
    last = frame.history[-1]
    assert all(math.isfinite(last[k]) for k in ("loss", "test_loss", "accuracy", "test_accuracy"))
    assert ("test_bits_per_char" in last) == (model == "gpt")


def test_the_loss_falls():
    frame = train("--training_mode", "entire", "--rounds", "25", "--batch_size", "32", *GPT)
    assert frame.history[-1]["test_loss"] < frame.history[0]["test_loss"] - 0.5


@pytest.mark.parametrize("mode", ["entire", "blockwise_sequential"])
@pytest.mark.parametrize("model", ["gpt", "vit"])
def test_checkpoint_then_restore_continues_bit_exactly(mode, model):
    from src.Runs.checkpoint import frame_state, restore
    argv = ["--training_mode", mode, *(GPT if model == "gpt" else VIT)]
    straight = train(*argv, "--rounds", "4")
    half = train(*argv, "--rounds", "2")
    resumed = frame_for(*argv, "--rounds", "4")
    restore(resumed, frame_state(half))
    resolve_engine(mode).function(resumed)
    for key, value in straight.center_model.state_dict().items():
        assert torch.equal(value, resumed.center_model.state_dict()[key]), key


# ---------------------------------------------------------------- the units that read the task


@pytest.mark.parametrize("model", ["gpt", "vit"])
def test_hessian_units_give_finite_numbers_in_float64(model):
    from src.Buliding_Units.hessian.products import _autograd_hvp, FlatLoss, make_batched_hvp
    from src.Buliding_Units.hessian.units import HessianBlockInteractionMeasurement, HessianSpectrumMeasurement
    frame = frame_for(*(GPT if model == "gpt" else VIT))
    interaction = HessianBlockInteractionMeasurement(batch_size=4, max_steps=6, tol=0.1)
    spectrum = HessianSpectrumMeasurement(batch_size=4, k=2, max_steps=6, trace_probes=4, tol=0.1)
    model64, x, y = interaction._problem(frame)
    hvp = make_batched_hvp(model64, frame.criterion, x, y)
    assert hvp.backend == "func"  # vmap(jvp(grad)) through the embeddings, LayerNorm and the attention
    probes = torch.randn(2, hvp.numel, dtype=torch.float64)
    torch.testing.assert_close(hvp(probes), _autograd_hvp(FlatLoss(model64, frame.criterion, x, y))(probes))
    for unit in (interaction, spectrum):
        unit.prepare(frame)
        record = unit.measure(frame)
        numbers = record["norms"] if "norms" in record else [record["trace"], *record["eigenvalues"],
                                                             *record["block_lambda_max"], *record["block_trace"]]
        assert all(math.isfinite(v) for v in torch.tensor(numbers, dtype=torch.float64).flatten().tolist())
        assert len(record["block_sizes"]) == 3


def test_memory_unit_counts_a_gpt():
    from src.Buliding_Units.MeasurementUnit import Working_memory_usage
    frame = frame_for(*GPT)
    record = Working_memory_usage().measure(frame)
    saved = record["autograd_saved_MB"]
    assert record["n_copies"] == 3 and len(saved["block_steps"]) == 3
    assert saved["full_step"] > 0 and saved["block_steps"][-1] < saved["full_step"]


def test_curriculum_scores_text_by_loss_and_refuses_margin():
    from src.Buliding_Units.ScheduleUnit import Curriculum
    frame = frame_for(*GPT)
    with pytest.raises(ValueError, match="score=margin needs a classification data set; python_docs is a "
                                         "language_model task"):
        Curriculum(score="margin").prepare(frame)
    curriculum = Curriculum(score="loss", start=0.5, full_at=4)
    curriculum.prepare(frame)
    changes = curriculum.at(frame, 0)
    assert len(changes["order"]) == len(frame.data.train) and changes["pool_size"] == math.ceil(0.5 * len(
        frame.data.train))


def test_stoppers_read_a_language_model_record():
    frame = train("--training_mode", "entire", "--rounds", "2", "--target_monitor", "test_accuracy",
                  "--target_value", "0.0", *GPT, units=stoppers_from_settings(dol1.resolve_config(
                      FAST + GPT + ["--target_value", "0.0"])))
    assert frame.stop_kind == "target" and frame.round == 0  # any accuracy above 0 stops at the first check
    units = stoppers_from_settings(dol1.resolve_config(FAST + GPT + ["--early_stop_patience", "1",
                                                                     "--early_stop_monitor", "loss"]))
    frame = train("--training_mode", "entire", "--rounds", "2", *GPT, units=units)
    assert frame.round == 2 and frame.stop_kind is None


# ---------------------------------------------------------------- the multi-process engines (slow)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "extra"), [("blockwise", ["--n_workers", "2"]), ("async_sequential", []),
                                             ("async", ["--n_workers", "2"])])
def test_multi_process_and_async_engines_train_a_tiny_gpt(tmp_path, mode, extra):
    frame = dol1.main(FAST + GPT + ["--training_mode", mode, "--rounds", "4", "--report_sampling_rate", "2",
                                    "--output_root", str(tmp_path)] + extra)
    assert frame.round == 4 and frame.n_blocks == 3
    assert all(math.isfinite(r["test_bits_per_char"]) for r in frame.history)
    assert "BitsPerChar" in next((tmp_path / "reports").glob("R*.txt")).read_text()
