"""The jitted generation loop: greedy vs repeated full-forward argmax, EOS, seeds, streaming."""

import jax
import numpy as np
import pytest
from test_decoding_support import full_logits, init_params, tiny_config

from rustgpt_jax.data import CharTokenizer
from rustgpt_jax.decoding import (
    SamplingConfig,
    TextStreamer,
    context_limit,
    generate,
    left_pad,
    stream,
    truncate_at_stop,
)
from rustgpt_jax.models import build_model

CONFIG = tiny_config(num_kv_heads=2, window_size=6, max_seq_len=24)
PROMPTS = [[5, 9, 11, 3, 40, 7, 8], [20, 21]]
NEW = 10


@pytest.fixture(scope='module')
def model_params():
    return build_model(CONFIG), init_params(CONFIG, seed=3)


def _greedy_oracle(model, params, prompt, steps):
    """Repeated argmax of the full forward pass, no cache."""
    seq = np.zeros((1, len(prompt) + steps), np.int32)  # right padding: causal, never seen
    seq[0, :len(prompt)] = prompt
    for i in range(len(prompt), seq.shape[1]):
        seq[0, i] = int(np.argmax(full_logits(model, params, seq)[0, i - 1]))
    return seq[0, len(prompt):].tolist()


def test_greedy_equals_repeated_full_forward_argmax(model_params):
    model, params = model_params
    tokens, lengths = left_pad(PROMPTS)
    out = generate(model, params, tokens, lengths, max_new_tokens=NEW,
                   limit=context_limit(CONFIG))
    for b, prompt in enumerate(PROMPTS):
        assert out.row(b) == _greedy_oracle(model, params, prompt, NEW)
    assert out.lengths.tolist() == [NEW, NEW] and not out.finished.any()


def test_eos_finishes_rows_independently(model_params):
    model, params = model_params
    tokens, lengths = left_pad(PROMPTS)
    free = [generate(model, params, tokens, lengths, max_new_tokens=NEW).row(b) for b in (0, 1)]

    def stop(row, eos):
        return row.index(eos) + 1 if eos in row else NEW
    # An EOS id at which the two rows stop at different steps.
    eos = next(t for t in free[0] if stop(free[0], t) != stop(free[1], t))
    out = generate(model, params, tokens, lengths, max_new_tokens=NEW, eos_id=eos, pad_id=0)
    for b in (0, 1):
        n = stop(free[b], eos)
        assert out.row(b) == free[b][:n] and out.lengths[b] == n
        assert (out.tokens[b, n:] == 0).all() and out.finished[b] == (eos in free[b])


def test_sampling_seeds_and_streaming_agree(model_params):
    model, params = model_params
    sampling = SamplingConfig(temperature=1.3, top_k=20, top_p=0.95)
    tokens, lengths = left_pad(PROMPTS[:1])
    runs = [generate(model, params, tokens, lengths, max_new_tokens=NEW, sampling=sampling,
                     rng=jax.random.key(seed)).row(0) for seed in (1, 1, 2)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    streamed = list(stream(model, params, PROMPTS[0], max_new_tokens=NEW, sampling=sampling,
                           rng=jax.random.key(1)))
    assert streamed == runs[0]


def test_context_overflow_and_empty_prompt_raise(model_params):
    model, params = model_params
    full = tiny_config(max_seq_len=8)
    tokens, lengths = left_pad([[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match='exceeds the model context of 8'):
        generate(build_model(full), params, tokens, lengths, max_new_tokens=4,
                 limit=context_limit(full))
    with pytest.raises(ValueError, match='empty'):
        list(stream(model, params, [], max_new_tokens=3))
    with pytest.raises(ValueError, match='max_new_tokens'):
        generate(model, params, tokens, lengths, max_new_tokens=0)


def test_text_streamer_holds_back_stop_strings():
    tok = CharTokenizer.from_text('abcdefgh \n')
    ids = tok.encode('abc de\nfgh')
    streamer = TextStreamer(tok, stop_strings=['de\n'])
    pieces = [streamer.push(i) for i in ids]
    assert ''.join(pieces) + streamer.flush() == 'abc '
    assert pieces == ['a', 'b', 'c', ' ', '', ''] + [''] * 4 and streamer.stopped
    streamer = TextStreamer(tok, stop_strings=['dx'])
    text = ''.join(streamer.push(i) for i in ids) + streamer.flush()
    assert text == 'abc de\nfgh' and not streamer.stopped
    assert truncate_at_stop('one. two. three', ['. t', 'o.']) == ('one', True)
    assert truncate_at_stop('abc', ['x']) == ('abc', False)
