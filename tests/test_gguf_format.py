"""GGUF container, dequantisation and export checks that need no llama.cpp.

Oracles: `gguf.quants.dequantize` (the gguf package's own numpy reference) for every
supported type; our own model's logits before export for save/load round trips; literal
byte layouts for the hostile files.
"""

import struct
import time

import numpy as np
import pytest

gguf = pytest.importorskip('gguf')
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.constants import GGMLQuantizationType as T  # noqa: E402

from rustgpt_jax.config import ModelConfig  # noqa: E402
from rustgpt_jax.interop.gguf import (  # noqa: E402
    GGUFError,
    dequantize,
    load_gguf,
    permute_qk,
    save_gguf,
    unpermute_qk,
)

TINY = ModelConfig(vocab_size=96, embed_dim=64, hidden_dim=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_seq_len=32)


def random_params(config, seed=0, scale=0.5):
    """A numpy param tree of Transformer(config) (scanned layers), built without JAX.

    Shapes follow rustgpt_jax/nn (and interop/hf.py): kernels (D, N, H), (N, H, D), ...
    """
    rng = np.random.default_rng(seed)
    d, f, v, lc = config.embed_dim, config.hidden_dim, config.vocab_size, config.num_layers
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    w = lambda *shape: (rng.standard_normal(shape) * scale / np.sqrt(shape[-1])).astype(
        np.float32)
    norm = lambda: (1 + 0.1 * rng.standard_normal((lc, d))).astype(np.float32)
    params = {
        'embedder': {'token_embedding': w(v, d)},
        'final_norm': {'scale': (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)},
        'layers': {
            'attention': {'q_proj': {'kernel': w(lc, d, n, h)},
                          'k_proj': {'kernel': w(lc, d, k, h)},
                          'v_proj': {'kernel': w(lc, d, k, h)},
                          'o_proj': {'kernel': w(lc, n, h, d)}},
            'ffn': {'w1': {'kernel': w(lc, d, f)}, 'w3': {'kernel': w(lc, d, f)},
                    'w2': {'kernel': w(lc, f, d)}},
            'attn_norm': {'scale': norm()}, 'ffn_norm': {'scale': norm()}}}
    if not config.tie_embeddings:
        params['embedder']['lm_head'] = w(d, v)
    return params


def _flat(tree, prefix=''):
    if isinstance(tree, dict):
        return {k: v for key in tree for k, v in _flat(tree[key], f'{prefix}/{key}').items()}
    return {prefix: np.asarray(tree)}


# -- dequantisation ------------------------------------------------------------


@pytest.mark.parametrize('qtype', [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0])
def test_dequantize_matches_gguf_package(qtype):
    x = np.random.default_rng(1).standard_normal((6, 128)).astype(np.float32) * 3
    raw = gguf.quants.quantize(x, qtype) if qtype not in (T.F32, T.F16) else x.astype(
        np.float16 if qtype == T.F16 else np.float32)
    ref = gguf.quants.dequantize(raw, qtype) if qtype not in (T.F32, T.F16) else raw.astype(
        np.float32)
    ours = dequantize(raw.view(np.uint8), qtype, x.shape)
    np.testing.assert_array_equal(ours, ref)
    bound = {T.F32: 0, T.F16: 2e-3, T.BF16: 2e-2, T.Q8_0: 2e-2, T.Q4_0: 0.3}[qtype]
    assert np.abs(ours - x).max() <= bound * np.abs(x).max()


@pytest.mark.parametrize('qtype', [T.Q4_K, T.Q5_K, T.Q6_K])
def test_dequantize_k_quants_random_blocks(qtype):
    """gguf has no K-quant quantizer: random raw blocks with finite f16 scales."""
    rng = np.random.default_rng(2)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(5 * 3, size), dtype=np.uint8)
    for pos in ((208,) if qtype == T.Q6_K else (0, 2)):  # f16 d (and dmin)
        scale = rng.uniform(-2, 2, raw.shape[0]).astype('<f2')
        raw[:, pos:pos + 2] = scale.view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(5, 3 * size)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(raw, qtype, (5, 3 * block))
    assert ours.shape == ref.shape == (5, 3 * block)
    np.testing.assert_array_equal(ours, ref)


