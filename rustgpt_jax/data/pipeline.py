"""Deterministic, resumable batch iterators for language-model pretraining.

Every batch is a dict of host numpy arrays of shape (B, T):

    tokens      int32    model inputs
    targets     int32    next tokens (inputs shifted by one)
    loss_mask   float32  1 where the target is scored
    positions   int32    position of each input within its segment
    segment_ids int32    1, 2, ... per sequence in the row; 0 = padding

Padding slots carry token/target `pad_id`, position 0, segment 0 and loss 0: the
attention predicate requires equal segment ids, so padding never mixes with real
tokens, and a padding query still sees itself (no fully masked rows).

Training iterators are infinite and seeded. An epoch's order is a pure function of
`(seed, epoch)`, so `state()` (a small JSON-able dict) and `restore(state)` reproduce
an uninterrupted run exactly without storing any arrays.
"""

from __future__ import annotations

import abc
import math
from typing import Iterator, Optional

import numpy as np

from rustgpt_jax.data.errors import DataError

BATCH_KEYS = ('tokens', 'targets', 'loss_mask', 'positions', 'segment_ids')


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The random stream of one epoch: independent of how many batches came before."""
    return np.random.default_rng([seed, epoch])


def empty_batch(batch_size: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """An all-padding batch; builders fill the real slots in place."""
    return {
            'tokens': np.full((batch_size, seq_len), pad_id, np.int32),
            'targets': np.full((batch_size, seq_len), pad_id, np.int32),
            'loss_mask': np.zeros((batch_size, seq_len), np.float32),
            'positions': np.zeros((batch_size, seq_len), np.int32),
            'segment_ids': np.zeros((batch_size, seq_len), np.int32),
    }


def check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f'{name} must be an integer >= 1, got {value!r}')


def _as_token_array(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f'tokens must be a 1-D integer array, got shape {tokens.shape} '
                        f'dtype {tokens.dtype}')
    return tokens.astype(np.int32, copy=False)


class ResumableIterator(abc.ABC):
    """Infinite batch iterator over epochs whose plans depend only on (seed, epoch).

    Subclasses implement `_plan(epoch)` (anything; cached for the current epoch),
    `_num_steps(plan)` and `_batch(plan, step_in_epoch)`, and `_identity()` (sizes
    that a restored state must match).
    """

    kind = ''

    def __init__(self, seed: int):
        if not isinstance(seed, (int, np.integer)):
            raise DataError(f'seed must be an integer, got {seed!r}')
        self.seed = int(seed)
        self.epoch = 0
        self.step_in_epoch = 0
        self.step = 0
        self._plan_cache: Optional[tuple[int, object]] = None

    @abc.abstractmethod
    def _plan(self, epoch: int): ...

    @abc.abstractmethod
    def _num_steps(self, plan) -> int: ...

    @abc.abstractmethod
    def _batch(self, plan, step_in_epoch: int) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def _identity(self) -> dict: ...

    def _current_plan(self):
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            self._plan_cache = (self.epoch, self._plan(self.epoch))
        return self._plan_cache[1]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        plan = self._current_plan()
        if self.step_in_epoch >= self._num_steps(plan):
            self.epoch += 1
            self.step_in_epoch = 0
            plan = self._current_plan()
        batch = self._batch(plan, self.step_in_epoch)
        self.step_in_epoch += 1
        self.step += 1
        return batch

    def state(self) -> dict:
        """JSON-able position: the next `next()` after `restore(state)` continues here."""
        return {'kind': self.kind, 'seed': self.seed, 'epoch': self.epoch,
                'step_in_epoch': self.step_in_epoch, 'step': self.step, **self._identity()}

    def restore(self, state: dict) -> None:
        """Continues from `state()`; raises DataError when it belongs to other data."""
        expected = {'kind': self.kind, 'seed': self.seed, **self._identity()}
        for key, want in expected.items():
            if key not in state:
                raise DataError(f'iterator state lacks {key!r}: {state}')
            if state[key] != want:
                raise DataError(f'iterator state has {key}={state[key]!r} but this iterator '
                                f'has {key}={want!r} (a state from other data or settings)')
        for key in ('epoch', 'step_in_epoch', 'step'):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise DataError(f'iterator state {key} must be an integer >= 0, got '
                                f'{state.get(key)!r}')
        self.epoch = state['epoch']
        self.step_in_epoch = state['step_in_epoch']
        self.step = state['step']


class LMBatchIterator(ResumableIterator):
    """Random windows of a token array, every window at most once per epoch.

    Epoch e cuts the array into consecutive windows of `seq_len + 1` tokens (overlapping
    by one: the last target of a window is the first input of the next) starting at a
    random offset in [0, seq_len), shuffles them and yields `floor(windows / B)`
    batches; the leftover windows are skipped that epoch (other offsets cover them).

    Args:
      tokens: (N,) integer token ids; needs N - 1 >= batch_size * seq_len.
      batch_size: B rows per batch.
      seq_len: T tokens per row.
      seed: the random seed.
    """

    kind = 'lm'

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        super().__init__(seed)
        check_positive(batch_size=batch_size, seq_len=seq_len)
        self.tokens = _as_token_array(tokens)
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        need = self.batch_size * self.seq_len + 1
        if len(self.tokens) < need:
            raise DataError(f'{len(self.tokens)} tokens are too few for one batch of '
                            f'{self.batch_size} x {self.seq_len} (needs {need})')

    def _identity(self) -> dict:
        return {'num_tokens': int(len(self.tokens)), 'batch_size': self.batch_size,
                'seq_len': self.seq_len}

    def _plan(self, epoch: int) -> np.ndarray:
        rng = epoch_rng(self.seed, epoch)
        n, t = len(self.tokens), self.seq_len
        # The offset may not leave fewer than one batch of windows.
        max_offset = min(t - 1, (n - 1) - self.batch_size * t)
        offset = int(rng.integers(0, max_offset + 1))
        num_windows = (n - 1 - offset) // t
        return offset + t * rng.permutation(num_windows)  # window starts

    def _num_steps(self, plan) -> int:
        return len(plan) // self.batch_size

    def _batch(self, plan, step_in_epoch: int) -> dict[str, np.ndarray]:
        b, t = self.batch_size, self.seq_len
        starts = plan[step_in_epoch * b:(step_in_epoch + 1) * b]
        windows = self.tokens[starts[:, None] + np.arange(t + 1)[None, :]]  # (B, T + 1)
        return {
                'tokens': windows[:, :-1],
                'targets': windows[:, 1:],
                'loss_mask': np.ones((b, t), np.float32),
                'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                'segment_ids': np.ones((b, t), np.int32),
        }


def evenly_spaced(total: int, count: Optional[int]) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included (all of
    them when count is None or >= total). Deterministic."""
    if count is None or count >= total:
        return list(range(total))
    if count == 1:
        return [0]
    return [round(i * (total - 1) / (count - 1)) for i in range(count)]


