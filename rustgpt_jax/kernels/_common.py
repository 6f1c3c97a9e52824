"""Pieces shared by the GPU (Triton) and TPU (Mosaic) attention kernels.

Block skipping. Inside a kernel the mask of a (query block, key block) tile is the shared
predicate `masks.allowed` applied to the *positions* (and segment ids) loaded as blocks, so
it is exact for any layout. Which key blocks are visited at all is decided from *token
indices*: in the self-attention layout (T == S, query i and key i are the same token, as
in training batches, packed sequences and left padding) a position difference equals an
index difference for every allowed pair, so key j can only be visible to query i when
`0 <= i - j < window`. Blocks outside that band are skipped. Callers that cannot promise
the layout (T != S) turn skipping off and every block is visited (still exact).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from rustgpt_jax import masks as masks_lib


def clamp_block(block: int, length: int) -> int:
    """Largest block <= `block` that a sequence of `length` still needs (power of 2)."""
    return max(1, min(block, 1 << max(0, (length - 1).bit_length())))


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def tile_mask(q_pos, k_pos, window, q_seg=None, k_seg=None):
    """The shared predicate on a tile: q_pos (bq, 1), k_pos (1, bk) -> (bq, bk) bool."""
    return masks_lib.allowed(q_pos, k_pos, window, q_seg, k_seg)


def kv_block_range(q_block, block_q: int, block_k: int, window, num_k_blocks: int):
    """Key blocks [lo, hi) that can hold a visible key for a query block (token indices).

    Args:
      q_block: int32 scalar, index of the query block.
      block_q, block_k: static tile sizes.
      window: int32 scalar in [0, NO_WINDOW].
      num_k_blocks: static number of key blocks.
    """
    first_row = q_block * block_q
    last_row = first_row + (block_q - 1)
    hi = jnp.minimum(lax.div(last_row, block_k) + 1, num_k_blocks)
    lo = lax.div(jnp.maximum(first_row - window + 1, 0), block_k)
    return lo, hi


def q_block_range(k_block, block_q: int, block_k: int, window, num_q_blocks: int):
    """Query blocks [lo, hi) that can see some key of a key block (token indices)."""
    first_col = k_block * block_k
    last_col = first_col + (block_k - 1)
    lo = lax.div(first_col, block_q)
    # window <= NO_WINDOW = 2**30 and the column < 2**30, so the sum fits in int32.
    last_row = jnp.minimum(last_col + window - 1, num_q_blocks * block_q - 1)
    hi = jnp.where(window > 0, lax.div(jnp.maximum(last_row, 0), block_q) + 1, lo)
    return lo, hi


def online_softmax_step(s, mask, m_prev, l_prev, acc_prev, v, *, dot):
    """One FlashAttention-2 update of (m, l, acc) with a masked logit tile.

    Args:
      s: (bq, bk) float32 scaled logits; mask: (bq, bk) bool.
      m_prev, l_prev: (bq, 1) float32 running max and denominator.
      acc_prev: (bq, H) float32 unnormalised output.
      v: (bk, H) values.
      dot: matmul (a (m, k), b (k, n)) -> (m, n) float32 of the backend.
    """
    s = jnp.where(mask, s, masks_lib.MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Masked entries are zeroed explicitly: a row with nothing visible yet keeps l = 0.
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    acc_new = alpha * acc_prev + dot(p.astype(v.dtype), v)
    return m_new, l_new, acc_new


def finish_softmax(m, denom, acc):
    """Normalised output and log-sum-exp; rows with no visible key give 0 output."""
    empty = denom == 0.0
    out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom))
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, denom)))
    return out, lse


def dot_nt(a, b):
    """a (m, k) @ b (n, k)^T in float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a (m, k) @ b (k, n) in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a (k, m)^T @ b (k, n) in float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
