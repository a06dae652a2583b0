"""Tests of the Hessian block numerics against torch.func, finite differences and closed forms (float64, CPU)."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from src.Buliding_Units.hessian.krylov import krylov_block_norms
from src.Buliding_Units.hessian import (InteractionInfo, block_interaction_norms, block_sizes, block_spectral_norms,
                                        exact_hessian, finite_difference_hessian, make_batched_hvp,
                                        normalised_coupling, plan_method)
from hessian_helpers import F64, Sequential, one_thread  # noqa: F401 - one_thread: autouse fixture


class Heads(nn.Module):
    """One Linear(d, 1) head per class; the logits are the heads' outputs side by side."""

    def __init__(self, dim: int, classes: int, bias: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, 1, bias=bias) for _ in range(classes))

    def forward(self, x):
        return torch.cat([head(x) for head in self.blocks], dim=1)


def mlp(dim=8, widths=(8, 8, 8, 8), classes=3, seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Flatten(), nn.Linear(dim, widths[0]), nn.Tanh())]
    blocks += [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(widths[:-1], widths[1:])]
    blocks += [nn.Linear(widths[-1], classes)]
    return Sequential(blocks).to(F64).eval()


def cnn(batch_norm=False, seed=0):
    torch.manual_seed(seed)
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    blocks = [nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), norm(3), nn.Tanh()),
              nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), norm(3), nn.Tanh()),
              nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))]
    return Sequential(blocks).to(F64).eval()


def classification_batch(shape, classes=3, n=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=generator, dtype=F64),
            torch.randint(0, classes, (n,), generator=generator))


def flat_loss(model, criterion, inputs, targets):
    """The loss of the flat block-parameter vector, written independently of hessian.py."""
    named = [(n, p) for b in model.blocks for n, p in b.named_parameters()]
    prefix = {id(p): name for name, p in model.named_parameters()}
    names = [prefix[id(p)] for _, p in named]
    shapes = [p.shape for _, p in named]
    p0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss(flat):
        params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return criterion(functional_call(model, params, (inputs,)), targets)

    return loss, p0


@pytest.fixture(scope="module")
def mlp_case():
    model, criterion = mlp(), nn.CrossEntropyLoss()
    inputs, targets = classification_batch((8,))
    hessian = exact_hessian(model, criterion, inputs, targets)
    return model, criterion, inputs, targets, hessian


@pytest.fixture(scope="module")
def cnn_case():
    model, criterion = cnn(), nn.CrossEntropyLoss()
    inputs, targets = classification_batch((2, 5, 5), n=16)
    return model, criterion, inputs, targets, exact_hessian(model, criterion, inputs, targets)


def test_block_sizes_follow_blocks():
    assert block_sizes(mlp()) == [72, 72, 72, 72, 27]
    assert block_sizes(cnn()) == [57, 84, 12]


def test_exact_hessian_matches_torch_func(mlp_case):
    model, criterion, inputs, targets, hessian = mlp_case
    loss, p0 = flat_loss(model, criterion, inputs, targets)
    reference = torch.func.hessian(loss)(p0)
    assert hessian.shape == (315, 315) and hessian.dtype == F64
    assert torch.allclose(hessian, reference, rtol=0, atol=1e-12 * reference.abs().max())
    assert torch.equal(hessian, hessian.mT)


def test_finite_differences_match_exact(mlp_case):
    model, criterion, inputs, targets, hessian = mlp_case
    fd = finite_difference_hessian(model, criterion, inputs, targets)
    assert torch.equal(fd, fd.mT)
    assert (fd - hessian).norm() / hessian.norm() < 1e-6


def test_finite_differences_refuse_large_models():
    model, criterion = mlp(), nn.CrossEntropyLoss()
    inputs, targets = classification_batch((8,))
    with pytest.raises(ValueError, match=r"N = 315.*max_params = 100"):
        finite_difference_hessian(model, criterion, inputs, targets, max_params=100)


