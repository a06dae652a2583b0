"""Tests of the block-aware model zoo: block structure, torchvision equivalence, voting, validation."""

import copy
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn

from src.Architectures.feedforward_nn import (
    EnsembleFeedForwardCNN,
    EnsembleFeedForwardNetwork,
    FeedForwardCNN,
    FeedForwardNetwork,
    ResidualBlock,
    ResidualFeedForwardCNN,
)
from src.Architectures.Models import (
    MODELS,
    build_model,
    load_feedforward,
    load_feedforward_cnn,
    load_feedforward_cnn_ensemble,
    load_feedforward_ensemble,
    load_resnet18,
    load_resnet34,
    load_residual_feedforward_cnn,
)
from src.Architectures.resnets import resnet18, resnet34

ROOT = Path(__file__).resolve().parents[1]

# name -> (small config, input shape without batch, expected number of blocks)
CASES = {
    "linear_nn": ([8, 6], (2, 3, 3), 3),
    "mlp": ([8, 6, 4], (12,), 4),
    "cnn": ([4, 6], (3, 8, 8), 3),
    "residual_cnn": ([4, 8, 8], (3, 8, 8), 4),
    "cnn_ensemble": ([[4], [4, 6]], (3, 8, 8), 5),
    "feedforward_ensemble": ([[8], [8, 6], [4]], (12,), 7),
    "ResNet18": ([8], (3, 16, 16), 10),
    "ResNet34": ([8], (3, 16, 16), 18),
    "vit": ([16, 16], (3, 8, 8), 4),
    "gpt": ([16], (6,), 3),
}
ENSEMBLES = {"cnn_ensemble", "feedforward_ensemble"}
SEQUENCES = {"gpt"}  # token ids in, one output per position: tested in test_transformers.py


def test_table_has_exactly_the_seed_names():
    assert set(MODELS) == {"linear_nn", "mlp", "cnn", "residual_cnn", "cnn_ensemble",
                           "feedforward_ensemble", "ResNet18", "ResNet34", "vit", "gpt"}
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocks_partition_the_parameters(name):
    torch.manual_seed(0)
    config, shape, n_blocks = CASES[name]
    model = build_model(name, config, shape, 5)
    assert isinstance(model.blocks, nn.ModuleList)
    assert len(model.blocks) == n_blocks
    block_ids = [id(p) for block in model.blocks for p in block.parameters()]
    assert len(block_ids) == len(set(block_ids)), "a parameter belongs to two blocks"
    assert set(block_ids) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for b in model.blocks for p in b.parameters()) == sum(
        p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(set(MODELS) - SEQUENCES))
def test_forward_shape_and_gradients(name):
    torch.manual_seed(0)
    config, shape, _ = CASES[name]
    model = build_model(name, config, shape, 5)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 5)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(set(MODELS) - ENSEMBLES - SEQUENCES))
def test_sequential_blocks_equal_forward(name):
    torch.manual_seed(0)
    config, shape, _ = CASES[name]
    model = build_model(name, config, shape, 5).eval()
    x = torch.randn(2, *shape)
    h = x
    with torch.no_grad():
        for block in model.blocks:
            h = block(h)
        torch.testing.assert_close(h, model(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [EnsembleFeedForwardNetwork, EnsembleFeedForwardCNN])
def test_ensemble_blocks_are_the_members_blocks(cls):
    model = cls([[16, 16], [32, 32], [32, 64]], 12 if cls is EnsembleFeedForwardNetwork else 3, 4)
    assert len(model.blocks) == 9
    member_blocks = [block for member in model.members for block in member.blocks]
    assert all(a is b for a, b in zip(model.blocks, member_blocks, strict=True))


def test_mlp_takes_images_and_vectors():
    torch.manual_seed(0)
    model = FeedForwardNetwork([8], 48, 3).eval()
    images = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(model(images), model(images.reshape(4, 48)))
    assert len(model.blocks) == 2


def test_linear_nn_is_linear():
    torch.manual_seed(0)
    model = build_model("linear_nn", [8, 8], (6,), 3)
    x, y = torch.randn(5, 6), torch.randn(5, 6)
    zero = model(torch.zeros(1, 6))
    torch.testing.assert_close(model(x + y) - zero, (model(x) - zero) + (model(y) - zero))


def test_cnn_stem_halves_resolution_and_counts_blocks():
    model = FeedForwardCNN([8, 16, 16], 3, 10)
    assert len(model.blocks) == 4
    assert model.blocks[0](torch.randn(2, 3, 32, 32)).shape == (2, 8, 16, 16)
    no_bn = FeedForwardCNN([8], 3, 10, batch_norm=False, stem_stride=1)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    assert no_bn.blocks[0](torch.randn(1, 3, 32, 32)).shape == (1, 8, 32, 32)


# ---------------------------------------------------------------- residual CNN


def test_residual_cnn_changes_channels_and_seed_default():
    torch.manual_seed(0)
    model = ResidualFeedForwardCNN([4, 8, 8, 16], 3, 10)
    assert len(model.blocks) == 5
    assert isinstance(model.blocks[1].skip, nn.Sequential)  # 4 -> 8 needs a projection
    assert isinstance(model.blocks[2].skip, nn.Identity)  # 8 -> 8 does not
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    seed_default = ResidualFeedForwardCNN([8] * 5, 3, 10, beta=0.5)
    assert len(seed_default.blocks) == 6


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_residual_block_formula(beta):
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, beta=beta).eval()
    x = torch.randn(2, 4, 5, 5)
    expected = torch.relu(beta * block.skip(x) + (1 - beta) * block.residual(x))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_out_of_range_raises(beta):
    with pytest.raises(ValueError, match="beta must be in"):
        ResidualFeedForwardCNN([4, 4], 3, 2, beta=beta)
    with pytest.raises(ValueError, match="beta must be in"):
        ResidualFeedForwardCNN([4], 3, 2, beta=beta)  # no residual block, still checked
    with pytest.raises(ValueError, match="beta"):
        build_model("residual_cnn", [4, 4], (3, 8, 8), 2, beta=beta)


