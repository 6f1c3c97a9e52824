"""HRM: the L/H iteration against an unrolled loop, causality, gradients, training,
parameter counts, decoding with per-iteration KV caches."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rustgpt_jax.arch._stack import LayerStack, make_embedder
from rustgpt_jax.arch.hrm import HRMLM, parameter_counts_hrm
from rustgpt_jax.config import ModelConfig, NormPlacement
from rustgpt_jax.models import build_model
from rustgpt_jax.nn.block import Block, make_norm

V, D = 29, 16


def _config(**overrides):
    base = dict(vocab_size=V, embed_dim=D, hidden_dim=24, num_layers=1, num_heads=2,
                num_kv_heads=1, max_seq_len=16, architecture='hrm', hrm_cycles=2,
                hrm_steps=3, hrm_low_layers=2, hrm_high_layers=1)
    return ModelConfig(**{**base, **overrides})


BASELINE = dict(norm='layer_norm', feed_forward='relu', positions='learned', use_bias=True,
                norm_placement='post', tie_embeddings=True, num_kv_heads=2, scan_layers=False)


def _init(config, tokens):
    init = jax.jit(build_model(config).init)
    return nn.meta.unbox(init(jax.random.PRNGKey(0), tokens))['params']


def _jit_apply(model):
    """model.apply compiled once per shape (eager dispatch of every op is far slower)."""
    return jax.jit(model.apply, static_argnames=('deterministic', 'decode', 'mutable'))


def _tokens(shape, seed=1):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, V, dtype=jnp.int32)


@jax.jit
def _cross_entropy(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()


def _unrolled_logits(config, params, tokens, cycles, steps):
    """The SPEC §5 loop written out in Python with the model's own L and H weights."""
    pre = config.norm_placement == NormPlacement.PRE
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embedder = make_embedder(config)
    x = embedder.apply({'params': params['embedder']}, tokens, positions, method='encode')
    x = make_norm(config, 'n').apply({'params': params['embed_norm']}, x)
    low = LayerStack(config, Block, config.hrm_low_layers, out_norm=pre)
    high = LayerStack(config, Block, config.hrm_high_layers, out_norm=pre)
    low_params = params['cycles']['low_steps']['low']
    high_params = params['cycles']['high']
    z_low = jnp.broadcast_to(params['z_low_init'], x.shape)
    z_high = jnp.broadcast_to(params['z_high_init'], x.shape)
    for _ in range(cycles):
        for _ in range(steps):
            z_low = low.apply({'params': low_params}, z_low + z_high + x, positions)
        z_high = high.apply({'params': high_params}, z_high + z_low, positions)
    if pre:
        z_high = make_norm(config, 'n').apply({'params': params['final_norm']}, z_high)
    return embedder.apply({'params': params['embedder']}, z_high, method='decode')


@pytest.mark.parametrize('overrides', [{}, BASELINE], ids=['modern', 'baseline'])
def test_matches_unrolled_loop(overrides):
    config = _config(**overrides)
    tokens = _tokens((2, 9))
    params = _init(config, tokens)
    got = _jit_apply(build_model(config))({'params': params}, tokens)
    unrolled = jax.jit(_unrolled_logits, static_argnums=(0, 3, 4))
    np.testing.assert_allclose(got, unrolled(config, params, tokens, 2, 3),
                               rtol=2e-5, atol=2e-5)
    # The order of the loops matters: N and T swapped is a different model.
    assert np.abs(got - unrolled(config, params, tokens, 3, 2)).max() > 1e-3


