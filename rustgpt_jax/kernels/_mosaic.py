"""TPU attention kernels (Pallas -> Mosaic), FlashAttention-2 forward and backward.

The TPU pipeline is a grid over (batch, head, query block, key block); the innermost
axis is sequential ("arbitrary") and carries the online-softmax state in VMEM scratch.
The window arrives by scalar prefetch (SMEM), so both the kernel body and the index maps
see it: steps outside the token-index band (`_common.kv_block_range`) are guarded off
with `pl.when`, and their index maps are clamped into the band so that no new K/V block
is copied either. Sliding-window work and HBM traffic therefore grow as T * W, while the
compiled program does not depend on the window value.

Layout inside: (B, N, T, H) (heads before time, so the last two block dims are
(rows, head_dim) as Mosaic tiles want). Query positions are (B, T, 1) columns and key
positions (B, 1, S) rows, so a tile mask is a broadcast of two loaded blocks. GQA: query
head n reads KV head n // G in the index map; the dk/dv grid runs (KV head, key block,
group member, query block) and accumulates the G query heads into one dk/dv block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.kernels import _common as cm


def _clamp(j, lo, hi):
    """Block index j clamped into [lo, hi - 1] (hi > lo is not guaranteed)."""
    return jnp.minimum(jnp.maximum(j, lo), jnp.maximum(hi - 1, lo))


def _side_inputs(qpos, kpos, qseg, kseg):
    args = [qpos[:, :, None], kpos[:, None, :]]  # (B, T, 1), (B, 1, S)
    if qseg is not None:
        args += [qseg[:, :, None], kseg[:, None, :]]
    return args


def _side_specs(has_seg, block_q, block_k, q_row_map, k_col_map):
    specs = [pl.BlockSpec((None, block_q, 1), q_row_map),
             pl.BlockSpec((None, 1, block_k), k_col_map)]
    return specs * 2 if has_seg else specs


def _split_refs(refs, has_seg):
    """(win, qpos, kpos, [qseg, kseg], rest...) -> win, qpos, kpos, qseg, kseg, rest."""
    if has_seg:
        return refs[0], refs[1], refs[2], refs[3], refs[4], refs[5:]
    return refs[0], refs[1], refs[2], None, None, refs[3:]


def _mask(qpos_ref, kpos_ref, qseg_ref, kseg_ref, window):
    q_seg = None if qseg_ref is None else qseg_ref[...]
    k_seg = None if kseg_ref is None else kseg_ref[...]
    return cm.tile_mask(qpos_ref[...], kpos_ref[...], window, q_seg, k_seg)


def _params(num_parallel, num_arbitrary):
    sem = ('parallel',) * num_parallel + ('arbitrary',) * num_arbitrary
    return pltpu.CompilerParams(dimension_semantics=sem)


def _fwd_kernel(*refs, scale, block_q, block_k, skip, has_seg):
    win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, rest = _split_refs(refs, has_seg)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = rest
    bi, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    num_k_blocks = pl.num_programs(3)
    window = win_ref[bi]

    @pl.when(kj == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, masks_lib.MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    if skip:
        lo, hi = cm.kv_block_range(qi, block_q, block_k, window, num_k_blocks)
        visit = (kj >= lo) & (kj < hi)
    else:
        visit = kj >= 0

    @pl.when(visit)
    def _step():
        s = cm.dot_nt(q_ref[...], k_ref[...]) * scale
        mask = _mask(qpos_ref, kpos_ref, qseg_ref, kseg_ref, window)
        m, denom, acc = cm.online_softmax_step(s, mask, m_sc[...], l_sc[...], acc_sc[...],
                                           v_ref[...], dot=cm.dot_nn)
        m_sc[...] = m
        l_sc[...] = denom
        acc_sc[...] = acc

    @pl.when(kj == num_k_blocks - 1)
    def _finish():
        out, lse = cm.finish_softmax(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _kv_index(skip, block_q, block_k, num_k_blocks, groups):
    def index(bi, ni, qi, kj, win_ref):
        if skip:
            lo, hi = cm.kv_block_range(qi, block_q, block_k, win_ref[bi], num_k_blocks)
            kj = _clamp(kj, lo, hi)
        return bi, ni // groups, kj, 0
    return index


def forward(q, k, v, qpos, kpos, qseg, kseg, win, *, scale, block_q, block_k, skip,
            interpret):
    """q (B, T, N, H), k/v (B, S, K, H) -> out (B, T, N, H), lse (B, N, T, 1) float32."""
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    nq, nk = t // block_q, s_len // block_k
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, len, H)
    has_seg = qseg is not None
    q_map = lambda bi, ni, qi, kj, w: (bi, ni, qi, 0)  # noqa: E731
    kv_map = _kv_index(skip, block_q, block_k, nk, g)
    q_row = lambda bi, ni, qi, kj, w: (bi, qi, 0)  # noqa: E731

    def k_col(bi, ni, qi, kj, w):
        return bi, 0, kv_map(bi, ni, qi, kj, w)[2]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, n, nq, nk),
        in_specs=[*_side_specs(has_seg, block_q, block_k, q_row, k_col),
                  pl.BlockSpec((None, None, block_q, h), q_map),
                  pl.BlockSpec((None, None, block_k, h), kv_map),
                  pl.BlockSpec((None, None, block_k, h), kv_map)],
        out_specs=[pl.BlockSpec((None, None, block_q, h), q_map),
                   pl.BlockSpec((None, None, block_q, 1), q_map)],
        scratch_shapes=[pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, h), jnp.float32)])
    kernel = functools.partial(_fwd_kernel, scale=scale, block_q=block_q, block_k=block_k,
                               skip=skip, has_seg=has_seg)
    out, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, n, t, h), q.dtype),
                   jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        compiler_params=_params(3, 1), interpret=interpret, name='flash_attention_fwd',
    )(win[:, 0], *_side_inputs(qpos, kpos, qseg, kseg), qt, kt, vt)
    return out.transpose(0, 2, 1, 3), lse


def _dq_kernel(*refs, scale, block_q, block_k, skip, has_seg):
    win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, rest = _split_refs(refs, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc = rest
    bi, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    num_k_blocks = pl.num_programs(3)
    window = win_ref[bi]

    @pl.when(kj == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    if skip:
        lo, hi = cm.kv_block_range(qi, block_q, block_k, window, num_k_blocks)
        visit = (kj >= lo) & (kj < hi)
    else:
        visit = kj >= 0

    @pl.when(visit)
    def _step():
        k = k_ref[...]
        s = cm.dot_nt(q_ref[...], k) * scale
        mask = _mask(qpos_ref, kpos_ref, qseg_ref, kseg_ref, window)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dp = cm.dot_nt(do_ref[...], v_ref[...])
        ds = p * (dp - delta_ref[...]) * scale
        dq_sc[...] += cm.dot_nn(ds.astype(k.dtype), k)

    @pl.when(kj == num_k_blocks - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, block_q, block_k, skip, has_seg):
    win_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, rest = _split_refs(refs, has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc = rest
    bi, kj, gi, qi = (pl.program_id(i) for i in (0, 2, 3, 4))
    groups, num_q_blocks = pl.num_programs(3), pl.num_programs(4)
    window = win_ref[bi]

    @pl.when((gi == 0) & (qi == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    if skip:
        lo, hi = cm.q_block_range(kj, block_q, block_k, window, num_q_blocks)
        visit = (qi >= lo) & (qi < hi)
    else:
        visit = qi >= 0

    @pl.when(visit)
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = cm.dot_nt(q, k_ref[...]) * scale
        mask = _mask(qpos_ref, kpos_ref, qseg_ref, kseg_ref, window)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dv_sc[...] += cm.dot_tn(p.astype(do.dtype), do)
        dp = cm.dot_nt(do, v_ref[...])
        ds = p * (dp - delta_ref[...]) * scale
        dk_sc[...] += cm.dot_tn(ds.astype(q.dtype), q)

    @pl.when((gi == groups - 1) & (qi == num_q_blocks - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, qpos, kpos, qseg, kseg, win, out, lse, do, *, scale, block_q,
             block_k, skip, interpret):
    """Returns dq, dk, dv in the dtypes and layouts of q, k, v."""
    b, t, n, h = q.shape
    s_len, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    nq, nk = t // block_q, s_len // block_k
    has_seg = qseg is not None
    # delta_i = sum_h o_ih do_ih (FlashAttention-2, Alg. 2 line 4).
    delta = jnp.einsum('btnh,btnh->bnt', out.astype(jnp.float32),
                       do.astype(jnp.float32))[..., None]  # (B, N, T, 1)
    qt, kt, vt, dot_ = (x.transpose(0, 2, 1, 3) for x in (q, k, v, do))
    side = _side_inputs(qpos, kpos, qseg, kseg)
    wins = win[:, 0]

    q_map = lambda bi, ni, qi, kj, w: (bi, ni, qi, 0)  # noqa: E731
    kv_map = _kv_index(skip, block_q, block_k, nk, g)
    q_row = lambda bi, ni, qi, kj, w: (bi, qi, 0)  # noqa: E731

    def k_col(bi, ni, qi, kj, w):
        return bi, 0, kv_map(bi, ni, qi, kj, w)[2]

    q_blk = pl.BlockSpec((None, None, block_q, h), q_map)
    kv_blk = pl.BlockSpec((None, None, block_k, h), kv_map)
    row_blk = pl.BlockSpec((None, None, block_q, 1), q_map)
    dq_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, n, nq, nk),
        in_specs=[*_side_specs(has_seg, block_q, block_k, q_row, k_col), q_blk, kv_blk,
                  kv_blk, q_blk, row_blk, row_blk],
        out_specs=q_blk, scratch_shapes=[pltpu.VMEM((block_q, h), jnp.float32)])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_q=block_q, block_k=block_k,
                          skip=skip, has_seg=has_seg),
        grid_spec=dq_spec, out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=_params(3, 1), interpret=interpret, name='flash_attention_dq',
    )(wins, *side, qt, kt, vt, dot_, lse, delta)

    def q_index(bi, ki, kj, gi, qi, w):
        if skip:
            lo, hi = cm.q_block_range(kj, block_q, block_k, w[bi], nq)
            qi = _clamp(qi, lo, hi)
        return bi, ki * g + gi, qi, 0

    def q_row2(bi, ki, kj, gi, qi, w):
        return bi, q_index(bi, ki, kj, gi, qi, w)[2], 0

    kv_blk2 = pl.BlockSpec((None, None, block_k, h), lambda bi, ki, kj, gi, qi, w:
                           (bi, ki, kj, 0))
    q_blk2 = pl.BlockSpec((None, None, block_q, h), q_index)
    row_blk2 = pl.BlockSpec((None, None, block_q, 1), q_index)
    k_col2 = lambda bi, ki, kj, gi, qi, w: (bi, 0, kj)  # noqa: E731
    dkv_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, kv_heads, nk, g, nq),
        in_specs=[*_side_specs(has_seg, block_q, block_k, q_row2, k_col2), q_blk2,
                  kv_blk2, kv_blk2, q_blk2, row_blk2, row_blk2],
        out_specs=[kv_blk2, kv_blk2],
        scratch_shapes=[pltpu.VMEM((block_k, h), jnp.float32),
                        pltpu.VMEM((block_k, h), jnp.float32)])
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q, block_k=block_k,
                          skip=skip, has_seg=has_seg),
        grid_spec=dkv_spec,
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        compiler_params=_params(3, 2), interpret=interpret, name='flash_attention_dkv',
    )(wins, *side, qt, kt, vt, dot_, lse, delta)
    return (dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))
