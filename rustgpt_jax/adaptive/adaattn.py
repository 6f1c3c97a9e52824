"""Unified AdaAttn (SPEC §4) and the one dispatch on `AttentionVariant`.

AdaAttn makes a joint rank + precision decision from ONE statistic: the normalised
entropy e in [0, 1] of the attention of a static sample of query rows (each row's
entropy divided by ln of its number of allowed keys; rows with fewer than two allowed
keys carry no information and are left out), averaged over rows, heads and batch.

  * rank: focus = 1 - e; low rank when focus > threshold + hardware penalty, the rank
    picked from the static set as in `rank.rank_branch`;
  * precision: the policy's run-time level (`precision.choose_precision`), moved one
    level up (more precise) when the low-rank branch is taken, so that the two
    approximations are never stacked at their most aggressive.

One `lax.switch` selects among (1 + #ranks) x #levels compiled branches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.adaptive import precision as prec
from rustgpt_jax.adaptive.core import masked_attention, sampled_probs
from rustgpt_jax.adaptive.entropy import normalized_entropy
from rustgpt_jax.adaptive.rank import (
    AdaptiveRankAttention,
    LowRankProjections,
    hardware_penalty,
    low_rank_attention,
    rank_branch,
)
from rustgpt_jax.config import AttentionImpl, AttentionVariant, PrecisionPolicy


def sampled_normalized_entropy(probs, mask):
    """Mean normalised entropy of sampled rows with >= 2 allowed keys.

    Args:
      probs: (B, K, G, R, S); mask: (B, R, S) bool.

    Returns:
      float32 scalar in [0, 1] (0 when no row has two allowed keys).
    """
    e = normalized_entropy(probs, mask[:, None, None])  # (B, K, G, R)
    informative = (jnp.sum(mask, axis=-1) >= 2).astype(jnp.float32)[:, None, None]
    weights = jnp.broadcast_to(informative, e.shape)
    return jnp.sum(e * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class AdaAttn(nn.Module):
    """Joint adaptive rank + adaptive precision attention.

    Called like `runtime.attention.dot_product_attention`. Sows `low_rank`, `rank`,
    `entropy` (the normalised entropy e) and `precision` (one-hot over LEVELS).
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ranks: Sequence[int] = (8,)
    threshold: float = 0.95
    policy: PrecisionPolicy = PrecisionPolicy.BALANCED
    levels: Optional[Sequence[str]] = None
    sample_rows: int = 32
    backend: Optional[str] = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, *, q_positions, kv_positions, window=masks_lib.NO_WINDOW,
                 q_segment_ids=None, kv_segment_ids=None):
        """Args: q (B, T, N, H); k, v (B, S, K, H); the rest as dot_product_attention.

        Returns:
          (B, T, N, H).
        """
        ranks = sorted(self.ranks, reverse=True)
        levels = prec._check_levels(self.levels or prec.supported_levels(self.backend))
        proj = LowRankProjections(self.num_heads, self.num_kv_heads, self.head_dim, ranks,
                                  self.param_dtype, name='projections')()
        probs, smask = sampled_probs(
            jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), q_positions=q_positions,
            kv_positions=kv_positions, window=window, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, rows=self.sample_rows)
        entropy = sampled_normalized_entropy(probs, smask)
        bar = self.threshold + hardware_penalty(k.shape[1], self.backend)
        rank_index = rank_branch(1.0 - entropy, bar, len(ranks))
        level = prec.choose_precision(self.policy, prec.max_abs_qkv(q, k, v), k.shape[1],
                                      levels)
        level = jnp.where(rank_index > 0, jnp.maximum(level - 1, 0), level)

        def run(rank, dtype):
            def attend(q, k, v):
                mask = masks_lib.make_attention_mask(q_positions, kv_positions, window,
                                                     q_segment_ids, kv_segment_ids)
                if rank is None:
                    return masked_attention(q, k, v, mask, self.head_dim ** -0.5, dtype)
                return low_rank_attention(q, k, v, mask, *proj[rank], self.head_dim, dtype)
            return attend

        branches = [run(rank, prec.LEVEL_DTYPES[lv]) for rank in [None] + ranks for lv in levels]
        out = jax.lax.switch(rank_index * len(levels) + level, branches, q, k, v)
        rank_table = jnp.array([self.head_dim] + ranks, jnp.int32)
        self.sow('intermediates', 'low_rank', (rank_index > 0).astype(jnp.float32))
        self.sow('intermediates', 'rank', rank_table[rank_index])
        self.sow('intermediates', 'entropy', entropy)
        self.sow('intermediates', 'precision', prec.level_one_hot(level, levels))
        return out


def make_attention_core(variant: AttentionVariant, *, num_heads: int, num_kv_heads: int,
                        head_dim: int, ranks: Sequence[int], threshold: float,
                        policy: PrecisionPolicy, impl: AttentionImpl,
                        param_dtype=jnp.float32, name: str = 'adaptive'):
    """The attention core of a variant, or None for STANDARD (use the plain kernel).

    This is the only dispatch on AttentionVariant. The returned module is called like
    `runtime.attention.dot_product_attention(q, k, v, q_positions=..., ...)`.
    """
    variant = AttentionVariant(variant)
    if variant == AttentionVariant.STANDARD:
        return None
    if variant == AttentionVariant.ADAPTIVE_RANK:
        return AdaptiveRankAttention(num_heads, num_kv_heads, head_dim, tuple(ranks), threshold,
                                     impl, param_dtype=param_dtype, name=name)
    if variant == AttentionVariant.ADAPTIVE_PRECISION:
        return prec.AdaptivePrecisionAttention(head_dim, policy, name=name)
    if variant == AttentionVariant.ADAATTN:
        return AdaAttn(num_heads, num_kv_heads, head_dim, tuple(ranks), threshold, policy,
                       param_dtype=param_dtype, name=name)
    raise ValueError(f'unknown attention variant {variant!r}')  # pragma: no cover
