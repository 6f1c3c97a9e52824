"""Token streaming for the CLIs, and stop strings.

`stream` yields tokens as they are produced: one jitted prefill, then one jitted decode
step per token with the cache donated (updated in place). It draws from the same key
schedule as `generate.generate`, so both give the same tokens for the same seed.

Stop strings are matched on decoded text on the host. `TextStreamer` turns a token
stream into printable text, holding back a tail that could still become a stop string
(or an incomplete multi-byte character), so a stop string is never printed.
"""

from __future__ import annotations

import functools
from typing import Iterator, Optional, Sequence

import jax
import numpy as np

from rustgpt_jax.decoding.cache import PROMPT_BUCKET, init_cache, left_pad
from rustgpt_jax.decoding.generate import check_lengths, decode_step, prefill
from rustgpt_jax.decoding.sampling import SamplingConfig, sample_logits


@functools.partial(jax.jit, static_argnames=('model', 'sampling'))
def _first_token(params, tokens, lengths, rng, *, model, sampling):
    cache = init_cache(model, tokens.shape[0])
    logits, cache = prefill(model, params, cache, tokens, lengths)
    return sample_logits(logits, jax.random.fold_in(rng, 0), sampling), cache


@functools.partial(jax.jit, static_argnames=('model', 'sampling'), donate_argnames=('cache',))
def _next_token(params, cache, token, position, rng, index, *, model, sampling):
    logits, cache = decode_step(model, params, cache, token, position)
    return sample_logits(logits, jax.random.fold_in(rng, index), sampling), cache


def stream(model, params, prompt: Sequence[int], *, max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(), eos_id: Optional[int] = None,
           rng=None, limit: Optional[int] = None) -> Iterator[int]:
    """Yields generated token ids one at a time (EOS is yielded, then the stream ends).

    Args:
      model, params: as `generate.generate`.
      prompt: the prompt ids (non-empty).
      max_new_tokens: the most tokens to yield.
      sampling: a SamplingConfig.
      eos_id: stop after this id (None: never).
      rng: jax.random key (default key 0).
      limit: `cache.context_limit(config)`; an overflowing prompt raises ValueError.
    """
    tokens, lengths = left_pad([list(prompt)], multiple=PROMPT_BUCKET)
    check_lengths(lengths, max_new_tokens, limit)
    rng = jax.random.key(0) if rng is None else rng
    token, cache = _first_token(params, tokens, lengths, rng, model=model, sampling=sampling)
    for i in range(max_new_tokens):
        if i:
            position = lengths + (i - 1)
            token, cache = _next_token(params, cache, token, position, rng, np.int32(i),
                                       model=model, sampling=sampling)
        value = int(token[0])
        yield value
        if value == eos_id:
            return


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Cuts `text` before the earliest stop string.

    Returns:
      (text up to the first stop string, whether one was found).
    """
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    if not hits:
        return text, False
    return text[:min(hits)], True


class TextStreamer:
    """Incremental detokenisation with stop strings.

    Args:
      tokenizer: has `decode(ids) -> str`.
      stop_strings: generation ends before the first of these in the text.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.text = ''
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds a token; returns the newly printable text ('' while held back)."""
        if self.stopped:
            return ''
        self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids)
        cut, self.stopped = truncate_at_stop(self.text, self.stop_strings)
        if self.stopped:
            self.text = cut
            return self._emit(len(cut))
        safe = len(self.text)
        # A trailing replacement character may be half of a multi-byte character.
        while safe > self.emitted and self.text[safe - 1] == '\ufffd':
            safe -= 1
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._emit(safe)

    def flush(self) -> str:
        """The held-back tail, once the stream has ended."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self.emitted:
            return ''
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
