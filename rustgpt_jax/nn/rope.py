"""Rotary position embeddings (Su et al., 2021), pure functions.

Uses the "rotate half" layout of Hugging Face LLaMA/Mistral: channel i pairs with channel
i + H/2, so HF checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import jax.numpy as jnp


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
      positions: (B, T) int32.
      base: RoPE base (theta).

    Returns:
      (B, T, N, H) in x's dtype; the rotation itself runs in float32.
    """
    h = x.shape[-1]
    cos, sin = rope_angles(positions, h, base)  # (B, T, H/2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, H/2)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
