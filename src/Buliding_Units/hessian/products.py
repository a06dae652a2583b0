"""Curvature-vector products of the loss w.r.t. the flat vector of block parameters: the Hessian H or the
generalised Gauss-Newton matrix G = Jᵀ H_L J, batched over probes.

Pure functions, no file I/O; ``hessian`` builds on them (see its module docstring for the flat-vector convention and
the measurement mode). G uses J, the Jacobian of the model's outputs w.r.t. the parameters, and H_L, the Hessian of
the loss w.r.t. the outputs: it drops H's term that holds the network's second derivatives (Σ_k ∂L/∂f_k ∇²f_k), and
is positive semi-definite whenever the loss is convex in the outputs (cross-entropy, MSE). Martens (2020), "New
insights and perspectives on the natural gradient method", JMLR 21(146), section 8.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

logger = logging.getLogger(__name__)

CURVATURES = ("hessian", "ggn")  # the Hessian of the loss, or its generalised Gauss-Newton part

# Heuristic working memory of one probe in a batched HVP, in copies of the parameters and of the activations
# (forward tangent, backward cotangent and their products); only used to size the chunks.
_PARAM_COPIES = 4
_ACTIVATION_COPIES = 4


class FlatLoss:
    """The loss as a function of the flat vector of block parameters, evaluated on detached copies."""

    def __init__(self, model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"expected a model with an nn.ModuleList attribute 'blocks', got {type(blocks).__name__}")
        name_of = {id(p): name for name, p in model.named_parameters()}
        self.names: list[str] = []
        self.block_sizes: list[int] = []
        in_blocks: set[str] = set()
        for index, block in enumerate(blocks):
            size = 0
            for p in block.parameters():
                if name_of[id(p)] in in_blocks:
                    raise ValueError(f"parameter {name_of[id(p)]!r} is shared between blocks (block {index} again)")
                self.names.append(name_of[id(p)])
                in_blocks.add(name_of[id(p)])
                size += p.numel()
            self.block_sizes.append(size)
        params = dict(model.named_parameters())
        if not self.names:
            raise ValueError("the model's blocks hold no parameters")
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.p0 = torch.cat([params[n].detach().reshape(-1) for n in self.names]).clone()
        self.fixed = {n: p.detach() for n, p in params.items() if n not in in_blocks}
        # Clones: a train-mode BatchNorm updates its running statistics in place.
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.model, self.criterion, self.inputs, self.targets = model, criterion, inputs, targets

    def outputs(self, flat: Tensor) -> Tensor:
        """The model's outputs at the flat parameters."""
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.numels), self.shapes)}
        return functional_call(self.model, {**self.fixed, **self.buffers, **params}, (self.inputs,))

    def loss_of_outputs(self, outputs: Tensor) -> Tensor:
        """The loss as a function of the outputs."""
        return self.criterion(outputs, self.targets)

    def __call__(self, flat: Tensor) -> Tensor:
        return self.loss_of_outputs(self.outputs(flat))

    def activation_numel(self) -> int:
        """Number of activation entries of one forward pass (outputs of leaf modules), for memory sizing."""
        counts = [self.inputs.numel()]

        def hook(_module, _args, output):
            if isinstance(output, Tensor):
                counts.append(output.numel())

        handles = [m.register_forward_hook(hook) for m in self.model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self(self.p0)
        finally:
            for handle in handles:
                handle.remove()
        return sum(counts)


def _hvp_backend(model: nn.Module) -> str:
    """The HVP implementation the model's mode allows: train-mode BatchNorm updates buffers, which vmap refuses."""
    train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
                   for m in model.modules())
    return "autograd" if train_bn else "func"


def check_deterministic(flat: FlatLoss) -> None:
    """Refuse a random forward pass (dropout in train mode...): Krylov methods need H v to be a function of v."""
    with torch.no_grad():
        first, second = flat(flat.p0), flat(flat.p0)
    if (first - second).abs() > 1e-5 * first.abs():  # slack for non-deterministic GPU kernels
        raise ValueError(f"two evaluations of the loss at the same parameters differ ({first.item():.6g} vs "
                         f"{second.item():.6g}): the forward pass is random (dropout in train mode?); call "
                         "model.eval() before measuring")


def _func_hvp(flat: FlatLoss) -> Callable[[Tensor], Tensor]:
    grad_fn = grad(flat)
    p0 = flat.p0
    return vmap(lambda v: jvp(grad_fn, (p0,), (v,))[1])


def _autograd_hvp(flat: FlatLoss) -> Callable[[Tensor], Tensor]:
    # One graph of the gradient, reused by every call (is_grads_batched vmaps the double backward).
    p = flat.p0.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(flat(p), p, create_graph=True)
    if not g.requires_grad:  # the gradient does not depend on the parameters: H = 0
        return torch.zeros_like
    return lambda vs: torch.autograd.grad(g, p, vs, is_grads_batched=True, retain_graph=True)[0]