def test_dequantize_rejects_bad_sizes_and_types():
    with pytest.raises(ValueError, match='needs 68 bytes'):
        dequantize(np.zeros(67, np.uint8), T.Q8_0, (2, 32))
    with pytest.raises(ValueError, match='Q2_K is not supported'):
        dequantize(np.zeros(84, np.uint8), T.Q2_K, (256,))


def test_qk_permutation_is_llama_cpp_interleave():
    # 1 head, H = 4: HF rows (0, 1 | 2, 3) pair 0-2 and 1-3; llama.cpp wants pairs adjacent.
    w = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(permute_qk(w, 1), w[[0, 2, 1, 3]])
    w = np.random.default_rng(0).standard_normal((2 * 8, 5))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 2), 2), w)


# -- save / load without llama.cpp -----------------------------------------------


@pytest.mark.parametrize('ftype,tol', [('f32', 0.0), ('f16', 1e-3), ('bf16', 8e-3),
                                       ('q8_0', 1e-2), ('q4_0', 0.2)])
def test_save_load_round_trip(tmp_path, ftype, tol):
    """Params survive export + import (q/k permutation undone); quantised within the format's
    step. Logit parity with llama.cpp is in test_gguf_llamacpp.py."""
    config = TINY.replace(tie_embeddings=ftype == 'f16')
    params = random_params(config)
    path = save_gguf(tmp_path / 'm.gguf', config, params, None, ftype=ftype)
    config2, params2, tok = load_gguf(path, max_seq_len=32)
    assert config2 == config
    assert tok.vocab_size == config.vocab_size and not tok.add_bos
    ref, got = _flat(params), _flat(params2)
    assert sorted(ref) == sorted(got)
    for name in ref:
        err = np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max()
        assert err <= (tol if ref[name].ndim > 2 or 'embedder' in name else 0.0), (name, err)


def test_save_refuses_what_llama_cpp_cannot_run(tmp_path):
    params = None  # refusals happen before params are read
    cases = {'norm': TINY.replace(norm='layer_norm'),
             'positions': TINY.replace(positions='learned'),
             'use_bias': TINY.replace(use_bias=True),
             'norm_placement': TINY.replace(norm_placement='post'),
             'feed_forward': TINY.replace(feed_forward='relu'),
             'window_size': TINY.replace(window_size=8)}
    for field, config in cases.items():
        with pytest.raises(ValueError, match=f'ModelConfig.{field}'):
            save_gguf(tmp_path / 'x.gguf', config, params)


# -- hostile files ---------------------------------------------------------------


def _s(text: bytes) -> bytes:
    return struct.pack('<Q', len(text)) + text


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key.encode()) + struct.pack('<I', vtype) + payload


