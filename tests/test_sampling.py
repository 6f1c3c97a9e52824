"""Samplers against numpy oracles: top-k set, top-p nucleus, temperature, seeding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax.decoding import SamplingConfig, filtered_logits, sample_logits

V = 12


def _logits(rows=3, seed=0):
    # Distinct values, so the top-k set and the nucleus are unambiguous.
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(V) * 0.4 + rng.normal(0, 0.01, V)
                     for _ in range(rows)]).astype(np.float32)


def _nucleus(logits, temperature, top_k, top_p):
    """Numpy oracle: the allowed ids of each row and their renormalised probabilities."""
    out = []
    for row in logits.astype(np.float64) / temperature:
        order = np.argsort(-row)
        if top_k:
            order = order[:top_k]
        p = np.exp(row[order] - row[order].max())
        p /= p.sum()
        n = int(np.searchsorted(np.cumsum(p), top_p - 1e-12)) + 1  # smallest set >= top_p
        ids, p = order[:n], p[:n] / p[:n].sum()
        out.append(dict(zip(ids.tolist(), p.tolist())))
    return out


def _draws(logits, config, n=4000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    sample = jax.jit(jax.vmap(lambda k: sample_logits(jnp.asarray(logits), k, config)))
    return np.asarray(sample(keys))  # (n, B)


@pytest.mark.parametrize('temperature,top_k,top_p', [
    (1.0, 3, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.6), (1.5, 0, 0.9), (1.0, 6, 0.8)])
def test_samples_stay_in_the_oracle_set_with_its_frequencies(temperature, top_k, top_p):
    logits = _logits()
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    allowed = _nucleus(logits, temperature, top_k, top_p)
    draws = _draws(logits, config)
    for b, probs in enumerate(allowed):
        assert set(np.unique(draws[:, b]).tolist()) <= set(probs)  # never outside
        freq = np.bincount(draws[:, b], minlength=V) / len(draws)
        for token, p in probs.items():  # binomial std <= 0.008 at n = 4000
            assert abs(freq[token] - p) < 0.03, (b, token, freq[token], p)
    # The filtered logits keep exactly the oracle set.
    kept = np.asarray(filtered_logits(jnp.asarray(logits), config)) > -1e29
    for b, probs in enumerate(allowed):
        assert set(np.flatnonzero(kept[b]).tolist()) == set(probs)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = _logits(rows=4, seed=3)
    greedy = np.argmax(logits, axis=-1)
    np.testing.assert_array_equal(sample_logits(jnp.asarray(logits), None, SamplingConfig()),
                                  greedy)
    for config in (SamplingConfig(1.0, top_k=1), SamplingConfig(2.0, top_p=1e-6)):
        draws = _draws(logits, config, n=50)
        np.testing.assert_array_equal(draws, np.broadcast_to(greedy, draws.shape))


def test_same_seed_same_output():
    logits = jnp.asarray(_logits(rows=8))
    config = SamplingConfig(temperature=1.0, top_p=0.95)
    a = sample_logits(logits, jax.random.key(7), config)
    b = sample_logits(logits, jax.random.key(7), config)
    np.testing.assert_array_equal(a, b)
    others = [sample_logits(logits, jax.random.key(s), config) for s in range(8, 12)]
    assert any(not np.array_equal(a, o) for o in others)


@pytest.mark.parametrize('kwargs,field', [
    (dict(temperature=-1.0), 'temperature'), (dict(top_k=-2), 'top_k'),
    (dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'), (dict(top_k=2.5), 'top_k')])
def test_bad_settings_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)
