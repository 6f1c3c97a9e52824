"""Where XLA's fusion would recompute a value per element of its readers, keep it written once.

XLA:CPU fuses cheap-looking elementwise producers into every consumer. For RoPE's cos and
sin (B, T, H/2) that meant evaluating them per element of each rotated (B, T, N, H) q or
k, N * 2 times too often, in every layer's forward and backward pass.
`jax.lax.optimization_barrier` does not reach XLA:CPU's fusion pass (it is removed
before it); a dot is never fused into its consumers, so an identity product (exact in
float32 at HIGHEST precision) makes XLA write the table once and the readers load it.
Other backends keep the values as they are: their fusion heuristics are not known to
duplicate these producers, and the product would be pure overhead.
Measured: benchmarks/RESULTS.md ("Training throughput").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def written_once(x):
    """x (..., C) unchanged, materialised once on XLA:CPU (see the module docstring).

    Decode steps (one row per batch element) gain too: every layer's rotation re-evaluated
    cos and sin per rotated element, and the identical tables of all layers are one
    product after XLA's common-subexpression pass (TinyLlama Q4_K_M decode step: the
    rotations' fusions 0.43 -> 0.05 ms of ~35 ms, benchmarks/RESULTS.md).
    """
    if jax.default_backend() != 'cpu' or x.ndim < 2:
        return x
    return jnp.dot(x, jnp.eye(x.shape[-1], dtype=x.dtype), precision=jax.lax.Precision.HIGHEST)