def test_block_spectral_norms_against_svdvals():
    torch.manual_seed(0)
    sizes = [3, 5, 4]
    matrix = torch.randn(12, 12, dtype=F64)
    matrix = matrix + matrix.mT
    norms = block_spectral_norms(matrix, sizes)
    edges = [0, 3, 8, 12]
    for i in range(3):
        for j in range(3):
            block = matrix[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            assert norms[i, j] == pytest.approx(torch.linalg.svdvals(block)[0].item(), rel=1e-12)
        diagonal = matrix[edges[i]:edges[i + 1], edges[i]:edges[i + 1]]
        assert norms[i, i] == pytest.approx(torch.linalg.eigvalsh(diagonal).abs().max().item(), rel=1e-12)
    with pytest.raises(ValueError, match="sum"):
        block_spectral_norms(matrix, [3, 5])


@pytest.mark.parametrize("case", ["mlp_case", "cnn_case"])
def test_krylov_matches_exact_block_norms(case, request):
    model, criterion, inputs, targets, hessian = request.getfixturevalue(case)
    exact = block_spectral_norms(hessian, block_sizes(model))
    for tol, max_steps, bound in [(1e-2, 50, 2e-2), (1e-10, 300, 1e-6)]:
        estimate, info = block_interaction_norms(model, criterion, inputs, targets, tol=tol, max_steps=max_steps,
                                                 method="krylov", return_info=True)
        assert info.method == "krylov" and info.lower_bound and info.pool == "one-sided"
        assert estimate.dtype == F64 and torch.equal(estimate, estimate.mT)
        assert ((estimate - exact).abs() / exact).max() <= bound
        assert (estimate <= exact * (1 + 1e-9)).all()  # certified lower bounds
        assert info.steps.shape == exact.shape and info.converged.dtype == torch.bool
    assert info.converged.all()


def test_two_sided_pool_when_outputs_exceed_budget(mlp_case):
    model, criterion, inputs, targets, hessian = mlp_case
    exact = block_spectral_norms(hessian, block_sizes(model))
    hvp = make_batched_hvp(model, criterion, inputs, targets)
    row = 315 * 8  # bytes of one stored output
    for budget in [row, 40 * row]:  # two-sided from the start; after 40 outputs
        result = krylov_block_norms(hvp, hvp.block_sizes, tol=1e-10, max_steps=300, store_budget_bytes=budget)
        assert result.pool == "two-sided"
        assert ((result.norms - exact).abs() / exact).max() <= 1e-6
        assert (result.norms <= exact * (1 + 1e-9)).all()


@pytest.mark.parametrize("bias", [False, True])
def test_per_class_heads_couple_at_one_over_c_minus_one(bias):
    classes, dim = 4, 5
    model = Heads(dim, classes, bias).to(F64)
    for p in model.parameters():
        nn.init.zeros_(p)
    inputs, targets = classification_batch((dim,), classes=classes, n=40)
    norms = block_interaction_norms(model, nn.CrossEntropyLoss(), inputs, targets, tol=1e-12, max_steps=100,
                                    method="krylov")
    coupling = normalised_coupling(norms)
    off_diagonal = coupling[~torch.eye(classes, dtype=torch.bool)]
    assert torch.allclose(off_diagonal, torch.full_like(off_diagonal, 1 / (classes - 1)), rtol=1e-6, atol=0)
    assert torch.allclose(coupling.diagonal(), torch.ones(classes, dtype=F64))


def test_two_layer_linear_network_closed_form():
    n, d_in, hidden, d_out = 30, 6, 4, 3
    model = Sequential([nn.Linear(d_in, hidden, bias=False), nn.Linear(hidden, d_out, bias=False)]).to(F64)
    for p in model.parameters():
        nn.init.zeros_(p)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, d_in, generator=generator, dtype=F64)
    y = torch.randn(n, d_out, generator=generator, dtype=F64)
    expected = 2 / d_out * torch.linalg.matrix_norm(x.mT @ y / n, ord=2).item()
    criterion = nn.MSELoss()
    # torch 2.14's mse_loss has no forward-over-reverse support: the autograd fallback is used
    assert make_batched_hvp(model, criterion, x, y).backend == "autograd"
    exact = block_spectral_norms(exact_hessian(model, criterion, x, y), block_sizes(model))
    assert exact[0, 0] == 0 and exact[1, 1] == 0
    assert exact[0, 1] == pytest.approx(expected, rel=1e-12)
    estimate, info = block_interaction_norms(model, criterion, x, y, tol=1e-12, max_steps=100, method="krylov",
                                             return_info=True)
    assert estimate[0, 0] == 0 and estimate[1, 1] == 0
    assert estimate[0, 1] == pytest.approx(expected, rel=1e-9)
    assert info.converged.all()  # breakdowns: the Krylov spaces are exhausted
    assert normalised_coupling(estimate)[0, 1].isnan()


def test_parameter_free_block_gets_zero():
    model = Sequential([nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)]).to(F64).eval()
    inputs, targets = classification_batch((4,))
    criterion = nn.CrossEntropyLoss()
    exact = block_spectral_norms(exact_hessian(model, criterion, inputs, targets), block_sizes(model))
    estimate, info = block_interaction_norms(model, criterion, inputs, targets, tol=1e-10, method="krylov",
                                             return_info=True)
    assert block_sizes(model) == [25, 0, 18]
    assert (exact[1] == 0).all() and (estimate[1] == 0).all() and info.converged.all()
    assert torch.allclose(estimate, exact, rtol=1e-8, atol=0)


