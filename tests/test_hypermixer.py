"""HyperMixer: causal token mixing against a numpy loop, causality, gradients, training,
parameter counts, decoding with the running-sum cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rustgpt_jax.arch.hypermixer import (
    CausalHyperMixing,
    HyperMixerLM,
    parameter_counts_hypermixer,
    segmented_prefix_sum,
    sinusoidal_features,
)
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.models import build_model

V, D = 29, 16


def _config(**overrides):
    base = dict(vocab_size=V, embed_dim=D, hidden_dim=24, num_layers=2, num_heads=2,
                num_kv_heads=2, max_seq_len=16, architecture='hypermixer',
                hypermixer_hidden_dim=12)
    return ModelConfig(**{**base, **overrides})


BASELINE = dict(norm='layer_norm', feed_forward='relu', positions='learned', use_bias=True,
                norm_placement='post', tie_embeddings=True, scan_layers=False)


def _init(config, tokens):
    init = jax.jit(build_model(config).init)
    return nn.meta.unbox(init(jax.random.PRNGKey(0), tokens))['params']


def _jit_apply(model):
    """model.apply compiled once per shape (eager dispatch of every op is far slower)."""
    return jax.jit(model.apply, static_argnames=('deterministic', 'decode', 'mutable'))


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, V, dtype=jnp.int32)


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_sinusoidal_features_literal():
    pos = jnp.array([[0, 3, -2]], jnp.int32)
    got = np.asarray(sinusoidal_features(pos, 5))
    want = np.zeros((1, 3, 5))
    for t, p in enumerate([0, 3, 0]):  # padding (-2) reads position 0
        for i in range(5):
            angle = p / 10000 ** (2 * (i // 2) / 5)
            want[0, t, i] = np.sin(angle) if i % 2 == 0 else np.cos(angle)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_segmented_prefix_sum_literal():
    values = jnp.array([[1., 2., 3., 4., 5.]])
    starts = jnp.array([[True, False, True, False, False]])
    np.testing.assert_array_equal(segmented_prefix_sum(values, starts), [[1, 3, 3, 7, 12]])


@pytest.mark.parametrize('use_bias', [False, True])
def test_token_mixing_matches_numpy_loop(use_bias):
    b, t, c = 2, 7, 5
    x = jax.random.normal(jax.random.PRNGKey(2), (b, t, D))
    positions = jnp.array([[-1, -1, 0, 1, 2, 3, 4], [0, 1, 2, 0, 1, 2, 3]], jnp.int32)
    segments = jnp.array([[0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    layer = CausalHyperMixing(hidden_dim=c, use_bias=use_bias, init_std=0.3)
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(3), x, positions,
                                               segments))['params']
    got = np.asarray(jax.jit(layer.apply)({'params': params}, x, positions, segments))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    xs, pos, seg = np.asarray(x, np.float64), np.asarray(positions), np.asarray(segments)

    def hyper(name, z):
        up, down = p[name]['up'], p[name]['down']
        h = z @ up['kernel'] + (up['bias'] if use_bias else 0)
        return _gelu(h) @ down['kernel'] + (down['bias'] if use_bias else 0)

    want = np.zeros((b, t, D))
    for r in range(b):
        z = xs[r] + np.asarray(sinusoidal_features(positions[r:r + 1], D))[0]
        w1, w2 = hyper('hyper_w1', z), hyper('hyper_w2', z)  # (T, C)
        for i in range(t):
            keys = [j for j in range(i + 1) if pos[r, j] >= 0 and seg[r, j] == seg[r, i]]
            m = np.zeros((c, D))
            for j in keys:
                m += np.outer(w1[j], xs[r, j])
            m /= max(len(keys), 1)
            want[r, i] = w2[i] @ _gelu(m)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('overrides', [{}, BASELINE], ids=['modern', 'baseline'])
def test_causal_exactly(overrides):
    config = _config(**overrides)
    model = build_model(config)
    apply = _jit_apply(model)
    tokens = _tokens((2, 12))
    params = _init(config, tokens)
    base = apply({'params': params}, tokens)
    for t in (0, 5, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % V)
        out = apply({'params': params}, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.all(np.abs(out[:, t:] - base[:, t:]).max(axis=-1) > 0)


def test_segments_isolated_exactly():
    config = _config()
    model = build_model(config)
    apply = _jit_apply(model)
    tokens = _tokens((1, 12))
    segments = jnp.array([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7))], jnp.int32)
    params = _init(config, tokens)
    packed = apply({'params': params}, tokens, positions, segments)
    changed = tokens.at[0, 1].set((tokens[0, 1] + 3) % V)
    out = apply({'params': params}, changed, positions, segments)
    np.testing.assert_array_equal(out[:, 5:], packed[:, 5:])
    # The second segment alone gives the same logits (up to summation order).
    alone = apply({'params': params}, tokens[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], alone, rtol=1e-5, atol=1e-6)


def test_every_parameter_is_logically_partitioned():
    config = _config()
    boxed = jax.eval_shape(build_model(config).init, jax.random.PRNGKey(0),
                           _tokens((1, 4)))['params']
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == len(leaf.value.shape)
        assert len(set(leaf.names)) == len(leaf.names)


@pytest.mark.parametrize('overrides', [{}, BASELINE], ids=['modern', 'baseline'])
def test_trains_and_gradients_reach_every_parameter(overrides):
    config = _config(**overrides)
    model = build_model(config)
    tokens = _tokens((4, 13))
    params = _init(config, tokens)
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logits = model.apply({'params': p}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss, g

    opt = tx.init(params)
    losses = []
    for i in range(25):
        params, opt, loss, grads = step(params, opt)
        losses.append(float(loss))
        if i == 0:  # at init, no parameter may be cut off from the loss
            flat = jax.tree_util.tree_flatten_with_path(grads)[0]
            for path, g in flat:
                assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)
    assert losses[0] == pytest.approx(np.log(V), rel=0.05)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize('overrides', [
    {}, BASELINE, dict(use_bias=True, hypermixer_hidden_dim=None),
    dict(norm='layer_norm', positions='learned', tie_embeddings=True, num_layers=3)])
def test_parameter_counts_match_formula(overrides):
    config = _config(**overrides)
    shapes = jax.eval_shape(lambda: _init(config, jnp.zeros((1, 4), jnp.int32)))
    counts = parameter_counts_hypermixer(config)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == counts['total']
    assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')
    d, c, f = D, config.hypermixer_hidden_dim or config.hidden_dim, config.hidden_dim
    if not overrides:  # modern defaults, by hand: tables, 2 hypernets + SwiGLU + 2 RMS/layer
        assert counts['total'] == 2 * V * d + 2 * (2 * (d * d + d * c) + 3 * d * f + 2 * d) + d


@pytest.mark.parametrize('overrides', [{}, BASELINE], ids=['modern', 'baseline'])
def test_decode_with_cache_matches_full_forward(overrides):
    config = _config(**overrides)
    model = build_model(config)
    apply = _jit_apply(model)
    # Row 1 is left-padded by two slots (negative positions): they must be skipped.
    tokens = _tokens((2, 11))
    positions = jnp.array([list(range(11)), [-1, -1] + list(range(9))], jnp.int32)
    params = _init(config, tokens)
    full = apply({'params': params}, tokens, positions)

    cache = jax.jit(model.init, static_argnames='decode')(
        jax.random.PRNGKey(0), tokens[:, :5], positions[:, :5], decode=True)['cache']
    assert jax.tree.leaves(cache) and all(np.all(np.asarray(c) == 0)
                                          for c in jax.tree.leaves(cache))
    logits, mutated = apply({'params': params, 'cache': cache}, tokens[:, :5],
                            positions[:, :5], decode=True, mutable=('cache',))
    outs = [logits]
    for t in range(5, 11):
        logits, mutated = apply({'params': params, **mutated}, tokens[:, t:t + 1],
                                positions[:, t:t + 1], decode=True, mutable=('cache',))
        outs.append(logits)
    # Padding slots (row 1, slots 0-1) attend nothing; their outputs are meaningless.
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1)[real], full[real],
                               rtol=1e-5, atol=1e-5)
    # Left padding changes nothing: the padded row equals the unpadded sequence.
    unpadded = apply({'params': params}, tokens[1:, 2:])
    np.testing.assert_allclose(full[1:, 2:], unpadded, rtol=1e-5, atol=1e-5)


def test_bad_input_raises():
    # The checks run while tracing, so abstract evaluation is enough to trigger them.
    model = build_model(_config())
    assert isinstance(model, HyperMixerLM)
    tokens = _tokens((2, 4))
    variables = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True)))
    with pytest.raises(ValueError, match='segment_ids'):
        jax.eval_shape(lambda v: model.apply(v, tokens, segment_ids=tokens * 0,
                                           decode=True, mutable=['cache']), variables)
    with pytest.raises(ValueError, match='cache was built for batch 2'):
        jax.eval_shape(lambda v: model.apply(v, tokens[:1], decode=True,
                                           mutable=['cache']), variables)
    with pytest.raises(ValueError, match='max_seq_len'):
        jax.eval_shape(lambda v: model.apply(v, _tokens((1, 17))), variables)
    with pytest.raises(ValueError, match='positions shape'):
        jax.eval_shape(lambda v: model.apply(v, tokens, tokens[:, :3]), variables)
