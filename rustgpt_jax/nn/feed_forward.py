"""Position-wise feed-forward layers: ReLU MLP (baseline) and SwiGLU (modern)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.nn.dense import dense
from rustgpt_jax.runtime.execution import Execution


class ReluFeedForward(nn.Module):
    """W2 relu(W1 x + b1) + b2, the RustGPT baseline.

    `execution`: the parameter layout and products (`runtime.Execution`).
    """
    hidden_dim: int
    use_bias: bool = True
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        """Args: x (B, T, D). Returns (B, T, D)."""
        d = x.shape[-1]
        h = _project(self, 'up', x, self.hidden_dim, (axes.EMBED, axes.MLP))  # (B, T, F)
        h = jax.nn.relu(h)
        return _project(self, 'down', h, d, (axes.MLP, axes.EMBED))  # (B, T, D)


def _project(ffn, name, x, features, kernel_axes):
    """`nn.dense.dense` with the feed-forward layer's explicit fields."""
    return dense(name, x, features, kernel_axes, use_bias=ffn.use_bias, init_std=ffn.init_std,
                 dtype=ffn.dtype, param_dtype=ffn.param_dtype, execution=ffn.execution)


@jax.custom_jvp
def silu(x):
    """x * sigmoid(x), the same values as `jax.nn.silu`, with a constant-free derivative.

    silu'(x) = s + x * s * (1 - s), s = sigmoid(x), written with 1 - s = sigmoid(-x). In the
    backward pass XLA:CPU fuses this derivative into the transposed copy that feeds the
    W1 weight-gradient dot; with the broadcast constant `1` inside, that fusion takes the
    slow generic loop emitter (benchmarks/RESULTS.md, "training"). The derivative is
    exact, only the expression differs.
    """
    return x * jax.nn.sigmoid(x)


@silu.defjvp
def _silu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    s = jax.nn.sigmoid(x)
    return x * s, dx * (s + x * s * jax.nn.sigmoid(-x))


class SwiGLU(nn.Module):
    """W2 (silu(W1 x) * W3 x) (Shazeer, 2020), as in LLaMA / Mistral.

    With `execution.packed`, W1 and W3 are one output-major kernel 'w13' (2F, D) and W2
    is (D, F): one matrix product instead of two (`nn.packing`).
    """
    hidden_dim: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        """Args: x (B, T, D). Returns (B, T, D)."""
        d, f = x.shape[-1], self.hidden_dim
        if self.execution.packed:
            gate_up = _project(self, 'w13', x, 2 * f, (axes.EMBED, axes.MLP_PACKED))  # (B,T,2F)
            gate, up = gate_up[..., :f], gate_up[..., f:]
        else:
            gate = _project(self, 'w1', x, f, (axes.EMBED, axes.MLP))  # (B, T, F)
            up = _project(self, 'w3', x, f, (axes.EMBED, axes.MLP))  # (B, T, F)
        return _project(self, 'w2', silu(gate) * up, d, (axes.MLP, axes.EMBED))  # (B, T, D)
