"""Window strategies as pure functions, and the state they keep (SPEC §2).

The AttentionEntropy and PerplexityBased strategies keep, per layer, three variables in
the Flax collection `adaptive` (scope `.../window`):

  ema       float32  EMA of the observed quantity (entropy H or loss L, nats)
  observed  bool     whether anything has been observed yet
  window    int32    the window used at the last forward pass (0 before any)

The entropy is observed by the layer itself; the loss is fed back by the training /
eval step through `observe_loss`. The window at a forward pass is computed from the
state *before* that pass observes anything, so it lags one step.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax.numpy as jnp
from flax import traverse_util

from rustgpt_jax.config import ModelConfig, WindowStrategy

COLLECTION = 'adaptive'
SCOPE = 'window'
STATE_KEYS = ('ema', 'observed', 'window')
STATEFUL_STRATEGIES = (WindowStrategy.ATTENTION_ENTROPY, WindowStrategy.PERPLEXITY)


def ema_update(ema, observed, value, alpha: float):
    """E <- (1 - alpha) E + alpha value; the first observation is taken as is."""
    value = jnp.asarray(value, jnp.float32)
    return jnp.where(observed, (1.0 - alpha) * ema + alpha * value, value)


def window_from_fraction(n, min_window: int, max_window: int):
    """clamp(min + floor((max - min) * clamp(n, 0, 1)), min, max) as int32."""
    n = jnp.clip(jnp.asarray(n, jnp.float32), 0.0, 1.0)
    w = min_window + jnp.floor((max_window - min_window) * n).astype(jnp.int32)
    return jnp.clip(w, min_window, max_window).astype(jnp.int32)


def sequence_length_window(seq_len, min_window: int, max_window: int):
    """SequenceLengthBased: clamp(seq_len // 2, min_window, max_window) as int32."""
    half = jnp.asarray(seq_len, jnp.int32) // 2
    return jnp.clip(half, min_window, max_window).astype(jnp.int32)


def entropy_window(ema, ref, min_window: int, max_window: int):
    """AttentionEntropy: n = clamp(E / ln(max(2, ref)), 0, 1) mapped into [min, max].

    Args:
      ema: EMA of the mean attention entropy E (nats).
      ref: the previous window (or the sequence length before there is one).
    """
    ref = jnp.maximum(jnp.asarray(ref, jnp.float32), 2.0)
    return window_from_fraction(jnp.asarray(ema, jnp.float32) / jnp.log(ref),
                                min_window, max_window)


def perplexity_window(loss_ema, vocab_size: int, min_window: int, max_window: int):
    """PerplexityBased: n = clamp(L / ln(vocab_size), 0, 1): an uncertain model gets a
    wider window."""
    return window_from_fraction(jnp.asarray(loss_ema, jnp.float32) / math.log(max(vocab_size, 2)),
                                min_window, max_window)


def _is_window_state(path: tuple, flat: Mapping) -> bool:
    prefix = path[:-1]
    return (len(path) >= 2 and path[-2] == SCOPE and path[-1] == 'ema'
            and all(prefix + (key,) in flat for key in STATE_KEYS))


def observe_loss(adaptive_state: Any, loss, config: ModelConfig):
    """Feeds the model's next-token loss to the PerplexityBased strategy (pure; jittable).

    The training / eval step calls this once per step with the mean loss (nats) and
    threads the result into the next step's `adaptive` collection. Every layer's EMA
    gets the same observation. For other strategies the state is returned unchanged.

    Args:
      adaptive_state: the `adaptive` collection (nested dict / FrozenDict; with a
        scanned stack each leaf has a leading layer axis).
      loss: float scalar (nats).
      config: the model's ModelConfig.

    Returns:
      the updated collection, same structure and dtypes.
    """
    if config.window_strategy != WindowStrategy.PERPLEXITY:
        return adaptive_state
    loss = jnp.asarray(loss, jnp.float32)
    if loss.ndim != 0:
        raise ValueError(f'observe_loss expects a scalar loss, got shape {loss.shape}')
    flat = traverse_util.flatten_dict(dict(adaptive_state or {}))
    found = [path[:-1] for path in flat if _is_window_state(path, flat)]
    if not found:
        raise ValueError('observe_loss: adaptive_state holds no window state; pass the '
                         "'adaptive' collection returned by model.init for a PERPLEXITY model")
    out = dict(flat)
    for prefix in found:
        ema, observed = flat[prefix + ('ema',)], flat[prefix + ('observed',)]
        out[prefix + ('ema',)] = ema_update(ema, observed, loss, config.window_ema_alpha)
        out[prefix + ('observed',)] = jnp.ones_like(observed)
    return traverse_util.unflatten_dict(out)
