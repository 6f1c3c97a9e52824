"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import axes


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
        x32 = x.astype(jnp.float32)
        inv = jnp.reciprocal(jnp.sqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps))
        return (x32 * inv * scale.astype(jnp.float32)).astype(self.dtype)


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
