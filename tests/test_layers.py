"""Leaf layers and reference attention against numpy formulas, plus check_grads."""

import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from rustgpt_jax import masks
from rustgpt_jax.nn import LayerNorm, ReluFeedForward, RMSNorm, SwiGLU, apply_rope
from rustgpt_jax.ops import reference

GRAD_TOL = dict(atol=2e-2, rtol=2e-2, eps=1e-3)  # finite differences in float32


def _rand(seed, *shape, scale=1.0):
    return (np.random.RandomState(seed).randn(*shape) * scale).astype(np.float32)


def _perturbed(params, seed):
    """Replaces every param by random values, so ones/zeros inits cannot hide a bug."""
    leaves, tree = jax.tree_util.tree_flatten(flax.core.meta.unbox(params))
    return jax.tree_util.tree_unflatten(
        tree, [_rand(seed + i, *np.shape(x)) for i, x in enumerate(leaves)])


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _check_layer_grads(module, params, x):
    f = lambda p, x: module.apply({'params': p}, x)
    check_grads(f, (params, x), order=1, modes=('rev',), **GRAD_TOL)


def test_rms_norm():
    x = _rand(0, 2, 3, 8)
    module = RMSNorm(eps=1e-5)
    params = _perturbed(module.init(jax.random.key(0), x)['params'], 1)
    expected = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5) * params['scale']
    np.testing.assert_allclose(module.apply({'params': params}, x), expected, rtol=1e-5,
                               atol=1e-6)
    _check_layer_grads(module, params, x)


def test_layer_norm():
    x = _rand(2, 2, 3, 8) + 3.0  # a mean offset that the centring must remove
    module = LayerNorm(eps=1e-5)
    params = _perturbed(module.init(jax.random.key(0), x)['params'], 3)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * params['scale'] + params['bias']
    np.testing.assert_allclose(module.apply({'params': params}, x), expected, rtol=1e-5,
                               atol=1e-5)
    _check_layer_grads(module, params, x)


def test_swiglu():
    x = _rand(4, 2, 3, 8)
    module = SwiGLU(hidden_dim=12)
    params = _perturbed(module.init(jax.random.key(0), x)['params'], 5)
    w1, w2, w3 = (params[n]['kernel'] for n in ('w1', 'w2', 'w3'))
    assert set(params) == {'w1', 'w2', 'w3'} and 'bias' not in params['w1']
    expected = (_silu(x @ w1) * (x @ w3)) @ w2
    np.testing.assert_allclose(module.apply({'params': params}, x), expected, rtol=1e-4,
                               atol=1e-4)
    _check_layer_grads(module, params, x)


