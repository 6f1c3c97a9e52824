"""Sequence packing of instruction examples into fixed (B, T) rows.

An encoded example of n ids fills n - 1 slots of a row: inputs `ids[:-1]`, targets
`ids[1:]`, loss mask `mask[1:]` (the mask of the *target*, so the last prompt token is
the input that predicts the first response token). Several examples share a row, each
with its own segment id (1, 2, ... in order of placement) and positions restarting at
0; unused slots are padding (see `pipeline` for the padding convention).

Truncation rule: an example longer than the row (n - 1 > T) keeps its first T + 1 ids,
so the prompt survives and the end of the response (and its EOS) is cut. An example
left without any scored target by the cut (a prompt filling the whole row) is dropped,
since it would cost compute and teach nothing; `PackingStats` counts both cases.

Rows are filled first-fit in the order given (each example goes to the first row with
room), which is deterministic and typically leaves little padding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from rustgpt_jax.data.errors import DataError
from rustgpt_jax.data.instructions import EncodedExample
from rustgpt_jax.data.pipeline import (
    ResumableIterator,
    check_positive,
    empty_batch,
    epoch_rng,
    evenly_spaced,
)


@dataclasses.dataclass(frozen=True)
class PackingStats:
    num_examples: int  # kept after truncation / dropping
    num_truncated: int
    num_dropped: int


def prepare_examples(examples: Sequence[EncodedExample], seq_len: int,
                     ) -> tuple[list[EncodedExample], PackingStats]:
    """Applies the truncation rule; returns the examples that fit a row of `seq_len`."""
    check_positive(seq_len=seq_len)
    kept, truncated, dropped = [], 0, 0
    for ex in examples:
        if len(ex) > seq_len + 1:
            ex = EncodedExample(ex.ids[:seq_len + 1], ex.loss_mask[:seq_len + 1])
            truncated += 1
        if len(ex) < 2 or not ex.loss_mask[1:].any():
            dropped += 1
            continue
        kept.append(ex)
    return kept, PackingStats(len(kept), truncated, dropped)


def first_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Assigns items to rows of capacity `seq_len`, each to the first row with room.

    Args:
      lengths: slots each item needs, every one in [1, seq_len], in placement order.

    Returns:
      rows as lists of item indices, in order of placement.
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise DataError(f'item {i} needs {n} slots, outside [1, {seq_len}]')
    shortest = min(lengths, default=1)
    rows: list[list[int]] = []
    # Rows that can still take the shortest item, in row order (so the search stays
    # first-fit); full rows leave the search, which keeps it short on large datasets.
    open_rows = np.zeros((0,), np.int64)
    open_free = np.zeros((0,), np.int64)
    for i, n in enumerate(lengths):
        hits = np.flatnonzero(open_free >= n)
        if len(hits):
            k = int(hits[0])
            rows[int(open_rows[k])].append(i)
            open_free[k] -= n
            if open_free[k] < shortest:
                open_rows = np.delete(open_rows, k)
                open_free = np.delete(open_free, k)
        else:
            rows.append([i])
            if seq_len - n >= shortest:
                open_rows = np.append(open_rows, len(rows) - 1)
                open_free = np.append(open_free, seq_len - n)
    return rows


def build_packed_batch(rows: Sequence[Sequence[int]], examples: Sequence[EncodedExample],
                       batch_size: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Writes up to `batch_size` packed rows into one batch (missing rows are padding).

    Args:
      rows: per row, the indices into `examples` packed into it.
      examples: prepared examples (each at most seq_len + 1 ids).

    Returns:
      the (B, T) batch dict of `pipeline.BATCH_KEYS`.
    """
    if len(rows) > batch_size:
        raise DataError(f'{len(rows)} rows do not fit a batch of {batch_size}')
    batch = empty_batch(batch_size, seq_len, pad_id)
    for r, row in enumerate(rows):
        at = 0
        for segment, idx in enumerate(row, start=1):
            ex = examples[idx]
            n = len(ex) - 1
            if at + n > seq_len:
                raise DataError(f'row {r} overflows: {at} + {n} slots > seq_len {seq_len}')
            batch['tokens'][r, at:at + n] = ex.ids[:-1]
            batch['targets'][r, at:at + n] = ex.ids[1:]
            batch['loss_mask'][r, at:at + n] = ex.loss_mask[1:]
            batch['positions'][r, at:at + n] = np.arange(n)
            batch['segment_ids'][r, at:at + n] = segment
            at += n
    return batch


