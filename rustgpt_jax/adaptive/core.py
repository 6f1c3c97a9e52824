"""Shared pieces of the AdaAttn branches: a dtype-controlled masked attention and
query-row sampling for the cheap statistics that drive the run-time decisions."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.adaptive.entropy import attention_entropy
from rustgpt_jax.ops import reference


def _is_fp8(dtype) -> bool:
    return jnp.dtype(dtype).itemsize == 1


def masked_attention(q, k, v, mask, scale: float, dtype: Any = jnp.float32):
    """softmax(clamp(q k^T * scale)) v with q/k/v and both matmuls in `dtype`.

    The scores are clamped to `dtype`'s finite range (an overflowed score becomes the
    largest finite value instead of inf) and the softmax always runs in float32
    (SPEC §4). fp8 matmuls accumulate into float32, as fp8 GEMMs do on hardware.
    q and k may have a different last dim from v (the low-rank path).

    Args:
      q: (B, T, N, R) queries; k: (B, S, K, R) keys; v: (B, S, K, H) values; N % K == 0.
      mask: (B, T, S) bool.
      scale: logit scale (the low-rank path keeps 1/sqrt(head_dim)).
      dtype: compute dtype of the matmuls.

    Returns:
      (B, T, N, H) in q's dtype.
    """
    b, t, n, _ = q.shape
    kv_heads, h = k.shape[2], v.shape[-1]
    dtype = jnp.dtype(dtype)
    acc = jnp.float32 if _is_fp8(dtype) else dtype
    qs = (q.astype(jnp.float32) * scale).astype(dtype)
    qs = qs.reshape(b, t, kv_heads, n // kv_heads, q.shape[-1])  # (B, T, K, G, R)
    scores = jnp.einsum('BTKGR,BSKR->BKGTS', qs, k.astype(dtype),
                        preferred_element_type=acc).astype(jnp.float32)
    if dtype != jnp.float32:
        limit = float(jnp.finfo(dtype).max)
        scores = jnp.clip(scores, -limit, limit)
    scores = jnp.where(mask[:, None, None], scores, masks_lib.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)  # float32 (B, K, G, T, S)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(dtype), v.astype(dtype),
                     preferred_element_type=acc)
    return out.reshape(b, t, n, h).astype(q.dtype)


def sample_rows(num_rows: int, count: int) -> np.ndarray:
    """Static, evenly spaced query-row indices (always including the last row).

    Args:
      num_rows: T.
      count: how many rows to keep (all rows when count >= T).

    Returns:
      int32 numpy indices, sorted, unique.
    """
    if count < 1:
        raise ValueError(f'sample row count must be >= 1, got {count}')
    if count >= num_rows:
        return np.arange(num_rows, dtype=np.int32)
    return np.unique(np.linspace(num_rows - 1, 0, count).round().astype(np.int32))


def sampled_probs(q, k, *, q_positions, kv_positions, window, q_segment_ids=None,
                  kv_segment_ids=None, rows: int = 32, scale=None):
    """Reference float32 probabilities of a static sample of query rows.

    Blocked and Pallas kernels never materialise probabilities; the statistics
    (entropy, focus) are estimated from `rows` query rows against all keys, which costs
    O(rows * S) instead of O(T * S).

    Args:
      q: (B, T, N, H); k: (B, S, K, H); positions/segments as in
        `runtime.attention.dot_product_attention`.
      rows: sample size.
      scale: logit scale, default 1/sqrt(H).

    Returns:
      probs (B, K, G, R, S) float32 and mask (B, R, S) bool, R = min(rows, T).
    """
    idx = sample_rows(q.shape[1], rows)
    q_seg = None if q_segment_ids is None else q_segment_ids[:, idx]
    mask = masks_lib.make_attention_mask(q_positions[:, idx], kv_positions, window,
                                         q_seg, kv_segment_ids)
    probs = reference.attention_probs(q[:, idx], k, mask, scale)
    return probs, mask


def attention_with_entropy(q, k, v, *, q_positions, kv_positions, window,
                           q_segment_ids=None, kv_segment_ids=None, attend=None,
                           rows: int = 64):
    """Attention output plus SPEC §2's mean attention entropy H (outside the gradient).

    With `attend=None` this is the reference path: the probabilities are computed once
    and serve both the output and the exact entropy over every query row. Otherwise
    `attend(q, k, v, q_positions=..., ...)` (a blocked / Pallas kernel or an AdaAttn
    core, none of which materialises probabilities) computes the output and H is
    estimated from the reference probabilities of `rows` evenly spaced query rows.

    Args:
      q: (B, T, N, H); k, v: (B, S, K, H); the rest as dot_product_attention.

    Returns:
      (out (B, T, N, H), H float32 scalar).
    """
    kwargs = dict(q_positions=q_positions, kv_positions=kv_positions, window=window,
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids)
    if attend is None:
        b, t, n, h = q.shape
        mask = masks_lib.make_attention_mask(q_positions, kv_positions, window,
                                             q_segment_ids, kv_segment_ids)
        probs = reference.attention_probs(q, k, mask)  # (B, K, G, T, S)
        out = jnp.einsum('BKGTS,BSKH->BTKGH', probs.astype(v.dtype), v,
                         preferred_element_type=jnp.float32)
        out = out.reshape(b, t, n, h).astype(q.dtype)
    else:
        out = attend(q, k, v, **kwargs)
        probs, mask = sampled_probs(q, k, rows=rows, **kwargs)
    return out, jax.lax.stop_gradient(attention_entropy(probs, mask))
