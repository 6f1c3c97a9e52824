"""Beam search with adaptive beam width (SPEC §3), one jitted loop.

Static shapes: `max_width` beams are always allocated (the model runs on a batch of
`max_width` rows) and the inactive ones carry score -inf. Each step:

  1. H = mean over live beams of the next-token entropy (nats); n = min(H / 7, 1);
     width += 1 if n > threshold else width -= 1, clipped to [min_width, max_width]
     (only with `adaptive`; otherwise the width stays at its start value).
  2. Expansion: the global top `width` continuations of all live beams by summed
     log-probability.
  3. Continuations ending in EOS, and every continuation at the last step (max length),
     leave the beam and go to a pool of finished hypotheses, which keeps the
     `max_width` best by `score / length ** alpha` (length = generated tokens, EOS
     included). The others become the live beams of the next step.
  4. The KV cache is reordered per beam (a gather of the parent rows on every cache
     leaf's batch axis) and the new tokens are decoded in one batched step.

The loop ends after `max_new_tokens` steps or when no beam is live. The result is the
pool's best hypothesis, with the width used at each step (the trajectory).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax.decoding.cache import (
    PROMPT_BUCKET,
    cache_batch_axes,
    init_cache,
    left_pad,
    reorder_cache,
)
from rustgpt_jax.decoding.generate import check_lengths, decode_step, prefill

_NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    """Beam-search settings (defaults are SPEC §3's).

    Attributes:
      width: starting width.
      min_width, max_width: bounds of the adaptive width; `max_width` beams are allocated.
      threshold: the width grows when the normalised entropy n exceeds it, else shrinks.
      entropy_scale: n = min(H / entropy_scale, 1) (the seed's 7 nats).
      alpha: length normalisation exponent of `score / length ** alpha`.
      adaptive: False keeps the width fixed at `width`.
    """
    width: int = 4
    min_width: int = 1
    max_width: int = 8
    threshold: float = 0.5
    entropy_scale: float = 7.0
    alpha: float = 1.0
    adaptive: bool = True

    def __post_init__(self):
        if not 1 <= self.min_width <= self.width <= self.max_width:
            raise ValueError(f'beam widths must satisfy 1 <= min_width <= width <= max_width, '
                             f'got min_width={self.min_width}, width={self.width}, '
                             f'max_width={self.max_width}')
        if self.entropy_scale <= 0:
            raise ValueError(f'entropy_scale must be > 0, got {self.entropy_scale}')
        if self.alpha < 0:
            raise ValueError(f'alpha must be >= 0, got {self.alpha}')


@dataclasses.dataclass(frozen=True)
class BeamOutput:
    """Finished hypotheses, best first (host numpy arrays).

    Attributes:
      tokens: (M, N) int32 generated ids (EOS included), padded with `pad_id`.
      lengths: (M,) int32 generated tokens per hypothesis (0 for an unused pool slot).
      scores: (M,) float32 summed log-probabilities.
      normalized: (M,) float32 `scores / lengths ** alpha` (-inf for unused slots).
      widths: (steps,) int32 the beam width used at each expansion.
    """
    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray
    normalized: np.ndarray
    widths: np.ndarray

    @property
    def best(self) -> list[int]:
        """Generated ids of the best hypothesis."""
        return self.tokens[0, :self.lengths[0]].tolist()


def entropy(logp):
    """Entropy in nats of each row of log-probabilities (B, V) -> (B,)."""
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def adapt_width(width, mean_entropy, config: BeamConfig):
    """SPEC §3's rule: +1 if min(H / 7, 1) > threshold else -1, kept in bounds."""
    n = jnp.minimum(mean_entropy / config.entropy_scale, 1.0)
    step = jnp.where(n > config.threshold, 1, -1)
    return jnp.clip(width + step, config.min_width, config.max_width).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'config', 'eos_id',
                                             'pad_id'))
