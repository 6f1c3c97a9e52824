"""Pallas single-token decode kernel vs the einsum reference on ring-buffer caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import masks
from rustgpt_jax.kernels import flash_decode
from rustgpt_jax.ops.reference import mha_reference


def ring_positions(current, slots):
    """Positions held by a ring buffer of `slots` after writing position `current`.

    Slot i holds the latest position p <= current with p % slots == i; slots never
    written hold -1 (empty).
    """
    i = np.arange(slots)
    pos = current - ((current - i) % slots)
    return np.where(pos >= 0, pos, -1).astype(np.int32)


@pytest.mark.parametrize('n, k, dtype, window, splits', [
    (4, 4, jnp.float32, masks.NO_WINDOW, 1),
    (6, 2, jnp.float32, (7, 30), None),
    (4, 1, jnp.float32, 12, 3),
    (8, 2, jnp.bfloat16, 9, 2),
])
def test_decode_matches_reference_on_ring_buffer(n, k, dtype, window, splits):
    b, s, h = 2, 45, 16
    keys = jax.random.split(jax.random.key(n * 10 + k), 3)
    q = jax.random.normal(keys[0], (b, 1, n, h), jnp.float32).astype(dtype)
    kc = jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(dtype)
    vc = jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(dtype)
    current = np.array([100, 20])  # row 0 wrapped around the ring, row 1 partly empty
    kpos = jnp.asarray(np.stack([ring_positions(c, s) for c in current]))
    qpos = jnp.asarray(current[:, None], jnp.int32)
    window = jnp.asarray(window, jnp.int32)
    decode = jax.jit(lambda *a, **kw: flash_decode(*a, **kw, block_k=8, num_splits=splits))
    out = decode(q, kc, vc, q_positions=qpos, kv_positions=kpos, window=window)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = mha_reference(up(q), up(kc), up(vc), q_positions=qpos, kv_positions=kpos,
                        window=window)
    assert out.dtype == dtype and out.shape == q.shape
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(up(out), ref, atol=tol, rtol=tol)


def test_ring_positions_literal():
    np.testing.assert_array_equal(ring_positions(6, 4), [4, 5, 6, 3])
    np.testing.assert_array_equal(ring_positions(1, 4), [0, 1, -1, -1])


def test_decode_bad_shapes_raise():
    q = jnp.zeros((1, 2, 4, 16))
    cache = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r'\(B, 1, N, H\)'):
        flash_decode(q, cache, cache, q_positions=jnp.zeros((1, 1), jnp.int32),
                     kv_positions=jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match='kv_positions'):
        flash_decode(q[:, :1], cache, cache, q_positions=jnp.zeros((1, 1), jnp.int32),
                     kv_positions=jnp.zeros((1, 7), jnp.int32))