# ---------------------------------------------------------------- ensemble voting


def _member_outputs(model, x):
    return torch.stack([member(x) for member in model.members])  # (M, N, D)


def test_average_voting_is_the_member_mean():
    torch.manual_seed(0)
    model = EnsembleFeedForwardNetwork([[8], [8, 8], [4]], 6, 3, voting_method="average")
    x = torch.randn(16, 6)
    for mode in (True, False):
        model.train(mode)
        torch.testing.assert_close(model(x), _member_outputs(model, x).mean(0))


def test_random_voting_picks_one_member_per_sample_in_training_only():
    torch.manual_seed(0)
    model = EnsembleFeedForwardNetwork([[8], [8, 8], [4]], 6, 3, voting_method="random").train()
    x = torch.randn(64, 6)
    out, members = model(x), _member_outputs(model, x)
    distance = (members - out.unsqueeze(0)).abs().amax(dim=2)  # (M, N)
    assert torch.all(distance.min(dim=0).values == 0), "a row equals no member's row"
    assert len(set(distance.argmin(dim=0).tolist())) > 1, "every sample voted by the same member"
    model.eval()
    torch.testing.assert_close(model(x), members.mean(0))


def test_unknown_voting_method_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'majority'.*\['average', 'random'\]"):
        EnsembleFeedForwardCNN([[4]], 3, 2, voting_method="majority")
    with pytest.raises(ValueError, match="average"):
        build_model("feedforward_ensemble", [[4]], (6,), 2, voting_method="majority")


# ---------------------------------------------------------------- ResNets vs torchvision


@pytest.mark.parametrize(("ours_fn", "tv_name", "n_blocks"), [(resnet18, "resnet18", 10), (resnet34, "resnet34", 18)])
def test_resnet_matches_torchvision_both_ways(ours_fn, tv_name, n_blocks):
    import torchvision

    torch.manual_seed(0)
    tv_fn = getattr(torchvision.models, tv_name)
    ours, tv = ours_fn(num_classes=10), tv_fn(num_classes=10)
    assert len(ours.blocks) == n_blocks
    ours_sd, tv_sd = ours.state_dict(), tv.state_dict()
    assert list(ours_sd) == list(tv_sd)  # same keys in the same order, none extra
    assert len({t.data_ptr() for t in ours_sd.values()}) == len(ours_sd), "a tensor is listed twice"
    x = torch.randn(2, 3, 64, 64)

    ours.load_state_dict(tv_sd)  # torchvision -> ours, strict
    ours.eval(), tv.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))

    torch.manual_seed(1)
    ours2, tv2 = ours_fn(num_classes=10).eval(), tv_fn(num_classes=10).eval()
    tv2.load_state_dict(ours2.state_dict())  # ours -> torchvision, strict
    with torch.no_grad():
        torch.testing.assert_close(tv2(x), ours2(x))
        assert not torch.allclose(ours2(x), ours(x)), "the second pair should have other weights"