class LMValidationBatches:
    """Fixed-order batches that score every next-token prediction of `tokens` once.

    Row r holds inputs `tokens[rT : rT + T]` and targets shifted by one; the last row may
    be shorter (the rest is padding) and the last batch is filled with padding rows,
    so shapes never change. Iterate it as often as needed; the order never changes.
    With `num_batches`, the batches used are spread evenly over the whole split (a
    prefix would score only the start of the text); `whole()` gives every batch.

    Args:
      tokens: (N,) integer ids, N >= 2.
      batch_size, seq_len: B and T.
      num_batches: use this many batches, evenly spaced over the split (None = all).
      pad_id: the id written in padding slots (masked out anyway).
    """

    def __init__(self, tokens, batch_size: int, seq_len: int,
                 num_batches: Optional[int] = None, pad_id: int = 0):
        check_positive(batch_size=batch_size, seq_len=seq_len)
        if num_batches is not None:
            check_positive(num_batches=num_batches)
        self.tokens = _as_token_array(tokens)
        if len(self.tokens) < 2:
            raise DataError(f'validation needs at least 2 tokens, got {len(self.tokens)}')
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        num_rows = math.ceil((len(self.tokens) - 1) / seq_len)
        self.total_batches = math.ceil(num_rows / batch_size)
        self.indices = evenly_spaced(self.total_batches, num_batches)
        self.num_batches = len(self.indices)

    def whole(self) -> 'LMValidationBatches':
        """The same split, every batch (a final evaluation)."""
        return LMValidationBatches(self.tokens, self.batch_size, self.seq_len, None, self.pad_id)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        b, t = self.batch_size, self.seq_len
        n = len(self.tokens)
        for i in self.indices:
            batch = empty_batch(b, t, self.pad_id)
            for row in range(b):
                start = (i * b + row) * t
                length = min(t, n - 1 - start)
                if length <= 0:
                    break
                batch['tokens'][row, :length] = self.tokens[start:start + length]
                batch['targets'][row, :length] = self.tokens[start + 1:start + 1 + length]
                batch['loss_mask'][row, :length] = 1.0
                batch['positions'][row, :length] = np.arange(length)
                batch['segment_ids'][row, :length] = 1
            yield batch
