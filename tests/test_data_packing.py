"""Sequence packing of instruction examples: literal rows, truncation, resumption."""

import json

import numpy as np
import pytest

from rustgpt_jax import masks
from rustgpt_jax.data import (
    BATCH_KEYS,
    CharTokenizer,
    DataError,
    EncodedExample,
    InstructionExample,
    PackedBatchIterator,
    PackedValidationBatches,
    build_packed_batch,
    encode_instruction,
    first_fit,
    format_prompt,
    prepare_examples,
)


def _ex(ids, mask):
    return EncodedExample(np.asarray(ids, np.int32), np.asarray(mask, np.float32))


# 3, 2 and 5 slots (n ids fill n - 1 slots).
EXAMPLES = [
        _ex([10, 11, 12, 13], [0, 0, 1, 1]),
        _ex([20, 21, 22], [0, 1, 1]),
        _ex([30, 31, 32, 33, 34, 35], [0, 0, 0, 1, 1, 1]),
]


def test_first_fit_literal():
    assert first_fit([3, 2, 5, 1, 4], 6) == [[0, 1, 3], [2], [4]]
    with pytest.raises(DataError, match='item 1 needs 7 slots'):
        first_fit([3, 7], 6)


def _first_fit_oracle(lengths, capacity):
    """Plain first-fit: scan every row in order."""
    rows, free = [], []
    for i, n in enumerate(lengths):
        for r, f in enumerate(free):
            if f >= n:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def test_first_fit_matches_plain_loop():
    rng = np.random.default_rng(0)
    for capacity in (8, 64):
        for _ in range(10):
            lengths = rng.integers(1, capacity + 1, size=200).tolist()
            assert first_fit(lengths, capacity) == _first_fit_oracle(lengths, capacity)


def test_packed_batch_literal():
    rows = first_fit([len(e) - 1 for e in EXAMPLES], 6)
    assert rows == [[0, 1], [2]]
    batch = build_packed_batch(rows, EXAMPLES, batch_size=3, seq_len=6, pad_id=0)
    expected = {
            'tokens': [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 34, 0], [0] * 6],
            'targets': [[11, 12, 13, 21, 22, 0], [31, 32, 33, 34, 35, 0], [0] * 6],
            'loss_mask': [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0] * 6],
            'positions': [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0], [0] * 6],
            'segment_ids': [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0], [0] * 6],
    }
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    assert batch['loss_mask'].dtype == np.float32 and batch['segment_ids'].dtype == np.int32


