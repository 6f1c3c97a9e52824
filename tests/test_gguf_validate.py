"""The opt-in tensor-data check (validate.py, llama.cpp `check_tensors`).

Oracles: `gguf.quants.dequantize` (which values a corrupted scale really poisons, and that
finite scales give finite values); offsets recomputed from `read_header`'s tensor infos
as data_offset + tensor offset + block index * type_size; literal f16 bit patterns.
"""

import struct
import time
import warnings

import jax
import numpy as np
import pytest

gguf = pytest.importorskip('gguf')
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from test_gguf_format import TINY, _flat, random_params  # noqa: E402

from rustgpt_jax import quant  # noqa: E402
from rustgpt_jax.interop.gguf import GGUFError, dequantize, load_gguf, save_gguf  # noqa: E402
from rustgpt_jax.interop.gguf.reader import read_header  # noqa: E402
from rustgpt_jax.interop.gguf.validate import (  # noqa: E402
    CHECKED_FIELDS,
    check_file,
    check_tensor_data,
)

FLOATS = (T.F32, T.F16, T.BF16)
BLOCKS = (T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K)
# Byte offsets of the f16 scales in a block (ggml-common.h block_q*), independent of
# validate.CHECKED_FIELDS; test_scale_positions_poison_exactly_their_block confirms them.
SCALES = {T.Q8_0: {'d': 0}, T.Q4_0: {'d': 0}, T.Q4_K: {'d': 0, 'dmin': 2},
          T.Q5_K: {'d': 0, 'dmin': 2}, T.Q6_K: {'d': 208}}
# f16 / f32 / bf16 bit patterns (little-endian bytes) of the non-finite values.
BAD_F16 = {'NaN': b'\x00\x7e', '+inf': b'\x00\x7c', '-inf': b'\x00\xfc'}
BAD_VALUE = {T.F32: {'NaN': b'\x00\x00\xc0\x7f', '+inf': b'\x00\x00\x80\x7f',
                     '-inf': b'\x00\x00\x80\xff'},
             T.F16: BAD_F16,
             T.BF16: {'NaN': b'\xc0\x7f', '+inf': b'\x80\x7f', '-inf': b'\x80\xff'}}


def valid_blocks(qtype, n_blocks, seed=0, scale=None):
    """(n_blocks * type_size,) uint8: random quant bytes with finite f16 scales.

    scale: a fixed value for every scale field, else uniform in [-2, 2].
    """
    rng = np.random.default_rng(seed)
    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for pos in SCALES[qtype].values():
        s = np.full(n_blocks, scale) if scale is not None else rng.uniform(-2, 2, n_blocks)
        raw[:, pos:pos + 2] = s.astype('<f2').view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def valid_values(qtype, n, seed=0):
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if qtype == T.BF16:
        return gguf.quants.quantize(x, T.BF16).view(np.uint8)
    return x.astype(np.float16 if qtype == T.F16 else np.float32).view(np.uint8)


