"""Language-model batches: shifted targets, windows, seeding, resumption, validation."""

import json

import numpy as np
import pytest

from rustgpt_jax.data import BATCH_KEYS, DataError, LMBatchIterator, LMValidationBatches

B, T = 3, 8
N = 200  # 199 predictions -> 24 windows of 8 -> 8 or 7 batches per epoch


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_batch_fields_and_targets_shifted_by_one():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 50, size=N)
    # Same length and seed -> same window starts; an arange reveals them.
    starts_it = LMBatchIterator(np.arange(N), B, T, seed=3)
    it = LMBatchIterator(data, B, T, seed=3)
    for _ in range(10):
        where, batch = next(starts_it), next(it)
        assert set(batch) == set(BATCH_KEYS)
        assert batch['tokens'].dtype == np.int32 and batch['loss_mask'].dtype == np.float32
        starts = where['tokens'][:, 0]
        # the arange shows every row is a contiguous window
        np.testing.assert_array_equal(where['tokens'], starts[:, None] + np.arange(T))
        for r, s in enumerate(starts):
            np.testing.assert_array_equal(batch['tokens'][r], data[s:s + T])
            np.testing.assert_array_equal(batch['targets'][r], data[s + 1:s + T + 1])
        np.testing.assert_array_equal(batch['positions'], np.tile(np.arange(T), (B, 1)))
        np.testing.assert_array_equal(batch['segment_ids'], np.ones((B, T)))
        np.testing.assert_array_equal(batch['loss_mask'], np.ones((B, T)))


def test_epoch_uses_each_window_once_with_a_common_offset():
    it = LMBatchIterator(np.arange(N), B, T, seed=0)
    plan = it._current_plan()
    steps = len(plan) // B
    starts = np.concatenate([next(it)['tokens'][:, 0] for _ in range(steps)])
    assert it.epoch == 0
    assert len(set(starts.tolist())) == steps * B  # no window twice
    offset = starts.min() % T
    assert np.all(starts % T == offset) and 0 <= offset < T
    assert starts.max() + T + 1 <= N
    next(it)
    assert (it.epoch, it.step_in_epoch, it.step) == (1, 1, steps + 1)


def test_same_seed_same_batches_different_seed_different():
    data = np.arange(N)
    _assert_same(_take(LMBatchIterator(data, B, T, seed=1), 12),
                 _take(LMBatchIterator(data, B, T, seed=1), 12))
    a = _take(LMBatchIterator(data, B, T, seed=1), 3)
    c = _take(LMBatchIterator(data, B, T, seed=2), 3)
    assert any(not np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, c))


@pytest.mark.parametrize('interrupt_at', [0, 4, 7, 8, 13])
def test_resume_equals_uninterrupted(interrupt_at):
    data = np.random.default_rng(1).integers(0, 9, size=N)
    full = _take(LMBatchIterator(data, B, T, seed=5), 20)  # spans 2+ epochs
    it = LMBatchIterator(data, B, T, seed=5)
    _take(it, interrupt_at)
    state = json.loads(json.dumps(it.state()))
    assert state['step'] == interrupt_at
    resumed = LMBatchIterator(data, B, T, seed=5)
    resumed.restore(state)
    _assert_same(full[interrupt_at:], _take(resumed, 20 - interrupt_at))


def test_restore_rejects_foreign_state():
    it = LMBatchIterator(np.arange(N), B, T, seed=5)
    state = it.state()
    with pytest.raises(DataError, match='seed=5 but this iterator has seed=6'):
        LMBatchIterator(np.arange(N), B, T, seed=6).restore(state)
    with pytest.raises(DataError, match='num_tokens=200 but this iterator has num_tokens=300'):
        LMBatchIterator(np.arange(300), B, T, seed=5).restore(state)
    with pytest.raises(DataError, match='step must be an integer'):
        it.restore({**state, 'step': -1})


def test_bad_lm_inputs():
    with pytest.raises(DataError, match='too few for one batch of 3 x 8 \\(needs 25\\)'):
        LMBatchIterator(np.arange(24), B, T)
    with pytest.raises(DataError, match='1-D integer array'):
        LMBatchIterator(np.zeros((10, 10)), B, T)
    with pytest.raises(DataError, match='seq_len must be an integer >= 1'):
        LMBatchIterator(np.arange(N), B, 0)


def test_validation_batches_literal_and_cover_every_prediction():
    tokens = np.arange(100, 123)  # 23 tokens -> 22 predictions -> rows of 5,5,5,5,2
    val = LMValidationBatches(tokens, batch_size=2, seq_len=5, pad_id=0)
    batches = list(val)
    assert len(val) == len(batches) == 3
    last = batches[2]
    np.testing.assert_array_equal(last['tokens'], [[120, 121, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last['targets'], [[121, 122, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last['loss_mask'], [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last['positions'], [[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(last['segment_ids'], [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batches[0]['tokens'], [[100, 101, 102, 103, 104],
                                                         [105, 106, 107, 108, 109]])
    scored = np.concatenate([b['targets'][b['loss_mask'] > 0] for b in batches])
    np.testing.assert_array_equal(scored, tokens[1:])  # each prediction once, in order
    _assert_same(batches, list(val))  # fixed order on every pass
    assert len(LMValidationBatches(tokens, 2, 5, num_batches=1)) == 1


def test_validation_subset_spreads_over_the_split_and_whole_covers_it():
    tokens = np.arange(1000, 1201)  # 200 predictions -> 40 rows of 5 -> 20 batches of 2
    val = LMValidationBatches(tokens, batch_size=2, seq_len=5, num_batches=4)
    assert val.total_batches == 20 and len(val) == 4
    first_inputs = [int(b['tokens'][0, 0]) for b in val]
    # Batches 0, 6, 13, 19 of 20 (rows of 5 tokens, 2 rows each): start, ..., end.
    assert first_inputs == [1000, 1060, 1130, 1190]
    assert [int(b['tokens'][0, 0]) for b in val] == first_inputs  # deterministic
    whole = val.whole()
    assert len(whole) == 20
    scored = np.concatenate([b['targets'][b['loss_mask'] > 0] for b in whole])
    np.testing.assert_array_equal(scored, tokens[1:])