def test_packed_row_mask_never_mixes_segments_or_padding():
    batch = build_packed_batch([[0, 1]], EXAMPLES, batch_size=1, seq_len=6)
    mask = np.asarray(masks.make_attention_mask(batch['positions'], batch['positions'],
                                                q_segment_ids=batch['segment_ids'],
                                                kv_segment_ids=batch['segment_ids']))[0]
    expected = np.array([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_truncation_keeps_the_head_and_drops_unscored_examples():
    long = _ex(np.arange(10), [0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    prompt_only = _ex(np.arange(8), [0, 0, 0, 0, 0, 0, 1, 1])
    kept, stats = prepare_examples([long, prompt_only, EXAMPLES[1]], seq_len=4)
    assert (stats.num_examples, stats.num_truncated, stats.num_dropped) == (2, 2, 1)
    np.testing.assert_array_equal(kept[0].ids, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(kept[0].loss_mask, [0, 0, 1, 1, 1])
    assert kept[1] is EXAMPLES[1]


def _chat_examples(n=11):
    pairs = [InstructionExample(f'q{i}?', 'ans' * (1 + i % 3)) for i in range(n)]
    tok = CharTokenizer.from_text(''.join(format_prompt(p.prompt) + p.response for p in pairs))
    return tok, pairs, [encode_instruction(tok, p) for p in pairs]


def test_scored_targets_are_exactly_each_response_and_eos():
    tok, pairs, encoded = _chat_examples()
    val = PackedValidationBatches(encoded, batch_size=2, seq_len=64, pad_id=tok.pad_id)
    found = []
    for batch in val:
        for r in range(2):
            for seg in range(1, batch['segment_ids'][r].max() + 1):
                sel = (batch['segment_ids'][r] == seg) & (batch['loss_mask'][r] > 0)
                found.append(tok.decode(batch['targets'][r][sel], skip_special_tokens=False))
    # validation keeps file order: rows are filled first-fit in order
    assert sorted(found) == sorted(p.response + '<eos>' for p in pairs)
    assert found[0] == pairs[0].response + '<eos>'


def test_packed_validation_subset_is_spread_and_whole_is_everything():
    tok, pairs, encoded = _chat_examples(40)
    full = PackedValidationBatches(encoded, batch_size=1, seq_len=64, pad_id=tok.pad_id)
    every = [b['tokens'].tolist() for b in full]
    sub = PackedValidationBatches(encoded, batch_size=1, seq_len=64, num_batches=3,
                                  pad_id=tok.pad_id)
    assert len(every) == sub.total_batches > 3
    n = len(every)
    expected = [every[0], every[round((n - 1) / 2)], every[n - 1]]  # first, middle, last
    assert [b['tokens'].tolist() for b in sub] == expected
    assert [b['tokens'].tolist() for b in sub.whole()] == every


def _segments(batch):
    """Rebuilds each packed example's ids: its inputs plus its last target."""
    out = []
    for r in range(batch['tokens'].shape[0]):
        for seg in range(1, batch['segment_ids'][r].max() + 1):
            sel = batch['segment_ids'][r] == seg
            out.append((*batch['tokens'][r][sel].tolist(), int(batch['targets'][r][sel][-1])))
    return out


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_every_example_once_per_epoch():
    _, _, encoded = _chat_examples()
    it = PackedBatchIterator(encoded, batch_size=2, seq_len=64, seed=0)
    for epoch in range(2):
        steps = -(-len(it._current_plan()) // 2)
        batches = [next(it) for _ in range(steps)]
        assert it.epoch == epoch
        seen = [s for b in batches for s in _segments(b)]
        assert sorted(seen) == sorted(tuple(e.ids.tolist()) for e in encoded)
        assert sum(float(b['loss_mask'].sum()) for b in batches) == sum(
                float(e.loss_mask[1:].sum()) for e in encoded)


@pytest.mark.parametrize('interrupt_at', [0, 3, 7])
def test_packed_resume_equals_uninterrupted_and_seeds_differ(interrupt_at):
    _, _, encoded = _chat_examples()
    uninterrupted = PackedBatchIterator(encoded, 2, 64, seed=0)  # 3 steps per epoch
    full = [next(uninterrupted) for _ in range(12)]
    part = PackedBatchIterator(encoded, 2, 64, seed=0)
    for _ in range(interrupt_at):
        next(part)
    resumed = PackedBatchIterator(encoded, 2, 64, seed=0)
    resumed.restore(json.loads(json.dumps(part.state())))
    _assert_same(full[interrupt_at:], [next(resumed) for _ in range(12 - interrupt_at)])
    again = PackedBatchIterator(encoded, 2, 64, seed=0)
    _assert_same(full, [next(again) for _ in range(12)])
    other = PackedBatchIterator(encoded, 2, 64, seed=1)
    assert any(not np.array_equal(a['tokens'], next(other)['tokens']) for a in full)


def test_packed_bad_inputs():
    with pytest.raises(DataError, match='no instruction example has a scored token'):
        PackedBatchIterator([_ex(np.arange(8), [0] * 6 + [1, 1])], 2, 4)
    with pytest.raises(DataError, match='batch_size must be an integer >= 1'):
        PackedBatchIterator(EXAMPLES, 0, 6)
    with pytest.raises(DataError, match='must be 1-D of equal length'):
        _ex([1, 2, 3], [0, 1])
