"""One entry point for attention; the implementation enum is dispatched here only."""

from __future__ import annotations

from typing import Optional

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.config import AttentionImpl
from rustgpt_jax.ops import reference


def dot_product_attention(q, k, v, *, q_positions, kv_positions,
                          window=masks_lib.NO_WINDOW, q_segment_ids=None,
                          kv_segment_ids=None,
                          impl: AttentionImpl = AttentionImpl.REFERENCE,
                          scale: Optional[float] = None):
    """Masked multi-head attention with grouped KV heads.

    The mask is `masks.allowed(q_pos, k_pos, window, q_seg, k_seg)`. The blocked and
    Pallas paths also assume the self-attention layout (key index j > query index i is
    never allowed, nor i - j >= window), which holds for training batches, packed
    sequences and left padding; decoding against a cache uses the reference path.

    Args:
      q: (B, T, N, H) queries.
      k, v: (B, S, K, H) keys and values, N % K == 0.
      q_positions: (B, T) int32.
      kv_positions: (B, S) int32; negative marks an empty slot.
      window: int32 scalar or (B,) traced window (masks.NO_WINDOW = full causal).
      q_segment_ids, kv_segment_ids: optional (B, T), (B, S) int32.
      impl: which implementation computes it.
      scale: logit scale, default 1/sqrt(H).

    Returns:
      (B, T, N, H) in q's dtype.
    """
    impl = AttentionImpl(impl)
    if impl == AttentionImpl.REFERENCE:
        fn = reference.mha_reference
    elif impl == AttentionImpl.BLOCKED:
        from rustgpt_jax.ops import blocked
        fn = blocked.blocked_attention
    elif impl == AttentionImpl.PALLAS:
        from rustgpt_jax.kernels import flash_attention
        fn = flash_attention.flash_attention
    else:  # pragma: no cover - the enum is exhaustive
        raise ValueError(f'unknown attention implementation {impl!r}')
    return fn(q, k, v, q_positions=q_positions, kv_positions=kv_positions,
              window=window, q_segment_ids=q_segment_ids,
              kv_segment_ids=kv_segment_ids, scale=scale)
