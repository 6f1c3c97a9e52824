"""GPU attention kernels (Pallas -> Triton), FlashAttention-2 forward and backward.

Layout: q (B, T, N, H), k/v (B, S, K, H), all padded by the caller (T, S to multiples of
the blocks, H to a power of 2). Each program owns one query block (forward, dq) or one
key block (dk/dv); the other operand stays resident and a `lax.fori_loop` with *traced*
bounds walks only the blocks that the token-index band can reach (see `_common`), so a
sliding window costs O(T * W) and a new window value never recompiles. GQA comes from
the index maps: query head n reads KV head n // G; the dk/dv program of KV head k loops
over its G query heads, so K/V are never repeated.

Side inputs: `win` (B, 1) int32 window per row, positions (B, T)/(B, S) int32 and
optional segment ids; lse/delta are (B, N, T) float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.kernels import _common as cm


def _compiler_params(head_dim: int, block_a: int, block_b: int):
    num_warps = 4 if head_dim <= 64 and block_a * block_b <= 64 * 64 else 8
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _row(ref, sl=None):
    """Loads a 1-D int block as a (n, 1) column."""
    x = ref[...] if sl is None else ref[sl]
    return x[:, None]


def _col(ref, sl=None):
    x = ref[...] if sl is None else ref[sl]
    return x[None, :]


def _fwd_kernel(win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, scale, block_q, block_k, skip):
    qi = pl.program_id(0)
    window = win_ref[0]
    num_k_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]  # (bq, H)
    q_pos = _row(qpos_ref)
    q_seg = None if qseg_ref is None else _row(qseg_ref)
    if skip:
        lo, hi = cm.kv_block_range(qi, block_q, block_k, window, num_k_blocks)
    else:
        lo, hi = 0, num_k_blocks

    def body(kj, carry):
        m, denom, acc = carry
        sl = pl.ds(pl.multiple_of(kj * block_k, block_k), block_k)
        s = cm.dot_nt(q, k_ref[sl, :]) * scale  # (bq, bk)
        k_seg = None if kseg_ref is None else _col(kseg_ref, sl)
        mask = cm.tile_mask(q_pos, _col(kpos_ref, sl), window, q_seg, k_seg)
        return cm.online_softmax_step(s, mask, m, denom, acc, v_ref[sl, :], dot=cm.dot_nn)

    m = jnp.full((block_q, 1), masks_lib.MASK_VALUE, jnp.float32)
    denom = jnp.zeros((block_q, 1), jnp.float32)
    acc = jnp.zeros(q.shape, jnp.float32)
    m, denom, acc = lax.fori_loop(lo, hi, body, (m, denom, acc))
    out, lse = cm.finish_softmax(m, denom, acc)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _side_specs(qpos, kpos, qseg, kseg, q_block_map, kv_full_map, block_q, s_len):
    """BlockSpecs of positions / segment ids: query side blocked, key side resident."""
    specs = [pl.BlockSpec((None, block_q), q_block_map),
             pl.BlockSpec((None, s_len), kv_full_map)]
    args = [qpos, kpos]
    if qseg is not None:
        specs += [pl.BlockSpec((None, block_q), q_block_map),
                  pl.BlockSpec((None, s_len), kv_full_map)]
        args += [qseg, kseg]
    return specs, args


def _with_optional_segments(kernel, has_segments: bool, num_before: int):
    """Inserts None for the segment refs when there are none (keeps one kernel body)."""
    if has_segments:
        return kernel

    def wrapped(*refs):
        return kernel(*refs[:num_before], None, None, *refs[num_before:])
    return wrapped


def forward(q, k, v, qpos, kpos, qseg, kseg, win, *, scale, block_q, block_k, skip,
            interpret):
    """Returns out (B, T, N, H) in q's dtype and lse (B, N, T) float32."""
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    grid = (t // block_q, b, n)
    side_specs, side_args = _side_specs(qpos, kpos, qseg, kseg, lambda i, bi, ni: (bi, i),
                                        lambda i, bi, ni: (bi, 0), block_q, s_len)
    kernel = functools.partial(_fwd_kernel, scale=scale, block_q=block_q,
                               block_k=block_k, skip=skip)
    return pl.pallas_call(
        _with_optional_segments(kernel, qseg is not None, 3),
        grid=grid,
        in_specs=[pl.BlockSpec((None, 1), lambda i, bi, ni: (bi, 0)), *side_specs,
                  pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
                  pl.BlockSpec((None, s_len, None, h),
                               lambda i, bi, ni: (bi, 0, ni // g, 0)),
                  pl.BlockSpec((None, s_len, None, h),
                               lambda i, bi, ni: (bi, 0, ni // g, 0))],
        out_specs=[pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0)),
                   pl.BlockSpec((None, None, block_q), lambda i, bi, ni: (bi, ni, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
        compiler_params=_compiler_params(h, block_q, block_k),
        interpret=interpret,
        name='flash_attention_fwd',
    )(win, *side_args, q, k, v)


def _dq_kernel(win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_q, block_k, skip):
    qi = pl.program_id(0)
    window = win_ref[0]
    num_k_blocks = k_ref.shape[0] // block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = _row(lse_ref)
    delta = _row(delta_ref)
    q_pos = _row(qpos_ref)
    q_seg = None if qseg_ref is None else _row(qseg_ref)
    if skip:
        lo, hi = cm.kv_block_range(qi, block_q, block_k, window, num_k_blocks)
    else:
        lo, hi = 0, num_k_blocks

    def body(kj, dq):
        sl = pl.ds(pl.multiple_of(kj * block_k, block_k), block_k)
        k = k_ref[sl, :]
        s = cm.dot_nt(q, k) * scale
        k_seg = None if kseg_ref is None else _col(kseg_ref, sl)
        mask = cm.tile_mask(q_pos, _col(kpos_ref, sl), window, q_seg, k_seg)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        dp = cm.dot_nt(do, v_ref[sl, :])
        ds = p * (dp - delta) * scale
        return dq + cm.dot_nn(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q, block_k,
                groups, skip):
    kj = pl.program_id(0)
    window = win_ref[0]
    num_q_blocks = q_ref.shape[0] // block_q
    k = k_ref[...]  # (bk, H)
    v = v_ref[...]
    k_pos = _col(kpos_ref)
    k_seg = None if kseg_ref is None else _col(kseg_ref)
    if skip:
        lo, hi = cm.q_block_range(kj, block_q, block_k, window, num_q_blocks)
    else:
        lo, hi = 0, num_q_blocks

    def q_body(qi, carry, gi):
        dk, dv = carry
        sl = pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)
        q = q_ref[sl, gi, :]  # (bq, H)
        do = do_ref[sl, gi, :]
        lse = lse_ref[gi, sl][:, None]
        delta = delta_ref[gi, sl][:, None]
        q_seg = None if qseg_ref is None else _row(qseg_ref, sl)
        mask = cm.tile_mask(_row(qpos_ref, sl), k_pos, window, q_seg, k_seg)
        s = cm.dot_nt(q, k) * scale
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        dv = dv + cm.dot_tn(p.astype(do.dtype), do)
        dp = cm.dot_nt(do, v)
        ds = p * (dp - delta) * scale
        dk = dk + cm.dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    def g_body(gi, carry):
        return lax.fori_loop(lo, hi, functools.partial(q_body, gi=gi), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, groups, g_body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, qpos, kpos, qseg, kseg, win, out, lse, do, *, scale, block_q,
             block_k, skip, interpret):
    """Returns dq, dk, dv in the dtypes of q, k, v."""
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    # delta_i = sum_h o_ih do_ih (FlashAttention-2, Alg. 2 line 4): one cheap XLA reduction.
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32), do.astype(jnp.float32))
    has_seg = qseg is not None
    win_spec = pl.BlockSpec((None, 1), lambda i, bi, hi: (bi, 0))

    side_specs, side_args = _side_specs(qpos, kpos, qseg, kseg, lambda i, bi, ni: (bi, i),
                                        lambda i, bi, ni: (bi, 0), block_q, s_len)
    dq_kernel = functools.partial(_dq_kernel, scale=scale, block_q=block_q,
                                  block_k=block_k, skip=skip)
    q_blk = pl.BlockSpec((None, block_q, None, h), lambda i, bi, ni: (bi, i, ni, 0))
    kv_full = pl.BlockSpec((None, s_len, None, h), lambda i, bi, ni: (bi, 0, ni // g, 0))
    row_blk = pl.BlockSpec((None, None, block_q), lambda i, bi, ni: (bi, ni, i))
    dq = pl.pallas_call(
        _with_optional_segments(dq_kernel, has_seg, 3),
        grid=(t // block_q, b, n),
        in_specs=[win_spec, *side_specs, q_blk, kv_full, kv_full, q_blk, row_blk, row_blk],
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(h, block_q, block_k),
        interpret=interpret,
        name='flash_attention_dq',
    )(win, *side_args, q, k, v, do, lse, delta)

    # dk/dv: one program per (key block, batch, KV head); the G query heads of that KV
    # head are a (T, G, H) view of q, so the group sum happens in registers.
    q5 = q.reshape(b, t, kv_heads, g, h)
    do5 = do.reshape(b, t, kv_heads, g, h)
    lse4 = lse.reshape(b, kv_heads, g, t)
    delta4 = delta.reshape(b, kv_heads, g, t)
    q_map = lambda j, bi, ki: (bi, 0)  # noqa: E731
    k_map = lambda j, bi, ki: (bi, j)  # noqa: E731
    side_specs = [pl.BlockSpec((None, t), q_map), pl.BlockSpec((None, block_k), k_map)]
    side_args = [qpos, kpos]
    if has_seg:
        side_specs += [pl.BlockSpec((None, t), q_map), pl.BlockSpec((None, block_k), k_map)]
        side_args += [qseg, kseg]
    dkv_kernel = functools.partial(_dkv_kernel, scale=scale, block_q=block_q,
                                   block_k=block_k, groups=g, skip=skip)
    q_full = pl.BlockSpec((None, t, None, g, h), lambda j, bi, ki: (bi, 0, ki, 0, 0))
    kv_blk = pl.BlockSpec((None, block_k, None, h), lambda j, bi, ki: (bi, j, ki, 0))
    rows_full = pl.BlockSpec((None, None, g, t), lambda j, bi, ki: (bi, ki, 0, 0))
    dk, dv = pl.pallas_call(
        _with_optional_segments(dkv_kernel, has_seg, 3),
        grid=(s_len // block_k, b, kv_heads),
        in_specs=[win_spec, *side_specs, q_full, kv_blk, kv_blk, q_full, rows_full,
                  rows_full],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(h, block_q, block_k),
        interpret=interpret,
        name='flash_attention_dkv',
    )(win, *side_args, q5, k, v, do5, lse4, delta4)
    return dq, dk, dv
