"""The native decode-step attention (native.cpu_gemv.decode_attention), against float64
numpy, and the runtime's two forms of one step (kernel and XLA) against each other."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_native_cpu_gemv import ISAS, _require_isa, _require_kernel

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.native import cpu_gemv
from rustgpt_jax.runtime.decode_attention import cached_decode_attention
from rustgpt_jax.runtime.execution import Execution, MatvecImpl


def _case(b, heads, g, h, c, keep=0.6, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    mask = rng.random((b, c)) < keep
    return f(b, heads, g, h), f(b, heads, h), f(b, heads, h), f(b, heads, c, h), f(
        b, heads, c, h), mask


def _oracle(q, k, v, ck, cv, mask, scale):
    """softmax over [kept slots, the token] of scale q.k, times the values, in float64."""
    q = q.astype(np.float64)
    old = np.einsum('bkgh,bkch->bkgc', q, ck) * scale
    old = np.where(mask[:, None, None], old, -np.inf)
    new = np.einsum('bkgh,bkh->bkg', q, k)[..., None] * scale
    s = np.concatenate([old, new], -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum('bkgc,bkch->bkgh', p[..., :-1], cv) + p[..., -1:] * v[:, :, None]


# (B, K, G, H, C): TinyLlama's decode (4 KV heads of 8 query rows, H = 64); odd query
# groups (a last single row), head dims with 8- and 16-lane tails and below one vector,
# one slot, caches longer than a vector, batch rows over one KV head (MQA).
SHAPES = [(1, 4, 8, 64, 140), (2, 3, 5, 72, 37), (1, 2, 3, 70, 300), (3, 1, 1, 5, 1),
          (2, 2, 2, 128, 19), (1, 1, 12, 40, 64)]


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_decode_attention_equals_float64_numpy(shape, isa):
    _require_isa(isa)
    q, k, v, ck, cv, mask = _case(*shape, seed=sum(shape))
    mask[0, :] = False  # a row whose cache is empty: the token attends to itself only
    scale = shape[3] ** -0.5
    got = jax.jit(lambda *a: cpu_gemv.decode_attention(*a, scale=scale, isa=isa))(
        q, k, v, ck, cv, mask)
    expected = _oracle(q, k, v, ck, cv, mask, scale)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('isa', ISAS)
def test_softmax_extremes_match(isa):
    # Scores 80 apart: the kernel's exp must give the small weights (e^-80 is a normal
    # float32) and zero, not garbage, below its range (e^-200).
    _require_isa(isa)
    q, k, v, ck, cv, mask = _case(1, 2, 3, 16, 50, keep=1.0, seed=4)
    q = q * 0 + 1.0
    ck[..., :] = np.linspace(-200, 20, 50, dtype=np.float32)[:, None] / 16
    scale = 1.0
    got = cpu_gemv.decode_attention(q, k, v, ck, cv, mask, scale=scale, isa=isa)
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, ck, cv, mask, scale),
                               rtol=2e-5, atol=1e-6)


def test_masked_slots_are_never_read():
    # NaN in every dropped slot: skipped, they cannot reach the result.
    _require_kernel()
    q, k, v, ck, cv, mask = _case(2, 2, 4, 64, 33, seed=7)
    dropped = np.broadcast_to(~mask[:, None], ck.shape[:3])
    ck[dropped] = np.nan
    cv[dropped] = np.nan
    got = np.asarray(cpu_gemv.decode_attention(q, k, v, ck, cv, mask, scale=0.125))
    assert np.isfinite(got).all()
    ck[dropped] = 0
    cv[dropped] = 0
    np.testing.assert_allclose(got, _oracle(q, k, v, ck, cv, mask, 0.125), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('threads', [1, 2, 3])
def test_thread_counts_give_one_result(threads):
    _require_kernel()
    q, k, v, ck, cv, mask = _case(3, 4, 2, 64, 90, seed=2)
    got = cpu_gemv.decode_attention(q, k, v, ck, cv, mask, scale=0.3, threads=threads, spin_us=0)
    np.testing.assert_allclose(np.asarray(got), _oracle(q, k, v, ck, cv, mask, 0.3),
                               rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize('window', [masks_lib.NO_WINDOW, 5])
def test_the_runtime_kernel_and_xla_forms_are_one_step(window):
    # The runtime's one function in two forms, positions and sliding window included: a
    # ring cache of 24 slots, some empty (position -1), at decode position 30.
    _require_kernel()
    b, n, kv, h, c = 2, 6, 2, 32, 24
    rng = np.random.default_rng(3)
    q = rng.normal(size=(b, 1, n, h)).astype(np.float32)
    k, v = (rng.normal(size=(b, 1, kv, h)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.normal(size=(b, kv, c, h)).astype(np.float32) for _ in range(2))
    cache_positions = np.where(np.arange(c) < 20, np.arange(c) + 10, -1)[None].repeat(b, 0)
    cache_positions[1, :6] = -1
    q_positions = np.array([[30], [31]], np.int32)

    def step(matvec):
        f = lambda *a: cached_decode_attention(
            *a, q_positions=q_positions, cache_positions=cache_positions.astype(np.int32),
            window=jnp.int32(window), execution=Execution(packed=True, matvec=matvec))
        return np.asarray(jax.jit(f)(q, k, v, ck, cv))

    kernel, xla = step(MatvecImpl.CPU_GEMV), step(MatvecImpl.XLA)
    np.testing.assert_allclose(kernel, xla, rtol=2e-5, atol=2e-6)
    hlo = jax.jit(lambda *a: cached_decode_attention(
        *a, q_positions=q_positions, cache_positions=cache_positions.astype(np.int32),
        execution=Execution(packed=True, matvec=MatvecImpl.CPU_GEMV))).lower(
        q, k, v, ck, cv).as_text()
    assert cpu_gemv.TARGET_ATTENTION in hlo


def test_other_platforms_lower_the_xla_form():
    # jax.lax.platform_dependent in the runtime: the custom call is emitted for CPU only,
    # and the GPU and TPU modules hold the XLA form's softmax instead.
    _require_kernel()
    q, k, v, ck, cv, _ = _case(1, 2, 4, 16, 12, seed=5)
    q, k, v = q[:, None].reshape(1, 1, 8, 16), k[:, None], v[:, None]
    step = jax.jit(lambda *a: cached_decode_attention(
        *a, q_positions=np.array([[12]], np.int32),
        cache_positions=np.arange(12, dtype=np.int32)[None],
        execution=Execution(packed=True, matvec=MatvecImpl.CPU_GEMV)))
    target = cpu_gemv.TARGET_ATTENTION
    for platform, expect_call in (('cpu', True), ('cuda', False), ('tpu', False)):
        exported = jax.export.export(
            step, platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(q, k, v, ck, cv)
        text = exported.mlir_module()
        assert (f'@{target}(' in text) == expect_call, platform
        assert ('exponential' in text) != expect_call, platform


@pytest.mark.parametrize('args,message', [
    (((1, 2, 3, 8), (1, 2, 8), (1, 2, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 5)), None),
    (((1, 2, 3, 8), (1, 2, 8), (1, 2, 8), (1, 3, 5, 8), (1, 3, 5, 8), (1, 5)), 'caches'),
    (((1, 2, 3, 8), (1, 2, 7), (1, 2, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 5)), 'k, v must'),
    (((1, 2, 3, 8), (1, 2, 8), (1, 2, 8), (1, 2, 5, 8), (1, 2, 5, 8), (1, 4)), 'mask'),
])
def test_bad_shapes_are_named(args, message):
    _require_kernel()
    arrays = [np.zeros(s, np.float32) for s in args[:5]] + [np.ones(args[5], bool)]
    if message is not None:
        with pytest.raises(ValueError, match=message):
            cpu_gemv.decode_attention(*arrays, scale=1.0)
        return
    assert cpu_gemv.decode_attention(*arrays, scale=1.0).shape == args[0]
    with pytest.raises(ValueError, match='float32'):
        cpu_gemv.decode_attention(*[a.astype(np.float16) for a in arrays[:5]], arrays[5],
                                  scale=1.0)
