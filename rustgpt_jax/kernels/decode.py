"""Single-token decode attention against a KV cache (flash-decoding, Pallas -> Triton).

One query token per sequence attends a cache of S slots. The cache is a ring buffer, so
slot order says nothing about positions: the mask is the shared predicate on the per-slot
positions (negative = empty slot) and nothing is skipped by index. Work is split over
(batch, KV head, S chunk) programs; each loops over its chunk in key blocks with an online
softmax and writes a partial (max, denominator, accumulator), and the chunks are merged in
XLA (Dao et al., "Flash-Decoding", 2023). The G query heads that share a KV head form the
rows of one tile (padded to 16 rows, the smallest Triton matmul), so the cache is read
once per KV head.

The kernel is written for the Triton lowering; off GPU it runs in interpret mode (there
is no separate Mosaic decode kernel: on TPU use the reference path for decoding).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.kernels import _common as cm
from rustgpt_jax.kernels.flash_attention import window_per_row
from rustgpt_jax.ops.reference import mha_reference as reference

__all__ = ['flash_decode', 'reference']


def _decode_kernel(win_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref,
                   *, scale, block_k):
    window = win_ref[0]
    q_pos = qpos_ref[0]
    q = q_ref[...]  # (Gp, H)
    num_blocks = k_ref.shape[0] // block_k

    def body(j, carry):
        m, denom, acc = carry
        sl = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s = cm.dot_nt(q, k_ref[sl, :]) * scale  # (Gp, bk)
        mask = cm.tile_mask(q_pos, kpos_ref[sl][None, :], window)  # (1, bk)
        mask = jnp.broadcast_to(mask, s.shape)
        return cm.online_softmax_step(s, mask, m, denom, acc, v_ref[sl, :], dot=cm.dot_nn)

    rows = q.shape[0]
    init = (jnp.full((rows, 1), masks_lib.MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    m, denom, acc = lax.fori_loop(0, num_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = m[:, 0]
    l_ref[...] = denom[:, 0]


def flash_decode(q, k_cache, v_cache, *, q_positions, kv_positions,
                 window=masks_lib.NO_WINDOW, scale: Optional[float] = None,
                 block_k: int = 64, num_splits: Optional[int] = None,
                 interpret: Optional[bool] = None):
    """Attention of one new token per sequence over a KV cache.

    Args:
      q: (B, 1, N, H) query of the new token.
      k_cache, v_cache: (B, S, K, H) cache, N % K == 0 (query head n reads KV head n // G).
      q_positions: (B, 1) int32 position of the new token.
      kv_positions: (B, S) int32 position held by each slot; negative = empty slot.
      window: traced int32 scalar or (B,) (masks.NO_WINDOW = full causal).
      scale: logit scale, default 1/sqrt(H).
      block_k: key rows per tile (power of 2).
      num_splits: chunks of the cache processed in parallel; default keeps a chunk at
        >= 4 blocks and the grid at >= 128 programs where S allows.
      interpret: default: interpret mode unless running on GPU.

    Returns:
      (B, 1, N, H) in q's dtype.
    """
    if q.ndim != 4 or q.shape[1] != 1:
        raise ValueError(f'q must be (B, 1, N, H), got shape {q.shape}')
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f'k_cache and v_cache must both be (B, S, K, H), got '
                         f'{k_cache.shape} and {v_cache.shape}')
    b, _, n, h = q.shape
    s, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != h:
        raise ValueError(f'cache shape {k_cache.shape} does not match q shape {q.shape}')
    if n % kv_heads:
        raise ValueError(f'query heads ({n}) must be a multiple of KV heads ({kv_heads})')
    if tuple(q_positions.shape) != (b, 1):
        raise ValueError(f'q_positions shape {q_positions.shape} != (B, 1) = {(b, 1)}')
    if tuple(kv_positions.shape) != (b, s):
        raise ValueError(f'kv_positions shape {kv_positions.shape} != (B, S) = {(b, s)}')
    if block_k <= 0 or block_k & (block_k - 1):
        raise ValueError(f'block_k must be a positive power of 2, got {block_k}')
    g = n // kv_heads
    scale = float(h ** -0.5 if scale is None else scale)
    if interpret is None:
        interpret = jax.default_backend() != 'gpu'

    block_k = cm.clamp_block(block_k, s)
    num_blocks = -(-s // block_k)
    if num_splits is None:
        num_splits = max(1, min(num_blocks // 4, -(-128 // (b * kv_heads))))
    num_splits = max(1, min(int(num_splits), num_blocks))
    chunk = -(-num_blocks // num_splits) * block_k
    s_pad = chunk * num_splits
    rows = max(16, 1 << max(0, (g - 1).bit_length()))
    h_pad = 1 << max(0, (h - 1).bit_length())

    qg = q[:, 0].reshape(b, kv_heads, g, h)  # (B, K, G, H)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - g), (0, h_pad - h)))
    pad_kv = ((0, 0), (0, s_pad - s), (0, 0), (0, h_pad - h))
    kc = jnp.pad(k_cache, pad_kv)
    vc = jnp.pad(v_cache, pad_kv)
    kpos = jnp.pad(jnp.asarray(kv_positions, jnp.int32), ((0, 0), (0, s_pad - s)),
                   constant_values=-1)
    qpos = jnp.asarray(q_positions, jnp.int32)
    win = window_per_row(window, b)[:, None]  # (B, 1)

    kernel = functools.partial(_decode_kernel, scale=scale, block_k=block_k)
    row_map = lambda bi, ki, si: (bi, 0)  # noqa: E731
    acc, m, l_part = pl.pallas_call(
        kernel,
        grid=(b, kv_heads, num_splits),
        in_specs=[pl.BlockSpec((None, 1), row_map), pl.BlockSpec((None, 1), row_map),
                  pl.BlockSpec((None, chunk), lambda bi, ki, si: (bi, si)),
                  pl.BlockSpec((None, None, rows, h_pad), lambda bi, ki, si: (bi, ki, 0, 0)),
                  pl.BlockSpec((None, chunk, None, h_pad), lambda bi, ki, si: (bi, si, ki, 0)),
                  pl.BlockSpec((None, chunk, None, h_pad), lambda bi, ki, si: (bi, si, ki, 0))],
        out_specs=[pl.BlockSpec((None, None, None, rows, h_pad),
                                lambda bi, ki, si: (bi, ki, si, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda bi, ki, si: (bi, ki, si, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda bi, ki, si: (bi, ki, si, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows, h_pad), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((b, kv_heads, num_splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name='flash_decode',
    )(win, qpos, kpos, qg, kc, vc)

    # Merge the chunks: rescale each partial to the global max (log-sum-exp merge).
    m_all = jnp.max(m, axis=2, keepdims=True)  # (B, K, 1, rows)
    w = jnp.where(l_part > 0, jnp.exp(m - m_all), 0.0)  # (B, K, splits, rows)
    denom = jnp.sum(w * l_part, axis=2)  # (B, K, rows)
    num = jnp.einsum('bksr,bksrh->bkrh', w, acc)
    out = jnp.where(denom[..., None] > 0, num / jnp.where(denom > 0, denom, 1.0)[..., None],
                    0.0)
    out = out[:, :, :g, :h].reshape(b, 1, n, h)
    return out.astype(q.dtype)
