"""Mask builders against literal 0/1 matrices; a traced window never retraces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import masks


def _m(rows):
    return np.array([[int(c) for c in row.split()] for row in rows], bool)


def test_causal_square():
    expected = _m(['1 0 0 0',
                   '1 1 0 0',
                   '1 1 1 0',
                   '1 1 1 1'])
    np.testing.assert_array_equal(masks.causal_mask(4), expected)


def test_window_one_is_identity():
    np.testing.assert_array_equal(masks.sliding_window_mask(5, 1), np.eye(5, dtype=bool))


def test_window_three():
    expected = _m(['1 0 0 0 0 0',
                   '1 1 0 0 0 0',
                   '1 1 1 0 0 0',
                   '0 1 1 1 0 0',
                   '0 0 1 1 1 0',
                   '0 0 0 1 1 1'])
    np.testing.assert_array_equal(masks.sliding_window_mask(6, 3), expected)
    # Traced window, same answer.
    np.testing.assert_array_equal(masks.sliding_window_mask(6, jnp.int32(3)), expected)


@pytest.mark.parametrize('window', [5, 6, masks.NO_WINDOW])
def test_window_at_least_seq_is_causal(window):
    np.testing.assert_array_equal(masks.sliding_window_mask(5, window), np.tril(np.ones((5, 5))))


def test_packed_segments():
    positions = jnp.array([[0, 1, 0, 1, 2]], jnp.int32)
    segments = jnp.array([[1, 1, 2, 2, 2]], jnp.int32)
    expected = _m(['1 0 0 0 0',
                   '1 1 0 0 0',
                   '0 0 1 0 0',
                   '0 0 1 1 0',
                   '0 0 1 1 1'])
    mask = masks.make_attention_mask(positions, positions, masks.NO_WINDOW, segments, segments)
    np.testing.assert_array_equal(mask[0], expected)
    # Window 2 inside the segments.
    expected_w2 = _m(['1 0 0 0 0',
                      '1 1 0 0 0',
                      '0 0 1 0 0',
                      '0 0 1 1 0',
                      '0 0 0 1 1'])
    mask = masks.make_attention_mask(positions, positions, 2, segments, segments)
    np.testing.assert_array_equal(mask[0], expected_w2)


def test_negative_positions_are_padding():
    positions = jnp.array([[-1, -1, 0, 1, 2]], jnp.int32)  # two left-padding slots
    expected = _m(['0 0 0 0 0',
                   '0 0 0 0 0',
                   '0 0 1 0 0',
                   '0 0 1 1 0',
                   '0 0 1 1 1'])
    np.testing.assert_array_equal(masks.make_attention_mask(positions, positions)[0], expected)


def test_ring_cache_positions():
    # One query at position 5 against a ring of 4 slots holding positions 4, 5, 2, 3.
    mask = masks.make_attention_mask(jnp.array([[5]]), jnp.array([[4, 5, 2, 3]]), 3)
    np.testing.assert_array_equal(mask[0], _m(['1 1 0 1']))


def test_per_row_windows():
    pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4))
    mask = masks.make_attention_mask(pos, pos, jnp.array([1, 2], jnp.int32))
    np.testing.assert_array_equal(mask[0], np.eye(4, dtype=bool))
    np.testing.assert_array_equal(mask[1], _m(['1 0 0 0', '1 1 0 0', '0 1 1 0', '0 0 1 1']))


def test_segments_must_come_together():
    pos = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match='segment_ids'):
        masks.make_attention_mask(pos, pos, 2, q_segment_ids=pos)


def test_traced_window_does_not_retrace():
    traces = []

    @jax.jit
    def count_visible(window):
        traces.append(1)
        return masks.sliding_window_mask(8, window).sum()

    seen = [int(count_visible(jnp.int32(w))) for w in (1, 3, 8, masks.NO_WINDOW)]
    assert len(traces) == 1
    # sum_i min(i + 1, W) for 8 queries.
    assert seen == [8, 1 + 2 + 3 * 6, 36, 36]
