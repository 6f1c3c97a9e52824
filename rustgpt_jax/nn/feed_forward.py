"""Position-wise feed-forward layers: ReLU MLP (baseline) and SwiGLU (modern)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax.nn import axes
from rustgpt_jax.nn.dense import dense


class ReluFeedForward(nn.Module):
    """W2 relu(W1 x + b1) + b2, the RustGPT baseline."""
    hidden_dim: int
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x (B, T, D). Returns (B, T, D)."""
        d = x.shape[-1]
        h = dense(self, 'up', x, self.hidden_dim, (axes.EMBED, axes.MLP))  # (B, T, F)
        h = jax.nn.relu(h)
        return dense(self, 'down', h, d, (axes.MLP, axes.EMBED))  # (B, T, D)


class SwiGLU(nn.Module):
    """W2 (silu(W1 x) * W3 x) (Shazeer, 2020), as in LLaMA / Mistral."""
    hidden_dim: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """Args: x (B, T, D). Returns (B, T, D)."""
        d = x.shape[-1]
        gate = dense(self, 'w1', x, self.hidden_dim, (axes.EMBED, axes.MLP))  # (B, T, F)
        up = dense(self, 'w3', x, self.hidden_dim, (axes.EMBED, axes.MLP))  # (B, T, F)
        return dense(self, 'w2', jax.nn.silu(gate) * up, d, (axes.MLP, axes.EMBED))  # (B, T, D)
