"""The GGUF-weight product kernel (native.quant_matmul), against gguf-py's dequantizer.

Oracle: gguf.quants.dequantize(blocks) in float64 times quantize_activations(x) in
float64; the kernel may differ only by float32 rounding of its accumulation.
"""

import re

import jax
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from rustgpt_jax.native import build as native_build
from rustgpt_jax.native import quant_matmul as qm

TYPES = sorted(qm.SUPPORTED_TYPES, key=lambda t: t.name)
ISAS = ['avx512_vnni', 'avx2']
# Where each type keeps its f16 scales inside a block: (d,) or (d, dmin).
SCALE_OFFSETS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _require(isa):
    # Skipped only where the hardware or toolchain cannot run it; a failed build with a
    # compiler present is a failure.
    if native_build.compiler() is None:
        pytest.skip('no C++ compiler')
    assert qm.available(), qm.unavailable_reason()
    if isa == 'avx512_vnni' and qm.isa() != 'avx512_vnni':
        pytest.skip(f'this CPU lacks AVX-512 VNNI (best here: {qm.isa()}); the AVX2 path runs')


def _blocks(kind, out, n_blocks, rng):
    """(out, row_bytes) uint8: random bytes with finite, sensibly sized f16 scales."""
    values, size = GGML_QUANT_SIZES[kind]
    if kind == T.F16:
        return rng.normal(size=(out, n_blocks)).astype(np.float16).view(np.uint8)
    if kind == T.BF16:
        top = rng.normal(size=(out, n_blocks)).astype(np.float32).view(np.uint32) >> 16
        return top.astype(np.uint16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(out, n_blocks, size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[kind]:
        scale = (rng.normal(size=(out, n_blocks, 1)) * 0.05).astype(np.float16)
        blocks[..., offset:offset + 2] = scale.view(np.uint8)
    return blocks.reshape(out, n_blocks * size)


def _check(kind, rows, out, n_in, isa, seed=0):
    rng = np.random.default_rng(seed)
    values, size = GGML_QUANT_SIZES[kind]
    blocks = _blocks(kind, out, n_in // values, rng)
    x = rng.normal(size=(rows, n_in)).astype(np.float32)
    w = dequantize(blocks, kind).astype(np.float64)  # (out, in)
    xq = qm.quantize_activations(x, kind).astype(np.float64)
    expected = xq @ w.T
    bound = np.abs(xq) @ np.abs(w).T  # float32 rounding of the sum scales with this
    got = np.asarray(qm.quant_matmul(x, blocks, kind, isa=isa))
    assert got.shape == (rows, out) and np.abs(expected).max() > 0
    bad = np.abs(got - expected) > 1e-5 * bound + 1e-6
    assert not bad.any(), (f'{kind.name} {isa} rows={rows} out={out} in={n_in}: '
                           f'{bad.sum()} outputs off, e.g. {got[bad][:3]} vs {expected[bad][:3]}')


def _in_sizes(kind):
    """One, two and three blocks, and 2048: whole and partial kernel steps."""
    values = GGML_QUANT_SIZES[kind][0]
    return [values, 2 * values, 3 * values, 2048] if values > 1 else [1, 2, 3, 37, 2048]


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('kind', TYPES, ids=lambda t: t.name)
def test_every_row_count_equals_the_dequantized_oracle(kind, isa):
    # 1..8: decode; 13, 70 and 128: prefill tiles, 13 and 70 with a partial last tile.
    _require(isa)
    n_in = 2 * max(GGML_QUANT_SIZES[kind][0], 64)
    for rows in [*range(1, 9), 13, 70, 128]:
        _check(kind, rows, 37, n_in, isa, seed=rows)


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('kind', TYPES, ids=lambda t: t.name)
def test_odd_shapes_equal_the_dequantized_oracle(kind, isa):
    # out not a multiple of the four-row groups, in of 1..3 blocks and 2048; rows of
    # decode, of the small-prefill tiles and of the large-prefill ones.
    _require(isa)
    for out in (1, 3, 37):
        for n_in in _in_sizes(kind):
            for rows in (1, 5, 70):
                _check(kind, rows, out, n_in, isa, seed=out + n_in)


@pytest.mark.parametrize('kind', TYPES, ids=lambda t: t.name)
def test_threads_give_the_single_thread_result_exactly(kind):
    # Each output is computed by one thread with the same code, whichever takes it.
    _require('avx2')
    rng = np.random.default_rng(7)
    blocks = _blocks(kind, 300, 512 // GGML_QUANT_SIZES[kind][0], rng)
    for rows in (1, 13, 70):
        x = rng.normal(size=(rows, 512)).astype(np.float32)
        one = np.asarray(qm.quant_matmul(x, blocks, kind, threads=1))
        for threads, spin_us in ((2, 0), (3, 50)):
            many = qm.quant_matmul(x, blocks, kind, threads=threads, spin_us=spin_us)
            np.testing.assert_array_equal(np.asarray(many), one)


# (type, out) per part: TinyLlama's q/k/v and gate/up mixes, and every type in one call.
MULTI_PARTS = [
    [(T.Q4_K, 64), (T.Q4_K, 8), (T.Q6_K, 8)],
    [(T.Q4_K, 44), (T.Q4_K, 44)],
    [(T.Q8_0, 40), (T.Q4_0, 5), (T.F16, 12), (T.Q5_K, 9), (T.BF16, 3), (T.Q6_K, 33)],
]


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('mix', range(len(MULTI_PARTS)))
def test_multi_equals_the_single_calls_concatenated(mix, isa):
    # Same quantized x, same per-row code: bit for bit, whatever the chunks' split.
    _require(isa)
    rng = np.random.default_rng(mix)
    n_in = 512
    parts = [(_blocks(kind, out, n_in // GGML_QUANT_SIZES[kind][0], rng), kind)
             for kind, out in MULTI_PARTS[mix]]
    for rows in [*range(1, 9), 40, 70]:
        x = rng.normal(size=(rows, n_in)).astype(np.float32)
        single = np.concatenate([np.asarray(qm.quant_matmul(x, b, k, isa=isa))
                                 for b, k in parts], axis=1)
        for threads in (1, 2):
            got = qm.quant_matmul_multi(x, parts, threads=threads, isa=isa)
            np.testing.assert_array_equal(np.asarray(got), single, err_msg=f'rows={rows}')


def test_multi_bad_arguments_raise_by_name():
    x = np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError, match='quant_matmul_multi: parts is empty'):
        qm.quant_matmul_multi(x, [])
    with pytest.raises(ValueError, match=re.escape('quant_matmul_multi: blocks hold in=32')):
        qm.quant_matmul_multi(x, [(np.zeros((4, 144), np.uint8), T.Q4_K),
                                  (np.zeros((4, 34), np.uint8), T.Q8_0)])


def test_runs_inside_jit_and_vmap():
    _require('avx2')
    rng = np.random.default_rng(3)
    blocks = _blocks(T.Q4_K, 16, 1, rng)
    x = rng.normal(size=(3, 2, 256)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda v: qm.quant_matmul(v, blocks, T.Q4_K)))(x)
    for i in range(3):
        np.testing.assert_array_equal(got[i], qm.quant_matmul(x[i], blocks, T.Q4_K))


def test_quantize_activations_matches_ggml_q8_conventions():
    # Q8_0: fp16 d = amax / 127, q = +-127 at the largest; Q8_K: the sign of d follows
    # -x[argmax |x|] and q = -127 there.
    x = np.zeros((1, 256), np.float32)
    x[0, :3] = [0.5, -1.0, 0.25]
    q8_0 = qm.quantize_activations(x, T.Q8_0)
    d = np.float32(np.float16(np.float32(1.0) / np.float32(127)))
    np.testing.assert_array_equal(q8_0[0, :3], d * np.float32([64, -127, 32]))
    q8_k = qm.quantize_activations(x, T.Q4_K)
    assert q8_k[0, 1] == -1.0 and q8_k[0, 0] == np.float32(1 / np.float32(127.0)) * 64
    np.testing.assert_array_equal(qm.quantize_activations(x, T.BF16), x)


@pytest.mark.parametrize('x_shape,b_shape,x_dtype,b_dtype,kind,message', [
    ((1, 32), (4, 34), np.float64, np.uint8, T.Q8_0, 'x must be float32'),
    ((1, 32), (4, 34), np.float32, np.int8, T.Q8_0, 'blocks must be uint8'),
    ((1, 32), (4, 35), np.float32, np.uint8, T.Q8_0, 'row_bytes=35 is not a whole number'),
    ((1, 64), (4, 34), np.float32, np.uint8, T.Q8_0, 'blocks hold in=32 values per row, x has'),
    ((32,), (4, 34), np.float32, np.uint8, T.Q8_0, 'expected x (rows, in) and blocks'),
    ((1, 32), (4, 34), np.float32, np.uint8, T.Q2_K, 'unsupported ggml type Q2_K'),
    ((1, 32), (4, 34), np.float32, np.uint8, 999, 'unknown ggml type 999'),
])
def test_bad_arguments_raise_by_name(x_shape, b_shape, x_dtype, b_dtype, kind, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        qm.quant_matmul(np.zeros(x_shape, x_dtype), np.zeros(b_shape, b_dtype), kind)


def test_an_unknown_isa_raises():
    with pytest.raises(ValueError, match="isa must be None or one of"):
        qm.quant_matmul(np.zeros((1, 32), np.float32), np.zeros((1, 34), np.uint8), T.Q8_0,
                        isa='sse2')