def test_resnet_strict_loading_reports_torchvision_names():
    torch.manual_seed(0)
    source = resnet18(num_classes=10).state_dict()
    model = resnet18(num_classes=10)
    missing = dict(source)
    del missing["fc.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "fc.bias"'):
        model.load_state_dict(missing)
    extra = dict(source, **{"layer1.0.conv3.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layer1.0.conv3.weight"'):
        model.load_state_dict(extra)
    result = model.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["fc.bias"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="size mismatch"):
        resnet18(num_classes=10, cifar_stem=True).load_state_dict(source)


def test_resnet_state_dict_nested_and_copied():
    torch.manual_seed(0)
    model = resnet18(num_classes=4)
    wrapper = nn.Sequential(model)
    keys = list(wrapper.state_dict())
    assert keys[0] == "0.conv1.weight" and keys[-1] == "0.fc.bias"
    wrapper.load_state_dict(wrapper.state_dict())
    clone = copy.deepcopy(model)
    before = model.blocks[-1].fc.bias.clone()
    clone.load_state_dict({k: torch.zeros_like(v) if k == "fc.bias" else v for k, v in model.state_dict().items()})
    assert torch.all(clone.blocks[-1].fc.bias == 0)
    torch.testing.assert_close(model.blocks[-1].fc.bias, before)  # the copy's hooks act on the copy
    # internal names (as named_parameters gives them) load too
    internal = dict(model.named_parameters()) | dict(model.named_buffers())
    assert model.load_state_dict(internal) is not None


def test_cifar_stem_keeps_resolution():
    model = load_resnet18(10, True)
    assert model.blocks[0].conv1.kernel_size == (3, 3)
    assert isinstance(model.blocks[0].maxpool, nn.Identity)
    assert model.blocks[0](torch.randn(1, 3, 32, 32)).shape == (1, 64, 32, 32)
    assert not build_model("ResNet18", [], (3, 224, 224), 5).blocks[0].conv1.kernel_size == (3, 3)


def test_pretrained_fails_clearly_offline(monkeypatch):
    import torchvision.models._api as weights_api  # where the weights API downloads from

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    for loader in (load_resnet18, load_resnet34):
        with pytest.raises(RuntimeError, match="network access") as info:
            loader(pretrained=True)
        assert torch.hub.get_dir() in str(info.value)
        assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_pretrained_rejects_incompatible_options():
    with pytest.raises(ValueError, match="num_classes=1000"):
        load_resnet18(num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="cifar_stem"):
        load_resnet34(cifar_stem=True, pretrained=True)


def test_importing_models_does_not_import_torchvision():
    code = ("import sys; import src.Architectures.Models, src.Architectures.resnets; "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- loaders and validation


def test_loaders_keep_the_seed_argument_order():
    mlp = load_feedforward([8, 8], 5, 3)
    assert mlp.blocks[0].linear.in_features == 5 and mlp.blocks[-1].linear.out_features == 3
    cnn = load_feedforward_cnn([4], 1, 2)
    assert cnn.blocks[0].conv.in_channels == 1 and cnn.blocks[-1].linear.out_features == 2
    residual = load_residual_feedforward_cnn([4, 8], 1, 2, 0.25)
    assert residual.blocks[1].beta == 0.25
    ensemble = load_feedforward_ensemble([[4], [4]], 5, 3, "random")
    assert ensemble.voting_method == "random" and len(ensemble.blocks) == 4
    cnn_ensemble = load_feedforward_cnn_ensemble([[4]], 1, 2, "average", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in cnn_ensemble.modules())
    assert len(load_resnet34(7).blocks) == 18 and load_resnet34(7).blocks[-1].fc.out_features == 7


def test_unknown_model_lists_sorted_valid_names():
    with pytest.raises(ValueError) as info:
        build_model("resnet_18", [8], (3, 32, 32), 10)
    message = str(info.value)
    assert "'resnet_18'" in message and str(sorted(MODELS)) in message


@pytest.mark.parametrize(("name", "config"), [
    ("mlp", []), ("mlp", [0, 4]), ("mlp", [[8]]), ("linear_nn", "8,8"), ("cnn", [4.5]),
    ("residual_cnn", [True]), ("feedforward_ensemble", [8, 8]), ("cnn_ensemble", []),
    ("cnn_ensemble", [[]]), ("cnn_ensemble", [[4], [-1]]), ("vit", [16, 32]), ("vit", [[16]]), ("gpt", [0]),
])
def test_bad_config_raises_one_clear_sentence(name, config):
    shape = (3, 8, 8)
    with pytest.raises(ValueError) as info:
        build_model(name, config, shape, 2)
    message = str(info.value)
    assert repr(name) in message and repr(config) in message and "\n" not in message


@pytest.mark.parametrize("name", ["cnn", "residual_cnn", "cnn_ensemble", "ResNet18"])
def test_image_models_need_a_3d_input_shape(name):
    config = [[4]] if name in ENSEMBLES else [4]
    with pytest.raises(ValueError, match=r"3-D input_shape.*\(64,\)"):
        build_model(name, config, (64,), 2)


def test_bad_input_shape_and_output_dim_raise():
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", [4], (0,), 2)
    with pytest.raises(ValueError, match="output_dim"):
        build_model("mlp", [4], (4,), 0)
