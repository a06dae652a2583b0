"""The curvature spectrum (top-k eigenvalues, traces, per-block λ_max) against the exact Hessian, float64."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from src.Buliding_Units.hessian import block_sizes, exact_hessian
from src.Buliding_Units.hessian.spectrum import curvature_spectrum, spectrum_from_hvp
from hessian_helpers import F64, Sequential, one_thread  # noqa: F401 - one_thread: autouse fixture


@pytest.fixture(scope="module")
def tiny():
    """A 4-block tanh MLP (N = 154) on 40 samples, 3 classes, and its exact Hessian."""
    torch.manual_seed(0)
    dims = [6, 8, 6, 5]
    blocks = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims[:-1], dims[1:])]
    model = Sequential(blocks + [nn.Linear(5, 3)]).to(F64).eval()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(40, 6, generator=generator, dtype=F64) * 2
    targets = torch.randint(0, 3, (40,), generator=generator)
    criterion = nn.CrossEntropyLoss()
    return model, criterion, inputs, targets, exact_hessian(model, criterion, inputs, targets)


def _spans(sizes):
    edges = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def test_top_eigenvalues_match_eigvalsh(tiny):
    model, criterion, inputs, targets, H = tiny
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    result = curvature_spectrum(model, criterion, inputs, targets, k=3, tol=1e-9, max_steps=200)
    assert result.converged and len(result.eigenvalues) == 3
    assert torch.allclose(torch.tensor(result.eigenvalues, dtype=F64), exact, rtol=1e-6, atol=0)
    assert all(abs(v - e) <= r * (1 + 1e-6) + 1e-15 for v, e, r in zip(result.eigenvalues, exact.tolist(),
                                                                        result.residuals))
    sizes = block_sizes(model)
    for b, span in enumerate(_spans(sizes)):
        block_max = torch.linalg.eigvalsh(H[span, span]).max().item()
        assert result.block_lambda_max[b] == pytest.approx(block_max, rel=1e-6)
        assert result.block_converged[b]


def test_hutchinson_traces_within_three_standard_errors(tiny):
    model, criterion, inputs, targets, H = tiny
    sizes = block_sizes(model)
    for seed in range(3):
        result = curvature_spectrum(model, criterion, inputs, targets, k=1, seed=seed, trace_probes=64)
        assert 0 < result.trace_se < abs(result.trace)
        assert abs(result.trace - H.trace().item()) <= 3 * result.trace_se
        assert sum(result.block_trace) == pytest.approx(result.trace, rel=1e-10)
        for b, span in enumerate(_spans(sizes)):
            assert abs(result.block_trace[b] - H[span, span].trace().item()) <= 3 * result.block_trace_se[b]


def test_hutchinson_is_exact_for_a_diagonal_matrix():
    """zᵀ D z = tr D for every Rademacher z: a zero standard error, the exact trace."""
    diagonal = torch.linspace(-1, 3, 30, dtype=F64)
    result = spectrum_from_hvp(lambda v: v * diagonal, [10, 20], k=2, tol=1e-10, trace_probes=8, dtype=F64)
    assert result.trace == pytest.approx(diagonal.sum().item(), rel=1e-12) and result.trace_se < 1e-12
    assert result.eigenvalues == pytest.approx([3.0, diagonal[-2].item()], rel=1e-10)
    assert result.block_lambda_max == pytest.approx([diagonal[9].item(), 3.0], rel=1e-10)


def _power_iteration(model, criterion, inputs, targets, steps=500):
    """λ_max by plain power iteration with torch.autograd.functional.hvp (PyHessian's method), not our code."""
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]

    def loss(*values):
        return criterion(functional_call(model, dict(zip(names, values)), (inputs,)), targets)

    generator = torch.Generator().manual_seed(7)
    v = [torch.randn(p.shape, generator=generator, dtype=F64) for p in params]
    estimate = 0.0
    for _ in range(steps):
        norm = torch.sqrt(sum((t * t).sum() for t in v))
        v = [t / norm for t in v]
        hv = torch.autograd.functional.hvp(loss, tuple(p.detach() for p in params), tuple(v))[1]
        estimate = sum((a * b).sum() for a, b in zip(hv, v)).item()
        v = list(hv)
    return estimate


def test_top_eigenvalue_agrees_with_power_iteration(tiny):
    model, criterion, inputs, targets, H = tiny
    values = torch.linalg.eigvalsh(H)
    assert values[-1] > 2 * values[0].abs()  # the top eigenvalue dominates: power iteration finds it
    ours = curvature_spectrum(model, criterion, inputs, targets, k=1, tol=1e-9, max_steps=200).eigenvalues[0]
    assert ours == pytest.approx(_power_iteration(model, criterion, inputs, targets), rel=1e-6)


def test_ggn_spectrum(tiny):
    model, criterion, inputs, targets, _ = tiny
    G = exact_hessian(model, criterion, inputs, targets, curvature="ggn")
    result = curvature_spectrum(model, criterion, inputs, targets, k=2, tol=1e-9, max_steps=200, curvature="ggn")
    assert torch.allclose(torch.tensor(result.eigenvalues, dtype=F64), torch.linalg.eigvalsh(G).flip(0)[:2],
                          rtol=1e-6, atol=0)
    assert abs(result.trace - G.trace().item()) <= 3 * result.trace_se


def test_bad_arguments_are_refused(tiny):
    model, criterion, inputs, targets, _ = tiny
    with pytest.raises(ValueError, match="k >= 1.*k=0"):
        curvature_spectrum(model, criterion, inputs, targets, k=0)
    with pytest.raises(ValueError, match="trace_probes=1"):
        curvature_spectrum(model, criterion, inputs, targets, trace_probes=1)
