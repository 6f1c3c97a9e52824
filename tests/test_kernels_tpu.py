"""The TPU (Mosaic) flash attention kernel in TPU interpret mode vs the einsum reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from test_kernels_flash import TOLS, arange_positions, assert_matches, make_inputs

from rustgpt_jax.kernels import flash_attention
from rustgpt_jax.ops.reference import mha_reference
from rustgpt_jax.ops.tiling import BlockSizes


def test_mosaic_sliding_window_gqa_tail_matches_reference():
    # T = 20 is not a multiple of the 8-row blocks; per-row windows; GQA 2.
    b, t, n, k, h = 2, 20, 2, 1, 16
    q, kk, v, ct = make_inputs(11, b, t, t, n, k, h, jnp.float32)
    pos = arange_positions(b, t)
    fn = functools.partial(flash_attention, backend='mosaic', block_sizes=BlockSizes(8, 8, 8, 8))
    assert_matches(fn, q, kk, v, ct, TOLS[jnp.float32], q_positions=pos, kv_positions=pos,
                   window=jnp.array([3, 9], jnp.int32))


def test_mosaic_segments_under_force_tpu_interpret_mode():
    b, t, n, k, h = 1, 16, 2, 2, 16
    q, kk, v, ct = make_inputs(12, b, t, t, n, k, h, jnp.bfloat16)
    seg = (jnp.arange(t)[None] >= 6).astype(jnp.int32)
    pos = (jnp.arange(t)[None] - 6 * seg).astype(jnp.int32)
    fn = functools.partial(flash_attention, backend='mosaic', interpret=False,
                           block_sizes=BlockSizes(8, 8, 8, 8))
    with pltpu.force_tpu_interpret_mode():
        assert_matches(fn, q, kk, v, ct, TOLS[jnp.bfloat16], q_positions=pos,
                       kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                       window=jnp.int32(5))


def test_mosaic_and_triton_kernels_agree_without_window_retrace():
    b, t, n, h = 1, 16, 2, 16
    q, kk, v, _ = make_inputs(13, b, t, t, n, 1, h, jnp.float32)
    pos = arange_positions(b, t)
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def run(backend, window):
        traces.append(backend)
        return flash_attention(q, kk, v, q_positions=pos, kv_positions=pos, window=window,
                               backend=backend, block_sizes=BlockSizes(8, 8, 8, 8))

    for window in (2, 7):
        ref = mha_reference(q, kk, v, q_positions=pos, kv_positions=pos, window=window)
        for backend in ('mosaic', 'triton'):
            np.testing.assert_allclose(run(backend, jnp.int32(window)), ref, atol=2e-5)
    assert sorted(traces) == ['mosaic', 'triton']