@pytest.mark.parametrize('overrides', [{}, BASELINE], ids=['modern', 'baseline'])
def test_causal_exactly(overrides):
    config = _config(**overrides)
    apply = _jit_apply(build_model(config))
    tokens = _tokens((2, 12))
    params = _init(config, tokens)
    base = apply({'params': params}, tokens)
    for t in (0, 6, 11):
        changed = tokens.at[:, t].set((tokens[:, t] + 7) % V)
        out = apply({'params': params}, changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.all(np.abs(out[:, t:] - base[:, t:]).max(axis=-1) > 0)


def test_segments_isolated_exactly():
    config = _config()
    apply = _jit_apply(build_model(config))
    tokens = _tokens((1, 12))
    segments = jnp.array([[1] * 5 + [2] * 7], jnp.int32)
    positions = jnp.array([list(range(5)) + list(range(7))], jnp.int32)
    params = _init(config, tokens)
    packed = apply({'params': params}, tokens, positions, segments)
    changed = tokens.at[0, 1].set((tokens[0, 1] + 3) % V)
    np.testing.assert_array_equal(apply({'params': params}, changed, positions, segments)[:, 5:],
                                  packed[:, 5:])
    np.testing.assert_allclose(packed[:, 5:], apply({'params': params}, tokens[:, 5:]),
                               rtol=1e-5, atol=1e-5)


def test_every_parameter_is_logically_partitioned():
    boxed = jax.eval_shape(build_model(_config()).init, jax.random.PRNGKey(0),
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

    @jax.jit
    def step(p, opt):
        loss, g = jax.value_and_grad(
            lambda q: _cross_entropy(model.apply({'params': q}, tokens[:, :-1]),
                                     tokens[:, 1:]))(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss, g

    opt = tx.init(params)
    losses = []
    for i in range(25):
        params, opt, loss, grads = step(params, opt)
        losses.append(float(loss))
        if i == 0:  # at init, no parameter may be cut off from the loss
            flat = jax.tree_util.tree_flatten_with_path(grads)[0]
            names = {jax.tree_util.keystr(path) for path, _ in flat}
            assert {"['z_low_init']", "['z_high_init']"} <= names
            for path, g in flat:
                assert np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)
    assert losses[0] == pytest.approx(np.log(V), rel=0.05)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize('overrides', [
    {}, BASELINE, dict(use_bias=True, head_dim=4, num_heads=4, num_kv_heads=2),
    dict(norm='layer_norm', hrm_low_layers=3, hrm_high_layers=2, tie_embeddings=True)])
def test_parameter_counts_match_formula(overrides):
    config = _config(**overrides)
    shapes = jax.eval_shape(lambda: _init(config, jnp.zeros((1, 4), jnp.int32)))
    counts = parameter_counts_hrm(config)
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == counts['total']
    assert counts['total'] == sum(v for k, v in counts.items() if k != 'total')
    # Weights are shared across iterations: N and T never change the count.
    assert parameter_counts_hrm(config.replace(hrm_cycles=5, hrm_steps=7)) == counts
    if not overrides:  # modern defaults by hand: GQA 2/1 heads of 8, SwiGLU, RMSNorm
        block = D * 16 + 2 * D * 8 + 16 * D + 3 * D * 24 + 2 * D
        assert counts['total'] == 2 * V * D + 2 * D + 3 * block + 2 * D + 2 * D


def test_decode_with_cache_matches_full_forward():
    # Window 4 < prefill 5: the per-iteration caches are rings that wrap during the test.
    config = _config(window_size=4)
    model = build_model(config)
    apply = _jit_apply(model)
    # Row 1 is left-padded by two slots (negative positions): they must be skipped.
    tokens = _tokens((2, 11))
    positions = jnp.array([list(range(11)), [-1, -1] + list(range(9))], jnp.int32)
    params = _init(config, tokens)
    full = apply({'params': params}, tokens, positions)

    cache = jax.jit(model.init, static_argnames='decode')(
        jax.random.PRNGKey(0), tokens[:, :5], positions[:, :5], decode=True)['cache']
    # One KV cache per application: N*T of L's blocks and N of H's.
    low_keys = cache['cycles']['low_steps']['low']['layers']['attention']['key']
    assert low_keys.shape[:3] == (2, 3, 2)
    assert low_keys.shape[-2] == config.cache_length  # (..., B, K, C, H)
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
                               rtol=2e-5, atol=2e-5)
    unpadded = apply({'params': params}, tokens[1:, 2:])
    np.testing.assert_allclose(full[1:, 2:], unpadded, rtol=2e-5, atol=2e-5)


def test_bad_input_raises():
    model = build_model(_config())
    assert isinstance(model, HRMLM)
    tokens = _tokens((2, 4))
    variables = nn.meta.unbox(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True)))
    with pytest.raises(ValueError, match='segment_ids'):
        jax.eval_shape(lambda v: model.apply(v, tokens, segment_ids=tokens * 0,
                                           decode=True, mutable=['cache']), variables)
    with pytest.raises(ValueError, match='max_seq_len'):
        jax.eval_shape(lambda v: model.apply(v, _tokens((1, 17))), variables)
    with pytest.raises(ValueError, match='hrm_steps'):
        _config(hrm_steps=0)