class PackedBatchIterator(ResumableIterator):
    """Shuffled, packed instruction batches; infinite and resumable.

    Each epoch shuffles the examples with `(seed, epoch)`, packs them first-fit and
    yields `ceil(rows / B)` batches, the last one completed with padding rows, so every
    example is seen exactly once per epoch.

    Args:
      examples: encoded examples (from `encode_instruction`).
      batch_size, seq_len: B and T.
      seed: the random seed.
      pad_id: id written in padding slots.
    """

    kind = 'packed'

    def __init__(self, examples: Sequence[EncodedExample], batch_size: int, seq_len: int,
                 seed: int = 0, pad_id: int = 0):
        super().__init__(seed)
        check_positive(batch_size=batch_size, seq_len=seq_len)
        self.batch_size, self.seq_len, self.pad_id = int(batch_size), int(seq_len), pad_id
        self.examples, self.stats = prepare_examples(examples, seq_len)
        if not self.examples:
            raise DataError(f'no instruction example has a scored token within '
                            f'seq_len={seq_len} ({self.stats.num_dropped} dropped)')
        self._slots = [len(ex) - 1 for ex in self.examples]

    def _identity(self) -> dict:
        return {'num_examples': len(self.examples), 'batch_size': self.batch_size,
                'seq_len': self.seq_len}

    def _plan(self, epoch: int) -> list[list[int]]:
        order = epoch_rng(self.seed, epoch).permutation(len(self.examples))
        rows = first_fit([self._slots[i] for i in order], self.seq_len)
        return [[int(order[j]) for j in row] for row in rows]

    def _num_steps(self, plan) -> int:
        return math.ceil(len(plan) / self.batch_size)

    def _batch(self, plan, step_in_epoch: int) -> dict[str, np.ndarray]:
        b = self.batch_size
        rows = plan[step_in_epoch * b:(step_in_epoch + 1) * b]
        return build_packed_batch(rows, self.examples, b, self.seq_len, self.pad_id)


class PackedValidationBatches:
    """Instruction validation batches: examples in file order, packed first-fit.

    Args:
      examples: encoded examples.
      batch_size, seq_len: B and T.
      num_batches: use this many batches, evenly spaced over the split (None = all);
        `whole()` gives every batch.
      pad_id: id written in padding slots.
    """

    def __init__(self, examples: Sequence[EncodedExample], batch_size: int, seq_len: int,
                 num_batches: Optional[int] = None, pad_id: int = 0):
        check_positive(batch_size=batch_size, seq_len=seq_len)
        if num_batches is not None:
            check_positive(num_batches=num_batches)
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.source = examples
        self.examples, self.stats = prepare_examples(examples, seq_len)
        self.rows = first_fit([len(ex) - 1 for ex in self.examples], seq_len)
        self.total_batches = math.ceil(len(self.rows) / batch_size)
        self.indices = evenly_spaced(self.total_batches, num_batches)
        self.num_batches = len(self.indices)

    def whole(self) -> 'PackedValidationBatches':
        """The same split, every batch (a final evaluation)."""
        return PackedValidationBatches(self.source, self.batch_size, self.seq_len, None,
                                       self.pad_id)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        b = self.batch_size
        for i in self.indices:
            yield build_packed_batch(self.rows[i * b:(i + 1) * b], self.examples, b,
                                     self.seq_len, self.pad_id)
