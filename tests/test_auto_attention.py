"""AttentionImpl.AUTO: its choice per backend (GPU/TPU stubbed) and its values on CPU."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax import kernels, masks
from rustgpt_jax.config import AttentionImpl, ModelConfig
from rustgpt_jax.ops import index_mask
from rustgpt_jax.ops.reference import mha_reference
from rustgpt_jax.runtime import attention, auto
from rustgpt_jax.runtime.auto import AttentionCall
from rustgpt_jax.runtime.decode_attention import cached_decode_attention

NO_WINDOW = masks.NO_WINDOW
# The value tests run where the backend is the CPU (CI); on a GPU (the accelerator suite)
# the native cuDNN test below runs instead.
cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='CPU values')
gpu_only = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='needs a GPU')
AUTO, REF, BLOCKED = AttentionImpl.AUTO, AttentionImpl.REFERENCE, AttentionImpl.BLOCKED
PALLAS, CUDNN = AttentionImpl.PALLAS, AttentionImpl.CUDNN

TRAIN_BF16 = AttentionCall(static_window=64, dtype='bfloat16', head_dim=128)

# (backend, call, expected implementation): every branch of `auto.choose`.
CHOICES = [
    ('cpu', TRAIN_BF16, BLOCKED),
    ('cpu', AttentionCall(dtype='float32', head_dim=16), BLOCKED),
    ('cpu', AttentionCall(static_window=64, same_length=False), REF),
    ('cpu', AttentionCall(entropy=True), REF),
    ('cpu', AttentionCall(length=80), REF),  # shorter than one blocked tile (256)
    ('cpu', AttentionCall(length=256), BLOCKED),
    ('tpu', TRAIN_BF16, PALLAS),
    ('tpu', AttentionCall(same_length=False), PALLAS),
    ('gpu', TRAIN_BF16, CUDNN),
    ('gpu', AttentionCall(static_window=NO_WINDOW, dtype='float16', head_dim=64,
                          segments=True), CUDNN),
    ('gpu', AttentionCall(static_window=64, dtype='float32', head_dim=128), PALLAS),
    ('gpu', AttentionCall(static_window=None, dtype='bfloat16', head_dim=128), PALLAS),
    ('gpu', AttentionCall(static_window=64, dtype='bfloat16', head_dim=36), PALLAS),
    ('gpu', AttentionCall(static_window=64, dtype='bfloat16', head_dim=256), PALLAS),
    ('gpu', AttentionCall(static_window=64, dtype='bfloat16', head_dim=128,
                          same_length=False), PALLAS),
]


@pytest.mark.parametrize('backend, call, expected', CHOICES)
def test_choice_per_backend(backend, call, expected):
    choice = auto.choose(call, backend)
    assert choice.impl == expected
    assert choice.reason.startswith(f'{backend}: ')


def test_decode_step_choice_per_backend():
    assert [auto.choose_step(b).impl for b in ('cpu', 'tpu', 'gpu')] == [BLOCKED, BLOCKED,
                                                                         PALLAS]


def test_attention_call_reads_the_static_window_from_the_config():
    assert auto.attention_call(ModelConfig(window_size=32)) == AttentionCall(
        static_window=32, dtype='float32', head_dim=16)
    assert auto.attention_call(ModelConfig(dtype='bfloat16')).static_window == NO_WINDOW
    adaptive = auto.attention_call(ModelConfig(window_strategy='attention_entropy',
                                               max_window=16))
    assert adaptive.static_window is None and adaptive.entropy


def test_default_config_is_auto():
    assert ModelConfig().attention_impl == AUTO


def make_inputs(seed, b, t, s, n, k, h, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype),
            jax.random.normal(keys[1], (b, s, k, h), jnp.float32).astype(dtype),
            jax.random.normal(keys[2], (b, s, k, h), jnp.float32).astype(dtype))


def arange(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@cpu_only
@pytest.mark.parametrize('window, segments, n, k', [(NO_WINDOW, False, 2, 2), (5, True, 4, 1)])
def test_auto_on_cpu_has_the_reference_values_and_grads(window, segments, n, k):
    b, t, h = 2, 24, 16  # shorter than one blocked tile: AUTO runs the reference
    call = AttentionCall(static_window=window)
    kern = attention.attention_kernels(AUTO, call)
    assert kern.step is cached_decode_attention and kern.step_before_write
    assert not kern.dense_probs
    q, kk, v = make_inputs(window, b, t, t, n, k, h)
    pos = arange(b, t)
    kw = dict(q_positions=pos, kv_positions=pos, window=jnp.int32(window))
    if segments:
        seg = (jnp.arange(t)[None] >= jnp.array([[0], [11]])).astype(jnp.int32)
        kw.update(q_segment_ids=seg, kv_segment_ids=seg)

    @jax.jit
    def values_and_grads(q, kk, v):
        out = {}
        for name, fn in (('auto', kern.full), ('reference', mha_reference),
                         ('blocked', attention.attention_kernels(BLOCKED).full)):
            def loss(q, kk, v, fn=fn):
                return jnp.sum(fn(q, kk, v, **kw) * jnp.cos(jnp.arange(h)))
            out[name] = (fn(q, kk, v, **kw), jax.grad(loss, (0, 1, 2))(q, kk, v))
        return out

    out = values_and_grads(q, kk, v)
    np.testing.assert_allclose(out['auto'][0], out['reference'][0], atol=2e-5, rtol=2e-5)
    for g, rg in zip(out['auto'][1], out['reference'][1]):
        np.testing.assert_allclose(g, rg, atol=2e-5, rtol=2e-4)
    # Below one tile, the same computation as the reference, bit for bit.
    np.testing.assert_array_equal(out['auto'][0], out['reference'][0])


@cpu_only
def test_auto_on_cpu_is_the_blocked_loop_from_one_tile_on():
    b, t, n, k, h = 1, 256, 2, 1, 16
    q, kk, v = make_inputs(64, b, t, t, n, k, h)
    pos = arange(b, t)
    kw = dict(q_positions=pos, kv_positions=pos, window=jnp.int32(64))
    got = jax.jit(lambda q, kk, v: attention.attention_kernels(AUTO).full(q, kk, v, **kw))(
        q, kk, v)
    blocked = jax.jit(lambda q, kk, v: attention.attention_kernels(BLOCKED).full(
        q, kk, v, **kw))(q, kk, v)
    np.testing.assert_array_equal(got, blocked)
    np.testing.assert_allclose(got, mha_reference(q, kk, v, **kw), atol=2e-5, rtol=2e-5)


@cpu_only
def test_auto_on_cpu_takes_chunks_against_a_cache_and_entropy_layers_exactly():
    # T != S: the blocked loop refuses this layout, AUTO runs the reference.
    b, t, s, n, k, h = 1, 6, 20, 4, 2, 16
    q, kk, v = make_inputs(3, b, t, s, n, k, h)
    kw = dict(q_positions=arange(b, t) + s - t, kv_positions=arange(b, s),
              window=jnp.int32(8))
    out = attention.attention_kernels(AUTO).full(q, kk, v, **kw)
    np.testing.assert_array_equal(out, mha_reference(q, kk, v, **kw))
    assert attention.attention_kernels(AUTO, AttentionCall(entropy=True)).dense_probs


@pytest.fixture
def on_gpu(monkeypatch):
    """Makes jax.default_backend() say 'gpu' (AUTO's choice and the kernels' modes)."""
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')


def test_auto_on_stubbed_gpu_decodes_with_the_pallas_kernel(on_gpu):
    kern = attention.attention_kernels(AUTO, TRAIN_BF16)
    assert kern.step is kernels.flash_decode and not kern.step_before_write
    assert not kern.dense_probs
    assert attention.describe(AUTO, TRAIN_BF16)[0].startswith('auto -> cudnn (gpu: ')


def _lowered_text(fn, *args):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()


def test_auto_float32_lowering_for_cuda_is_the_triton_kernel(on_gpu):
    b, t, n, k, h = 1, 128, 4, 2, 64
    q, kk, v = make_inputs(0, b, t, t, n, k, h)
    full = attention.attention_kernels(AUTO, AttentionCall(static_window=32)).full
    pos = arange(b, t)

    def loss(q, kk, v, window):
        return jnp.sum(full(q, kk, v, q_positions=pos, kv_positions=pos, window=window))

    text = _lowered_text(jax.grad(loss, (0, 1, 2)), q, kk, v, jnp.int32(32))
    for name in ('flash_attention_fwd', 'flash_attention_dq', 'flash_attention_dkv'):
        assert f'name = "{name}"' in text
    assert text.count('__gpu$xla.gpu.triton') == 3


def test_cudnn_branch_lowering_keeps_the_triton_fallback(on_gpu, monkeypatch):
    # cuDNN cannot be lowered without a GPU; its XLA twin stands in, and the run-time
    # fallback branch must still be the Triton kernel.
    monkeypatch.setattr(attention, 'CUDNN_IMPLEMENTATION', 'xla')
    b, t, n, k, h = 1, 128, 4, 2, 64
    q, kk, v = make_inputs(0, b, t, t, n, k, h, jnp.bfloat16)
    full = attention.attention_kernels(AUTO, AttentionCall(static_window=32)).full
    pos = arange(b, t)
    text = _lowered_text(lambda q, kk, v, w: full(q, kk, v, q_positions=pos,
                                                  kv_positions=pos, window=w),
                         q, kk, v, jnp.int32(32))
    assert text.count('__gpu$xla.gpu.triton') == 1 and 'stablehlo.case' in text


def test_fits_index_mask_literal_cases():
    b, t = 2, 8
    pos = arange(b, t)
    ones = jnp.ones((b, t), jnp.int32)

    def fits(qp=pos, kp=pos, window=NO_WINDOW, seg=None, static=NO_WINDOW):
        return bool(index_mask.fits_index_mask(qp, kp, jnp.int32(window), seg, seg, static))

    assert fits() and fits(seg=ones) and fits(window=3, static=3)
    assert fits(window=8, static=NO_WINDOW)  # a window of T masks nothing more
    assert not fits(window=3)  # the window is not the static one
    assert not fits(qp=pos - 1, kp=pos - 1)  # left padding: negative positions
    assert not fits(seg=ones.at[1, 5:].set(0))  # a padded (or packed) row
    assert not fits(qp=pos.at[0, 4:].add(-4), kp=pos.at[0, 4:].add(-4))  # restart
    per_row = jnp.array([3, 4], jnp.int32)
    assert not bool(index_mask.fits_index_mask(pos, pos, per_row, None, None, 3))


@pytest.mark.parametrize('window', [NO_WINDOW, 1, 5, 24])
def test_index_mask_attention_is_the_predicate_on_unpadded_rows(window):
    b, t, n, k, h = 2, 24, 4, 2, 16
    q, kk, v = make_inputs(window % 7, b, t, t, n, k, h)
    pos = arange(b, t)
    out = index_mask.index_mask_attention(q, kk, v, static_window=window, implementation='xla')
    ref = mha_reference(q, kk, v, q_positions=pos, kv_positions=pos, window=window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


@cpu_only
def test_cudnn_runs_fused_only_on_batches_that_fit(monkeypatch):
    # XLA's twin of the cuDNN call; the Pallas fallback (interpret mode on CPU) replaced
    # by zeros to see which branch ran.
    monkeypatch.setattr(attention, 'CUDNN_IMPLEMENTATION', 'xla')
    b, t, n, k, h, window = 2, 16, 2, 1, 16, 6
    q, kk, v = make_inputs(5, b, t, t, n, k, h, jnp.bfloat16)
    full = attention.attention_kernels(CUDNN, AttentionCall(static_window=window)).full
    pos = arange(b, t)
    padded = pos - jnp.array([[3], [0]], jnp.int32)  # row 0 left-padded by 3

    def run(positions):
        return full(q, kk, v, q_positions=positions, kv_positions=positions,
                    window=jnp.int32(window))

    def up(x):
        return x.astype(jnp.float32)

    ref = mha_reference(up(q), up(kk), up(v), q_positions=pos, kv_positions=pos,
                        window=window)
    np.testing.assert_allclose(up(run(pos)), ref, atol=3e-2, rtol=3e-2)
    real = (padded >= 0)[:, :, None, None]
    ref_padded = mha_reference(up(q), up(kk), up(v), q_positions=padded,
                               kv_positions=padded, window=window)
    np.testing.assert_allclose(jnp.where(real, up(run(padded)), 0),
                               jnp.where(real, ref_padded, 0), atol=3e-2, rtol=3e-2)
    monkeypatch.setattr(kernels, 'flash_attention', lambda q, *a, **kw: jnp.zeros_like(q))
    assert float(jnp.max(jnp.abs(up(run(pos))))) > 0  # fused
    assert float(jnp.max(jnp.abs(up(run(padded))))) == 0  # fallback


@gpu_only
@pytest.mark.parametrize('window', [NO_WINDOW, 64])
def test_auto_runs_cudnn_natively_with_the_reference_values(window):
    # The accelerator suite's check of the real cuDNN call (bf16, GQA, head_dim 128).
    b, t, n, k, h = 2, 256, 8, 2, 128
    call = AttentionCall(static_window=window)
    assert auto.choose(call.at(*make_inputs(0, 1, 1, 1, n, k, h, jnp.bfloat16)[:2])).impl \
        == CUDNN
    q, kk, v = make_inputs(7, b, t, t, n, k, h, jnp.bfloat16)
    pos = arange(b, t)
    kw = dict(q_positions=pos, kv_positions=pos, window=jnp.int32(window))
    full = jax.jit(lambda q, kk, v: attention.attention_kernels(AUTO, call).full(
        q, kk, v, **kw))
    out = full(q, kk, v).astype(jnp.float32)
    up = [x.astype(jnp.float32) for x in (q, kk, v)]
    np.testing.assert_allclose(out, mha_reference(*up, **kw), atol=3e-2, rtol=3e-2)
    text = jax.jit(lambda q, kk, v: attention.attention_kernels(AUTO, call).full(
        q, kk, v, **kw)).lower(q, kk, v).as_text()
    assert 'cudnn' in text and '__gpu$xla.gpu.triton' in text  # fused, Triton fallback
