"""Cached decoding (prefill + one-token steps) against the full forward pass, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding_support import full_logits, init_params, tiny_config

from rustgpt_jax.decoding import (
    cache_batch_axes,
    context_limit,
    decode_step,
    init_cache,
    left_pad,
    prefill,
    prompt_positions,
    reorder_cache,
    unstack_layers,
)
from rustgpt_jax.models import build_model

TOL = 1e-5


def _cached_logits(model, params, seqs, lengths, prompt_len):
    """Logits at every position from prefill(prompt) + one decode step per later token.

    Args: seqs (B, S) right-aligned after left padding; lengths (B,) true lengths;
    prompt_len: tokens per row fed by the prefill (the rest one at a time).
    Returns (B, S, V) aligned with seqs.
    """
    b, s = seqs.shape
    pad = s - lengths
    # Left-padded prompt: the first `prompt_len` real tokens of each row.
    prompts = [seqs[r, pad[r]:pad[r] + prompt_len].tolist() for r in range(b)]
    tokens, plens = left_pad(prompts)
    run = jax.jit(lambda p, c, t, n: model.apply(
        {'params': p, 'cache': c}, t, positions=prompt_positions(n, t.shape[1]),
        decode=True, mutable=['cache']))
    logits, variables = run(params, init_cache(model, b), tokens, plens)  # (B, P, V)
    cache = variables['cache']
    per_row = [list(np.asarray(logits[r, tokens.shape[1] - prompt_len:])) for r in range(b)]
    step = jax.jit(lambda p, c, t, pos: decode_step(model, p, c, t, pos))
    for i in range(prompt_len, int(lengths.min())):
        tok = jnp.asarray([seqs[r, pad[r] + i] for r in range(b)], jnp.int32)
        out, cache = step(params, cache, tok, jnp.full((b,), i, jnp.int32))
        for r in range(b):
            per_row[r].append(np.asarray(out[r]))
    return [np.stack(rows) for rows in per_row]


# (config overrides, sequence length). The window case runs past max_seq_len = 8: with
# RoPE the ring of W = 4 slots has no length limit, and it wraps four times here.
CASES = {
    'full_causal_mha': (dict(), 14),
    'sliding_window_gqa': (dict(num_kv_heads=2, window_size=4, max_seq_len=8), 18),
    'mqa_full_causal': (dict(num_kv_heads=1), 14),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_cached_logits_equal_full_forward(name):
    overrides, length = CASES[name]
    config = tiny_config(**overrides)
    model, params = build_model(config), init_params(config)
    # The oracle: the same weights (RoPE has no position table) with room for `length`.
    oracle = build_model(config.replace(max_seq_len=32))
    rng = np.random.default_rng(0)
    lengths = np.array([length, length - 5], np.int32)  # row 1 is left-padded
    seqs = np.zeros((2, length), np.int32)
    for r, n in enumerate(lengths):
        seqs[r, length - n:] = rng.integers(3, 64, n)
    got = _cached_logits(model, params, seqs, lengths, prompt_len=3)
    for r, n in enumerate(lengths):
        expected = np.asarray(full_logits(oracle, params, seqs[r:r + 1, length - n:])[0])
        assert len(got[r]) == length - 5
        np.testing.assert_allclose(got[r], expected[:len(got[r])], atol=TOL, rtol=TOL)
    if config.window_size:
        assert context_limit(config) is None
        assert config.cache_length == 4 and length - 5 > 2 * config.max_seq_len - 4
    else:
        assert context_limit(config) == config.max_seq_len


def test_unstacked_layers_decode_like_scanned():
    config = tiny_config(num_kv_heads=2, window_size=4)
    params = init_params(config)
    flat_config, flat_params = unstack_layers(config, params)
    assert not flat_config.scan_layers and 'layer_1' in flat_params
    tokens, lengths = left_pad([[5, 6, 7, 8, 9], [10, 11]])
    outs = []
    for cfg, p in ((config, params), (flat_config, flat_params)):
        model = build_model(cfg)

        def run(p, model=model):
            _, cache = prefill(model, p, init_cache(model, 2), tokens, lengths)
            return decode_step(model, p, cache, jnp.array([3, 4]), jnp.asarray(lengths))[0]
        outs.append(np.asarray(jax.jit(run)(p)))
    np.testing.assert_allclose(outs[0], outs[1], atol=TOL, rtol=TOL)


def test_reorder_cache_gathers_batch_axis():
    for scan in (True, False):
        model = build_model(tiny_config(num_kv_heads=2, scan_layers=scan))
        cache = init_cache(model, 3)
        axes = cache_batch_axes(model)
        names = [str(path[-1].key) for path, _ in
                 jax.tree_util.tree_flatten_with_path(cache)[0]]
        marked = jax.tree_util.tree_map(
            lambda x, a: x + 7 if a < 0 else x + jnp.expand_dims(
                jnp.arange(3), [d for d in range(x.ndim) if d != a]).astype(x.dtype),
            cache, axes)
        moved = reorder_cache(marked, jnp.array([2, 2, 0]), axes)
        for name, leaf, a in zip(names, jax.tree_util.tree_leaves(moved),
                                 jax.tree_util.tree_leaves(axes)):
            if name == 'index':  # the shared column counter has no batch axis
                assert a == -1
                np.testing.assert_array_equal(leaf, 7)
                continue
            assert a == (1 if scan else 0)
            rows = np.moveaxis(np.asarray(leaf), a, 0)
            base = -1 if leaf.dtype == jnp.int32 else 0
            np.testing.assert_array_equal(rows.reshape(3, -1)[:, 0], np.array([2, 2, 0]) + base)


def test_left_pad_rejects_empty_prompt():
    with pytest.raises(ValueError, match='empty'):
        left_pad([[1, 2], []])
    tokens, lengths = left_pad([[1, 2, 3], [4]], pad_id=0, multiple=4)
    np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
    np.testing.assert_array_equal(lengths, [3, 1])


def test_prefill_skips_an_empty_cache_and_attends_over_a_filled_one():
    # runtime.decode_attention.cached_chunk_attention: an empty cache (every position
    # negative) is skipped, so NaN in its slots cannot reach the output; a partly
    # filled one is attended over, as the dense reference over [cache, chunk] computes.
    from rustgpt_jax.ops.reference import mha_reference
    from rustgpt_jax.runtime.decode_attention import cached_chunk_attention

    rng = np.random.default_rng(0)
    b, t, n, kv, h, c = 2, 5, 4, 2, 16, 12
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
    positions = jnp.asarray(np.arange(t)[None].repeat(b, 0) + 7, jnp.int32)
    step = jax.jit(lambda ck, cv, cp: cached_chunk_attention(
        mha_reference, q, k, v, ck, cv, q_positions=positions, cache_positions=cp))

    empty = jnp.full((b, c), -1, jnp.int32)
    nan = jnp.full((b, c, kv, h), jnp.nan, jnp.float32)
    alone = mha_reference(q, k, v, q_positions=positions, kv_positions=positions)
    np.testing.assert_allclose(np.asarray(step(nan, nan, empty)), np.asarray(alone),
                               rtol=1e-6, atol=1e-6)

    ck, cv = (jnp.asarray(rng.normal(size=(b, c, kv, h)), jnp.float32) for _ in range(2))
    filled = jnp.asarray(np.where(np.arange(c) < 7, np.arange(c), -1)[None].repeat(b, 0),
                         jnp.int32)
    over = mha_reference(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1),
                         q_positions=positions,
                         kv_positions=jnp.concatenate([filled, positions], 1))
    got = np.asarray(step(ck, cv, filled))
    np.testing.assert_allclose(got, np.asarray(over), rtol=1e-6, atol=1e-6)
    assert np.abs(got - np.asarray(alone)).max() > 1e-3  # the cache mattered
