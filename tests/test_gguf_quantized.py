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


def test_ahead_of_time_lowering_takes_quantized_params():
    # `jit(f).lower(...)` rebuilds argument trees from JAX's ArgInfo stand-ins, which
    # have a shape and a dtype but no `ndim`; the QArray checks must accept them.
    raw = random_blocks(T.Q8_0, 3, 64, seed=1)
    q = quant.QArray(jnp.asarray(raw), T.Q8_0, (64, 3))
    stacked = quant.concat_rows([q, q], (64, 6))
    out = jax.jit(lambda c: quant.dequantize(c).sum(0)).lower(stacked).compile()(stacked)
    ref = gguf.quants.dequantize(raw, T.Q8_0).reshape(3, 64)
    np.testing.assert_allclose(np.asarray(out), 2 * ref.sum(0), rtol=1e-6)


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
    """Both forms of the quantized product (the native kernel and XLA's dequantise-in-jit)
    against llama.cpp, and against each other to float32 rounding: they quantize the
    activations identically, so only the summation order differs."""
    path = llama_files[name]
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} - {'F32'}
    assert kinds == FTYPES[name][1]
    config, params, _ = load_gguf(path, quantized=True)
    held = {leaf.ggml_type for leaf in jax.tree_util.tree_leaves(
        params, is_leaf=quant.is_quantized) if quant.is_quantized(leaf)}
    assert {T(t).name for t in held} == kinds  # nothing was dequantised on load
    tokens, xla = _logits(path, MatvecImpl.XLA)
    _, kernel = _logits(path, MatvecImpl.CPU_GEMV)
    ref = _llama_logits(path, tokens)
    for ours in (kernel, xla):
        rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
        assert rel <= 3e-2, rel
        assert np.mean(ours.argmax(-1) == ref.argmax(-1)) >= 0.95
    # Whole models agree less tightly than one product: a float32 rounding difference
    # upstream can move an activation across an int8 rounding boundary downstream.
    assert np.abs(kernel - xla).max() <= 3e-2 * np.abs(xla).max()
    assert np.mean(kernel.argmax(-1) == xla.argmax(-1)) >= 0.95


@pytest.mark.parametrize('qtype', sorted(quant.BLOCK_TYPES, key=int), ids=lambda t: t.name)
@pytest.mark.parametrize('rows', [1, 3, 8, 40])
def test_kernel_and_xla_forms_are_one_product(qtype, rows):
    """runtime.products' two forms of x . W^T agree to float32 rounding, per product."""
    from rustgpt_jax.runtime import products
    from rustgpt_jax.runtime.execution import Execution
    values = 512
    w = quant.QArray(jnp.asarray(random_blocks(qtype, 37, values, seed=rows)), qtype,
                     (values, 37))
    x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, values)), jnp.float32)
    forms = {}
    for matvec in (MatvecImpl.CPU_GEMV, MatvecImpl.XLA):
        f = jax.jit(lambda x, w, m=matvec: products.quantized_matmul(
            x, w, dtype=jnp.float32, execution=Execution(matvec=m)))
        forms[matvec] = np.asarray(f(x, w))
    xq = np.asarray(quant.quantize_activations(x, qtype), np.float64)
    wf = gguf.quants.dequantize(np.asarray(w.blocks), qtype).reshape(37, values)
    bound = np.abs(xq) @ np.abs(wf).T  # float32 rounding of the sum scales with this
    for y in forms.values():
        assert np.all(np.abs(y - xq @ wf.T) <= 1e-5 * bound + 1e-6)


def test_decode_steps_match_the_full_forward(llama_files):
    """The KV-cache decode loop over QArray params (jit, while_loop) gives the logits of
    one full forward pass, through the native kernel (1-row products) and XLA alike."""
    from rustgpt_jax.decoding.generate import generate
    from rustgpt_jax.decoding.sampling import SamplingConfig
    config, params, _ = load_gguf(llama_files['q4_k_m'], quantized=True)
    prompt = np.random.default_rng(7).integers(3, config.vocab_size, (1, 6)).astype(np.int32)
    for matvec in (MatvecImpl.CPU_GEMV, MatvecImpl.XLA):
        decode = prepare_for_decode(config, params, matvec=matvec)
        out = generate(decode.model, decode.params, prompt, np.array([6]), max_new_tokens=10,
                       sampling=SamplingConfig(temperature=0.0))
        tokens = np.concatenate([prompt[0], out.tokens[0]])
        full = np.asarray(jax.jit(decode.model.apply)({'params': decode.params},
                                                      jnp.asarray(tokens)[None]))[0]
        np.testing.assert_array_equal(tokens[6:], full[5:-1].argmax(-1))


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


def test_generate_cli_runs_gguf_quantized_unless_dequantize(llama_files, monkeypatch, capsys):
    """rustgpt-generate --gguf keeps the weights quantized; --dequantize gives float32.
    Both continue the prompt as llama.cpp's greedy decoding of the same file does."""
    import io

    from rustgpt_jax.decoding import cli
    seen = []
    real = cli.load_gguf

    def spy(path, **kwargs):
        config, params, tokenizer = real(path, **kwargs)
        seen.append(any(quant.is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(
            params, is_leaf=quant.is_quantized)))
        return config, params, tokenizer

    monkeypatch.setattr(cli, 'load_gguf', spy)
    path = str(llama_files['q8_0'])
    texts = []
    for extra in ([], ['--dequantize']):
        out = io.StringIO()
        assert cli.generate_main(['--gguf', path, '--prompt', 'hello world', '--temperature',
                                  '0', '--max_new_tokens', '6'] + extra, out=out) == 0
        texts.append(out.getvalue())
    assert seen == [True, False]
    llm = llama_ref._llama(path)
    ids = llm.tokenize(b'hello world', add_bos=True)
    want = [t for _, t in zip(range(6), llm.generate(ids, temp=0.0))]
    llm.close()
    assert texts == [llama_ref.VOCAB.decode(want) + '\n'] * 2, (texts, want)


def test_packing_stacks_quantized_kernels_without_copying(llama_files):
    """nn.packing turns q/k/v and gate/up QArrays (mixed types in Q4_K_M) into QConcats of
    the same blocks; the packed model computes the standard one's logits, and unpacking
    gives the standard tree back."""
    from rustgpt_jax.models import build_model
    from rustgpt_jax.nn.packing import pack_projections, unpack_projections
    from rustgpt_jax.runtime.execution import Execution
    config, params, _ = load_gguf(llama_files['q4_k_m'], quantized=True)
    packed = pack_projections(params)
    qkv = packed['layer_0']['attention']['qkv_proj']['kernel']
    attn = params['layer_0']['attention']
    assert isinstance(qkv, quant.QConcat)
    assert qkv.shape == (config.num_heads + 2 * config.num_kv_heads,
                         config.effective_head_dim, config.embed_dim)
    assert [p.blocks for p in qkv.parts] == [attn[n]['kernel'].blocks
                                             for n in ('q_proj', 'k_proj', 'v_proj')]
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, 12)))
    xla = Execution(matvec='xla')
    standard = build_model(config, xla).apply({'params': params}, tokens)
    fused = build_model(config, Execution(packed=True, matvec='xla')).apply(
        {'params': packed}, tokens)
    np.testing.assert_allclose(fused, standard, rtol=0, atol=1e-5 * np.abs(standard).max())
    back = unpack_projections(config, packed)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        assert a is b or np.array_equal(a, b)