def _func_ggn(flat: FlatLoss) -> Callable[[Tensor], Tensor]:
    # G v = Jᵀ (H_L (J v)): forward-mode J v, forward-over-reverse H_L on the outputs, one shared reverse Jᵀ.
    p0 = flat.p0
    outputs, pullback = vjp(flat.outputs, p0)
    loss_grad = grad(flat.loss_of_outputs)

    def one(v: Tensor) -> Tensor:
        jv = jvp(flat.outputs, (p0,), (v,))[1]
        return pullback(jvp(loss_grad, (outputs,), (jv,))[1])[0]

    return vmap(one)


def _autograd_ggn(flat: FlatLoss) -> Callable[[Tensor], Tensor]:
    # J v as the derivative of the linear map u -> Jᵀ u (the double-backward trick), batched with is_grads_batched.
    p = flat.p0.clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = flat.outputs(p)
        dual = torch.zeros_like(outputs, requires_grad=True)
        (jt_dual,) = torch.autograd.grad(outputs, p, dual, create_graph=True)
        leaf = outputs.detach().requires_grad_(True)
        (loss_grad,) = torch.autograd.grad(flat.loss_of_outputs(leaf), leaf, create_graph=True)

    def apply(vs: Tensor) -> Tensor:
        jv = torch.autograd.grad(jt_dual, dual, vs, is_grads_batched=True, retain_graph=True)[0]
        hjv = torch.autograd.grad(loss_grad, leaf, jv, is_grads_batched=True, retain_graph=True)[0]
        return torch.autograd.grad(outputs, p, hjv, is_grads_batched=True, retain_graph=True)[0]

    if not jt_dual.requires_grad or not loss_grad.requires_grad:  # outputs constant or loss linear in them: G = 0
        return torch.zeros_like
    return apply


_BACKENDS = {("hessian", "func"): _func_hvp, ("hessian", "autograd"): _autograd_hvp,
             ("ggn", "func"): _func_ggn, ("ggn", "autograd"): _autograd_ggn}


@dataclass
class BatchedHVP:
    """Maps probes V (m, N) to H V (m, N), in chunks of at most ``chunk_size`` probes per call."""

    raw: Callable[[Tensor], Tensor]
    block_sizes: list[int]
    chunk_size: int
    backend: str
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        """N, the length of the flat parameter vector."""
        return sum(self.block_sizes)

    def __call__(self, probes: Tensor) -> Tensor:
        if probes.ndim != 2 or probes.shape[1] != self.numel:
            raise ValueError(f"expected probes of shape (m, {self.numel}), got {tuple(probes.shape)}")
        chunks = probes.to(self.dtype).split(self.chunk_size)
        with torch.enable_grad():
            return torch.cat([self.raw(chunk).detach() for chunk in chunks])


def make_batched_hvp(model: nn.Module, criterion: nn.Module, inputs: Tensor, targets: Tensor,
                     memory_budget_mb: float = 256, curvature: str = "hessian") -> BatchedHVP:
    """Build the batched Hessian-vector (or Gauss-Newton-vector) product of the loss at the model's current
    parameters (built once).

    Args:
        model: network with an ``nn.ModuleList`` ``blocks``; used in its current train/eval mode, left unchanged.
        criterion: loss module with mean reduction.
        inputs, targets: the fixed batch.
        memory_budget_mb: working memory allowed for one chunk of probes (heuristic estimate).
        curvature: "hessian" (H) or "ggn" (G = Jᵀ H_L J, see the module docstring).

    Returns:
        A ``BatchedHVP``; calling it on V (m, N) returns H V (m, N) (or G V) in the parameters' dtype.

    Raises:
        ValueError: unknown curvature, no ``blocks`` ModuleList, a random forward pass, or inside
            ``torch.inference_mode``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {sorted(CURVATURES)}")
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb}")
    if torch.is_inference_mode_enabled():
        raise ValueError("Hessian-vector products need autograd: call outside torch.inference_mode()")
    backend = _hvp_backend(model)
    flat = FlatLoss(model, criterion, inputs, targets)
    check_deterministic(flat)
    per_probe = flat.p0.element_size() * (_PARAM_COPIES * flat.p0.numel()
                                          + _ACTIVATION_COPIES * flat.activation_numel())
    chunk = max(1, int(memory_budget_mb * 2**20 // per_probe))
    raw = _BACKENDS[curvature, backend](flat)
    if backend == "func":
        try:  # a trial probe: some losses lack forward-over-reverse support
            with torch.enable_grad(), warnings.catch_warnings():
                # torch registers its jvp decompositions with torch.jit.script on the first jvp, which warns that
                # jit.script is deprecated: torch's own internals, nothing a user can act on
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
                raw(torch.ones(1, flat.p0.numel(), dtype=flat.p0.dtype, device=flat.p0.device))
        except RuntimeError as err:  # torch 2.14: mse_loss (mean) hits "ZeroTensors are immutable"; huber_loss
            logger.info("vmap(jvp(grad)) failed (%s); using torch.autograd with is_grads_batched", err)
            backend = "autograd"
            raw = _BACKENDS[curvature, backend](flat)
    return BatchedHVP(raw, flat.block_sizes, chunk, backend, flat.p0.dtype, flat.p0.device)
