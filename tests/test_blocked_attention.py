"""Blocked attention vs the einsum reference: values, gradients, no retracing, bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.config import AttentionImpl
from rustgpt_jax.ops import blocked, reference
from rustgpt_jax.runtime import attention

NO_WINDOW = masks_lib.NO_WINDOW
HEADS = {'mha': (4, 4), 'gqa': (4, 2), 'mqa': (4, 1)}


def _inputs(seed, b, t, n, kv, h=8, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v, ct = (jnp.asarray(rng.normal(size=shape), dtype) for shape in
                   [(b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)])
    return q, k, v, ct


def _mask_case(name, b, t):
    """(window, positions, segment ids or None) for one mask configuration."""
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    seg = None
    window = NO_WINDOW
    if name.startswith('window'):
        window = {'window1': 1, 'window5': 5, 'window_long': 4 * t}[name]
    elif name == 'per_row':
        window = np.array([3, NO_WINDOW][:b], np.int32)
    elif name == 'packed':
        # Row 0: segments of 7, 9, rest; row 1: one segment then another; positions
        # restart per segment, as produced by sequence packing.
        seg = np.zeros((b, t), np.int32)
        for row, cuts in enumerate([(7, 16), (11,)][:b]):
            for c in cuts:
                seg[row, c:] += 1
            starts = np.r_[0, cuts]
            for s0, s1 in zip(starts, np.r_[cuts, t]):
                pos[row, s0:s1] = np.arange(s1 - s0)
        window = 6  # combined with a window, to exercise both predicates at once
    elif name == 'left_pad':
        for row, pad in enumerate([5, 10][:b]):
            pos[row] = np.arange(t) - pad  # negative positions: empty slots
    else:
        assert name == 'causal'
    seg = None if seg is None else jnp.asarray(seg)
    return jnp.asarray(window, jnp.int32), jnp.asarray(pos), seg


def _both(q, k, v, window, pos, seg, block_sizes):
    kwargs = dict(q_positions=pos, kv_positions=pos, window=window,
                  q_segment_ids=seg, kv_segment_ids=seg)
    blk = lambda q, k, v: blocked.blocked_attention(q, k, v, block_sizes=block_sizes,
                                                    **kwargs)
    ref = lambda q, k, v: reference.mha_reference(q, k, v, **kwargs)
    valid = masks_lib.make_attention_mask(pos, pos, window, seg, seg).any(-1)  # (B, T)
    return blk, ref, valid


def _check(q, k, v, ct, window, pos, seg, block_sizes, tol):
    blk, ref, valid = _both(q, k, v, window, pos, seg, block_sizes)
    out_b = jax.jit(blk)(q, k, v)
    out_r = ref(q, k, v)
    assert out_b.dtype == q.dtype
    rows = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out_b, np.float32)[rows],
                               np.asarray(out_r, np.float32)[rows], atol=tol, rtol=tol)
    # Rows that see no key (padding queries) are documented to output exactly 0.
    assert not np.any(np.asarray(out_b, np.float32)[~rows])

    # Cotangent zero on rows without keys: the reference spreads those uniformly.
    ct = ct * valid[:, :, None, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    grads_b = jax.jit(jax.grad(loss(blk), argnums=(0, 1, 2)))(q, k, v)
    grads_r = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, g_b, g_r in zip('qkv', grads_b, grads_r):
        assert g_b.dtype == q.dtype, name
        np.testing.assert_allclose(np.asarray(g_b, np.float32), np.asarray(g_r, np.float32),
                                   atol=tol, rtol=tol, err_msg=f'd{name}')


MASKS = ['causal', 'window1', 'window5', 'window_long', 'per_row', 'packed', 'left_pad']


@pytest.mark.parametrize('heads', list(HEADS))
@pytest.mark.parametrize('mask', MASKS)
def test_matches_reference_ragged_length(mask, heads):
    """T = 21 is a multiple of neither block size, so both paddings are exercised."""
    b, t = 2, 21
    n, kv = HEADS[heads]
    q, k, v, ct = _inputs(0, b, t, n, kv)
    window, pos, seg = _mask_case(mask, b, t)
    _check(q, k, v, ct, window, pos, seg, blocked.BlockSizes(4, 8), tol=1e-5)


@pytest.mark.parametrize('block_sizes', [(8, 8), (4, 16), (16, 4)])
@pytest.mark.parametrize('mask', ['causal', 'window5', 'packed'])
def test_matches_reference_block_multiple(mask, block_sizes):
    b, t = 2, 32
    q, k, v, ct = _inputs(1, b, t, *HEADS['gqa'])
    window, pos, seg = _mask_case(mask, b, t)
    _check(q, k, v, ct, window, pos, seg, blocked.BlockSizes(*block_sizes), tol=1e-5)


@pytest.mark.parametrize('mask', ['causal', 'window5', 'left_pad'])
def test_bfloat16_matches_reference(mask):
    b, t = 2, 21
    q, k, v, ct = _inputs(2, b, t, *HEADS['gqa'], dtype=jnp.bfloat16)
    window, pos, seg = _mask_case(mask, b, t)
    _check(q, k, v, ct, window, pos, seg, blocked.BlockSizes(4, 8), tol=3e-2)


def test_default_block_sizes_and_dispatch():
    """The public dispatch with default tiles (one tile longer than T) and a long T."""
    b, t = 1, 300
    q, k, v, ct = _inputs(3, b, t, *HEADS['gqa'])
    window, pos, seg = _mask_case('window5', b, t)
    kwargs = dict(q_positions=pos, kv_positions=pos, window=jnp.int32(70))
    out = attention.dot_product_attention(q, k, v, impl=AttentionImpl.BLOCKED, **kwargs)
    np.testing.assert_allclose(out, reference.mha_reference(q, k, v, **kwargs),
                               atol=1e-5, rtol=1e-5)


def test_default_tiles_shrink_with_batch_and_heads():
    """for_xla keeps a tile's logits over batch x heads within 2^19 floats; the default
    tiles of a training-sized batch (several blocks, ragged T) match the reference."""
    assert blocked.BlockSizes.for_xla(8) == blocked.BlockSizes(256, 256)
    assert blocked.BlockSizes.for_xla(64) == blocked.BlockSizes(64, 64)
    assert blocked.BlockSizes.for_xla(1 << 20) == blocked.BlockSizes(16, 16)
    b, t = 16, 150  # 16 x 4 query heads: 64 x 64 tiles, three query and key blocks
    q, k, v, ct = _inputs(6, b, t, *HEADS['gqa'])
    window, pos, seg = _mask_case('causal', b, t)
    assert blocked.BlockSizes.for_xla(b * q.shape[2]).block_q == 64
    _check(q, k, v, ct, window, pos, seg, None, tol=1e-5)


def test_changing_window_does_not_retrace():
    b, t = 2, 21
    q, k, v, ct = _inputs(4, b, t, *HEADS['mqa'])
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    traces = []

    @jax.jit
    def fwd_and_grad(q, k, v, window):
        traces.append(1)

        def loss(q, k, v):
            out = blocked.blocked_attention(q, k, v, q_positions=pos, kv_positions=pos,
                                            window=window,
                                            block_sizes=blocked.BlockSizes(4, 8))
            return jnp.sum(out * ct), out
        return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    for w in [2, 9, NO_WINDOW]:
        grads, out = fwd_and_grad(q, k, v, jnp.int32(w))
        ref = reference.mha_reference(q, k, v, q_positions=pos, kv_positions=pos,
                                      window=jnp.int32(w))
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    assert len(traces) == 1


@pytest.mark.parametrize('block_sizes', [(4, 8), (8, 4), (8, 8), (3, 5)])
def test_loop_bounds_are_exactly_the_nonempty_blocks(block_sizes):
    """Index-layout skipping: [lo, hi) is exactly the set of blocks with an allowed pair."""
    bs = blocked.BlockSizes(*block_sizes)
    t = 37
    nq, nk = -(-t // bs.block_q), -(-t // bs.block_k)
    rows = np.arange(nq * bs.block_q)[:, None]
    cols = np.arange(nk * bs.block_k)[None, :]
    for w in [0, 1, 3, 8, 13, t, 100]:
        ok = (cols <= rows) & (rows - cols < w)
        tiles = ok.reshape(nq, bs.block_q, nk, bs.block_k).any(axis=(1, 3))  # (nq, nk)
        for i in range(nq):
            lo, hi = (int(x) for x in blocked._kv_range(i, w, bs, nk))
            assert np.array_equal(np.flatnonzero(tiles[i]), np.arange(lo, hi)), (w, i)
        for c in range(nk):
            lo, hi = (int(x) for x in blocked._q_range(c, w, bs, nq))
            assert np.array_equal(np.flatnonzero(tiles[:, c]), np.arange(lo, hi)), (w, c)


def test_bad_inputs_raise_value_error():
    q, k, v, _ = _inputs(5, 1, 8, 4, 2)
    pos = jnp.arange(8, dtype=jnp.int32)[None]
    kw = dict(q_positions=pos, kv_positions=pos)
    with pytest.raises(ValueError, match='T == S'):
        blocked.blocked_attention(q, k[:, :4], v[:, :4], q_positions=pos,
                                  kv_positions=pos[:, :4])
    with pytest.raises(ValueError, match='multiple of KV heads'):
        blocked.blocked_attention(q[:, :, :3], k, v, **kw)
    with pytest.raises(ValueError, match='window'):
        blocked.blocked_attention(q, k, v, window=jnp.ones((3,), jnp.int32), **kw)
    with pytest.raises(ValueError, match='together'):
        blocked.blocked_attention(q, k, v, q_segment_ids=pos, **kw)
    with pytest.raises(ValueError, match='q_positions'):
        blocked.blocked_attention(q, k, v, q_positions=pos[:, :5], kv_positions=pos)
    with pytest.raises(ValueError, match='block_q'):
        blocked.BlockSizes(block_q=0)
