"""Adaptive-rank attention (SPEC §4): a run-time switch between dense attention and
attention with queries and keys projected to a low rank r by learned projections.

The decision is made from a focus score of the attention distribution of a static
sample of query rows, per batch x head:

    focus = clamp(1 - Hmean / Hmax + Hvar / Hmax**2, 0, 1),   Hmax = ln(#keys),

plus hardware penalties (`hardware_penalty`). A head votes low-rank when focus exceeds
threshold + penalty. `lax.switch` has one scalar branch index per layer, so the layer
takes the low-rank branch only when every (batch, head) votes for it (the most
conservative reading of "a head goes low-rank"; a per-head select would compute both
branches and save nothing). Among the static ranks, a higher focus picks a lower rank.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax import masks as masks_lib
from rustgpt_jax.adaptive.core import masked_attention, sampled_probs
from rustgpt_jax.adaptive.entropy import row_entropy
from rustgpt_jax.config import AttentionImpl
from rustgpt_jax.runtime.attention import dot_product_attention


def focus_score(probs, mask):
    """SPEC §4's focus score per batch x head.

    Args:
      probs: (B, K, G, T, S) probabilities of (a sample of) query rows.
      mask: (B, T, S) bool allowed keys; rows without any allowed key are ignored.

    Returns:
      (B, K, G) float32 in [0, 1]; 1 = perfectly peaked rows.
    """
    h = row_entropy(probs, mask[:, None, None])  # (B, K, G, T)
    valid = jnp.any(mask, axis=-1).astype(jnp.float32)[:, None, None]  # (B, 1, 1, T)
    count = jnp.maximum(jnp.sum(valid, axis=-1), 1.0)
    h_mean = jnp.sum(h * valid, axis=-1) / count  # (B, K, G)
    h_var = jnp.sum(valid * (h - h_mean[..., None]) ** 2, axis=-1) / count
    h_max = jnp.log(jnp.float32(max(probs.shape[-1], 2)))
    return jnp.clip(1.0 - h_mean / h_max + h_var / h_max ** 2, 0.0, 1.0)


def hardware_penalty(seq_len: int, backend: Optional[str] = None) -> float:
    """+min(0.2, (L - 512) / 2048) when L > 512; +0.1 on CPU (SPEC §4).

    Note that with the default threshold 0.95 the CPU penalty puts the bar at 1.05, so
    the low-rank branch can never be taken on CPU unless the threshold is lowered.
    """
    backend = backend or jax.default_backend()
    penalty = min(0.2, (seq_len - 512) / 2048) if seq_len > 512 else 0.0
    return penalty + (0.1 if backend == 'cpu' else 0.0)


def rank_branch(focus, bar: float, num_ranks: int):
    """Branch index: 0 = dense, i >= 1 = the i-th rank in descending order.

    The low-rank interval (bar, 1] is split evenly over the ranks; the most focused
    attention gets the lowest rank.

    Args:
      focus: float32 scalar (the layer's decisive focus).
      bar: threshold + penalty.
      num_ranks: number of static ranks.

    Returns:
      int32 scalar in [0, num_ranks].
    """
    excess = (focus - bar) / max(1.0 - bar, 1e-6)
    index = jnp.clip(jnp.floor(excess * num_ranks), 0, num_ranks - 1).astype(jnp.int32)
    return jnp.where(focus > bar, 1 + index, 0).astype(jnp.int32)


def _truncated_identity(key, shape, dtype=jnp.float32):
    """(heads, H, r) stacks of the first r columns of the identity: at init the low-rank
    logits are the logits of the first r channels, and r = H is exactly dense."""
    del key
    heads, h, r = shape
    return jnp.broadcast_to(jnp.eye(h, r, dtype=dtype), shape)


class LowRankProjections(nn.Module):
    """Learned (heads, H, r) projections of queries and keys, one pair per static rank."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ranks: Sequence[int]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self):
        """Returns {r: (Pq (N, H, r), Pk (K, H, r))}."""
        out = {}
        for r in self.ranks:
            pq = self.param(f'q_rank_{r}', nn.with_logical_partitioning(
                _truncated_identity, (axes.HEADS, axes.HEAD_DIM, None)),
                (self.num_heads, self.head_dim, r), self.param_dtype)
            pk = self.param(f'k_rank_{r}', nn.with_logical_partitioning(
                _truncated_identity, (axes.KV_HEADS, axes.HEAD_DIM, None)),
                (self.num_kv_heads, self.head_dim, r), self.param_dtype)
            out[r] = (pq, pk)
        return out


def low_rank_attention(q, k, v, mask, pq, pk, head_dim: int, dtype=jnp.float32):
    """Attention with q, k projected to rank r; values stay full; scale 1/sqrt(head_dim).

    Args:
      q: (B, T, N, H); k, v: (B, S, K, H); mask: (B, T, S) bool.
      pq: (N, H, r); pk: (K, H, r).

    Returns:
      (B, T, N, H) in q's dtype.
    """
    qr = jnp.einsum('BTNH,NHR->BTNR', q, pq.astype(q.dtype))  # (B, T, N, r)
    kr = jnp.einsum('BSKH,KHR->BSKR', k, pk.astype(k.dtype))  # (B, S, K, r)
    return masked_attention(qr, kr, v, mask, head_dim ** -0.5, dtype)


class AdaptiveRankAttention(nn.Module):
    """Dense / low-rank attention chosen at run time by `lax.switch`.

    Called like `runtime.attention.dot_product_attention` (keyword positions, window and
    segment ids). Sows `low_rank` (0/1), `rank` (head_dim when dense), `focus` (mean)
    and `head_votes` (fraction of batch x heads voting low-rank) into `intermediates`.
    """
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ranks: Sequence[int] = (8,)
    threshold: float = 0.95
    impl: AttentionImpl = AttentionImpl.REFERENCE
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
        proj = LowRankProjections(self.num_heads, self.num_kv_heads, self.head_dim, ranks,
                                  self.param_dtype, name='projections')()
        probs, smask = sampled_probs(
            jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), q_positions=q_positions,
            kv_positions=kv_positions, window=window, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, rows=self.sample_rows)
        focus = focus_score(probs, smask)  # (B, K, G)
        bar = self.threshold + hardware_penalty(k.shape[1], self.backend)
        branch = rank_branch(jnp.min(focus), bar, len(ranks))

        def mask():
            return masks_lib.make_attention_mask(q_positions, kv_positions, window,
                                                 q_segment_ids, kv_segment_ids)

        def dense(q, k, v):
            return dot_product_attention(
                q, k, v, q_positions=q_positions, kv_positions=kv_positions, window=window,
                q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, impl=self.impl)

        def low(r):
            return lambda q, k, v: low_rank_attention(q, k, v, mask(), *proj[r], self.head_dim)

        out = jax.lax.switch(branch, [dense] + [low(r) for r in ranks], q, k, v)
        rank_table = jnp.array([self.head_dim] + ranks, jnp.int32)
        self.sow('intermediates', 'low_rank', (branch > 0).astype(jnp.float32))
        self.sow('intermediates', 'rank', rank_table[branch])
        self.sow('intermediates', 'focus', jnp.mean(focus))
        self.sow('intermediates', 'head_votes', jnp.mean((focus > bar).astype(jnp.float32)))
        return out
