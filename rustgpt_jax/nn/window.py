"""The effective attention window of one layer (SPEC §2), a traced int32."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import masks
from rustgpt_jax.config import WindowStrategy


class WindowController(nn.Module):
    """Chooses the window of one layer from its strategy.

    Fixed: the configured window (full causal when None). SequenceLengthBased:
    clamp(seq_len // 2, min_window, max_window).
    """
    strategy: WindowStrategy = WindowStrategy.FIXED
    window_size: Optional[int] = None
    min_window: int = 1
    max_window: Optional[int] = None

    @nn.compact
    def __call__(self, seq_len):
        """Args: seq_len: int or traced int32 scalar. Returns a traced int32 scalar."""
        if self.strategy == WindowStrategy.FIXED:
            return jnp.int32(masks.window_or_full(self.window_size))
        if self.strategy == WindowStrategy.SEQUENCE_LENGTH:
            return sequence_length_window(seq_len, self.min_window, self.max_window)
        raise NotImplementedError(f'window strategy {self.strategy.value!r}')


def sequence_length_window(seq_len, min_window: int, max_window: int):
    """clamp(seq_len // 2, min_window, max_window) as int32."""
    return jnp.clip(jnp.asarray(seq_len, jnp.int32) // 2, min_window, max_window).astype(jnp.int32)