def valid_raw(qtype, n_blocks=40, seed=0):
    """(raw bytes, numpy shape) of a valid tensor of n_blocks blocks (values for floats)."""
    block = GGML_QUANT_SIZES[qtype][0]
    raw = valid_values(qtype, n_blocks, seed) if qtype in FLOATS else valid_blocks(
        qtype, n_blocks, seed)
    return raw, (n_blocks // 8, 8) if block == 1 else (n_blocks, block)


def test_every_supported_type_is_checked():
    assert set(CHECKED_FIELDS) == set(FLOATS) | set(BLOCKS)
    for qtype in BLOCKS:
        assert {f for f, _, _ in CHECKED_FIELDS[qtype]} == set(SCALES[qtype])
        assert {f: p for f, p, _ in CHECKED_FIELDS[qtype]} == SCALES[qtype]


@pytest.mark.parametrize('qtype', BLOCKS, ids=lambda q: q.name)
def test_finite_scales_give_finite_values(qtype):
    """Why checking scales suffices: extreme finite f16 scales (+-65504, the largest) with
    random quant bytes dequantise to finite float32, in ours and in gguf's reference."""
    for scale in (65504.0, -65504.0, 6e-8):
        raw = valid_blocks(qtype, 64, seed=3, scale=scale)
        with np.errstate(all='raise'):
            ours = dequantize(raw, qtype, (64, GGML_QUANT_SIZES[qtype][0]))
            ref = gguf.quants.dequantize(raw.reshape(64, -1), qtype)
        assert np.isfinite(ours).all() and np.isfinite(ref).all()


@pytest.mark.parametrize('qtype', BLOCKS, ids=lambda q: q.name)
def test_scale_positions_poison_exactly_their_block(qtype):
    """Each SCALES field set to inf makes gguf's dequantisation non-finite in exactly that
    block: the fields checked are the ones that scale the values."""
    n_blocks, block = 6, GGML_QUANT_SIZES[qtype][0]
    for pos in SCALES[qtype].values():
        raw = valid_blocks(qtype, n_blocks).reshape(n_blocks, -1)
        raw[4, pos:pos + 2] = np.frombuffer(BAD_F16['+inf'], np.uint8)
        with np.errstate(all='ignore'):
            ref = gguf.quants.dequantize(raw, qtype)
        bad_blocks = np.flatnonzero(~np.isfinite(ref).reshape(n_blocks, block).all(axis=1))
        assert bad_blocks.tolist() == [4]


@pytest.mark.parametrize('qtype', FLOATS + BLOCKS, ids=lambda q: q.name)
def test_valid_and_zero_data_pass(qtype):
    raw, shape = valid_raw(qtype)
    check_tensor_data(raw, qtype, shape, 'w', 1000, 'x.gguf')
    check_tensor_data(np.zeros_like(raw), qtype, shape, 'w', 1000, 'x.gguf')
    ro = raw.copy()
    ro.flags.writeable = False  # a read-only memmap slice is only viewed
    check_tensor_data(ro, qtype, shape, 'w', 1000, 'x.gguf')


@pytest.mark.parametrize('qtype', FLOATS + BLOCKS, ids=lambda q: q.name)
@pytest.mark.parametrize('what', ['NaN', '+inf', '-inf'])
def test_one_bad_scale_or_value_is_found(qtype, what, monkeypatch):
    # Small chunks so the bad block lies in a later chunk than the first.
    monkeypatch.setattr('rustgpt_jax.interop.gguf.validate.CHUNK_BYTES', 256)
    _, size = GGML_QUANT_SIZES[qtype]
    base, bad_block = 4096, 37
    for field, pos in ({'value': 0} if qtype in FLOATS else SCALES[qtype]).items():
        raw, shape = valid_raw(qtype)
        pattern = BAD_VALUE[qtype][what] if qtype in FLOATS else BAD_F16[what]
        at = bad_block * size + pos
        raw[at:at + len(pattern)] = np.frombuffer(pattern, np.uint8)
        with pytest.raises(GGUFError) as info:
            check_tensor_data(raw, qtype, shape, 'blk.3.ffn_up.weight', base, 'x.gguf')
        e = info.value
        assert e.field == 'blk.3.ffn_up.weight' and e.offset == base + bad_block * size
        assert f'byte offset {base + bad_block * size}' in str(e) and what in str(e)
        if qtype in FLOATS:
            assert f'element {bad_block} is {what}' in str(e)
        else:
            assert f'block {bad_block} ' in str(e) and f'scale {field}' in str(e)


@pytest.mark.parametrize('qtype', FLOATS + BLOCKS, ids=lambda q: q.name)
def test_all_ff_data_fails_at_its_first_block(qtype):
    raw, shape = valid_raw(qtype)
    with pytest.raises(GGUFError, match='NaN') as info:
        check_tensor_data(np.full_like(raw, 0xFF), qtype, shape, 'w', 96, 'x.gguf')
    assert info.value.field == 'w' and info.value.offset == 96


def test_unchecked_type_and_wrong_size_raise():
    with pytest.raises(GGUFError, match='no data check for tensor type Q2_K'):
        check_tensor_data(np.zeros(84, np.uint8), T.Q2_K, (256,), 'w', 0, 'x.gguf')
    with pytest.raises(GGUFError, match='67 data bytes'):
        check_tensor_data(np.zeros(67, np.uint8), T.Q8_0, (2, 32), 'w', 0, 'x.gguf')


# -- whole files -------------------------------------------------------------------


def _save(tmp_path, ftype, num_layers=1):
    config = TINY.replace(num_layers=num_layers)
    return save_gguf(tmp_path / f'{ftype}.gguf', config, random_params(config), None, ftype=ftype)


def _tensor(path, name):
    """(absolute data offset, TensorInfo) of tensor `name`, from the header alone."""
    header = read_header(np.fromfile(path, np.uint8), str(path))
    t = next(t for t in header.tensors if t.name == name)
    return header.data_offset + t.offset, t


@pytest.mark.parametrize('ftype', ['f32', 'f16', 'bf16', 'q8_0', 'q4_0'])
def test_files_of_every_written_type(tmp_path, ftype):
    """Valid files pass check_file and load with validate=True; one bad scale (or value)
    of blk.0.ffn_down.weight in block 5 fails both, at that block's byte offset."""
    path = _save(tmp_path, ftype)
    check_file(path)
    _, params, _ = load_gguf(path, validate=True)
    assert all(np.isfinite(v).all() for v in _flat(params).values())

    name = 'blk.0.ffn_down.weight'
    start, t = _tensor(path, name)
    qtype = T(t.ggml_type)
    assert qtype.name.lower() == ftype
    _, size = GGML_QUANT_SIZES[qtype]
    blob = bytearray(open(path, 'rb').read())
    for what in ('NaN', '+inf'):
        bad = bytearray(blob)
        pattern = BAD_VALUE[qtype][what] if qtype in BAD_VALUE else BAD_F16[what]
        bad[start + 5 * size:start + 5 * size + len(pattern)] = pattern  # d is at byte 0
        (tmp_path / 'bad.gguf').write_bytes(bytes(bad))
        for check in (check_file, lambda p: load_gguf(p, validate=True)):
            with pytest.raises(GGUFError, match=what.replace('+', r'\+')) as info:
                check(tmp_path / 'bad.gguf')
            assert info.value.field == name and info.value.offset == start + 5 * size
    # Without validate=True the same file loads: the check is opt-in.
    with np.errstate(invalid='ignore'):  # inf * 0
        _, params, _ = load_gguf(tmp_path / 'bad.gguf')
    assert not all(np.isfinite(v).all() for v in _flat(params).values())


def test_check_file_names_a_tensor_filled_with_ff(tmp_path):
    path = _save(tmp_path, 'q8_0')
    start, t = _tensor(path, 'blk.0.attn_k.weight')
    blob = bytearray(open(path, 'rb').read())
    blob[start:start + t.nbytes] = b'\xff' * t.nbytes
    (tmp_path / 'ff.gguf').write_bytes(bytes(blob))
    with pytest.raises(GGUFError, match="field 'blk.0.attn_k.weight'.*block 0 .*NaN") as info:
        check_file(tmp_path / 'ff.gguf')
    assert info.value.offset == start
    (tmp_path / 'empty.gguf').write_bytes(b'')
    with pytest.raises(GGUFError, match='magic'):  # the header is checked first
        check_file(tmp_path / 'empty.gguf')


@pytest.mark.parametrize('ftype', ['q8_0', 'f16'])
def test_fuzz_validated_loads_are_finite_or_gguf_errors(tmp_path, ftype):
    """Bounded fuzz: 150 mutants (header and data) loaded with validate=True give finite
    params or GGUFError; any other exception, numpy warning or FP error fails. For mutants
    of the data alone, validate=True raises exactly when the unchecked load is non-finite."""
    path = _save(tmp_path, ftype)
    blob = bytearray(open(path, 'rb').read())
    header = read_header(np.frombuffer(bytes(blob), np.uint8))
    data_at = header.data_offset
    rng = np.random.default_rng(99)
    outcomes, start = {'ok': 0, 'GGUFError': 0}, time.monotonic()
    for trial in range(150):
        mutant = bytearray(blob)
        kind = trial % 6
        if kind == 0:
            mutant = mutant[:int(rng.integers(0, len(blob)))]
        elif kind == 1:  # random header bytes
            for pos in rng.integers(0, data_at, size=int(rng.integers(1, 8))):
                mutant[pos] = int(rng.integers(0, 256))
        elif kind == 2:  # a huge or random 4-byte header field
            pos = int(rng.integers(0, data_at - 4))
            mutant[pos:pos + 4] = struct.pack('<I', int(rng.integers(0, 2 ** 32)))
        elif kind == 3:  # random data bytes
            for pos in rng.integers(data_at, len(blob), size=int(rng.integers(1, 64))):
                mutant[pos] = int(rng.integers(0, 256))
        elif kind == 4:  # a run of 0xFF in the data
            pos = int(rng.integers(data_at, len(blob)))
            end = min(len(blob), pos + int(rng.integers(1, 200)))
            mutant[pos:end] = b'\xff' * (end - pos)
        else:  # an f16 NaN / inf pattern at a random even data offset
            pos = data_at + 2 * int(rng.integers(0, (len(blob) - data_at) // 2))
            mutant[pos:pos + 2] = list(BAD_F16.values())[trial % 3]
        (tmp_path / 'mutant.gguf').write_bytes(bytes(mutant))
        with warnings.catch_warnings(), np.errstate(all='raise'):
            warnings.simplefilter('error')
            try:
                _, params, _ = load_gguf(tmp_path / 'mutant.gguf', validate=True)
                rejected = False
            except GGUFError:
                rejected = True
        outcomes['GGUFError' if rejected else 'ok'] += 1
        if not rejected:
            for name, value in _flat(params).items():
                assert np.isfinite(value).all(), (trial, kind, name)
        # The quantized runtime's loader accepts and rejects the same files.
        with warnings.catch_warnings(), np.errstate(all='raise'):
            warnings.simplefilter('error')
            try:
                _, held, _ = load_gguf(tmp_path / 'mutant.gguf', validate=True, quantized=True)
                assert not rejected, (trial, kind)
                for leaf in jax.tree_util.tree_leaves(held, is_leaf=quant.is_quantized):
                    value = quant.dequantize(leaf) if quant.is_quantized(leaf) else leaf
                    assert np.isfinite(np.asarray(value)).all(), (trial, kind)
            except GGUFError:
                assert rejected, (trial, kind)
        if kind >= 3:
            with np.errstate(all='ignore'):
                _, unchecked, _ = load_gguf(tmp_path / 'mutant.gguf')
            finite = all(np.isfinite(v).all() for v in _flat(unchecked).values())
            assert rejected == (not finite), (trial, kind)
        assert time.monotonic() - start < 30, f'fuzz too slow at trial {trial}'
    assert outcomes['GGUFError'] >= 50 and outcomes['ok'] >= 10, outcomes
