"""Beam search: a toy model with known probabilities, greedy parity, adaptive width, scores."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding_support import full_logits, init_params, tiny_config

from rustgpt_jax.decoding import BeamConfig, beam_search, generate, left_pad
from rustgpt_jax.models import build_model

PAD, EOS, S, A, B, C = range(6)


class SecondOrderToy(nn.Module):
    """Next-token logits = table[previous token, current token].

    The previous token is kept in the `cache` collection (one int per row), so a beam
    search that reorders the cache wrongly reads the wrong row of the table.
    """
    vocab_size: int

    @nn.compact
    def __call__(self, tokens, positions=None, decode=False, last_only=False):
        v = self.vocab_size
        table = self.param('table', nn.initializers.zeros, (v, v, v))
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
        prev = jnp.zeros((b,), jnp.int32)
        if decode:
            slot = self.variable('cache', 'prev', lambda: jnp.zeros((b,), jnp.int32))
            prev = slot.value
        # The token before each one: its left neighbour, or the cached one where that
        # neighbour is padding (negative position) or the chunk starts.
        before = jnp.concatenate([prev[:, None], tokens[:, :-1]], axis=1)  # (B, T)
        real = jnp.concatenate([jnp.zeros((b, 1), bool), positions[:, :-1] >= 0], axis=1)
        before = jnp.where(real, before, prev[:, None])
        if decode and not self.is_initializing():
            slot.value = jnp.where(positions[:, -1] >= 0, tokens[:, -1], prev)
        logits = table[before, tokens]  # (B, T, V)
        return logits[:, -1:] if last_only else logits


def _log_dist(v, probs):
    """log of a distribution with the given {token: p}; the rest share what is left."""
    rest = (1.0 - sum(probs.values())) / (v - len(probs))
    return np.log(np.array([probs.get(i, rest) for i in range(v)]))


def _toy_table(v=6):
    table = np.tile(_log_dist(v, {}), (v, v, 1))
    table[:, S] = _log_dist(v, {A: 0.6, B: 0.4 - 4e-6})
    table[:, A] = _log_dist(v, {C: 0.34, A: 0.32, B: 0.32})
    table[:, B] = _log_dist(v, {C: 0.9})
    table[A, C] = _log_dist(v, {EOS: 0.5})  # the cache decides between these two rows
    table[B, C] = _log_dist(v, {EOS: 0.99})
    return jnp.asarray(table, jnp.float32)


@pytest.mark.parametrize('config', [BeamConfig(width=2, adaptive=False), BeamConfig()])
def test_beam_finds_the_sequence_greedy_misses(config):
    toy, params = SecondOrderToy(6), {'table': _toy_table()}
    tokens, lengths = left_pad([[S]])
    greedy = generate(toy, params, tokens, lengths, max_new_tokens=3, eos_id=EOS)
    assert greedy.row(0) == [A, C, EOS]  # p = 0.6 * 0.34 * 0.5 = 0.102
    out = beam_search(toy, params, [S], max_new_tokens=3, config=config, eos_id=EOS)
    assert out.best == [B, C, EOS]  # p = 0.4 * 0.9 * 0.99 = 0.356
    np.testing.assert_allclose(out.scores[0], np.log((0.4 - 4e-6) * 0.9 * 0.99), rtol=1e-5)
    np.testing.assert_allclose(out.normalized[0], out.scores[0] / 3, rtol=1e-6)
    if config.adaptive:  # entropies <= ln 6 < 3.5 nats: n < 0.5, the width shrinks 4 -> 1
        assert out.widths.tolist() == [3, 2, 1]
    else:  # width 2 keeps greedy's path as the runner-up
        assert out.tokens[1, :3].tolist() == [A, C, EOS] and list(out.lengths[:2]) == [3, 3]
        np.testing.assert_allclose(out.scores[1], np.log(0.6 * 0.34 * 0.5), rtol=1e-5)


def _flat_table(v, peak):
    """Every context gives the same distribution: uniform (peak=0) or one token at `peak`."""
    row = np.zeros(v) if peak == 0 else np.where(np.arange(v) == 7, peak, 0.0)
    return {'table': jnp.asarray(np.tile(row, (v, v, 1)), jnp.float32)}


def test_adaptive_width_grows_under_high_entropy_and_shrinks_under_low():
    toy = SecondOrderToy(64)
    # Uniform over 64 tokens: H = ln 64 = 4.16 nats, n = 0.59 > 0.5 -> +1 each step.
    high = beam_search(toy, _flat_table(64, 0.0), [S], max_new_tokens=6)
    assert high.widths.tolist() == [5, 6, 7, 8, 8, 8]
    # One token carries almost all mass: H ~ 0 -> -1 each step down to min_width.
    low = beam_search(toy, _flat_table(64, 30.0), [S], max_new_tokens=6)
    assert low.widths.tolist() == [3, 2, 1, 1, 1, 1]
    assert low.best == [7] * 6
    bounded = beam_search(toy, _flat_table(64, 0.0), [S], max_new_tokens=4,
                          config=BeamConfig(width=2, max_width=3))
    assert bounded.widths.tolist() == [3, 3, 3, 3]


TRANSFORMER = tiny_config(num_kv_heads=2, window_size=4)


@pytest.fixture(scope='module')
def transformer():
    return build_model(TRANSFORMER), init_params(TRANSFORMER, seed=5)


def test_width_one_equals_greedy(transformer):
    model, params = transformer
    prompt = [4, 9, 2, 33]
    greedy = generate(model, params, *left_pad([prompt]), max_new_tokens=8)
    out = beam_search(model, params, prompt, max_new_tokens=8,
                      config=BeamConfig(width=1, adaptive=False))
    assert out.best == greedy.row(0) and out.widths.tolist() == [1] * 8


def test_hypothesis_scores_equal_full_forward_log_probs(transformer):
    """Each finished hypothesis' score is the sum of its tokens' full-forward log-probs,
    which holds only if the cache was reordered with the beams."""
    model, params = transformer
    prompt = [4, 9, 2, 33]
    out = beam_search(model, params, prompt, max_new_tokens=7, eos_id=5)
    assert np.isfinite(out.normalized).sum() >= 4
    for i in np.flatnonzero(np.isfinite(out.normalized)):
        gen = out.tokens[i, :out.lengths[i]].tolist()
        seq = np.zeros((1, len(prompt) + 7), np.int32)
        seq[0, :len(prompt) + len(gen)] = prompt + gen
        logits = np.asarray(full_logits(model, params, seq)[0], np.float64)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        expected = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(gen))
        np.testing.assert_allclose(out.scores[i], expected, rtol=1e-5, atol=1e-5)
        assert gen[-1] == 5 or len(gen) == 7
    assert (np.diff(out.normalized[np.isfinite(out.normalized)]) <= 0).all()  # best first


def test_bad_beam_config_raises():
    with pytest.raises(ValueError, match='min_width <= width <= max_width'):
        BeamConfig(width=9)
    with pytest.raises(ValueError, match='alpha'):
        BeamConfig(alpha=-1.0)
