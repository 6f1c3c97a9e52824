"""Blocked attention in plain XLA: FlashAttention-2 tiling that skips masked key blocks.

Queries are cut into blocks of `block_q` rows; for each query block an online softmax
(Dao, "FlashAttention-2", 2023, Alg. 1) runs over the key blocks of `block_k` keys that
the mask can leave non-empty, so a sliding window of W keys costs O(N W) rather than
O(N^2), and no (T, S) logits array is ever materialised. Loop bounds are computed at run
time from the traced window (`lax.fori_loop` with traced bounds lowers to a while loop),
so changing the window never recompiles.

Block skipping and the mask use different facts:
  * the loop bounds assume the self-attention layout: T == S and query index i sits at
    key index i, so key index j > i is never allowed, nor i - j >= window. This holds for
    training batches, packed sequences and left padding, where positions are the
    indices shifted down (or restarted per segment), never larger than the index gap;
  * inside a visited tile the mask is the shared predicate `masks.allowed` on the actual
    positions, window and segment ids, so the result equals `mha_reference` whenever the
    layout assumption holds (and is conservative otherwise only in which tiles it skips).

Loops with traced trip counts cannot be reverse-differentiated, so the op is a
`jax.custom_vjp` whose backward pass is blocked the same way (Alg. 2 split in two
loops): dq per query block over its key blocks, and dk, dv per key block over the query
blocks that can see it; both recompute probabilities from the saved logsumexp.

A query row with no allowed key (a padding query) gets output 0 and zero gradients here,
while the reference spreads it uniformly over all keys; such rows are never used.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.ops.tiling import BlockSizes


def _to_blocks(x, block: int, fill):
    """(B, L, ...) -> (L_pad // block, B, block, ...), padding L with `fill`."""
    b, length = x.shape[:2]
    n = -(-length // block)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * block - length)
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(b, n, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _q_layout(x, kv_heads: int, block: int):
    """(B, T, N, H) -> (nq, B, K, G, block_q, H), the tile layout of queries."""
    b, t, n, h = x.shape
    x = _to_blocks(x, block, 0).reshape(-1, b, block, kv_heads, n // kv_heads, h)
    return x.transpose(0, 1, 3, 4, 2, 5)


def _q_unlayout(x, t: int):
    """Inverse of `_q_layout`: (nq, B, K, G, block_q, H) -> (B, T, N, H)."""
    nq, b, kv_heads, g, block, h = x.shape
    x = x.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * block, kv_heads * g, h)
    return x[:, :t]


def _kv_layout(x, block: int):
    """(B, S, K, H) -> (nk, B, K, block_k, H)."""
    return _to_blocks(x, block, 0).transpose(0, 1, 3, 2, 4)


def _tile_mask(qp, kp, window, qs, ks):
    """(B, bq), (B, bk) tile positions -> (B, 1, 1, bq, bk) bool, the shared predicate."""
    q_seg = k_seg = None
    if qs is not None:
        q_seg, k_seg = qs[:, :, None], ks[:, None, :]
    ok = masks_lib.allowed(qp[:, :, None], kp[:, None, :], window[:, None, None],
                           q_seg, k_seg)  # (B, bq, bk)
    return ok[:, None, None]


def _kv_range(i, bound, bs: BlockSizes, nk):
    """Key blocks [lo, hi) that query block i can see: key index in (row - W, row]."""
    first = jnp.maximum(i * bs.block_q - bound + 1, 0)
    last = i * bs.block_q + bs.block_q - 1
    lo = first // bs.block_k
    hi = jnp.minimum(last // bs.block_k + 1, nk)
    return lo, jnp.where(bound > 0, hi, lo)  # a window of 0 allows nothing


def _q_range(c, bound, bs: BlockSizes, nq):
    """Query blocks [lo, hi) that can see key block c: row index in [key, key + W)."""
    first = c * bs.block_k
    last = c * bs.block_k + bs.block_k - 1 + bound - 1
    lo = first // bs.block_q
    hi = jnp.minimum(last // bs.block_q + 1, nq)
    return lo, jnp.where(bound > 0, hi, lo)


def _probs(q, k, qp, kp, window, qs, ks, lse, scale):
    """Recomputed probabilities of one tile, exactly 0 where masked."""
    s = jnp.einsum('bkgqh,bksh->bkgqs', q, k, preferred_element_type=jnp.float32) * scale
    mask = _tile_mask(qp, kp, window, qs, ks)
    return jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)  # (B, K, G, bq, bk)


def _forward(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound):
    """Blocked forward pass.

    Args:
      qb: (nq, B, K, G, bq, H); kb, vb: (nk, B, K, bk, H).
      qpos, qseg: (nq, B, bq); kpos, kseg: (nk, B, bk); segments may be None.
      window: (B,) int32, the predicate's window; bound: int32 scalar, loop bound window.

    Returns:
      out (nq, B, K, G, bq, H) in q's dtype and lse (nq, B, K, G, bq) float32.
    """
    nk = kb.shape[0]
    dtype = qb.dtype

    def q_block(args):
        i, q, qp, qs = args
        lo, hi = _kv_range(i, bound, bs, nk)

        def body(j, carry):
            m, denom, acc = carry
            ks = None if kseg is None else kseg[j]
            s = jnp.einsum('bkgqh,bksh->bkgqs', q, kb[j],
                           preferred_element_type=jnp.float32) * scale
            mask = _tile_mask(qp, kpos[j], window, qs, ks)
            s = jnp.where(mask, s, masks_lib.MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            # exp(masks_lib.MASK_VALUE - finite) underflows to exactly 0, so one select suffices;
            # rows with nothing allowed yet subtract 0 instead of masks_lib.MASK_VALUE.
            m_sub = jnp.where(m_new == masks_lib.MASK_VALUE, 0.0, m_new)
            p = jnp.exp(s - m_sub[..., None])
            alpha = jnp.exp(m - m_new)
            denom = alpha * denom + p.sum(-1)
            pv = jnp.einsum('bkgqs,bksh->bkgqh', p.astype(vb.dtype), vb[j],
                            preferred_element_type=jnp.float32)
            return m_new, denom, alpha[..., None] * acc + pv

        stats = jnp.full(q.shape[:-1], masks_lib.MASK_VALUE, jnp.float32)
        init = (stats, jnp.zeros_like(stats), jnp.zeros(q.shape, jnp.float32))
        m, denom, acc = lax.fori_loop(lo, hi, body, init)
        seen = denom > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, denom, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), 0.0)
        return out.astype(dtype), lse

    nq = qb.shape[0]
    return lax.map(q_block, (jnp.arange(nq, dtype=jnp.int32), qb, qpos, qseg))


def _backward(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound, out, lse, do):
    """Blocked backward pass: returns dq, dk, dv in the tile layouts of q, k, v.

    One pass over the tiles (FlashAttention-2, Alg. 2): key blocks outermost, each
    visiting the query blocks that can see it, with dq accumulated tile by tile in the
    carried (nq, ...) buffer. Every visited tile recomputes its probabilities once; a
    dq loop and a separate dk/dv loop would compute q.k^T, exp and dO.v^T twice.
    """
    nq = qb.shape[0]
    # D_i = sum_h dO_ih O_ih, the softmax-Jacobian correction (FlashAttention-2, Alg. 2).
    delta = jnp.einsum('nbkgqh,nbkgqh->nbkgq', do.astype(jnp.float32),
                       out.astype(jnp.float32))

    def kv_block(dq, args):
        c, k, v, kp, ks = args
        lo, hi = _q_range(c, bound, bs, nq)

        def body(i, carry):
            dk, dv, dq = carry
            qs = None if qseg is None else qseg[i]
            p = _probs(qb[i], k, qpos[i], kp, window, qs, ks, lse[i], scale)
            dv = dv + jnp.einsum('bkgqs,bkgqh->bksh', p.astype(do.dtype), do[i],
                                 preferred_element_type=jnp.float32)
            dp = jnp.einsum('bkgqh,bksh->bkgqs', do[i], v,
                            preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None])).astype(qb.dtype)
            dk = dk + jnp.einsum('bkgqs,bkgqh->bksh', ds, qb[i],
                                 preferred_element_type=jnp.float32)
            dq = dq.at[i].add(jnp.einsum('bkgqs,bksh->bkgqh', ds, k,
                                         preferred_element_type=jnp.float32))
            return dk, dv, dq

        zeros = jnp.zeros(k.shape, jnp.float32)
        dk, dv, dq = lax.fori_loop(lo, hi, body, (zeros, zeros, dq))
        return dq, ((dk * scale).astype(kb.dtype), dv.astype(vb.dtype))

    nk = kb.shape[0]
    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(qb.shape, jnp.float32),
                            (jnp.arange(nk, dtype=jnp.int32), kb, vb, kpos, kseg))
    return (dq * scale).astype(qb.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blocked(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound):
    return _forward(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound)[0]


def _blocked_fwd(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound):
    out, lse = _forward(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound)
    return out, (qb, kb, vb, qpos, kpos, qseg, kseg, window, bound, out, lse)


def _blocked_bwd(scale, bs, res, do):
    qb, kb, vb, qpos, kpos, qseg, kseg, window, bound, out, lse = res
    dq, dk, dv = _backward(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound,
                           out, lse, do)
    return dq, dk, dv, None, None, None, None, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f'q must be (B, T, N, H) and k, v (B, S, K, H); got q {q.shape}, '
                         f'k {k.shape}')
    if k.shape != v.shape:
        raise ValueError(f'k {k.shape} and v {v.shape} must have the same shape')
    b, t, n, h = q.shape
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f'q {q.shape} and k {k.shape} disagree on batch or head_dim')
    if n % k.shape[2]:
        raise ValueError(f'query heads ({n}) must be a multiple of KV heads ({k.shape[2]})')
    if k.shape[1] != t:
        raise ValueError(f'blocked attention needs the self-attention layout T == S, got '
                         f'T={t}, S={k.shape[1]}; use the reference path for decoding')
    if q_positions.shape != (b, t) or kv_positions.shape != (b, t):
        raise ValueError(f'q_positions {q_positions.shape} and kv_positions '
                         f'{kv_positions.shape} must both be (B, T) = {(b, t)}')
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError('q_segment_ids and kv_segment_ids must be given together')
    if q_segment_ids is not None and (q_segment_ids.shape != (b, t)
                                      or kv_segment_ids.shape != (b, t)):
        raise ValueError(f'q_segment_ids {q_segment_ids.shape} and kv_segment_ids '
                         f'{kv_segment_ids.shape} must both be (B, T) = {(b, t)}')


