"""Batched generation in one jitted loop: prefill, then single-token decode steps (SPEC §3).

`generate` compiles prefill + `lax.while_loop` over decode steps into one program per
(model, padded prompt width, max_new_tokens, sampling config); nothing dispatches per
token. Rows finish independently (EOS) and the loop exits early once all have. The key
for the token at output index i is `fold_in(rng, i)` (i = 0 comes from the prefill
logits), so `streaming.stream` reproduces `generate` token for token with the same seed.

Stop strings are text, so they are matched on the host after decoding
(`streaming.truncate_at_stop`); the jitted loop itself stops only at EOS and
max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax.decoding.cache import init_cache, prompt_positions
from rustgpt_jax.decoding.sampling import SamplingConfig, sample_logits


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """What `generate` returns (host numpy arrays).

    Attributes:
      tokens: (B, N) int32 generated ids; after a row's EOS the rest is `pad_id`.
      lengths: (B,) int32 generated tokens per row, its EOS included.
      finished: (B,) bool, True where the row produced EOS.
    """
    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def row(self, b: int) -> list[int]:
        """Generated ids of row b, EOS included, padding excluded."""
        return self.tokens[b, :self.lengths[b]].tolist()


def check_lengths(lengths, max_new_tokens: int, limit: Optional[int]) -> None:
    """Raises ValueError when a prompt plus `max_new_tokens` overflows the context.

    Args:
      lengths: prompt lengths (B,).
      max_new_tokens: tokens to generate per row.
      limit: `cache.context_limit(config)` (None = unbounded ring buffer).
    """
    if max_new_tokens < 1:
        raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
    longest = int(np.max(lengths))
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f'prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model '
            f'context of {limit} tokens (ModelConfig.max_seq_len); shorten the prompt, lower '
            f'max_new_tokens, or use a sliding-window RoPE model (its ring-buffer cache has no '
            f'length limit)')


def prefill(model, params, cache, tokens, lengths):
    """Runs the prompt through the model, filling the cache.

    Args:
      model, params: the model and its parameters.
      cache: an empty cache from `init_cache`.
      tokens: (B, P) int32 left-padded prompts.
      lengths: (B,) int32 prompt lengths.

    Returns:
      (next-token logits (B, V) float32, updated cache).
    """
    positions = prompt_positions(lengths, tokens.shape[1])
    logits, variables = model.apply({'params': params, 'cache': cache}, tokens,
                                    positions=positions, decode=True, last_only=True,
                                    mutable=['cache'])
    return logits[:, -1], variables['cache']


def decode_step(model, params, cache, token, position):
    """One token per row through the cached model.

    Args:
      token: (B,) int32 the newest token; position: (B,) int32 its position.

    Returns:
      (next-token logits (B, V) float32, updated cache).
    """
    logits, variables = model.apply({'params': params, 'cache': cache}, token[:, None],
                                    positions=position[:, None], decode=True,
                                    mutable=['cache'])
    return logits[:, 0], variables['cache']


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'sampling',
                                             'eos_id', 'pad_id'))
def _generate(params, tokens, lengths, rng, *, model, max_new_tokens: int,
              sampling: SamplingConfig, eos_id: Optional[int], pad_id: int):
    batch = tokens.shape[0]
    cache = init_cache(model, batch)
    logits, cache = prefill(model, params, cache, tokens, lengths)

    def choose(logits, i, finished):
        tok = sample_logits(logits, jax.random.fold_in(rng, i), sampling)  # (B,)
        tok = jnp.where(finished, pad_id, tok)
        done = finished if eos_id is None else finished | (tok == eos_id)
        return tok, done

    first, finished = choose(logits, 0, jnp.zeros((batch,), bool))
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    counts = jnp.ones((batch,), jnp.int32)

    def cond(state):
        i, _, _, finished, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(finished)

    def body(state):
        i, cache, out, finished, last, counts = state
        logits, cache = decode_step(model, params, cache, last, lengths + i - 1)
        tok, done = choose(logits, i, finished)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        counts = counts + (~finished).astype(jnp.int32)
        return i + 1, cache, out, done, tok, counts

    state = (jnp.int32(1), cache, out, finished, first, counts)
    _, _, out, finished, _, counts = jax.lax.while_loop(cond, body, state)
    return out, counts, finished


def generate(model, params, tokens, lengths, *, max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None,
             pad_id: int = 0, rng=None, limit: Optional[int] = None) -> GenerationOutput:
    """Generates up to `max_new_tokens` per row for a batch of left-padded prompts.

    Args:
      model: a Flax module with the decode interface (`cache.py`), hashable (static).
      params: its parameters (plain arrays).
      tokens: (B, P) int32 prompts, left-padded (`cache.left_pad`).
      lengths: (B,) int32 true prompt lengths, each >= 1.
      max_new_tokens: N, the most tokens generated per row.
      sampling: a SamplingConfig (greedy by default).
      eos_id: a row stops after emitting this id (None: always N tokens).
      pad_id: fills a row's output after its EOS.
      rng: jax.random key for sampling (default key 0).
      limit: `cache.context_limit(config)`; prompts that do not fit raise ValueError.

    Returns:
      A GenerationOutput.
    """
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
        raise ValueError(f'tokens must be (B, P) and lengths (B,), got {tokens.shape} and '
                         f'{lengths.shape}')
    if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
        raise ValueError(f'prompt lengths must be in [1, {tokens.shape[1]}], got '
                         f'{lengths.tolist()}')
    check_lengths(lengths, max_new_tokens, limit)
    rng = jax.random.key(0) if rng is None else rng
    out, counts, finished = _generate(params, tokens, lengths, rng, model=model,
                                      max_new_tokens=max_new_tokens, sampling=sampling,
                                      eos_id=eos_id, pad_id=pad_id)
    return GenerationOutput(np.asarray(out), np.asarray(counts), np.asarray(finished))