def _beam_search(params, tokens, lengths, *, model, max_new_tokens: int, config: BeamConfig,
                 eos_id: Optional[int], pad_id: int):
    beams, steps = config.max_width, max_new_tokens
    axes = cache_batch_axes(model)
    cache = init_cache(model, 1)
    logits, cache = prefill(model, params, cache, tokens, lengths)
    # Every beam starts from the prompt; only beam 0 is live, so the first expansion
    # does not pick the same continuation `width` times.
    cache = reorder_cache(cache, jnp.zeros((beams,), jnp.int32), axes)
    logp = jnp.broadcast_to(jax.nn.log_softmax(logits, axis=-1), (beams, logits.shape[-1]))
    scores = jnp.full((beams,), _NEG_INF).at[0].set(0.0)
    lengths_b = jnp.broadcast_to(lengths, (beams,))
    seqs = jnp.full((beams, steps), pad_id, jnp.int32)
    pool = (jnp.full((beams, steps), pad_id, jnp.int32), jnp.zeros((beams,), jnp.int32),
            jnp.full((beams,), _NEG_INF), jnp.full((beams,), _NEG_INF))
    widths = jnp.zeros((steps,), jnp.int32)

    def cond(state):
        t, scores = state[0], state[3]
        return (t < steps) & jnp.any(scores > _NEG_INF)

    def body(state):
        t, cache, logp, scores, seqs, pool, width, widths = state
        live = scores > _NEG_INF  # (W,)
        if config.adaptive:
            h = jnp.sum(jnp.where(live, entropy(logp), 0.0)) / jnp.sum(live)
            width = adapt_width(width, h, config)
        widths = widths.at[t].set(width)

        # Global top-`width` continuations (top `beams`, then rank >= width dropped).
        vocab = logp.shape[-1]
        cand = jnp.where(live[:, None], scores[:, None] + logp, _NEG_INF)  # (W, V)
        top, flat = jax.lax.top_k(cand.reshape(-1), beams)  # (W,)
        top = jnp.where(jnp.arange(beams) < width, top, _NEG_INF)
        parent, token = (flat // vocab).astype(jnp.int32), (flat % vocab).astype(jnp.int32)
        new_seqs = seqs[parent].at[:, t].set(token)  # (W, N)

        ends = jnp.full((beams,), t == steps - 1)
        if eos_id is not None:
            ends = ends | (token == eos_id)
        done = ends & (top > _NEG_INF)
        gen_len = t + 1
        norm = jnp.where(done, top / gen_len.astype(jnp.float32) ** config.alpha, _NEG_INF)
        pool = _merge_pool(pool, (new_seqs, jnp.full((beams,), gen_len, jnp.int32),
                                  jnp.where(done, top, _NEG_INF), norm), beams)

        scores = jnp.where(ends, _NEG_INF, top)
        cache = reorder_cache(cache, parent, axes)
        logits, cache = decode_step(model, params, cache, token, lengths_b + t)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return t + 1, cache, logp, scores, new_seqs, pool, width, widths

    state = (jnp.int32(0), cache, logp, scores, seqs, pool, jnp.int32(config.width), widths)
    state = jax.lax.while_loop(cond, body, state)
    t, pool, widths = state[0], state[5], state[7]
    return pool, widths, t


def _merge_pool(pool, new, size: int):
    """Keeps the `size` best of the finished pool and new finished hypotheses."""
    seqs, lens, raw, norm = (jnp.concatenate([a, b]) for a, b in zip(pool, new))
    _, keep = jax.lax.top_k(norm, size)
    return seqs[keep], lens[keep], raw[keep], norm[keep]


def beam_search(model, params, prompt: Sequence[int], *, max_new_tokens: int,
                config: BeamConfig = BeamConfig(), eos_id: Optional[int] = None,
                pad_id: int = 0, limit: Optional[int] = None) -> BeamOutput:
    """Beam search from one prompt.

    Args:
      model: a Flax module with the decode interface (`cache.py`), hashable (static).
      params: its parameters.
      prompt: the prompt ids (non-empty).
      max_new_tokens: N, the longest hypothesis.
      config: a BeamConfig.
      eos_id: ends a hypothesis (None: every hypothesis has N tokens).
      pad_id: fills token rows past a hypothesis' end.
      limit: `cache.context_limit(config)`; an overflowing prompt raises ValueError.

    Returns:
      A BeamOutput (hypotheses best first, and the width trajectory).
    """
    tokens, lengths = left_pad([list(prompt)], pad_id, multiple=PROMPT_BUCKET)
    check_lengths(lengths, max_new_tokens, limit)
    pool, widths, steps = _beam_search(params, tokens, lengths, model=model,
                                       max_new_tokens=max_new_tokens, config=config,
                                       eos_id=eos_id, pad_id=pad_id)
    seqs, lens, raw, norm = (np.asarray(a) for a in pool)
    lens = np.where(np.isfinite(norm), lens, 0).astype(np.int32)
    return BeamOutput(seqs, lens, raw.astype(np.float32), norm.astype(np.float32),
                      np.asarray(widths)[:int(steps)])