def test_swiglu_values_and_gradients_match_numpy():
    """The custom-VJP swiglu and swiglu_packed: values and both cotangents vs closed forms
    in float64, including saturated gates."""
    from rustgpt_jax.nn.feed_forward import swiglu, swiglu_packed
    g = np.concatenate([np.linspace(-30, 30, 601), [-100.0, 100.0]])
    u = np.cos(g) + 0.5
    dh = np.sin(3 * g) + 0.25
    s = 1 / (1 + np.exp(-g))
    value = g * s * u
    d_gate = dh * u * s * (1 + g * (1 - s))
    d_up = dh * g * s
    g32, u32, dh32 = (jnp.asarray(a, jnp.float32) for a in (g, u, dh))
    out, vjp = jax.vjp(swiglu, g32, u32)
    np.testing.assert_allclose(out, value, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dh32), (d_gate, d_up)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert np.all(np.isfinite(np.asarray(got)))
    out, vjp = jax.vjp(swiglu_packed, jnp.concatenate([g32, u32])[None])
    np.testing.assert_allclose(out[0], value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(vjp(dh32[None])[0][0], np.concatenate([d_gate, d_up]),
                               rtol=1e-5, atol=1e-5)
    check_grads(swiglu, (jnp.linspace(-4.0, 4.0, 9), jnp.linspace(1.0, 2.0, 9)), order=1,
                modes=['rev'], atol=1e-2)


def test_relu_feed_forward():
    x = _rand(6, 2, 3, 8)
    module = ReluFeedForward(hidden_dim=12, use_bias=True)
    params = _perturbed(module.init(jax.random.key(0), x)['params'], 7)
    up, down = params['up'], params['down']
    expected = np.maximum(x @ up['kernel'] + up['bias'], 0) @ down['kernel'] + down['bias']
    np.testing.assert_allclose(module.apply({'params': params}, x), expected, rtol=1e-4,
                               atol=1e-4)
    _check_layer_grads(module, params, x)


def _numpy_rope(x, positions, base):
    """Rotate-half RoPE, one channel pair at a time."""
    out = np.array(x, np.float64)
    h = x.shape[-1]
    for b, t in itertools.product(range(x.shape[0]), range(x.shape[1])):
        for i in range(h // 2):
            angle = positions[b, t] * base ** (-2.0 * i / h)
            c, s = np.cos(angle), np.sin(angle)
            x1, x2 = x[b, t, :, i], x[b, t, :, i + h // 2]
            out[b, t, :, i] = x1 * c - x2 * s
            out[b, t, :, i + h // 2] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize('base', [10000.0, 500.0])
def test_rope_matches_numpy(base):
    x = _rand(8, 3, 5, 3, 8)
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 11, 2], [-2, -1, 0, 1, 2]],  # -: padding
                         np.int32)
    np.testing.assert_allclose(apply_rope(x, positions, base), _numpy_rope(x, positions, base),
                               rtol=1e-5, atol=1e-5)
    check_grads(lambda x: apply_rope(x, positions, base), (x,), order=1, **GRAD_TOL)


def _split_then_rope(qkv, positions, n, kh, base):
    """What split_rope replaces: three head slices, then plain-autodiff apply_rope."""
    q, k, v = qkv[:, :, :n], qkv[:, :, n:n + kh], qkv[:, :, n + kh:]
    return apply_rope(q, positions, base), apply_rope(k, positions, base), v


@pytest.mark.parametrize('b,t,n,kh,h,base', [(2, 5, 4, 2, 8, 10000.0),  # GQA
                                             (1, 6, 2, 2, 4, 500.0),  # N = K
                                             (2, 4, 3, 1, 16, 10000.0)])  # MQA
def test_split_rope_values_and_gradients_match_numpy(b, t, n, kh, h, base):
    """The custom-VJP split_rope: q, k, v and d qkv vs float64 closed forms (the
    cotangent of a rotation is the cotangent rotated back, i.e. by -positions), with
    left padding (negative positions) and packed documents (positions restarting)."""
    from rustgpt_jax.nn.rope import split_rope
    qkv = _rand(11, b, t, n + 2 * kh, h)
    positions = np.stack([np.arange(t) - 2, np.arange(t) % 3][:b]).astype(np.int32)
    cot = [_rand(12 + i, b, t, m, h) for i, m in enumerate((n, kh, kh))]
    out, vjp = jax.vjp(lambda x: split_rope(x, positions, n, kh, base), jnp.asarray(qkv))
    want = (_numpy_rope(qkv[:, :, :n], positions, base),
            _numpy_rope(qkv[:, :, n:n + kh], positions, base), qkv[:, :, n + kh:])
    for got, w in zip(out, want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
    d_qkv = np.concatenate([_numpy_rope(cot[0], -positions, base),
                            _numpy_rope(cot[1], -positions, base), cot[2]], axis=2)
    (got,) = vjp(tuple(jnp.asarray(c) for c in cot))
    np.testing.assert_allclose(got, d_qkv, rtol=1e-5, atol=1e-5)
    # Same gradient as autodiff of the slices + apply_rope it replaces, under jit.
    loss = lambda f: jax.jit(jax.grad(lambda x: sum(
        jnp.sum(jnp.tanh(o) * c) for o, c in zip(f(x, positions, n, kh, base), cot))))
    np.testing.assert_allclose(loss(split_rope)(qkv), loss(_split_then_rope)(qkv),
                               rtol=1e-6, atol=1e-6)
    check_grads(lambda x: split_rope(x, positions, n, kh, base), (qkv,), order=1,
                modes=('rev',), **GRAD_TOL)


def test_split_rope_keeps_the_dtype():
    """bfloat16 in, bfloat16 q, k, v and d qkv out (the rotation itself is float32)."""
    from rustgpt_jax.nn.rope import split_rope
    qkv = jnp.asarray(_rand(13, 2, 3, 4, 8), jnp.bfloat16)
    positions = np.array([[0, 1, 2], [-1, 0, 1]], np.int32)
    out, vjp = jax.vjp(lambda x: split_rope(x, positions, 2, 1), qkv)
    assert [o.dtype for o in out] == [jnp.bfloat16] * 3
    assert vjp(tuple(jnp.ones_like(o) for o in out))[0].dtype == jnp.bfloat16
    for got, want in zip(out, _split_then_rope(qkv, positions, 2, 1, 10000.0)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_written_once_returns_the_rope_table_bit_for_bit():
    """The identity product that keeps XLA:CPU from recomputing cos / sin per element
    (runtime.fusion.written_once) returns them bit for bit, under jit as in the model."""
    from rustgpt_jax.nn import rope
    from rustgpt_jax.runtime.fusion import written_once
    positions = np.random.RandomState(14).randint(-50, 5000, (4, 64)).astype(np.int32)
    for h in (4, 32, 128):
        table = lambda p, h=h: jnp.concatenate(rope.rope_angles(p, h), axis=-1)
        want = jax.jit(table)(positions)
        got = jax.jit(lambda p, h=h: written_once(table(p, h)))(positions)
        np.testing.assert_array_equal(got, want)


def test_rope_scores_depend_only_on_offset():
    q, k = _rand(9, 1, 1, 1, 16), _rand(10, 1, 1, 1, 16)
    score = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([[m]])) *
                                       apply_rope(k, jnp.array([[n]]))))
    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(np.sum(q * k)), rtol=1e-5)


