"""Attention masks from one predicate (SPEC §1 window convention).

A mask is static structure plus traced data: positions, the window and segment ids
are arrays, so changing the window never recompiles. The same `allowed` predicate
builds the dense mask of the reference path and the block tiles inside kernels.

Conventions used everywhere in the package:
  * positions are int32 token positions; a *negative* key position marks an empty
    slot (padding, an unfilled KV-cache slot) and is never attended;
  * `window` is an int32 scalar or a per-row `(B,)` array; query i may attend key j
    iff j <= i and i - j < window (exactly `window` keys including itself);
    `NO_WINDOW` means full causal;
  * segment ids (packed sequences) must match for a key to be visible.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

# Larger than any position difference, so `q - k < NO_WINDOW` always holds.
NO_WINDOW = 2**30

# The logit of a masked pair, in every implementation. Finite, so max() over a fully
# masked tile stays finite, max/exp never see inf - inf, and a (never generated) fully
# masked row of the dense paths gives a uniform row instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def window_or_full(window: Optional[int]) -> int:
    """Maps the config convention (None = full causal) to the traced convention."""
    return NO_WINDOW if window is None else int(window)


def allowed(q_pos, k_pos, window, q_seg=None, k_seg=None):
    """The mask predicate, elementwise with broadcasting.

    Args:
      q_pos: query positions, any shape broadcastable against `k_pos`.
      k_pos: key positions (negative = empty slot).
      window: int32 scalar or array broadcastable against the others.
      q_seg, k_seg: optional segment ids, broadcastable like the positions.

    Returns:
      bool array: True where the query may attend the key.
    """
    ok = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < window)
    if q_seg is not None:
        ok = ok & (q_seg == k_seg)
    return ok


def make_attention_mask(q_positions, kv_positions, window=NO_WINDOW,
                        q_segment_ids=None, kv_segment_ids=None):
    """Dense boolean mask for the reference path.

    Args:
      q_positions: (B, T) int32.
      kv_positions: (B, S) int32, negative for empty slots.
      window: int32 scalar or (B,) per-row windows.
      q_segment_ids: optional (B, T) int32.
      kv_segment_ids: optional (B, S) int32, required iff q_segment_ids is given.

    Returns:
      (B, T, S) bool mask.
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError('q_segment_ids and kv_segment_ids must be given together')
    window = jnp.asarray(window, jnp.int32)
    if window.ndim == 1:
        window = window[:, None, None]  # (B, 1, 1)
    q_seg = k_seg = None
    if q_segment_ids is not None:
        q_seg = q_segment_ids[:, :, None]  # (B, T, 1)
        k_seg = kv_segment_ids[:, None, :]  # (B, 1, S)
    return allowed(q_positions[:, :, None], kv_positions[:, None, :], window,
                   q_seg, k_seg)


def causal_mask(seq_len: int):
    """(T, T) bool lower-triangular mask: positions 0..T-1, full causal."""
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
    return make_attention_mask(pos, pos)[0]


def sliding_window_mask(seq_len: int, window):
    """(T, T) bool mask of a sliding window of `window` keys (traced or static)."""
    pos = jnp.arange(seq_len, dtype=jnp.int32)[None]
    return make_attention_mask(pos, pos, window)[0]
