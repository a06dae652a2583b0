"""The Gauss-Newton option (``curvature="ggn"``) against G = Jᵀ H_L J built from Jacobians, in float64."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from src.Buliding_Units.hessian import (block_interaction_norms, block_sizes, block_spectral_norms, exact_hessian,
                                        make_batched_hvp, normalised_coupling)
from hessian_helpers import F64, Sequential, one_thread  # noqa: F401 - one_thread: autouse fixture


def tanh_mlp(dim=6, widths=(7, 5), out=3, seed=0):
    torch.manual_seed(seed)
    dims = [dim, *widths]
    blocks = [nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims[:-1], dims[1:])]
    return Sequential(blocks + [nn.Linear(dims[-1], out)]).to(F64).eval()


def reference_ggn(model, criterion, inputs, targets):
    """Jᵀ H_L J with J = jacrev of the outputs w.r.t. the flat block parameters and H_L = the loss's Hessian in the
    outputs; written without hessian.py."""
    named = [(name, p) for name, p in model.named_parameters()]
    shapes, numels = [p.shape for _, p in named], [p.numel() for _, p in named]
    p0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def outputs(flat):
        params = {name: t.view(s) for (name, _), t, s in zip(named, flat.split(numels), shapes)}
        return functional_call(model, params, (inputs,))

    out = outputs(p0)
    jacobian = jacrev(outputs)(p0).reshape(out.numel(), -1)  # (n·C, N)
    loss_hessian = hessian(lambda o: criterion(o.reshape(out.shape), targets))(out.reshape(-1))  # (n·C, n·C)
    return jacobian.mT @ loss_hessian @ jacobian


def _cross_entropy_case():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(20, 6, generator=generator, dtype=F64)
    return tanh_mlp(), nn.CrossEntropyLoss(), inputs, torch.randint(0, 3, (20,), generator=generator)


def _mse_case():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(20, 6, generator=generator, dtype=F64)
    return tanh_mlp(seed=1), nn.MSELoss(), inputs, torch.randn(20, 3, generator=generator, dtype=F64)


@pytest.mark.parametrize("case, backend", [(_cross_entropy_case, "func"), (_mse_case, "autograd")])
def test_ggn_matches_jacobian_reference(case, backend):
    model, criterion, inputs, targets = case()
    reference = reference_ggn(model, criterion, inputs, targets)
    assert make_batched_hvp(model, criterion, inputs, targets, curvature="ggn").backend == backend
    dense = exact_hessian(model, criterion, inputs, targets, curvature="ggn")
    assert torch.allclose(dense, reference, rtol=0, atol=1e-12 * reference.abs().max())
    assert torch.linalg.eigvalsh(reference).min() >= -1e-12 * reference.abs().max()  # PSD
    full = exact_hessian(model, criterion, inputs, targets)
    assert (full - reference).abs().max() > 1e-3 * reference.abs().max()  # the dropped term is not zero here
    sizes = block_sizes(model)
    exact = block_spectral_norms(reference, sizes)
    estimate, info = block_interaction_norms(model, criterion, inputs, targets, tol=1e-8, max_steps=200,
                                             method="krylov", curvature="ggn", return_info=True)
    assert info.converged.all()
    assert ((estimate - exact).abs() / exact).max() <= 1e-6
    assert (normalised_coupling(exact) <= 1 + 1e-12).all()  # PSD: |G_ij| <= sqrt(|G_ii| |G_jj|)


def test_ggn_equals_hessian_when_outputs_are_linear_in_parameters():
    """One linear head per class: the network term vanishes and G = H exactly."""
    torch.manual_seed(0)
    model = Sequential([nn.Linear(5, 1) for _ in range(3)])

    class Heads(Sequential):
        def forward(self, x):
            return torch.cat([head(x) for head in self.blocks], dim=1)

    heads = Heads(list(model.blocks)).to(F64)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(16, 5, generator=generator, dtype=F64)
    targets = torch.randint(0, 3, (16,), generator=generator)
    criterion = nn.CrossEntropyLoss()
    ggn = exact_hessian(heads, criterion, inputs, targets, curvature="ggn")
    assert torch.allclose(ggn, exact_hessian(heads, criterion, inputs, targets), rtol=0, atol=1e-14)


def test_unknown_curvature_lists_valid_ones():
    model, criterion, inputs, targets = _cross_entropy_case()
    with pytest.raises(ValueError, match=r"'fisher'.*\['ggn', 'hessian'\]"):
        block_interaction_norms(model, criterion, inputs, targets, curvature="fisher")