def test_normalised_coupling_does_not_modify_input():
    norms = torch.tensor([[4.0, 1.0, 2.0], [1.0, 1.0, 0.0], [2.0, 0.0, 0.0]], dtype=F64)
    before = norms.clone()
    coupling = normalised_coupling(norms)
    assert torch.equal(norms, before)
    assert coupling[0, 1] == pytest.approx(0.5) and coupling[1, 1] == 1
    assert coupling[0, 2].isnan() and coupling[2, 2].isnan()


def test_deterministic(mlp_case):
    model, criterion, inputs, targets, _ = mlp_case
    first = block_interaction_norms(model, criterion, inputs, targets, method="krylov", seed=5)
    with torch.no_grad():  # callers may measure inside no_grad
        again = block_interaction_norms(model, criterion, inputs, targets, method="krylov", seed=5)
    assert torch.equal(first, again)
    hvp = make_batched_hvp(model, criterion, inputs, targets)
    probes = torch.randn(3, hvp.numel, dtype=F64)
    assert torch.equal(hvp(probes), hvp(probes))


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()])


def _assert_same_state(model, state):
    values, grads = state
    assert all(torch.equal(values[k], v) for k, v in model.state_dict().items())
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


@pytest.mark.parametrize("train", [False, True])
def test_batch_norm_model_is_left_unchanged(train):
    model, criterion = cnn(batch_norm=True), nn.CrossEntropyLoss()
    inputs, targets = classification_batch((2, 5, 5), n=16)
    model.train()
    criterion(model(inputs), targets).backward()  # non-trivial running stats and grads
    model.train(train)
    state = _state(model)
    norms, info = block_interaction_norms(model, criterion, inputs, targets, method="krylov", return_info=True)
    exact = exact_hessian(model, criterion, inputs, targets)
    _assert_same_state(model, state)
    assert model.training == train
    assert make_batched_hvp(model, criterion, inputs, targets).backend == ("autograd" if train else "func")
    # train mode (batch statistics) goes through the autograd backend: check it against finite differences
    fd = finite_difference_hessian(model, criterion, inputs, targets)
    _assert_same_state(model, state)
    assert (fd - exact).norm() / exact.norm() < 1e-6
    reference = block_spectral_norms(exact, block_sizes(model))
    assert ((norms - reference).abs() / reference).max() <= 2e-2


class FunctionalDropout(nn.Module):
    def forward(self, x):
        return nn.functional.dropout(x, 0.5, training=self.training)


@pytest.mark.parametrize("dropout", [nn.Dropout(0.5), FunctionalDropout()])
def test_random_forward_is_refused(dropout):
    model = Sequential([nn.Linear(4, 4), dropout, nn.Linear(4, 2)]).to(F64).train()
    inputs, targets = classification_batch((4,), classes=2)
    with pytest.raises(ValueError, match="eval"):
        block_interaction_norms(model, nn.CrossEntropyLoss(), inputs, targets)
    model.eval()
    assert block_interaction_norms(model, nn.CrossEntropyLoss(), inputs, targets).shape == (3, 3)


def test_unknown_method_lists_valid_ones(mlp_case):
    model, criterion, inputs, targets, _ = mlp_case
    with pytest.raises(ValueError, match=r"'lanczos'.*\['auto', 'dense', 'krylov'\]"):
        block_interaction_norms(model, criterion, inputs, targets, method="lanczos")


def test_planner_dense_on_tiny_and_krylov_on_larger():
    criterion = nn.CrossEntropyLoss()
    tiny = mlp(dim=4, widths=(4, 4), classes=3)
    inputs, targets = classification_batch((4,))
    norms, info = block_interaction_norms(tiny, criterion, inputs, targets, return_info=True)
    assert info.method == "dense" and not info.lower_bound and info.hvps == sum(block_sizes(tiny))
    exact = block_spectral_norms(exact_hessian(tiny, criterion, inputs, targets), block_sizes(tiny))
    assert torch.allclose(norms, exact, rtol=1e-12, atol=0)

    larger = mlp(dim=32, widths=(32, 32, 32), classes=10)
    inputs, targets = classification_batch((32,), classes=10, n=64)
    n_params = sum(block_sizes(larger))
    assert plan_method(n_params, block_sizes(larger)) == "krylov"
    norms, info = block_interaction_norms(larger, criterion, inputs, targets, return_info=True)
    assert info.method == "krylov" and 0 < info.hvps < n_params / 4
    assert isinstance(info, InteractionInfo) and info.wall_time > 0 and (norms > 0).all()
