"""Rotary position embeddings (Su et al., 2021), pure functions.

Uses the "rotate half" layout of Hugging Face LLaMA/Mistral: channel i pairs with channel
i + H/2, so HF checkpoints load without permuting q/k weights.

`split_rope` (the packed q/k/v projection) has a hand-written backward pass: RoPE is
orthogonal, so the cotangent of q (or k) is its output cotangent rotated by -theta,
from the saved cos / sin alone (nothing of qkv's size is kept for the backward pass).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rustgpt_jax.runtime.fusion import written_once


def rope_frequencies(head_dim: int, base: float = 10000.0):
    """Inverse frequencies base^(-2i/H), i < H/2. Returns (H/2,) float32."""
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_angles(positions, head_dim: int, base: float = 10000.0):
    """Rotation angles pos * inv_freq.

    Args:
      positions: (B, T) int32.

    Returns:
      (cos, sin), each (B, T, H/2) float32.
    """
    theta = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, base)
    return jnp.cos(theta), jnp.sin(theta)


def apply_rope(x, positions, base: float = 10000.0):
    """Rotates channel pairs (i, i + H/2) of every head by pos * base^(-2i/H).

    Args:
      x: (B, T, N, H) queries or keys.
      positions: (B, T) int32. Negative (padding) positions rotate by negative angles
        like any other; the attention masks those columns.
      base: RoPE base (theta).

    Returns:
      (B, T, N, H) in x's dtype; the rotation itself runs in float32.

    Plain autodiff on purpose: a custom VJP (the cotangent rotated by -theta, written as
    one concatenation) measured slower than autodiff's two padded halves on XLA:CPU
    (q/k projection + RoPE forward + backward at train_throughput config (a): ~9.2 vs
    ~8.6 ms), because XLA duplicated the concatenation, sin and cos included, into both
    consumers (the projection's weight and input gradients). `split_rope` gains from its
    custom VJP because it also replaces the pads of the q/k/v split.
    """
    return _rotate(x, *_head_angles(positions, x.shape[-1], base))


def _head_angles(positions, head_dim, base):
    """(cos, sin) of `rope_angles`, each (B, T, 1, H/2): broadcast over heads.

    The table is computed once for every head and rotation that reads it
    (`runtime.fusion.written_once`: XLA:CPU otherwise re-evaluated cos and sin per rotated
    element; packed training step at train_throughput config (b), RoPE forward + backward
    168 -> 67 ms per step).
    """
    cos, sin = rope_angles(positions, head_dim, base)
    h2 = cos.shape[-1]
    cs = written_once(jnp.concatenate([cos, sin], axis=-1))  # (B, T, H)
    return cs[:, :, None, :h2], cs[:, :, None, h2:]


def _rotate(x, cos, sin):
    """Rotates x (B, T, N, H) by the angles of cos, sin (B, T, 1, H/2) in float32.

    Returns (B, T, N, H) in x's dtype. With sin negated this is the inverse rotation,
    which is also the transpose: what `split_rope`'s backward pass applies to dq, dk.
    """
    h = x.shape[-1]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def split_rope(qkv, positions, num_heads: int, num_kv_heads: int, base: float = 10000.0):
    """Splits a packed projection into q, k, v and applies `apply_rope` to q and k.

    Args:
      qkv: (B, T, N + 2K, H): N query heads, then K key heads, then K value heads
        (the packed 'qkv_proj' of `nn.attention.Attention`).
      positions: (B, T) int32.
      num_heads, num_kv_heads: N and K.
      base: RoPE base (theta).

    Returns:
      q (B, T, N, H), k (B, T, K, H), v (B, T, K, H), in qkv's dtype.
    """
    return _split_rope(qkv, positions, num_heads, num_kv_heads, float(base))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_rope(qkv, positions, n, kh, base):
    """`split_rope` with a hand-written backward pass.

    Why custom: autodiff transposes each of the three head slices (and each rotation's
    two channel halves) into a pad to the full (B, T, N + 2K, H) and adds them; here the
    backward pass writes d qkv as one concatenation of the rotated-back dq, dk and dv.
    """
    return _split_rope_fwd(qkv, positions, n, kh, base)[0]


def _split_rope_fwd(qkv, positions, n, kh, base):
    cos, sin = _head_angles(positions, qkv.shape[-1], base)
    q, k, v = qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]
    return (_rotate(q, cos, sin), _rotate(k, cos, sin), v), (cos, sin)


def _split_rope_bwd(n, kh, base, res, cotangents):
    # RoPE is orthogonal: the cotangent of q is dq rotated by -theta (sin negated).
    # XLA:CPU writes each rotated-back half-head pair once and copies the outer
    # concatenation into both consumers, the weight and the input gradient of
    # 'qkv_proj'; written as one fusion (the halves swapped by a flip instead of a
    # concatenation) it measured slower.
    cos, sin = res
    dq, dk, dv = cotangents
    d_qkv = jnp.concatenate([_rotate(dq, cos, -sin), _rotate(dk, cos, -sin), dv], axis=2)
    return d_qkv, None  # no cotangent for the integer positions


_split_rope.defvjp(_split_rope_fwd, _split_rope_bwd)
