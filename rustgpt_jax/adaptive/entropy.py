"""Attention entropy utilities (SPEC §2, §4): per-row, normalised, and reductions.

All functions take attention probabilities whose last axis runs over keys and an
optional boolean mask of the allowed keys (broadcastable to the probabilities). Masked
keys contribute nothing, and `0 ln 0 = 0`, so a one-hot row has entropy exactly 0.
"""

from __future__ import annotations

import jax.numpy as jnp

REDUCTIONS = ('mean', 'sum', 'none')


def row_entropy(probs, mask=None):
    """Shannon entropy `-sum_j p_j ln p_j` of each row, in nats.

    Args:
      probs: (..., S) probabilities over keys.
      mask: optional bool, broadcastable to (..., S); False keys are ignored.

    Returns:
      (...) float32 entropies.
    """
    p = probs.astype(jnp.float32)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    positive = p > 0
    # The inner where keeps log away from 0 so the gradient of 0 ln 0 is 0, not NaN.
    plogp = jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0)
    return -jnp.sum(plogp, axis=-1)


def allowed_count(mask, num_keys: int):
    """Number of allowed keys per row: (...) int32 (all `num_keys` when mask is None)."""
    if mask is None:
        return jnp.asarray(num_keys, jnp.int32)
    return jnp.sum(mask, axis=-1, dtype=jnp.int32)


def normalized_entropy(probs, mask=None):
    """Row entropy divided by `ln(#allowed keys)`, in [0, 1].

    A row with at most one allowed key has no uncertainty to normalise; it gets 0.

    Args:
      probs: (..., S) probabilities; mask: optional bool broadcastable to (..., S).

    Returns:
      (...) float32.
    """
    h = row_entropy(probs, mask)
    count = jnp.broadcast_to(allowed_count(mask, probs.shape[-1]), h.shape)
    several = count > 1
    h_max = jnp.log(jnp.where(several, count, 2).astype(jnp.float32))
    return jnp.where(several, h / h_max, 0.0)


def reduce_entropy(values, reduction: str = 'mean', weights=None):
    """Reduces per-row entropies.

    Args:
      values: (...) entropies.
      reduction: 'mean' (weighted mean over all entries), 'sum' or 'none'.
      weights: optional (...) weights (e.g. 1 for valid query rows, 0 for padding).

    Returns:
      a float32 scalar ('mean', 'sum') or `values` unchanged ('none').
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f'reduction must be one of {REDUCTIONS}, got {reduction!r}')
    if reduction == 'none':
        return values
    values = values.astype(jnp.float32)
    w = jnp.ones_like(values) if weights is None else jnp.broadcast_to(
        jnp.asarray(weights, jnp.float32), values.shape)
    total = jnp.sum(values * w)
    if reduction == 'sum':
        return total
    return total / jnp.maximum(jnp.sum(w), 1e-9)


def attention_entropy(probs, mask):
    """SPEC §2's H: row entropy, mean over (valid) query rows, then over heads and batch.

    Query rows with no allowed key (padding queries) are left out.

    Args:
      probs: (B, K, G, T, S) probabilities (the layout of `ops.reference.attention_probs`).
      mask: (B, T, S) bool.

    Returns:
      float32 scalar.
    """
    if probs.ndim != 5 or mask.ndim != 3:
        raise ValueError(f'attention_entropy expects probs (B, K, G, T, S) and mask (B, T, S), '
                         f'got {probs.shape} and {mask.shape}')
    h = row_entropy(probs, mask[:, None, None])  # (B, K, G, T)
    valid = jnp.any(mask, axis=-1).astype(jnp.float32)[:, None, None]  # (B, 1, 1, T)
    per_head = jnp.sum(h * valid, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1.0)
    # Batch rows without any valid query (all padding) do not count towards the mean.
    has_rows = (jnp.sum(valid, axis=-1) > 0).astype(jnp.float32)  # (B, 1, 1)
    has_rows = jnp.broadcast_to(has_rows, per_head.shape)
    return jnp.sum(per_head * has_rows) / jnp.maximum(jnp.sum(has_rows), 1.0)
