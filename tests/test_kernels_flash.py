"""Pallas flash attention (GPU/Triton kernel in interpret mode) vs the einsum reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import masks
from rustgpt_jax.kernels import _common, flash_attention
from rustgpt_jax.ops.reference import mha_reference
from rustgpt_jax.ops.tiling import BlockSizes

NO_WINDOW = masks.NO_WINDOW
TOLS = {jnp.float32: (2e-5, 2e-4), jnp.bfloat16: (3e-2, 3e-2), jnp.float16: (5e-3, 5e-3)}


def make_inputs(seed, b, t, s, n, k, h, dtype):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
    kk = jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(dtype)
    # A fixed random cotangent so that every output element matters for the gradient.
    ct = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    return q, kk, v, ct


def assert_matches(fn, q, k, v, ct, tol, rows=None, **kw):
    """Forward values and d/dq, d/dk, d/dv of `fn` vs the reference on float32 inputs.

    `rows` (B, T, 1, 1) bool, if given, restricts the comparison to those query rows.
    """
    atol, rtol = tol
    keep = (lambda x: x) if rows is None else (lambda x: jnp.where(rows, x, 0))  # noqa: E731
    up = lambda x: x.astype(jnp.float32)  # noqa: E731

    def loss(f, a, b, c):
        return jnp.sum(keep(up(f(a, b, c, **kw))) * ct)

    @jax.jit
    def kernel_and_grads(a, b, c):  # one compilation for the forward and the backward
        return fn(a, b, c, **kw), jax.grad(functools.partial(loss, fn), (0, 1, 2))(a, b, c)

    out, grads = kernel_and_grads(q, k, v)
    ref = keep(mha_reference(up(q), up(k), up(v), **kw))
    assert out.dtype == q.dtype and out.shape == q.shape
    np.testing.assert_allclose(keep(up(out)), ref, atol=atol, rtol=rtol)
    ref_grads = jax.grad(functools.partial(loss, mha_reference), (0, 1, 2))(up(q), up(k),
                                                                           up(v))
    for name, g, rg in zip('qkv', grads, ref_grads):
        assert g.dtype == q.dtype, name
        scale = float(jnp.max(jnp.abs(rg)))
        np.testing.assert_allclose(up(g), rg, atol=atol * max(1.0, scale), rtol=rtol,
                                   err_msg=f'd{name}')


def arange_positions(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


# (b, t, n, k, h, dtype, window, segments, blocks): a covering product, not a full one.
CASES = {
    'causal_f32_mha': (1, 32, 2, 2, 16, jnp.float32, NO_WINDOW, False, (16, 16, 16, 16)),
    'sliding_tail_gqa2': (2, 37, 4, 2, 32, jnp.float32, 5, False, (16, 8, 8, 16)),
    'segments_sliding_mqa': (1, 24, 4, 1, 16, jnp.float32, 9, True, (8, 8, 8, 8)),
    'per_row_window_gqa4': (2, 24, 8, 2, 16, jnp.float32, (3, 17), False, (16, 16, 16, 8)),
    'window_one': (1, 20, 2, 1, 16, jnp.float32, 1, False, (8, 8, 8, 8)),
    'head_dim_24_padded': (1, 19, 2, 2, 24, jnp.float32, 6, True, (8, 16, 16, 8)),
    'bf16_h64_gqa2': (1, 33, 4, 2, 64, jnp.bfloat16, NO_WINDOW, False, (32, 16, 16, 32)),
    'f16_h128_mqa_sliding': (1, 20, 2, 1, 128, jnp.float16, 4, False, (16, 16, 16, 16)),
    'default_blocks_f32': (1, 45, 2, 1, 16, jnp.float32, 12, False, None),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_forward_and_grads_match_reference(case):
    b, t, n, k, h, dtype, window, segments, blocks = CASES[case]
    q, kk, v, ct = make_inputs(len(case), b, t, t, n, k, h, dtype)
    pos = arange_positions(b, t)
    kw = dict(q_positions=pos, kv_positions=pos, window=jnp.asarray(window, jnp.int32))
    if segments:
        seg = jnp.broadcast_to((jnp.arange(t) >= t // 3).astype(jnp.int32)
                               + (jnp.arange(t) >= 2 * t // 3), (b, t))
        # Positions restart in every packed segment, as the data pipeline produces them.
        starts = jnp.array([0, t // 3, 2 * t // 3])[seg[0]]
        pos = jnp.broadcast_to(jnp.arange(t) - starts, (b, t)).astype(jnp.int32)
        kw.update(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    block_sizes = None if blocks is None else BlockSizes(*blocks)
    fn = functools.partial(flash_attention, block_sizes=block_sizes, backend='triton')
    assert_matches(fn, q, kk, v, ct, TOLS[dtype], **kw)


def test_left_padding_rows_and_empty_slots():
    b, t, n, k, h = 2, 24, 2, 1, 16
    q, kk, v, ct = make_inputs(1, b, t, t, n, k, h, jnp.float32)
    pad = jnp.array([[5], [0]])
    pos = (jnp.arange(t)[None] - pad).astype(jnp.int32)  # negative = left padding
    # Padded query rows have no visible key; the kernel returns 0 there, the reference a
    # uniform average, so compare real rows only (and zero the cotangent of padded rows).
    real = (pos >= 0)[:, :, None, None]
    fn = functools.partial(flash_attention, block_sizes=BlockSizes(8, 8, 8, 8))
    out = fn(q, kk, v, q_positions=pos, kv_positions=pos, window=jnp.int32(7))
    assert float(jnp.max(jnp.abs(jnp.where(real, 0.0, out)))) == 0.0
    ref = mha_reference(q, kk, v, q_positions=pos, kv_positions=pos, window=7)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref, 0), atol=2e-5)
    assert_matches(fn, q, kk, v, ct, TOLS[jnp.float32], rows=real, q_positions=pos,
                   kv_positions=pos, window=jnp.int32(7))


def test_queries_shorter_than_keys_visit_every_block():
    # T != S (a chunk of queries after a prefix): no index band is assumed.
    b, t, s, n, k, h = 1, 8, 27, 4, 2, 16
    q, kk, v, ct = make_inputs(2, b, t, s, n, k, h, jnp.float32)
    qpos = (jnp.arange(t)[None] + s - t).astype(jnp.int32)
    kpos = arange_positions(b, s)
    fn = functools.partial(flash_attention, block_sizes=BlockSizes(8, 8, 8, 8))
    assert_matches(fn, q, kk, v, ct, TOLS[jnp.float32], q_positions=qpos,
                   kv_positions=kpos, window=jnp.int32(10))


def test_block_skipping_follows_token_index_band():
    # With every position equal, the predicate allows all pairs, so only the skipped
    # blocks make the kernel differ from the reference: the output must equal the
    # reference restricted to the key blocks of the documented index band.
    b, t, n, h, bq, bk, window = 1, 32, 1, 16, 8, 8, 12
    q, kk, v, _ = make_inputs(3, b, t, t, n, n, h, jnp.float32)
    pos = jnp.zeros((b, t), jnp.int32)
    out = flash_attention(q, kk, v, q_positions=pos, kv_positions=pos,
                          window=jnp.int32(window), block_sizes=BlockSizes(bq, bk, bq, bk))
    qb = np.arange(t) // bq
    lo = np.maximum(qb * bq - window + 1, 0) // bk
    hi = np.minimum((qb * bq + bq - 1) // bk + 1, t // bk)
    kb = np.arange(t) // bk
    band = (kb[None] >= lo[:, None]) & (kb[None] < hi[:, None])  # (T, S) literal band
    from rustgpt_jax.ops.reference import reference_attention
    expected = reference_attention(q, kk, v, jnp.asarray(band)[None])
    np.testing.assert_allclose(out, expected, atol=2e-5)
    unskipped = flash_attention(q, kk, v, q_positions=pos, kv_positions=pos,
                                window=jnp.int32(window), skip_blocks=False,
                                block_sizes=BlockSizes(bq, bk, bq, bk))
    np.testing.assert_allclose(unskipped, mha_reference(q, kk, v, q_positions=pos,
                                                        kv_positions=pos, window=window),
                               atol=2e-5)


def test_block_ranges_literal():
    lo, hi = _common.kv_block_range(jnp.int32(3), 8, 8, jnp.int32(12), 4)
    assert (int(lo), int(hi)) == (1, 4)  # rows 24..31 see keys 13..31
    lo, hi = _common.q_block_range(jnp.int32(1), 8, 8, jnp.int32(12), 4)
    assert (int(lo), int(hi)) == (1, 4)  # keys 8..15 are seen by rows 8..26
    lo, hi = _common.kv_block_range(jnp.int32(3), 8, 8, jnp.int32(NO_WINDOW), 4)
    assert (int(lo), int(hi)) == (0, 4)


def test_changing_window_does_not_retrace():
    b, t, n, h = 1, 16, 2, 16
    q, kk, v, _ = make_inputs(4, b, t, t, n, n, h, jnp.float32)
    pos = arange_positions(b, t)
    traces = []

    @jax.jit
    def run(q, k, v, window):
        traces.append(1)
        return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, window=window,
                               block_sizes=BlockSizes(8, 8, 8, 8))

    for window in (3, 11, NO_WINDOW):
        out = run(q, kk, v, jnp.int32(window))
        ref = mha_reference(q, kk, v, q_positions=pos, kv_positions=pos, window=window)
        np.testing.assert_allclose(out, ref, atol=2e-5)
    assert len(traces) == 1


@pytest.mark.parametrize('bad, match', [
    (dict(k_shape=(1, 16, 4, 16)), 'multiple of KV heads'),
    (dict(dtype=jnp.int32), 'dtype'),
    (dict(window=jnp.ones((3,), jnp.int32)), 'window'),
    (dict(q_segment_ids=jnp.zeros((1, 16), jnp.int32)), 'together'),
    (dict(q_positions=jnp.zeros((1, 15), jnp.int32)), 'q_positions'),
    (dict(backend='cuda'), 'backend'),
])
def test_bad_input_raises_value_error(bad, match):
    q = jnp.zeros((1, 16, 6, 16), bad.pop('dtype', jnp.float32))
    k = jnp.zeros(bad.pop('k_shape', (1, 16, 2, 16)), q.dtype)
    kw = dict(q_positions=arange_positions(1, 16), kv_positions=arange_positions(1, 16))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, k, **kw)


def test_block_sizes_validated():
    with pytest.raises(ValueError, match='block_q'):
        BlockSizes(block_q=48).check_power_of_2()


def test_lowers_to_triton_for_gpu():
    # Real Triton lowering (no GPU needed to lower): bf16, head_dim 128, GQA 3, tail.
    b, t, n, k, h = 1, 300, 6, 2, 128
    q = jnp.zeros((b, t, n, h), jnp.bfloat16)
    kv = jnp.zeros((b, t, k, h), jnp.bfloat16)
    pos = arange_positions(b, t)

    def loss(q, k, v, window):
        out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos, window=window,
                              q_segment_ids=pos, kv_segment_ids=pos, backend='triton',
                              interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, kv, kv, jnp.int32(64)).lower(
        lowering_platforms=('cuda',))
    text = lowered.as_text()
    assert text.count('__gpu$xla.gpu.triton') == 3  # forward, dq, dk/dv
