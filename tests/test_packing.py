"""Packed projections (nn.packing, `runtime.Execution(packed=True)`): the same function
in another parameter layout, and the decode form built from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decoding_cache import _cached_logits
from test_decoding_support import full_logits, init_params, tiny_config

from rustgpt_jax.decoding import prepare_for_decode, unstack_layers
from rustgpt_jax.models import build_model
from rustgpt_jax.nn.packing import pack_projections, unpack_projections
from rustgpt_jax.runtime import Execution, MatvecImpl

PACKED = Execution(packed=True)

CASES = {
    'swiglu_gqa_scanned': dict(num_kv_heads=2),
    'swiglu_bias_unrolled': dict(use_bias=True, scan_layers=False),
    'relu_mqa_bias': dict(feed_forward='relu', num_kv_heads=1, use_bias=True),
}


def _tokens():
    return np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


@pytest.mark.parametrize('name', sorted(CASES))
def test_packed_model_computes_the_same_logits(name):
    config = tiny_config(**CASES[name])
    params = jax.tree_util.tree_map(  # non-zero biases, so a misplaced one shows
        lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), init_params(config))
    packed = pack_projections(params)
    expected = full_logits(build_model(config), params, _tokens())
    got = full_logits(build_model(config, PACKED), packed, _tokens())
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The layout init creates is the layout packing produces.
    init_shapes = jax.tree_util.tree_map(jnp.shape, init_params(config, PACKED))
    assert init_shapes == jax.tree_util.tree_map(jnp.shape, packed)
    # Unpacking restores the original arrays exactly.
    back = unpack_projections(config, packed)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_packed_gradients_are_packed_standard_gradients():
    config = tiny_config(num_kv_heads=2)
    params = init_params(config)
    packed = pack_projections(params)
    tokens = _tokens()

    def loss(model):
        def fn(p):
            logits = model.apply({'params': p}, tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        return jax.jit(jax.grad(fn))

    grads = loss(build_model(config))(params)
    packed_grads = loss(build_model(config, PACKED))(packed)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
                           packed_grads, pack_projections(grads))


@pytest.mark.parametrize('matvec_impl,tie', [('xla', False), ('cpu_gemv', False),
                                             ('cpu_gemv', True)])
def test_decode_form_cached_logits_equal_full_forward(matvec_impl, tie):
    # cpu_gemv: packed kernels and the output head ((D, V), or the tied (V, D) table).
    if matvec_impl == 'cpu_gemv':
        from test_native_cpu_gemv import _require_kernel
        _require_kernel()
    config = tiny_config(num_kv_heads=2, window_size=4, max_seq_len=8, tie_embeddings=tie)
    params = init_params(config)
    decode = prepare_for_decode(config, params, matvec=matvec_impl)
    assert decode.execution.packed and not decode.config.scan_layers
    assert decode.execution.matvec.value == matvec_impl
    # Every starting layout reaches the same decode form: unrolled, or already packed.
    for start, packed in ((unstack_layers(config, params), False),
                          ((config, pack_projections(params)), True)):
        other = prepare_for_decode(*start, params_packed=packed, matvec=matvec_impl)
        assert other.config == decode.config and other.execution == decode.execution
        jax.tree_util.tree_map(np.testing.assert_array_equal, other.params, decode.params)
    rng = np.random.default_rng(3)
    length = 14
    lengths = np.array([length, length - 4], np.int32)
    seqs = np.zeros((2, length), np.int32)
    for r, n in enumerate(lengths):
        seqs[r, length - n:] = rng.integers(3, 64, n)
    got = _cached_logits(decode.model, decode.params, seqs, lengths, prompt_len=3)
    oracle = build_model(config.replace(max_seq_len=32))  # the standard layout, no cache
    for r, n in enumerate(lengths):
        expected = np.asarray(full_logits(oracle, params, seqs[r:r + 1, length - n:])[0])
        np.testing.assert_allclose(got[r], expected[:len(got[r])], atol=1e-5, rtol=1e-5)


def test_hf_interop_round_trips_through_the_packed_layout():
    from rustgpt_jax.interop.hf import params_from_hf, params_to_hf
    config = tiny_config(num_kv_heads=2)
    params = init_params(config)
    state = params_to_hf(params, config)
    # Export of a packed model, unpacked = export of the standard one.
    packed = pack_projections(params)
    for name, array in params_to_hf(unpack_projections(config, packed), config).items():
        np.testing.assert_array_equal(array, state[name], err_msg=name)
    # Packed params are refused with the fix named, not exported wrongly.
    with pytest.raises(ValueError, match='packed layout.*unpack_projections'):
        params_to_hf(packed, config)
    # The standard import, packed = the packed params.
    imported = pack_projections(params_from_hf(state, config))
    jax.tree_util.tree_map(np.testing.assert_array_equal, imported, packed)


def test_packed_kernels_resolve_under_every_sharding_rule_table():
    import flax.linen as nn

    from rustgpt_jax.sharding.rules import Strategy, logical_axis_rules
    config = tiny_config(num_kv_heads=2, scan_layers=False)
    model = build_model(config, PACKED)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    specs = nn.get_partition_spec(boxed)['params']['layer_0']
    qkv = specs['attention']['qkv_proj']['kernel']
    w13 = specs['ffn']['w13']['kernel']
    assert tuple(qkv) == ('qkv_heads', 'head_dim', 'embed')
    assert tuple(w13) == ('mlp_packed', 'embed')
    fsdp_tp = logical_axis_rules(Strategy.FSDP_TP)
    # Fused dims stay whole (a split would mix q and kv heads); embed follows FSDP.
    assert tuple(nn.logical_to_mesh_axes(qkv, fsdp_tp)) == (None, None, 'data')
    assert tuple(nn.logical_to_mesh_axes(w13, fsdp_tp)) == (None, 'data')
    w2 = specs['ffn']['w2']['kernel']  # output-major (D, F): still split over 'model'
    assert tuple(nn.logical_to_mesh_axes(w2, fsdp_tp)) == ('data', 'model')


@pytest.mark.parametrize('lead,rows,blocks', [((1,), 12, 2), ((2, 3), 12, 3), ((1, 1), 8, 8),
                                               ((3, 4), 12, 2)])  # 12 rows > MATVEC_MAX_ROWS
def test_projection_row_blocks_equal_the_whole_matrix_product(lead, rows, blocks):
    from rustgpt_jax.nn.dense import Projection
    rng = np.random.default_rng(0)
    x = rng.normal(size=lead + (5,)).astype(np.float32)
    kernel = rng.normal(size=(rows, 5)).astype(np.float32)  # output-major (out, in)
    layer = Projection(features=(rows,), kernel_axes=('embed', 'mlp'),
                       execution=Execution(packed=True, row_blocks=(('w2', blocks),)), name='w2')
    got = layer.apply({'params': {'kernel': kernel}}, x)
    expected = x.astype(np.float64) @ kernel.T.astype(np.float64)  # numpy, not XLA
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('feed_forward', ['swiglu', 'relu'])
def test_matvec_row_blocks_leave_the_logits_unchanged(feed_forward):
    config = tiny_config(num_kv_heads=2, feed_forward=feed_forward)
    params = init_params(config)
    packed = pack_projections(params)
    ffn = ('w13', 'w2') if feed_forward == 'swiglu' else ('up', 'down')
    blocks = (('qkv_proj', 4), ('o_proj', 2), (ffn[0], 4), (ffn[1], 8))
    split = Execution(packed=True, row_blocks=blocks)
    # (1, 8): 8 rows, evaluated in blocks; (2, 12): 24 rows, whole (MATVEC_MAX_ROWS).
    for tokens in (_tokens()[:1, :8], _tokens()):
        expected = full_logits(build_model(config), params, tokens)
        got = full_logits(build_model(config, split), packed, tokens)  # same params
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('blocks,message', [
    ((('w2', 3),), 'w2 has 32 output rows, not divisible into 3 blocks'),
    ((('w4', 2),), "unknown projection 'w4'"),
    ((('w2', 0),), 'blocks must be an integer >= 1'),
    ('w2', 'must be a tuple of'),
])
def test_matvec_row_blocks_are_validated(blocks, message):
    params = init_params(tiny_config())
    with pytest.raises(ValueError, match='Execution.row_blocks') as error:
        prepare_for_decode(tiny_config(), params, row_blocks=blocks)
    assert message in str(error.value)
    with pytest.raises(ValueError, match='set packed=True'):
        Execution(row_blocks=(('w2', 2),))


def test_prepare_for_decode_picks_row_blocks_per_backend():
    from rustgpt_jax.decoding import default_row_blocks
    from rustgpt_jax.training.checkpoint import config_from_dict, config_to_dict
    config = tiny_config()
    assert default_row_blocks(config, 'cpu') == (('w2', 2),)
    assert default_row_blocks(tiny_config(feed_forward='relu'), 'cpu') == (('down', 2),)
    assert default_row_blocks(config, 'gpu') == ()
    params = init_params(config)
    decode = prepare_for_decode(config, params)
    assert decode.execution.row_blocks == default_row_blocks(config)
    assert prepare_for_decode(config, params, row_blocks=()).execution.row_blocks == ()
    # A checkpoint's JSON config (lists) reads back as the same config.
    import json
    saved = json.loads(json.dumps(config_to_dict(decode.config)))
    assert config_from_dict(saved) == decode.config


def test_projection_rejects_row_blocks_that_do_not_divide_its_rows():
    from rustgpt_jax.nn.dense import Projection
    layer = Projection(features=(12,), kernel_axes=('embed', 'mlp'),
                       execution=Execution(packed=True, row_blocks=(('w2', 5),)), name='w2')
    kernel = np.zeros((12, 5), np.float32)
    for rows in (1, 32):  # within and beyond MATVEC_MAX_ROWS
        with pytest.raises(ValueError, match='12 output rows do not split into 5 row blocks'):
            layer.apply({'params': {'kernel': kernel}}, np.zeros((rows, 5), np.float32))


def test_matvec_impl_is_validated_and_chosen_per_backend():
    from rustgpt_jax.decoding import default_matvec_impl
    from rustgpt_jax.native import cpu_gemv
    with pytest.raises(ValueError, match='Execution.matvec') as error:
        Execution(packed=True, matvec='fast')
    assert "'xla'" in str(error.value) and "'cpu_gemv'" in str(error.value)
    # The kernel serves quantized weights in the standard layout too (runtime.products).
    assert Execution(matvec='cpu_gemv').matvec == MatvecImpl.CPU_GEMV
    config = tiny_config()
    assert default_matvec_impl(config, 'gpu') == MatvecImpl.XLA
    assert default_matvec_impl(tiny_config(dtype='bfloat16'), 'cpu') == MatvecImpl.XLA
    assert default_matvec_impl(config, 'cpu') == (
        MatvecImpl.CPU_GEMV if cpu_gemv.available() else MatvecImpl.XLA)
    # An explicit choice is kept.
    params = init_params(config)
    assert prepare_for_decode(config, params, matvec='xla').execution.matvec == MatvecImpl.XLA


def test_cpu_gemv_falls_back_to_xla_with_a_warning_where_it_cannot_run(monkeypatch):
    from rustgpt_jax.native import cpu_gemv
    config = tiny_config(num_kv_heads=2)
    params = init_params(config)
    packed = pack_projections(params)
    gemv = Execution(packed=True, matvec='cpu_gemv')
    tokens = _tokens()[:1, :6]  # 6 rows: within the kernel's 8
    expected = full_logits(build_model(config), params, tokens)
    cpu_gemv.available()  # settle the real state before faking it
    monkeypatch.setitem(cpu_gemv._state, 'ok', False)
    monkeypatch.setitem(cpu_gemv._state, 'reason', 'no compiler (test)')
    cpu_gemv.warn_unavailable_once.cache_clear()
    from rustgpt_jax.decoding import default_matvec_impl
    try:
        with pytest.warns(RuntimeWarning, match=r"falls back to XLA's dot: no compiler \(test\)"):
            got = full_logits(build_model(config, gemv), packed, tokens)
        cpu_gemv.warn_unavailable_once.cache_clear()
        with pytest.warns(RuntimeWarning, match=r'no compiler \(test\)'):  # decoding's default
            assert default_matvec_impl(config, 'cpu') == MatvecImpl.XLA
    finally:
        cpu_gemv.warn_unavailable_once.cache_clear()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('field', ['packed_projections', 'matvec_row_blocks', 'matvec_impl'])
def test_removed_config_fields_name_their_replacement(field):
    value = {'packed_projections': True, 'matvec_row_blocks': (('w2', 2),),
             'matvec_impl': 'cpu_gemv'}[field]
    with pytest.raises(ValueError, match=f'ModelConfig.{field} was removed: .*Execution'):
        tiny_config(**{field: value})
    with pytest.raises(AttributeError, match=f'ModelConfig.{field} was removed'):
        bool(getattr(tiny_config(), field))  # an old `if config.packed_projections:`
    # An old gin file that binds the field gets the same message.
    from rustgpt_jax.train import load_run_config
    with pytest.raises(ValueError, match=f'ModelConfig.{field} was removed'):
        load_run_config(['configs/demo.gin'], [f'ModelConfig.{field} = {value!r}'])


def test_a_checkpoint_saved_with_the_packed_layout_still_loads(tmp_path):
    # A checkpoint written before the runtime layer: its JSON config names
    # packed_projections / matvec fields and its params are packed.
    from rustgpt_jax.training.checkpoint import config_from_dict, config_to_dict, legacy_packed
    config = tiny_config(num_kv_heads=2)
    saved = config_to_dict(config)
    saved.update(packed_projections=True, matvec_row_blocks=[['w2', 2]], matvec_impl='cpu_gemv')
    assert config_from_dict(saved) == config and legacy_packed(saved)
    assert not legacy_packed(config_to_dict(config))


def test_execution_kernel_settings_reach_every_gemv_call():
    from test_native_cpu_gemv import _require_kernel
    _require_kernel()
    config = tiny_config(num_kv_heads=2)
    decode = prepare_for_decode(config, init_params(config), matvec='cpu_gemv', gemv_threads=2,
                                gemv_spin_us=123)
    assert decode.execution.gemv_threads == 2 and decode.execution.gemv_spin_us == 123
    tokens = jnp.zeros((1, 1), jnp.int32)
    text = jax.jit(lambda p: decode.model.apply({'params': p}, tokens)).lower(
        decode.params).as_text()
    calls = text.count('custom_call @rgj_gemv')
    assert calls == 4 * config.num_layers + 1  # qkv, o, w13, w2 per layer, and the head
    assert text.count('threads = 2 : i64') == text.count('spin_us = 123 : i64') == calls