def _naive_attention(q, k, v, q_pos, k_pos, window, q_seg=None, k_seg=None):
    """Loops over batch, head and query; head n reads KV head n // (N // K)."""
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    out = np.zeros((b, t, n, h), np.float64)
    for bi, ni, i in itertools.product(range(b), range(n), range(t)):
        scores, values = [], []
        for j in range(k.shape[1]):
            visible = (k_pos[bi, j] >= 0 and k_pos[bi, j] <= q_pos[bi, i]
                       and q_pos[bi, i] - k_pos[bi, j] < window
                       and (q_seg is None or q_seg[bi, i] == k_seg[bi, j]))
            if visible:
                scores.append(q[bi, i, ni] @ k[bi, j, ni // groups] / np.sqrt(h))
                values.append(v[bi, j, ni // groups])
        if not scores:  # a padding query sees nothing; its output is unspecified
            continue
        p = np.exp(np.array(scores) - max(scores))
        out[bi, i, ni] = (p / p.sum()) @ np.array(values)
    return out


CASES = {
    'mha_full': dict(heads=4, kv_heads=4, window=masks.NO_WINDOW, segments=False),
    'gqa_window': dict(heads=4, kv_heads=2, window=3, segments=False),
    'mqa_window': dict(heads=4, kv_heads=1, window=2, segments=False),
    'gqa_segments_padding': dict(heads=6, kv_heads=2, window=4, segments=True),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_reference_attention_vs_naive_loop(name):
    case = CASES[name]
    b, t, h = 2, 7, 8
    q = _rand(11, b, t, case['heads'], h)
    k, v = _rand(12, b, t, case['kv_heads'], h), _rand(13, b, t, case['kv_heads'], h)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    seg = None
    if case['segments']:
        # Row 0: two packed documents (positions restart); row 1: two padding slots.
        pos[0] = [0, 1, 2, 0, 1, 2, 3]
        seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1] * t], np.int32)
        pos[1] = [-1, -1, 0, 1, 2, 3, 4]
    got = reference.mha_reference(q, k, v, q_positions=pos, kv_positions=pos,
                                  window=case['window'], q_segment_ids=seg, kv_segment_ids=seg)
    expected = _naive_attention(q, k, v, pos, pos, case['window'], seg, seg)
    valid = pos >= 0  # padding queries have no visible key: their output is unspecified
    np.testing.assert_allclose(np.asarray(got)[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_reference_attention_grads():
    q, k, v = _rand(14, 1, 5, 4, 4), _rand(15, 1, 5, 2, 4), _rand(16, 1, 5, 2, 4)
    pos = jnp.arange(5, dtype=jnp.int32)[None]
    f = lambda q, k, v: reference.mha_reference(q, k, v, q_positions=pos, kv_positions=pos,
                                                window=3)
    check_grads(f, (q, k, v), order=1, **GRAD_TOL)
