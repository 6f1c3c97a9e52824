"""The quantized GGUF runtime (`load_gguf(quantized=True)`) against independent oracles.

- `quant.dequantize` / `take_rows` (the XLA form, jnp inside jit) against gguf-py's
  `gguf.quants.dequantize`, bit for bit, over random blocks of every type.
- Logits of files that llama.cpp's own quantizer (`llama_model_quantize`) wrote, of every
  type, against llama.cpp evaluating the same tokens: relative error <= 3e-2 and greedy
  top-1 agreement >= 95% over 64 tokens.
- save_gguf of quantized params writes the blocks it loaded, byte for byte, and
  llama.cpp runs the result.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

llama_cpp = pytest.importorskip('llama_cpp')
gguf = pytest.importorskip('gguf')

import test_gguf_llamacpp as llama_ref  # noqa: E402
from test_gguf_format import random_params  # noqa: E402

from rustgpt_jax import quant  # noqa: E402
from rustgpt_jax.config import ModelConfig  # noqa: E402
from rustgpt_jax.decoding import prepare_for_decode  # noqa: E402
from rustgpt_jax.interop.gguf import load_gguf, save_gguf  # noqa: E402
from rustgpt_jax.runtime.execution import MatvecImpl  # noqa: E402

T = gguf.GGMLQuantizationType
TOKENS = 64
# 256 wide with 512 hidden: every row is whole 256-value K-quant blocks, so llama.cpp's
# quantizer keeps the requested types instead of falling back to Q5_0 / Q8_0.
CONFIG = ModelConfig(vocab_size=llama_ref.VOCAB.vocab_size, embed_dim=256, hidden_dim=512,
                     num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=TOKENS + 16)
# llama.cpp file types (llama_ftype) and the tensor types the file must then hold.
FTYPES = {'q8_0': (7, {'Q8_0'}), 'q4_0': (2, {'Q4_0', 'Q6_K'}),
          'q4_k_m': (15, {'Q4_K', 'Q6_K'}), 'q5_k_m': (17, {'Q5_K', 'Q6_K'}),
          'q6_k': (18, {'Q6_K'}), 'f16': (1, {'F16'}), 'bf16': (32, {'BF16'})}


def random_blocks(qtype, rows: int, values: int, seed: int = 0) -> np.ndarray:
    """(rows, row_bytes) uint8 of random blocks with finite, O(1) f16 scales."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (T.F16, T.BF16):
        w = rng.standard_normal((rows, values)).astype(np.float32)
        return gguf.quants.quantize(w, qtype).view(np.uint8).reshape(rows, -1)
    raw = rng.integers(0, 256, (rows * values // block, size), dtype=np.uint8)
    f16 = lambda n, lo: rng.uniform(lo, 1.0, n).astype('<f2').view(np.uint8).reshape(n, 2)
    scale_at = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
    for at in scale_at[qtype]:
        raw[:, at:at + 2] = f16(raw.shape[0], -1.0 if at != 2 else 0.0)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize('qtype', sorted(quant.BLOCK_TYPES, key=int), ids=lambda t: t.name)
def test_xla_dequantize_matches_gguf_py(qtype):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    values = 3 * max(block, 32)
    raw = random_blocks(qtype, 5, values, seed=int(qtype))
    q = quant.QArray(jnp.asarray(raw), qtype, (values, 5))
    ref = gguf.quants.dequantize(raw, qtype).reshape(5, values)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize)(q)), ref)
    ids = np.array([[4, 0, 4], [1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.take_rows)(q, ids)), ref[ids])


def test_qarray_checks_its_blocks():
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(ValueError, match='logical shape'):
        quant.QArray(raw, T.Q8_0, (32, 5))
    with pytest.raises(ValueError, match='not whole Q8_0 blocks'):
        quant.QArray(np.zeros((4, 35), np.uint8), T.Q8_0, (4, 32))
    with pytest.raises(ValueError, match='Q2_K is not a quantized weight type'):
        quant.QArray(raw, T.Q2_K, (4, 32))


