"""One decode step of attention against a KV cache, reading the cache before it is written.

Attending over [C cached slots, the new token] and writing the new token into its slot
afterwards gives the same result as writing first and attending over the C slots: the
slot being overwritten holds column i - C, which the mask already excludes (the ring
invariant of `nn.attention`). Reading the old buffer, with the write made to depend on
the result, lets XLA update the cache in place after the reads (benchmarks/RESULTS.md,
"decode": when the dot reads the updated buffer, XLA:CPU copies every layer's cache).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.runtime import products
from rustgpt_jax.runtime.execution import Execution


def cached_decode_attention(q, k, v, cache_k, cache_v, *, q_positions, cache_positions,
                            window=masks_lib.NO_WINDOW, scale: Optional[float] = None,
                            execution: Execution = Execution()):
    """Attention of one new token per row over the cache plus itself.

    Args:
      q: (B, 1, N, H) the new token's queries.
      k, v: (B, 1, K, H) its key and value (not yet in the cache).
      cache_k, cache_v: (B, K, C, H) the cache before this token is written.
      q_positions: (B, 1) int32 the token's position.
      cache_positions: (B, C) int32 the position in each slot (negative = empty).
      window: int32 scalar or (B,) window.
      scale: logit scale, default 1/sqrt(H).
      execution: picks the product of the two dots over the cache (one per KV head,
        G = N / K query rows each; `products.matmul`).

    Returns:
      (B, 1, N, H) in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t != 1:
        raise ValueError(f'cached_decode_attention takes one token per row, got {t}')
    scale = h ** -0.5 if scale is None else scale
    q = q.reshape(b, kv_heads, n // kv_heads, h)  # (B, K, G, H)
    # Keys are (C, H) output-major per KV head, values (C, H) input-major.
    old = products.matmul(q, cache_k, input_major=False, execution=execution) * scale
    mask = masks_lib.make_attention_mask(q_positions, cache_positions, window)  # (B, 1, C)
    old = jnp.where(mask[:, :, None], old, masks_lib.MASK_VALUE)  # (B, K, G, C)
    new = jnp.einsum('BKGH,BKH->BKG', q, k[:, 0],
                     preferred_element_type=jnp.float32)[..., None] * scale  # (B, K, G, 1)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    out = products.matmul(probs[..., :-1], cache_v, input_major=True, execution=execution)
    out = out + probs[..., -1:] * v[:, 0, :, None].astype(jnp.float32)  # (B, K, G, H)
    return out.reshape(b, 1, n, h).astype(q.dtype)