def _file(kvs=(), tensors=(), data=b'', version=3, n_tensors=None, n_kv=None):
    """A GGUF file from parts: tensors are (name, dims, type, offset)."""
    body = b''.join(kvs)
    for name, dims, ttype, offset in tensors:
        body += _s(name.encode()) + struct.pack('<I', len(dims))
        body += b''.join(struct.pack('<Q', d) for d in dims) + struct.pack('<IQ', ttype, offset)
    head = b'GGUF' + struct.pack('<IQQ', version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    raw = head + body
    return raw + b'\0' * (-len(raw) % 32) + data


ARCH_KV = _kv('general.architecture', 8, _s(b'llama'))


def _expect(tmp_path, blob, field, offset=None):
    path = tmp_path / 'bad.gguf'
    path.write_bytes(blob)
    with pytest.raises(GGUFError) as info:
        load_gguf(path)
    assert isinstance(info.value, ValueError)
    assert field in str(info.value), str(info.value)
    if offset is not None:
        assert info.value.offset == offset and f'byte offset {offset}' in str(info.value)
    return info.value


def test_hostile_headers(tmp_path):
    _expect(tmp_path, b'', 'magic', 0)
    _expect(tmp_path, b'GGML' + b'\0' * 40, 'magic', 0)
    _expect(tmp_path, _file(version=1), 'version', 4)
    _expect(tmp_path, _file(version=3 << 24), 'version', 4)  # a big-endian v3 file
    _expect(tmp_path, _file(n_tensors=2 ** 40), 'tensor_count', 8)
    _expect(tmp_path, _file(n_kv=2 ** 63), 'kv_count', 16)
    _expect(tmp_path, _file()[:20], 'kv_count', 16)
    # a key whose length field claims 2**62 bytes, right after the 24-byte header
    _expect(tmp_path, _file([struct.pack('<Q', 2 ** 62) + b'abc' * 8], n_kv=1), 'kv[0].key', 24)
    # a string value claiming more bytes than the file has
    _expect(tmp_path, _file([_kv('general.name', 8, struct.pack('<Q', 10 ** 6) + b'x')]),
            'general.name')
    _expect(tmp_path, _file([_kv('a', 9, struct.pack('<IQ', 4, 2 ** 60))]), 'a', 37)
    _expect(tmp_path, _file([_kv('a', 9, struct.pack('<IQ', 9, 1))]), 'nested arrays')
    _expect(tmp_path, _file([_kv('a', 77, b'')]), 'unknown value type 77')
    _expect(tmp_path, _file([ARCH_KV, ARCH_KV]), 'duplicate metadata key')
    _expect(tmp_path, _file([_kv('general.alignment', 4, struct.pack('<I', 24))]),
            'general.alignment', 24)
    _expect(tmp_path, _file([_s(b'\xff\xfe') + struct.pack('<I', 4) + b'\0' * 4]), 'UTF-8', 24)


def test_hostile_tensor_infos(tmp_path):
    info_at = 24 + len(ARCH_KV)
    _expect(tmp_path, _file([ARCH_KV], [('w', [4] * 9, 0, 0)]), 'n_dims', info_at)
    _expect(tmp_path, _file([ARCH_KV], [('w', [2 ** 50, 2], 0, 0)]), 'dimensions', info_at)
    _expect(tmp_path, _file([ARCH_KV], [('w', [2 ** 30, 2 ** 30], 0, 0)]), 'absurd', info_at)
    _expect(tmp_path, _file([ARCH_KV], [('w', [32], 999, 0)], b'\0' * 128),
            'unknown tensor type 999')
    _expect(tmp_path, _file([ARCH_KV], [('w', [30], 8, 0)], b'\0' * 128), 'block size 32')
    _expect(tmp_path, _file([ARCH_KV], [('w', [32], 0, 7)], b'\0' * 256), 'alignment')
    _expect(tmp_path, _file([ARCH_KV], [('w', [32], 0, 2 ** 60)], b'\0' * 128),
            'w.offset', info_at)
    _expect(tmp_path, _file([ARCH_KV], [('w', [64], 0, 0)], b'\0' * 128), 'runs past the end')
    _expect(tmp_path, _file([ARCH_KV], [('w', [8], 0, 0), ('w', [8], 0, 32)], b'\0' * 64),
            'duplicate tensor name')


def test_semantic_errors(tmp_path):
    good = save_gguf(tmp_path / 'good.gguf', TINY, random_params(TINY), None)
    blob = open(good, 'rb').read()
    # Renaming a required key hides it; the loader names the missing key.
    key = b'llama.embedding_length'
    _expect(tmp_path, blob.replace(key, b'llama.embedding_lengtX'), 'llama.embedding_length')
    _expect(tmp_path, blob.replace(b'\x05\0\0\0\0\0\0\0llama', b'\x05\0\0\0\0\0\0\0gpt_x'),
            'general.architecture')
    _expect(tmp_path, blob.replace(b'blk.1.ffn_up.weight', b'blk.1.ffn_XX.weight'),
            'blk.1.ffn_XX.weight')
    # A known but unsupported type (I32 has F32's size, so only the type is wrong).
    record = b'output_norm.weight' + struct.pack('<IQ', 1, 64)
    assert blob.count(record + struct.pack('<I', 0)) == 1
    error = _expect(tmp_path, blob.replace(record + struct.pack('<I', 0),
                                           record + struct.pack('<I', 26)), 'I32 is not supported')
    assert error.field == 'output_norm.weight' and error.offset == blob.index(record) - 8
    _expect(tmp_path, blob[:len(blob) - 100], 'runs past the end')


def test_fuzz_mutated_and_truncated_files(tmp_path):
    """Bounded fuzz: 200 mutants of a valid file load or raise GGUFError, never anything else."""
    good = save_gguf(tmp_path / 'good.gguf', TINY.replace(num_layers=1), random_params(
        TINY.replace(num_layers=1)), None, ftype='q8_0')
    blob = bytearray(open(good, 'rb').read())
    header_len = blob.index(b'blk.0.ffn_norm.weight') + 64  # metadata + tensor infos
    rng = np.random.default_rng(1234)
    outcomes, start = {'ok': 0, 'GGUFError': 0}, time.monotonic()
    for trial in range(200):
        mutant = bytearray(blob)
        kind = trial % 4
        if kind == 0:
            mutant = mutant[:int(rng.integers(0, len(blob)))]
        elif kind == 1:
            for pos in rng.integers(0, header_len, size=int(rng.integers(1, 8))):
                mutant[pos] = int(rng.integers(0, 256))
        elif kind == 2:  # a huge or random 8-byte length / count / offset
            pos = int(rng.integers(0, header_len - 8))
            value = int(rng.choice([2 ** 63 - 1, 2 ** 32, 2 ** 40 + 3,
                                    int(rng.integers(0, 2 ** 16))]))
            mutant[pos:pos + 8] = struct.pack('<Q', value)
        else:
            pos = int(rng.integers(0, header_len - 4))
            mutant[pos:pos + 4] = struct.pack('<I', int(rng.integers(0, 2 ** 32)))
        path = tmp_path / 'mutant.gguf'
        path.write_bytes(bytes(mutant))
        try:
            load_gguf(path)
            outcomes['ok'] += 1
        except GGUFError:
            outcomes['GGUFError'] += 1
        assert time.monotonic() - start < 60, f'fuzz too slow at trial {trial}'
    assert outcomes['GGUFError'] >= 100, outcomes


def test_gpt2_vocab_export_matches_hf_tokenizers(tmp_path):
    """Our byte-level BPE exported as a gpt2 GGUF vocabulary tokenises like the HF
    `tokenizers` BPE it came from (GPT-2 pre-tokenizer regex + merges by rank)."""
    from rustgpt_jax.data.bpe_tokenizer import ByteBPETokenizer
    text = "the quick brown fox jumps over the lazy dog. It's 2024, isn't it? café 日本\n" * 20
    bpe = ByteBPETokenizer.train(text, vocab_size=320, min_frequency=2)
    config = TINY.replace(vocab_size=bpe.vocab_size, num_layers=1)
    path = save_gguf(tmp_path / 'bpe.gguf', config, random_params(config), bpe)
    _, _, tok = load_gguf(path)
    assert tok.model == 'gpt2' and tok.eos_id == bpe.eos_id
    for s in ['the quick brown fox', "It's 2024, isn't it?", 'café  naïve 日本 🙂\n\n x', '   ']:
        assert tok.encode(s) == bpe.encode(s), s
        assert tok.decode(tok.encode(s)) == s
