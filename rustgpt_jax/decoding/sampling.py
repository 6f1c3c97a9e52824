"""Next-token samplers: greedy, temperature, top-k, top-p and their combinations (SPEC §3).

The filters follow the Hugging Face order: temperature scales the logits, top-k keeps
the k largest, top-p keeps the smallest set of the remaining tokens whose probability
reaches `top_p`, then one token is drawn. Temperature 0 is greedy (argmax, no draw).
Every function is pure and jit-friendly; `SamplingConfig` is a hashable static value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Finite so a fully filtered row (never produced: the top token always survives) is no NaN.
_FILTERED = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How one token is chosen from a row of logits.

    Attributes:
      temperature: 0 is greedy; otherwise logits are divided by it before drawing.
      top_k: keep the k most likely tokens (0 = no top-k filter).
      top_p: keep the smallest most-likely set with probability >= top_p (1.0 = off).
    """
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0.0:
            raise ValueError(f'temperature must be >= 0 (0 = greedy), got {self.temperature}')
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f'top_k must be an integer >= 0 (0 = off), got {self.top_k!r}')
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f'top_p must be in (0, 1] (1 = off), got {self.top_p}')

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_k_filter(logits, k: int):
    """Sets every logit below the k-th largest of its row to a huge negative value.

    Args:
      logits: (B, V) float32.
      k: static int >= 1 (values >= V keep everything).

    Returns:
      (B, V) float32. Ties with the k-th value are kept (they are equally "top k").
    """
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # (B, 1)
    return jnp.where(logits >= kth, logits, _FILTERED)


def top_p_filter(logits, p: float):
    """Keeps the nucleus: the most likely tokens whose cumulative probability reaches p.

    A token is kept iff the probability mass strictly before it (in descending order) is
    below `p`, so the most likely token always survives and the kept set is the smallest
    one with mass >= p.

    Args:
      logits: (B, V) float32.
      p: float in (0, 1].

    Returns:
      (B, V) float32 with the tokens outside the nucleus filtered.
    """
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)  # (B, V) most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # (B, V)
    keep_sorted = mass_before < p
    # Scatter the decision back to vocabulary order.
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, _FILTERED)


def filtered_logits(logits, config: SamplingConfig):
    """Logits after temperature, top-k and top-p (what `sample_logits` draws from).

    Args:
      logits: (B, V) float32.
      config: a SamplingConfig with temperature > 0.

    Returns:
      (B, V) float32.
    """
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k:
        logits = top_k_filter(logits, config.top_k)
    return top_p_filter(logits, config.top_p)


def sample_logits(logits, rng, config: SamplingConfig):
    """One token per row.

    Args:
      logits: (B, V) float32 next-token logits.
      rng: a jax.random key (ignored when greedy).
      config: the SamplingConfig (static).

    Returns:
      (B,) int32 token ids.
    """
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filtered_logits(logits, config), axis=-1).astype(jnp.int32)
