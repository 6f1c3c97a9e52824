"""The Transformer against a hand-written numpy forward, and its modes against each other."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax.arch.transformer import Transformer
from rustgpt_jax.config import (
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
    rustgpt_baseline,
    rustgpt_modern,
)

TINY = dict(vocab_size=32, embed_dim=16, hidden_dim=24, num_layers=2, num_heads=4,
            max_seq_len=16)


def _init(config, seed=0, scale=None):
    """Plain params at the model's shapes (from jax.eval_shape, no init compute).

    Norm scales are 1 and biases 0 plus, with `scale`, N(0, scale^2) noise on every leaf;
    other leaves are N(0, (scale or init_std)^2).
    """
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    shapes = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)['params']
    leaves, tree = jax.tree_util.tree_flatten_with_path(flax.core.meta.unbox(shapes))
    rng = np.random.RandomState(seed)
    new = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        draw = rng.randn(*leaf.shape).astype(np.float32) * (scale or config.init_std)
        if scale is None and 'norm' in name:
            draw = np.zeros(leaf.shape, np.float32)
        new.append(draw + 1.0 if name.endswith("['scale']") else draw)
    return jax.tree_util.tree_unflatten(tree, new)


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, tokens, positions=None, segment_ids=None):
    """Jitted: one compile per (config, shapes) beats op-by-op dispatch of the scan."""
    return Transformer(config).apply({'params': params}, tokens, positions, segment_ids)


def _tokens(batch, seq, vocab, seed=1):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, seq)), jnp.int32)


# -- numpy oracle ---------------------------------------------------------------


def _np_norm(config, p, x):
    if config.norm == NormType.RMS_NORM:
        return x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + config.norm_eps) * p['scale']
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + config.norm_eps) * p['scale'] + p['bias']


def _np_dense(p, x, spec):
    y = np.einsum(spec, x, p['kernel'])
    return y + p['bias'] if 'bias' in p else y


def _np_rope(x, base):
    t, h = x.shape[1], x.shape[-1]
    angle = np.arange(t)[:, None] * base ** (-np.arange(0, h, 2) / h)  # (T, H/2)
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_attention(config, p, x):
    q = _np_dense(p['q_proj'], x, 'btd,dnh->btnh')
    k = _np_dense(p['k_proj'], x, 'btd,dkh->btkh')
    v = _np_dense(p['v_proj'], x, 'btd,dkh->btkh')
    if config.positions == PositionType.ROPE:
        q, k = _np_rope(q, config.rope_base), _np_rope(k, config.rope_base)
    t, n, h = q.shape[1], q.shape[2], q.shape[3]
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    window = config.window_size or t + 1
    visible = (j <= i) & (i - j < window)
    out = np.zeros_like(q)
    for head in range(n):
        kv = head // config.queries_per_kv
        scores = np.einsum('bih,bjh->bij', q[:, :, head], k[:, :, kv]) / np.sqrt(h)
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, head] = probs @ v[:, :, kv]
    return _np_dense(p['o_proj'], out, 'btnh,nhd->btd')


def _np_ffn(p, x):
    if 'w1' in p:
        g = _np_dense(p['w1'], x, 'btd,df->btf')
        return _np_dense(p['w2'], g / (1 + np.exp(-g)) * _np_dense(p['w3'], x, 'btd,df->btf'),
                         'btf,fd->btd')
    return _np_dense(p['down'], np.maximum(_np_dense(p['up'], x, 'btd,df->btf'), 0),
                     'btf,fd->btd')


def numpy_forward(config, params, tokens):
    """Logits (B, T, V) in float64, written from the SPEC, not from the Flax code."""
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    emb = params['embedder']
    tokens = np.asarray(tokens)
    x = emb['token_embedding'][tokens]
    if config.positions == PositionType.LEARNED:
        x = x + emb['position_embedding'][np.arange(tokens.shape[1])]
    for layer in range(config.num_layers):
        p = jax.tree_util.tree_map(lambda a: a[layer], params['layers'])
        if config.norm_placement == NormPlacement.PRE:
            x = x + _np_attention(config, p['attention'], _np_norm(config, p['attn_norm'], x))
            x = x + _np_ffn(p['ffn'], _np_norm(config, p['ffn_norm'], x))
        else:
            x = _np_norm(config, p['attn_norm'], x + _np_attention(config, p['attention'], x))
            x = _np_norm(config, p['ffn_norm'], x + _np_ffn(p['ffn'], x))
    if config.norm_placement == NormPlacement.PRE:
        x = _np_norm(config, params['final_norm'], x)
    head = emb['token_embedding'].T if config.tie_embeddings else emb['lm_head']
    return x @ head


ORACLE_CONFIGS = {
    'baseline_post_norm': rustgpt_baseline(**TINY, num_kv_heads=4),
    'modern_pre_norm_gqa_window': rustgpt_modern(**TINY, num_kv_heads=2, window_size=3),
    'modern_mqa_tied': rustgpt_modern(**TINY, num_kv_heads=1, window_size=None,
                                      tie_embeddings=True, rope_base=500.0),
}


@pytest.mark.parametrize('name', sorted(ORACLE_CONFIGS))
def test_forward_matches_numpy(name):
    config = ORACLE_CONFIGS[name]
    params = _init(config, scale=0.3)
    tokens = _tokens(2, 9, config.vocab_size)
    logits = _forward(config, params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 9, config.vocab_size)
    np.testing.assert_allclose(logits, numpy_forward(config, params, tokens), rtol=1e-4,
                               atol=1e-4)


def test_post_norm_output_is_normalised():
    # Post-norm ends on the block's LayerNorm and has no final norm; pre-norm has one.
    config = ORACLE_CONFIGS['baseline_post_norm']
    params = _init(config)
    assert 'final_norm' not in params
    assert 'final_norm' in _init(ORACLE_CONFIGS['modern_mqa_tied'])
    hidden = jax.jit(lambda p, t: Transformer(config).apply(
        {'params': p}, t, method=Transformer.hidden_states))(params, _tokens(1, 6, 32))
    np.testing.assert_allclose(hidden.mean(-1), 0.0, atol=1e-5)  # scale 1, bias 0 at init
    np.testing.assert_allclose(hidden.std(-1), 1.0, atol=1e-3)


# -- decoding -----------------------------------------------------------------


@pytest.mark.parametrize('kv_heads,window', [(2, 3), (1, 3)])
def test_decode_matches_full_forward(kv_heads, window):
    config = rustgpt_modern(**TINY, num_kv_heads=kv_heads, window_size=window)
    model = Transformer(config)
    params = _init(config, scale=0.3)
    tokens = _tokens(2, 11, config.vocab_size)  # 4 prompt + 7 steps: the ring of 3 wraps
    full = _forward(config, params, tokens)
    prompt = tokens[:, :4]

    @jax.jit
    def prefill(prompt):
        # Without a cache collection the first decode call creates an empty one.
        _, state = model.apply({'params': params}, prompt, decode=True, mutable=['cache'])
        return model.apply({'params': params, 'cache': state['cache']}, prompt, decode=True,
                           mutable=['cache'])

    logits, state = prefill(prompt)
    np.testing.assert_allclose(logits, full[:, :4], atol=1e-5, rtol=1e-5)
    # The cache is a ring of W slots, (L, B, K, W, H) when scanned: memory stays flat.
    key_cache = state['cache']['layers']['attention']['key']
    assert key_cache.shape[:2] == (2, 2) and key_cache.shape[3] == window

    @jax.jit
    def step(cache, token, position):
        return model.apply({'params': params, 'cache': cache}, token, positions=position,
                           decode=True, mutable=['cache'])

    cache = state['cache']
    for t in range(4, 11):
        position = jnp.full((2, 1), t, jnp.int32)
        logits, state = step(cache, tokens[:, t:t + 1], position)
        cache = state['cache']
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=1e-5)


def test_last_only_is_the_last_row_of_the_logits():
    config = rustgpt_modern(**TINY)
    params = _init(config, scale=0.3)
    tokens = _tokens(2, 9, config.vocab_size)
    full = _forward(config, params, tokens)
    last = Transformer(config).apply({'params': params}, tokens, last_only=True)
    assert last.shape == (2, 1, config.vocab_size)
    np.testing.assert_allclose(last, full[:, -1:], atol=1e-5, rtol=1e-5)


# -- equivalent execution modes --------------------------------------------------


def test_scan_and_unrolled_layers_agree():
    config = rustgpt_modern(**TINY, num_kv_heads=2)
    params = _init(config, scale=0.3)
    unrolled = {key: value for key, value in params.items() if key != 'layers'}
    for i in range(config.num_layers):
        unrolled[f'layer_{i}'] = jax.tree_util.tree_map(lambda a: a[i], params['layers'])
    tokens = _tokens(2, 8, config.vocab_size)
    scanned = _forward(config, params, tokens)
    plain_config = config.replace(scan_layers=False)
    assert jax.tree_util.tree_structure(_init(plain_config)) == \
        jax.tree_util.tree_structure(unrolled)
    loop = _forward(plain_config, unrolled, tokens)
    np.testing.assert_allclose(scanned, loop, atol=1e-5, rtol=1e-5)


def _loss_and_grads(config, params, tokens):
    def loss(p):
        logits = Transformer(config).apply({'params': p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_agree():
    config = rustgpt_modern(**TINY, num_kv_heads=2)
    params = _init(config, scale=0.3)
    tokens = _tokens(2, 9, config.vocab_size)
    loss, grads = _loss_and_grads(config, params, tokens)
    assert float(jnp.abs(grads['layers']['attention']['q_proj']['kernel']).max()) > 0
    for policy in ('full', 'dots'):
        remat_loss, remat_grads = _loss_and_grads(config.replace(remat_policy=policy), params,
                                                  tokens)
        np.testing.assert_allclose(loss, remat_loss, rtol=1e-6)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
            grads, remat_grads)


def test_bfloat16_compute():
    config = rustgpt_modern(**TINY, num_kv_heads=2)
    params = _init(config, scale=0.3)
    tokens = _tokens(2, 8, config.vocab_size)
    ref = _forward(config, params, tokens)
    logits = _forward(config.replace(dtype='bfloat16'), params, tokens)
    assert logits.dtype == jnp.float32
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert rel < 3e-2, rel


def test_packed_segments_match_separate_sequences():
    config = rustgpt_modern(**TINY, num_kv_heads=2, window_size=None)
    params = _init(config, scale=0.3)
    a, b = _tokens(1, 5, 32, seed=3), _tokens(1, 4, 32, seed=4)
    packed = jnp.concatenate([a, b], 1)
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3]], jnp.int32)
    segments = jnp.array([[1] * 5 + [2] * 4], jnp.int32)
    out = _forward(config, params, packed, positions, segments)
    np.testing.assert_allclose(out[:, :5], _forward(config, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], _forward(config, params, b), atol=1e-5)


def test_too_long_sequence_raises():
    config = ModelConfig(**TINY, num_kv_heads=4)
    with pytest.raises(ValueError, match='max_seq_len'):
        Transformer(config).init(jax.random.key(0), jnp.zeros((1, 17), jnp.int32))
