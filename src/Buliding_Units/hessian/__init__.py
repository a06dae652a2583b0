"""The Hessian wing: curvature numerics per parameter block (pure functions, no file I/O) and the measurement units
that use them. Loaded only when a units file names a Hessian unit (``MeasurementUnit.py`` knows their names).

* :mod:`.products` — batched Hessian- and Gauss-Newton-vector products on the flat parameter vector;
* :mod:`.interaction` — exact, finite-difference and all-pairs block norms σ_max(H_ij) and the coupling;
* :mod:`.krylov`, :mod:`.pools` — batched Golub–Kahan / Lanczos with pooled Rayleigh–Ritz, for those norms;
* :mod:`.spectrum` — top eigenvalues and traces of the whole matrix and of each diagonal block;
* :mod:`.density` — each diagonal block's spectral density by stochastic Lanczos quadrature, all blocks at once, and
  the Jensen–Shannon distances between them (block heterogeneity, JS₀);
* :mod:`.figures` — heat-maps and the coupling-over-training figure; :mod:`.units` — the plugins.
"""
from .density import (JS_NORMALISATIONS, BlockSLQ, Densities, block_slq, js_distance, quadrature_moments,
                      spectral_densities, trace_estimates)
from .interaction import (InteractionInfo, block_interaction_norms, block_sizes, block_spectral_norms, exact_hessian,
                          finite_difference_hessian, normalised_coupling, plan_method)
from .krylov import krylov_block_norms
from .products import CURVATURES, BatchedHVP, FlatLoss, check_deterministic, make_batched_hvp
from .spectrum import curvature_spectrum, spectrum_from_hvp

__all__ = ["CURVATURES", "JS_NORMALISATIONS", "BatchedHVP", "BlockSLQ", "Densities", "FlatLoss", "InteractionInfo",
           "block_interaction_norms", "block_sizes", "block_slq", "block_spectral_norms", "check_deterministic",
           "curvature_spectrum", "exact_hessian", "finite_difference_hessian", "js_distance", "krylov_block_norms",
           "make_batched_hvp", "normalised_coupling", "plan_method", "quadrature_moments", "spectral_densities",
           "spectrum_from_hvp", "trace_estimates"]
