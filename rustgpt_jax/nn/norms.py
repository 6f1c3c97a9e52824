"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x, scale, eps: float):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32.

    Args: x (..., D); scale (D,). Returns (..., D) float32.

    Why custom: the backward pass is two passes over x (one row reduction, one
    elementwise) from the saved x and per-row 1/rms; autodiff's keeps more
    intermediates and splits the same math over more XLA:CPU fusions.
    """
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)  # (..., 1)
    return x32 * inv * scale.astype(jnp.float32), (x, scale, inv)


def _rms_norm_bwd(eps, res, dy):
    # y = x r s with r = (mean(x^2) + eps)^-1/2, so dr/dx = -r^3 x / D:
    # dx = r (s dy) - x r^3 mean(x s dy), ds = sum over rows of x r dy.
    # The barrier keeps XLA from reusing the forward pass's x * inv (B, T, D), which
    # would then live until here.
    x, scale, inv = jax.lax.optimization_barrier(res)
    x32, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    g = dy * scale.astype(jnp.float32)
    dx = inv * g - x32 * (inv ** 3 * jnp.mean(x32 * g, axis=-1, keepdims=True))
    # ds as a product of the rows' 1/rms with dy * x: as a reduction of dy * x * inv,
    # XLA:CPU's YNN fusion took inv broadcast to (B, T, D) as a materialised operand, and
    # the scheduler computed that in the forward pass and kept it (one per norm).
    d = x.shape[-1]
    ds = jnp.dot(inv.reshape(-1), (dy * x32).reshape(-1, d),
                 precision=jax.lax.Precision.HIGHEST)
    return dx.astype(x.dtype), ds.astype(scale.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale (Zhang & Sennrich, 2019); no bias."""
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x (..., D). Returns (..., D) in `dtype`."""
        scale = self.param('scale',
                           nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
                           (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps).astype(self.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias, eps inside the sqrt."""
    eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x (..., D). Returns (..., D) in `dtype`."""
        d = x.shape[-1]
        scale = self.param('scale',
                           nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
                           (d,), self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
                          (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