def blocked_attention(q, k, v, *, q_positions, kv_positions, window=masks_lib.NO_WINDOW,
                      q_segment_ids=None, kv_segment_ids=None,
                      scale: Optional[float] = None,
                      block_sizes: Optional[BlockSizes] = None):
    """Masked GQA attention computed tile by tile, skipping key blocks the mask empties.

    Same semantics as `rustgpt_jax.ops.reference.mha_reference` for the self-attention
    layout (module docstring). Differentiable (custom VJP) w.r.t. q, k and v.

    Args:
      q: (B, T, N, H) queries.
      k, v: (B, T, K, H) keys and values, N % K == 0; query head n reads KV head n // G.
      q_positions, kv_positions: (B, T) int32; a negative key position is an empty slot.
      window: traced int32 scalar or (B,) array (masks.NO_WINDOW = full causal). Per-row
        windows bound the loops by their maximum and mask each row by its own.
      q_segment_ids, kv_segment_ids: optional (B, T) int32 packed-sequence ids.
      scale: logit scale, default 1/sqrt(H).
      block_sizes: tile sizes, default `BlockSizes.for_xla(B * N)`.

    Returns:
      (B, T, N, H) in q's dtype.
    """
    _check_shapes(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    b, t, n, h = q.shape
    bs = BlockSizes.for_xla(b * n) if block_sizes is None else block_sizes
    kv_heads = k.shape[2]
    scale = h ** -0.5 if scale is None else float(scale)
    window = jnp.asarray(window, jnp.int32)
    if window.ndim == 0:
        window = jnp.broadcast_to(window, (b,))
    elif window.shape != (b,):
        raise ValueError(f'window must be a scalar or (B,) = ({b},), got {window.shape}')
    nk = -(-t // bs.block_k)
    # Clipping keeps the index arithmetic of the bounds far from int32 overflow.
    bound = jnp.clip(window.max(), 0, nk * bs.block_k)

    qb = _q_layout(q, kv_heads, bs.block_q)  # (nq, B, K, G, bq, H)
    kb = _kv_layout(k, bs.block_k)  # (nk, B, K, bk, H)
    vb = _kv_layout(v, bs.block_k)
    # Padded rows get position -1: such keys are empty slots, such queries see nothing.
    qpos = _to_blocks(q_positions.astype(jnp.int32), bs.block_q, -1)  # (nq, B, bq)
    kpos = _to_blocks(kv_positions.astype(jnp.int32), bs.block_k, -1)  # (nk, B, bk)
    qseg = kseg = None
    if q_segment_ids is not None:
        qseg = _to_blocks(q_segment_ids.astype(jnp.int32), bs.block_q, 0)
        kseg = _to_blocks(kv_segment_ids.astype(jnp.int32), bs.block_k, 0)
    out = _blocked(scale, bs, qb, kb, vb, qpos, kpos, qseg, kseg, window, bound)
    return _q_unlayout(out, t)
