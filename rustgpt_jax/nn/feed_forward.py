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


def _swiglu_grads(gate, up, dh):
    """(d gate, d up) of silu(gate) * up, in float32.

    silu'(g) = s + g s (1 - s), s = sigmoid(g), written with 1 - s = sigmoid(-g): with the
    broadcast constant `1` inside, XLA:CPU put this derivative in a transposed fusion
    with its slow generic loop emitter (benchmarks/RESULTS.md, "Training throughput").
    """
    # The barrier keeps XLA from merging this recomputation with the forward pass's
    # identical sigmoid, which would keep sigmoid(gate) and silu(gate) alive from the
    # forward to the backward pass: 2 x (B, T, F) floats per layer.
    gate, up = jax.lax.optimization_barrier((gate, up))
    g, u, dh = (a.astype(jnp.float32) for a in (gate, up, dh))
    # The term both cotangents share includes dh. The barrier stops CSE, not XLA:CPU's
    # scheduler: a shared sigmoid(g), which depends on forward values only, was computed
    # in the forward pass and kept until here (B, T, F floats per layer). Without this
    # barrier and rms_norm's, the step's temporaries at train_throughput (b) grew
    # 941.9 -> 1,059.9 MB.
    a = dh * jax.nn.sigmoid(g)
    return u * (a + a * g * jax.nn.sigmoid(-g)), a * g


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up with a hand-written backward pass.

    Args: gate, up (..., F). Returns (..., F).

    Why custom: autodiff of the product keeps silu's intermediates and writes each
    cotangent in its own fusions; here the backward pass recomputes sigmoid from the
    saved inputs in one fusion.
    """
    return _gated(gate, up)


def _gated(gate, up):
    return gate * jax.nn.sigmoid(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    d_gate, d_up = _swiglu_grads(gate, up, dh)
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def swiglu_packed(gate_up):
    """`swiglu` of the two halves of a packed (..., 2F) projection: gate, then up.

    Returns (..., F). The backward pass writes the packed (..., 2F) cotangent as one
    concatenation; autodiff of the two slices padded each half to 2F and added them,
    two extra passes over (B, T, 2F) per layer.
    """
    f = gate_up.shape[-1] // 2
    return _gated(gate_up[..., :f], gate_up[..., f:])


def _swiglu_packed_fwd(gate_up):
    return swiglu_packed(gate_up), gate_up


def _swiglu_packed_bwd(gate_up, dh):
    f = gate_up.shape[-1] // 2
    d_gate, d_up = _swiglu_grads(gate_up[..., :f], gate_up[..., f:], dh)
    return (jnp.concatenate([d_gate, d_up], axis=-1).astype(gate_up.dtype),)


swiglu_packed.defvjp(_swiglu_packed_fwd, _swiglu_packed_bwd)


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
            h = swiglu_packed(gate_up)
        else:
            gate = _project(self, 'w1', x, f, (axes.EMBED, axes.MLP))  # (B, T, F)
            up = _project(self, 'w3', x, f, (axes.EMBED, axes.MLP))  # (B, T, F)
            h = swiglu(gate, up)
        return _project(self, 'w2', h, d, (axes.MLP, axes.EMBED))  # (B, T, D)
