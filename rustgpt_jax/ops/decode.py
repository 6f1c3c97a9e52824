"""One decode step of attention against a KV cache, reading the cache before it is written.

Attending over [C cached slots, the new token] and writing the new token into its slot
afterwards gives the same result as writing first and attending over the C slots: the
slot being overwritten holds column i - C, which the mask already excludes (the ring
invariant of `nn.attention`). Reading the old buffer, with the write made to depend on
the result, lets XLA update the cache in place after the reads: when the attention
dot reads the *updated* buffer, XLA:CPU fuses a private copy of the update into the
dot's operand and copies every layer's cache several times per token to keep both
versions alive (110M benchmark model, batch 1: 40.7 -> 42.9 tokens/s).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.kernels import cpu_gemv
from rustgpt_jax.ops.reference import _MASK_VALUE


def cached_decode_attention(q, k, v, cache_k, cache_v, *, q_positions, cache_positions,
                            window=masks_lib.NO_WINDOW, scale: Optional[float] = None,
                            matvec_impl: str = 'xla'):
    """Attention of one new token per row over the cache plus itself.

    Args:
      q: (B, 1, N, H) the new token's queries.
      k, v: (B, 1, K, H) its key and value (not yet in the cache).
      cache_k, cache_v: (B, K, C, H) the cache before this token is written.
      q_positions: (B, 1) int32 the token's position.
      cache_positions: (B, C) int32 the position in each slot (negative = empty).
      window: int32 scalar or (B,) window.
      scale: logit scale, default 1/sqrt(H).
      matvec_impl: 'cpu_gemv' computes the two dots over the cache (per KV head, at most
        `kernels.cpu_gemv.MAX_ROWS` query heads per KV head, float32) with that kernel
        (`ModelConfig.matvec_impl`); 'xla' with XLA's dot.

    Returns:
      (B, 1, N, H) in q's dtype.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    if t != 1:
        raise ValueError(f'cached_decode_attention takes one token per row, got {t}')
    scale = h ** -0.5 if scale is None else scale
    q = q.reshape(b, kv_heads, n // kv_heads, h)  # (B, K, G, H)
    use_kernel = cpu_gemv.applies(matvec_impl, n // kv_heads, q, cache_k, cache_v)
    if use_kernel:  # the cache is (C, H) output-major per KV head
        old = cpu_gemv.gemv(q, cache_k) * scale
    else:
        old = jnp.einsum('BKGH,BKCH->BKGC', q, cache_k,
                         preferred_element_type=jnp.float32) * scale
    mask = masks_lib.make_attention_mask(q_positions, cache_positions, window)  # (B, 1, C)
    old = jnp.where(mask[:, :, None], old, _MASK_VALUE)
    new = jnp.einsum('BKGH,BKH->BKG', q, k[:, 0],
                     preferred_element_type=jnp.float32)[..., None] * scale  # (B, K, G, 1)
    probs = jax.nn.softmax(jnp.concatenate([old, new], axis=-1), axis=-1)
    if use_kernel:  # and input-major for the values
        out = cpu_gemv.gemv(probs[..., :-1], cache_v, True)
    else:
        out = jnp.einsum('BKGC,BKCH->BKGH', probs[..., :-1].astype(v.dtype), cache_v,
                         preferred_element_type=jnp.float32)
    out = out + probs[..., -1:] * v[:, 0, :, None].astype(jnp.float32)  # (B, K, G, H)
    return out.reshape(b, 1, n, h).astype(q.dtype)