@pytest.fixture(scope='module')
def llama_files(tmp_path_factory):
    """name -> a file llama.cpp quantized from one F32 file written by save_gguf."""
    tmp = tmp_path_factory.mktemp('quantized')
    source = save_gguf(tmp / 'f32.gguf', CONFIG, random_params(CONFIG, seed=3), llama_ref.VOCAB)
    files = {}
    for name, (ftype, _) in FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        out = tmp / f'{name}.gguf'
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(),
                                              params) == 0
        files[name] = out
    return files



def _logits(path, matvec=MatvecImpl.XLA):
    config, params, _ = load_gguf(path, quantized=True)
    decode = prepare_for_decode(config, params, matvec=matvec)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, TOKENS)
    apply = jax.jit(decode.model.apply)
    return tokens, np.asarray(apply({'params': decode.params}, jnp.asarray(tokens)[None]))[0]


def _llama_logits(path, tokens):
    llama_ref.CTX, saved = TOKENS + 16, llama_ref.CTX
    try:
        return llama_ref._llama_logits(path, tokens)
    finally:
        llama_ref.CTX = saved


@pytest.mark.parametrize('name', list(FTYPES))
def test_quantized_logits_match_llama_cpp(llama_files, name):
    path = llama_files[name]
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} - {'F32'}
    assert kinds == FTYPES[name][1]
    config, params, _ = load_gguf(path, quantized=True)
    held = {leaf.ggml_type for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=quant.is_quantized) if quant.is_quantized(leaf)}
    assert {T(t).name for t in held} == kinds  # nothing was dequantised on load
    tokens, ours = _logits(path)
    ref = _llama_logits(path, tokens)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel <= 3e-2, rel
    assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.95


@pytest.mark.parametrize('name', ['q4_k_m', 'q8_0'])
def test_save_gguf_writes_the_loaded_blocks_back(llama_files, tmp_path, name):
    path = llama_files[name]
    config, params, tokenizer = load_gguf(path, quantized=True)
    again = save_gguf(tmp_path / 'again.gguf', config, params, tokenizer)
    original = {t.name: t for t in gguf.GGUFReader(path).tensors}
    written = {t.name: t for t in gguf.GGUFReader(again).tensors}
    assert written.keys() == original.keys()
    for tensor_name, t in original.items():
        assert written[tensor_name].tensor_type == t.tensor_type, tensor_name
        np.testing.assert_array_equal(np.asarray(written[tensor_name].data), np.asarray(t.data),
                                      err_msg=tensor_name)
    tokens = np.random.default_rng(5).integers(0, config.vocab_size, TOKENS)
    np.testing.assert_array_equal(_llama_logits(again, tokens), _llama_logits(path, tokens))


@pytest.mark.parametrize('ftype', ['q8_0', 'q4_0', 'f16', 'bf16'])
def test_our_export_loads_back_bit_identically(tmp_path, ftype):
    """save_gguf's own quantisation is what the quantized runtime holds, block for block."""
    path = save_gguf(tmp_path / f'{ftype}.gguf', CONFIG, random_params(CONFIG, seed=4),
                     llama_ref.VOCAB, ftype=ftype)
    _, params, _ = load_gguf(path, quantized=True)
    file = {t.name: np.asarray(t.data).view(np.uint8) for t in gguf.GGUFReader(path).tensors}
    got = np.asarray(params['layer_1']['ffn']['w2']['kernel'].blocks)
    np.testing.assert_array_equal(got, file['blk.1.ffn_down.weight'].reshape(got.shape))
    from rustgpt_jax.interop.gguf import permute_qk
    q = np.asarray(params['layer_0']['attention']['q_proj']['kernel'].blocks)
    np.testing.assert_array_equal(permute_qk(q, CONFIG.num_heads),
                                  file['blk.0.attn_q.weight'].reshape(q.shape))
