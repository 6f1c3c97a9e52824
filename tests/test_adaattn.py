"""AdaAttn (SPEC §4): entropy tools, adaptive rank, adaptive precision, the unified module."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import adaptive
from rustgpt_jax.adaptive import adaattn, core
from rustgpt_jax.adaptive import precision as prec
from rustgpt_jax.config import PrecisionPolicy
from rustgpt_jax.ops import reference

B, T, N, K, H = 2, 16, 4, 2, 8
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
KW = dict(q_positions=POS, kv_positions=POS)


def _np_entropy(p):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)


def test_entropy_tools_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 6))
    mask = rng.random((3, 5, 6)) < 0.7
    mask[..., 0] = True
    p = np.where(mask, np.exp(logits), 0)
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(adaptive.row_entropy(p, mask), _np_entropy(p), rtol=1e-5)
    count = mask.sum(-1)
    expected = np.where(count > 1, _np_entropy(p) / np.log(np.maximum(count, 2)), 0)
    np.testing.assert_allclose(adaptive.normalized_entropy(p, mask), expected, rtol=1e-5)
    uniform = np.where(mask, 1.0, 0.0) / count[..., None]
    np.testing.assert_allclose(adaptive.normalized_entropy(uniform, mask),
                               (count > 1).astype(float), atol=1e-6)
    np.testing.assert_allclose(adaptive.row_entropy(np.eye(4)), 0.0)
    e = adaptive.row_entropy(p, mask)
    np.testing.assert_allclose(adaptive.reduce_entropy(e, 'mean'), _np_entropy(p).mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(adaptive.reduce_entropy(e, 'sum'), _np_entropy(p).sum(),
                               rtol=1e-5)
    assert adaptive.reduce_entropy(e, 'none') is e
    with pytest.raises(ValueError, match='reduction'):
        adaptive.reduce_entropy(e, 'max')


def test_focus_score_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, K, N // K, T, T)) * 3
    mask = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    p = np.where(mask[:, None, None], np.exp(logits), 0)
    p /= p.sum(-1, keepdims=True)
    h = _np_entropy(p)  # (B, K, G, T)
    expected = np.clip(1 - h.mean(-1) / np.log(T) + h.var(-1) / np.log(T) ** 2, 0, 1)
    np.testing.assert_allclose(adaptive.focus_score(p, mask), expected, rtol=1e-5)


@pytest.mark.parametrize('length, backend, expected', [
    (100, 'gpu', 0.0), (512, 'gpu', 0.0), (768, 'gpu', 0.125), (4096, 'gpu', 0.2),
    (100, 'cpu', 0.1), (1024, 'cpu', 0.3)])
def test_hardware_penalty(length, backend, expected):
    assert adaptive.hardware_penalty(length, backend) == pytest.approx(expected)


@pytest.mark.parametrize('focus, expected', [(0.4, 0), (0.6, 1), (0.9, 2), (1.0, 2)])
def test_rank_branch_splits_the_low_rank_interval(focus, expected):
    # ranks (4, 2) in descending order: branch 1 = rank 4, branch 2 = rank 2.
    assert int(adaptive.rank_branch(jnp.float32(focus), 0.5, 2)) == expected


def _peaked_qkv(seed=0):
    """Each query is a large multiple of its own key: attention is ~one-hot on the diagonal."""
    k = jax.random.normal(jax.random.PRNGKey(seed), (B, T, K, H))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    q = 400.0 * jnp.repeat(k, N // K, axis=2)
    v = jax.random.normal(jax.random.PRNGKey(seed + 1), (B, T, K, H))
    return q, k, v


def _uniform_qkv(seed=0):
    _, k, v = _peaked_qkv(seed)
    return jnp.zeros((B, T, N, H)), k, v


def _run(module, q, k, v):
    """(unboxed params, output, {stat name: value}) of one call, jitted."""
    params = nn.unbox(jax.jit(lambda q, k, v: module.init(jax.random.PRNGKey(0), q, k, v, **KW))(
        q, k, v))
    out, mutated = jax.jit(lambda p, q, k, v: module.apply(
        p, q, k, v, mutable=['intermediates'], **KW))(params, q, k, v)
    stats = jax.tree.map(lambda x: x[0], mutated['intermediates'],
                         is_leaf=lambda x: isinstance(x, tuple))
    return params, out, stats


def test_adaptive_rank_picks_low_rank_on_peaked_and_dense_on_uniform():
    module = adaptive.AdaptiveRankAttention(N, K, H, ranks=(4,), threshold=0.8, backend='gpu')
    q, k, v = _peaked_qkv()
    params, out, stats = _run(module, q, k, v)
    assert float(stats['low_rank']) == 1.0 and int(stats['rank']) == 4
    assert float(stats['focus']) > 0.99
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    proj = params['params']['projections']
    expected = adaptive.low_rank_attention(q, k, v, mask, proj['q_rank_4'], proj['k_rank_4'], H)
    np.testing.assert_allclose(out, expected, atol=1e-5)

    q, k, v = _uniform_qkv()
    _, out, stats = _run(module, q, k, v)
    assert float(stats['low_rank']) == 0.0 and int(stats['rank']) == H
    assert float(stats['focus']) < 0.5
    np.testing.assert_allclose(out, reference.mha_reference(q, k, v, **KW), atol=1e-6)


def test_cpu_penalty_keeps_default_threshold_dense():
    # SPEC §4 literally: threshold 0.95 + 0.1 on CPU > 1 >= focus, so always dense there.
    module = adaptive.AdaptiveRankAttention(N, K, H, ranks=(4,), threshold=0.95, backend='cpu')
    _, _, stats = _run(module, *_peaked_qkv())
    assert float(stats['low_rank']) == 0.0


def test_low_rank_equals_dense_at_full_rank():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in
               enumerate([(B, T, N, H), (B, T, K, H), (B, T, K, H)]))
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    dense = reference.mha_reference(q, k, v, **KW)
    eye_q, eye_k = jnp.broadcast_to(jnp.eye(H), (N, H, H)), jnp.broadcast_to(jnp.eye(H), (K, H, H))
    np.testing.assert_allclose(adaptive.low_rank_attention(q, k, v, mask, eye_q, eye_k, H),
                               dense, atol=1e-5)
    # Any orthogonal projection shared by q and k preserves q . k as well.
    rot = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(9), (H, H)))[0]
    np.testing.assert_allclose(adaptive.low_rank_attention(
        q, k, v, mask, jnp.broadcast_to(rot, (N, H, H)), jnp.broadcast_to(rot, (K, H, H)), H),
        dense, atol=1e-5)
    # Through the module: rank = head_dim, forced low-rank, identity init.
    module = adaptive.AdaptiveRankAttention(N, K, H, ranks=(H,), threshold=0.0, backend='gpu')
    _, out, stats = _run(module, q, k, v)
    assert float(stats['low_rank']) == 1.0
    np.testing.assert_allclose(out, dense, atol=1e-5)


@pytest.mark.parametrize('policy, max_abs, length, levels, expected', [
    ('quality', 1.0, 128, ('fp32', 'bf16', 'fp16'), 'fp32'),
    ('balanced', 1.0, 128, ('fp32', 'bf16', 'fp16'), 'bf16'),
    ('speed', 1.0, 128, ('fp32', 'bf16', 'fp16'), 'fp16'),
    ('speed', 1.0, 128, ('fp32', 'bf16', 'fp16', 'fp8'), 'fp8'),
    ('balanced', 1.0, 128, ('fp32', 'bf16', 'fp16', 'fp8'), 'bf16'),
    ('speed', 20.0, 128, ('fp32', 'bf16', 'fp16'), 'bf16'),  # overflow risk: one up
    ('speed', 20.0, 128, ('fp32', 'bf16', 'fp16', 'fp8'), 'fp16'),
    ('quality', 20.0, 128, ('fp32', 'bf16', 'fp16'), 'fp32'),  # already the top
    ('balanced', 1.0, 4096, ('fp32', 'bf16', 'fp16'), 'fp16'),  # long sequence: one down
    ('quality', 1.0, 4096, ('fp32', 'bf16', 'fp16'), 'bf16'),
    ('speed', 1.0, 4096, ('fp32', 'bf16', 'fp16'), 'fp16'),  # already the bottom
    ('balanced', 20.0, 4096, ('fp32', 'bf16', 'fp16'), 'bf16'),  # both: cancel
    ('balanced', 10.0, 2048, ('fp32', 'bf16', 'fp16'), 'bf16'),  # strict inequalities
])
def test_precision_policy_table(policy, max_abs, length, levels, expected):
    index = adaptive.choose_precision(PrecisionPolicy(policy), max_abs, length, levels)
    assert levels[int(index)] == expected


def test_levels_capability_and_validation():
    assert adaptive.supported_levels('cpu') == ('fp32', 'bf16', 'fp16')
    assert adaptive.supported_levels('tpu') == ('fp32', 'bf16', 'fp16')
    with pytest.raises(ValueError, match='subset'):
        adaptive.choose_precision(PrecisionPolicy.SPEED, 1.0, 8, ('fp64',))
    with pytest.raises(ValueError, match='ordered'):
        adaptive.choose_precision(PrecisionPolicy.SPEED, 1.0, 8, ('fp16', 'fp32'))


@pytest.mark.parametrize('level, atol', [('fp32', 1e-5), ('bf16', 5e-2), ('fp16', 5e-3),
                                         ('fp8', 2.5e-1)])
def test_precision_branches_match_reference(level, atol):
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in
               enumerate([(B, T, N, H), (B, T, K, H), (B, T, K, H)]))
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    out = core.masked_attention(q, k, v, mask, H ** -0.5, prec.LEVEL_DTYPES[level])
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference.mha_reference(q, k, v, **KW), atol=atol)


def test_scores_are_clamped_to_the_dtype_range():
    # q . k * scale = 300 * 300 * 8 / sqrt(8) ~ 2.5e5 overflows fp16 (max 65504).
    q = jnp.full((1, 2, 1, H), 300.0)
    k = jnp.stack([jnp.full((H,), 300.0), jnp.full((H,), -1.0)])[None, :, None]
    v = jnp.arange(2 * H, dtype=jnp.float32).reshape(1, 2, 1, H)
    mask = jnp.ones((1, 2, 2), bool)
    out = core.masked_attention(q, k, v, mask, H ** -0.5, jnp.float16)
    limit = float(jnp.finfo(jnp.float16).max)
    scores = np.clip(np.array([300.0 * 300 * H, -300.0 * H]) / math.sqrt(H), -limit, limit)
    p = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 0, 0], p @ np.asarray(v[0, :, 0]), atol=1e-2)


def test_adaptive_precision_module_switches_at_run_time():
    module = adaptive.AdaptivePrecisionAttention(H, PrecisionPolicy.SPEED,
                                                 levels=('fp32', 'bf16', 'fp16'))
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), s) for i, s in
               enumerate([(B, T, N, H), (B, T, K, H), (B, T, K, H)]))
    params = module.init(jax.random.PRNGKey(0), q, k, v, **KW)
    run = jax.jit(lambda q, k, v: module.apply(params, q, k, v, mutable=['intermediates'], **KW))

    def call(q, k, v):
        out, mutated = run(q, k, v)
        return out, {'precision': mutated['intermediates']['precision'][0]}

    out, stats = call(q, k, v)
    np.testing.assert_array_equal(stats['precision'], [0, 0, 1, 0])  # fp16
    np.testing.assert_allclose(out, reference.mha_reference(q, k, v, **KW), atol=5e-3)
    out, stats = call(q * 20, k, v)  # overflow risk: one level up, no retrace
    np.testing.assert_array_equal(stats['precision'], [0, 1, 0, 0])  # bf16
    # bf16 keeps 8 mantissa bits: logits of size ~100 carry errors of ~0.4.
    np.testing.assert_allclose(out, reference.mha_reference(q * 20, k, v, **KW), atol=2.5e-1)
    assert run._cache_size() == 1


def test_unified_joint_decision():
    module = adaattn.AdaAttn(N, K, H, ranks=(4,), threshold=0.8, policy=PrecisionPolicy.BALANCED,
                             levels=('fp32', 'bf16', 'fp16'), backend='gpu')
    _, out, stats = _run(module, *_uniform_qkv())
    np.testing.assert_allclose(stats['entropy'], 1.0, atol=1e-5)  # uniform: e = 1
    assert float(stats['low_rank']) == 0.0
    np.testing.assert_array_equal(stats['precision'], [0, 1, 0, 0])  # policy level (bf16)
    params, out, stats = _run(module, *_peaked_qkv())
    assert float(stats['entropy']) < 0.01 and float(stats['low_rank']) == 1.0
    np.testing.assert_array_equal(stats['precision'], [1, 0, 0, 0])  # one up with low rank
    q, k, v = _peaked_qkv()
    mask = jnp.tril(jnp.ones((T, T), bool))[None].repeat(B, 0)
    proj = params['params']['projections']
    np.testing.assert_allclose(
        out, adaptive.low_rank_attention(q, k, v, mask, proj['q_rank_4'], proj['k_rank_4'], H),
        atol=1e-5)
