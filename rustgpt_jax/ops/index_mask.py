"""Attention whose mask is an index band, through `jax.nn.dot_product_attention`.

cuDNN's fused attention (and JAX's own wrapper of it) masks by token *index*: causal
plus an optional static left window, `jax.nn.dot_product_attention(is_causal=True,
local_window_size=(W - 1, 0))`. This codebase masks by *position* with the shared
predicate `masks.allowed(q_pos, k_pos, window, q_seg, k_seg)` and a traced window. The
two agree exactly when every row of the batch is one unpadded sequence at positions
0..T-1 and the window equals the static W, which `fits_index_mask` checks on the traced
data, so a caller can branch on it (`lax.cond`) and stay exact for every input.

The public API has right-padding lengths but no segment ids; this codebase's padding
tokens form a segment of their own that still sees itself (`data.pipeline`), which
seq-length padding does not reproduce, so padded and packed rows do not fit.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def fits_index_mask(q_positions, kv_positions, window, q_segment_ids, kv_segment_ids,
                    static_window: int):
    """Whether the predicate's mask equals the causal index band of width `static_window`.

    Args:
      q_positions, kv_positions: (B, T) int32 (the self-attention layout, T == S).
      window: traced int32 scalar or (B,).
      q_segment_ids, kv_segment_ids: optional (B, T) int32.
      static_window: the W of the band (masks.NO_WINDOW = full causal).

    Returns:
      bool scalar: positions are 0..T-1 on both sides, every row is one segment, and the
      window is `static_window` in every row (or both are >= T, which masks nothing more).
    """
    t = q_positions.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)[None]  # (1, T)
    ok = jnp.all(q_positions == index) & jnp.all(kv_positions == index)
    if q_segment_ids is not None:
        ok &= jnp.all(q_segment_ids == q_segment_ids[:, :1])
        ok &= jnp.all(kv_segment_ids == q_segment_ids)
    window = jnp.asarray(window, jnp.int32)
    # Windows of T or more allow every causal pair of a length-T row alike.
    same = (window == static_window) | ((window >= t) & (static_window >= t))
    return ok & jnp.all(same)


def index_mask_attention(q, k, v, *, static_window: int, scale: Optional[float] = None,
                         implementation: Optional[str] = 'cudnn'):
    """Causal attention over the index band of `static_window` keys, by `jax.nn`.

    Args:
      q: (B, T, N, H) queries.
      k, v: (B, T, K, H) keys and values, N % K == 0 (GQA is native to jax.nn).
      static_window: python int W; query i sees key j iff 0 <= i - j < W
        (masks.NO_WINDOW or any W >= T = full causal).
      scale: logit scale, default 1/sqrt(H).
      implementation: `jax.nn.dot_product_attention`'s: 'cudnn' (GPU only) or 'xla'.

    Returns:
      (B, T, N, H) in q's dtype.
    """
    t = q.shape[1]
    local = None if static_window >= t else (int(static_window) - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                        local_window_size=local,
                                        implementation=implementation)

