"""The effective attention window of one layer (SPEC §2), a traced int32.

Fixed and SequenceLengthBased are stateless. AttentionEntropy and PerplexityBased keep
per-layer state in the Flax collection `adaptive` (see `adaptive.window_state`):

  * `model.init` creates the state (nothing observed yet);
  * a forward pass with `mutable=['adaptive', ...]` (train / eval steps) records the
    window it used and, for AttentionEntropy, the layer's attention entropy;
  * a forward pass where `adaptive` is given but immutable only reads it (decode);
  * without the collection at all (`apply({'params': p}, ...)`) the strategies fall
    back to SequenceLengthBased, as they do before the first observation.

The current window is sown into `intermediates` as `window/current`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import masks
from rustgpt_jax.adaptive import window_state as ws
from rustgpt_jax.adaptive.window_state import sequence_length_window
from rustgpt_jax.config import WindowStrategy

__all__ = ['WindowController', 'sequence_length_window']


class WindowController(nn.Module):
    """Chooses the window of one layer from its strategy.

    Attributes:
      strategy: the WindowStrategy.
      window_size: FIXED's window (None = full causal).
      min_window, max_window: bounds of the adaptive strategies.
      ema_alpha: EMA factor of AttentionEntropy / PerplexityBased.
      vocab_size: PerplexityBased normalises the loss by ln(vocab_size).
    """
    strategy: WindowStrategy = WindowStrategy.FIXED
    window_size: Optional[int] = None
    min_window: int = 1
    max_window: Optional[int] = None
    ema_alpha: float = 0.2
    vocab_size: int = 256

    def setup(self):
        self.state_vars = None
        if self.strategy in ws.STATEFUL_STRATEGIES:
            if self.max_window is None:
                raise ValueError(f'window strategy {self.strategy.value!r} needs max_window')
            if (self.is_mutable_collection(ws.COLLECTION)
                    or self.has_variable(ws.COLLECTION, 'ema')):
                self.state_vars = (
                    self.variable(ws.COLLECTION, 'ema', lambda: jnp.zeros((), jnp.float32)),
                    self.variable(ws.COLLECTION, 'observed', lambda: jnp.zeros((), jnp.bool_)),
                    self.variable(ws.COLLECTION, 'window', lambda: jnp.zeros((), jnp.int32)))

    @property
    def wants_entropy(self) -> bool:
        """True when the attention layer should report its entropy to `observe_entropy`."""
        return self.strategy == WindowStrategy.ATTENTION_ENTROPY

    def _updating(self) -> bool:
        return (self.state_vars is not None and self.is_mutable_collection(ws.COLLECTION)
                and not self.is_initializing())

    def __call__(self, seq_len):
        """The window for this forward pass.

        Args:
          seq_len: int or traced int32 scalar (the sequence length seen by the layer).

        Returns:
          int32 scalar (masks.NO_WINDOW for full causal).
        """
        if self.strategy == WindowStrategy.FIXED:
            window = jnp.int32(masks.window_or_full(self.window_size))
        elif self.strategy == WindowStrategy.SEQUENCE_LENGTH:
            window = sequence_length_window(seq_len, self.min_window, self.max_window)
        elif self.strategy in ws.STATEFUL_STRATEGIES:
            window = self._adaptive_window(seq_len)
        else:  # pragma: no cover - the enum is exhaustive
            raise ValueError(f'unknown window strategy {self.strategy!r}')
        self.sow('intermediates', 'current', window)
        return window

    def _adaptive_window(self, seq_len):
        fallback = sequence_length_window(seq_len, self.min_window, self.max_window)
        if self.state_vars is None:
            return fallback
        ema, observed, previous = (v.value for v in self.state_vars)
        if self.strategy == WindowStrategy.ATTENTION_ENTROPY:
            # ref = the previous window, or seq_len while there is none (SPEC §2).
            ref = jnp.where(previous > 0, previous, jnp.asarray(seq_len, jnp.int32))
            adaptive = ws.entropy_window(ema, ref, self.min_window, self.max_window)
        else:
            adaptive = ws.perplexity_window(ema, self.vocab_size, self.min_window,
                                            self.max_window)
        window = jnp.where(observed, adaptive, fallback).astype(jnp.int32)
        if self._updating():
            self.state_vars[2].value = window
        return window

    def observe_entropy(self, entropy):
        """Folds this pass's mean attention entropy H into the EMA (when updating).

        Args:
          entropy: float32 scalar, nats.
        """
        if not self.wants_entropy or not self._updating():
            return
        ema, observed, _ = self.state_vars
        self.sow('intermediates', 'entropy', entropy)
        ema.value = ws.ema_update(ema.value, observed.value, entropy, self.ema_alpha)
        observed.value = jnp.ones_like(observed.value)
