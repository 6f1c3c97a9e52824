"""`save_gguf`: a model trained here -> a llama-architecture GGUF file llama.cpp runs.

llama.cpp's llama graph is fixed: pre-norm RMSNorm, SwiGLU, RoPE on every channel, GQA,
no biases, full causal attention, a single stack of blocks. A ModelConfig outside that set
is refused with the field named. Weights go out in torch layout (via
`interop.hf.params_to_hf`) with q/k rows permuted to llama.cpp's adjacent-pair RoPE.
"""

from __future__ import annotations

import os
import warnings

import flax
import gguf
import jax
import numpy as np

from rustgpt_jax import quant
from rustgpt_jax.config import (
    Architecture,
    AttentionVariant,
    FeedForwardType,
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
    WindowStrategy,
)
from rustgpt_jax.data.instructions import chat_template_of
from rustgpt_jax.interop.gguf.loader import ARCH, GGUF_TO_HF, LAYER_TO_HF, permute_qk
from rustgpt_jax.interop.gguf.quantized import export_tensors
from rustgpt_jax.interop.gguf.tokenizer import (
    CONTROL,
    NORMAL,
    SPACE,
    UNKNOWN,
    UNUSED,
    GGUFTokenizer,
)
from rustgpt_jax.interop.hf import params_to_hf

# name -> (GGMLQuantizationType name, LlamaFileType value)
FILE_TYPES = {'f32': ('F32', 0), 'f16': ('F16', 1), 'bf16': ('BF16', 32), 'q8_0': ('Q8_0', 7),
              'q4_0': ('Q4_0', 2)}


def check_llama_compatible(config: ModelConfig) -> None:
    """Raises ValueError naming the first ModelConfig field llama.cpp's llama arch lacks."""
    required = {
        'architecture': (Architecture.TRANSFORMER, 'a transformer stack'),
        'norm': (NormType.RMS_NORM, 'RMSNorm (LayerNorm has a bias and mean-centring)'),
        'feed_forward': (FeedForwardType.SWIGLU, 'a SwiGLU feed-forward'),
        'positions': (PositionType.ROPE, 'RoPE (learned position tables do not exist there)'),
        'norm_placement': (NormPlacement.PRE, 'pre-norm blocks (post-norm is not expressible)'),
        'use_bias': (False, 'bias-free projections'),
        'attention_variant': (AttentionVariant.STANDARD, 'standard attention'),
        'window_strategy': (WindowStrategy.FIXED, 'a fixed attention window'),
    }
    for name, (value, what) in required.items():
        got = getattr(config, name)
        if got != value:
            shown = got.value if hasattr(got, 'value') else got
            raise ValueError(f'save_gguf: ModelConfig.{name}={shown!r} cannot be exported: '
                             f"llama.cpp's llama architecture needs {what}")
    if config.window_size is not None and config.window_size < config.max_seq_len:
        raise ValueError(f'save_gguf: ModelConfig.window_size={config.window_size} cannot be '
                         "exported: llama.cpp's llama architecture has no sliding window")


def vocab_of(tokenizer, vocab_size: int) -> dict:
    """GGUF `tokenizer.ggml.*` fields for one of our tokenizers, padded to `vocab_size`.

    Args:
      tokenizer: a GGUFTokenizer (written back as is), a char / word tokenizer (written as
        a llama vocabulary of its pieces, so llama.cpp reproduces character tokenization),
        a byte-level BPE tokenizer (written as gpt2 with its merges), or None (placeholder
        pieces '<tok_i>').
      vocab_size: the model's V; extra ids become UNUSED '<unused_i>' pieces.

    Returns:
      dict with model, tokens, scores, token_types, merges, bos/eos/unk/pad ids,
      add_bos, add_space_prefix, pre, chat_template (the tokenizer's own, or for ours
      `data.CHAT_TEMPLATE`, the format they are trained on).
    """
    kind = getattr(tokenizer, 'kind', None)
    out = dict(merges=None, bos_id=None, unk_id=None, pad_id=None, add_bos=False,
               add_space_prefix=False, pre=None, chat_template=chat_template_of(tokenizer))
    if isinstance(tokenizer, GGUFTokenizer):
        out.update(model=tokenizer.model, tokens=list(tokenizer.tokens),
                   scores=tokenizer.scores.tolist(), token_types=tokenizer.token_types.tolist(),
                   merges=tokenizer.merges or None, bos_id=tokenizer.bos_id,
                   eos_id=tokenizer.eos_id, unk_id=tokenizer.unk_id, pad_id=tokenizer.pad_id,
                   add_bos=tokenizer.add_bos, add_space_prefix=tokenizer.add_space_prefix,
                   pre=tokenizer.pre)
    elif kind in ('char', 'word'):
        # Specials first (<pad>, <eos>, <unk>), as rustgpt_jax.data.vocab_tokenizers lays out.
        pieces = list(tokenizer._vocab_identity())
        types = [NORMAL] * len(pieces)
        types[tokenizer.pad_id] = types[tokenizer.eos_id] = CONTROL
        types[tokenizer.unk_id] = UNKNOWN
        pieces = [p if types[i] != NORMAL else p.replace(' ', SPACE) for i, p in enumerate(pieces)]
        out.update(model='llama', tokens=pieces, scores=[0.0] * len(pieces), token_types=types,
                   eos_id=tokenizer.eos_id, unk_id=tokenizer.unk_id, pad_id=tokenizer.pad_id)
    elif kind == 'bpe':
        import json
        hf = tokenizer.hf_tokenizer
        vocab = hf.get_vocab(with_added_tokens=True)
        pieces = [None] * len(vocab)
        for piece, i in vocab.items():
            pieces[i] = piece
        merges = json.loads(hf.to_str())['model']['merges']
        merges = [m if isinstance(m, str) else ' '.join(m) for m in merges]
        types = [CONTROL if i in (tokenizer.pad_id, tokenizer.eos_id) else NORMAL
                 for i in range(len(pieces))]
        out.update(model='gpt2', tokens=pieces, scores=[0.0] * len(pieces), token_types=types,
                   merges=merges, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, pre='gpt-2')
    elif tokenizer is None:
        out.update(model='llama', tokens=[f'<tok_{i}>' for i in range(vocab_size)],
                   scores=[0.0] * vocab_size, token_types=[NORMAL] * vocab_size, eos_id=None)
    else:
        raise ValueError(f'save_gguf: tokenizer {type(tokenizer).__name__} (kind {kind!r}) '
                         'has no GGUF vocabulary mapping')
    n = len(out['tokens'])
    if n > vocab_size:
        raise ValueError(f'save_gguf: tokenizer has {n} tokens but ModelConfig.vocab_size is '
                         f'{vocab_size}')
    out['tokens'] += [f'<unused_{i}>' for i in range(n, vocab_size)]
    out['scores'] = list(out['scores']) + [0.0] * (vocab_size - n)
    out['token_types'] = list(out['token_types']) + [UNUSED] * (vocab_size - n)
    return out


def _add_vocab(writer, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab['model'])
    if vocab['pre']:
        writer.add_tokenizer_pre(vocab['pre'])
    writer.add_token_list(vocab['tokens'])
    writer.add_token_scores(np.asarray(vocab['scores'], np.float32).tolist())
    writer.add_token_types(np.asarray(vocab['token_types'], np.int32).tolist())
    if vocab['merges']:
        writer.add_token_merges(vocab['merges'])
    for name, add in (('bos_id', writer.add_bos_token_id), ('eos_id', writer.add_eos_token_id),
                      ('unk_id', writer.add_unk_token_id), ('pad_id', writer.add_pad_token_id)):
        if vocab[name] is not None:
            add(int(vocab[name]))
    writer.add_add_bos_token(bool(vocab['add_bos']))
    writer.add_add_eos_token(False)
    if vocab['model'] == 'llama':
        writer.add_add_space_prefix(bool(vocab['add_space_prefix']))
    if vocab['chat_template']:
        writer.add_chat_template(vocab['chat_template'])


def _encode(name: str, array: np.ndarray, qtype_name: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor.

    Norm vectors stay F32 (llama.cpp reads them as F32, as convert_hf_to_gguf writes them).
    A row length that is not a multiple of the quant block (32 for Q8_0/Q4_0) cannot be
    quantised in ggml's row-major block layout, so that tensor stays F32 with a warning
    (llama-quantize also falls back to another type there); llama.cpp runs mixed-type files.
    """
    import gguf
    qtype = gguf.GGMLQuantizationType[qtype_name]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.ndim == 1 or qtype_name == 'F32':
        return np.ascontiguousarray(array, np.float32), None
    if array.shape[-1] % block:
        warnings.warn(f'save_gguf: {name} has rows of {array.shape[-1]} values, not a multiple '
                      f'of the {qtype_name} block of {block}; writing it as F32', stacklevel=3)
        return np.ascontiguousarray(array, np.float32), None
    if qtype_name == 'F16':
        return array.astype(np.float16), None
    return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype), qtype


def save_gguf(path: str, config: ModelConfig, params, tokenizer=None, ftype: str = 'f32',
              name: str = 'rustgpt_jax') -> str:
    """Writes `params` of `Transformer(config)` as a llama-architecture GGUF file.

    Args:
      path: output file.
      config: a llama.cpp-compatible ModelConfig (see `check_llama_compatible`).
      params: the model's param tree (boxed or plain; scanned or per-layer), or the
        quantized params of `load_gguf(quantized=True)`, whose blocks are written as
        they are (`ftype` then applies to their float matrices only).
      tokenizer: see `vocab_of`; its vocabulary must fit in `config.vocab_size`.
      ftype: 'f32', 'f16', 'bf16', 'q8_0' or 'q4_0' for the 2-D weights; norms stay F32.
      name: `general.name`.

    Returns:
      `path`.

    Raises:
      ValueError: for a configuration or tokenizer llama.cpp cannot represent.
    """
    check_llama_compatible(config)
    if ftype not in FILE_TYPES:
        raise ValueError(f'save_gguf: ftype {ftype!r} is not one of {sorted(FILE_TYPES)}')
    vocab = vocab_of(tokenizer, config.vocab_size)
    qtype_name, file_type = FILE_TYPES[ftype]
    params = flax.core.meta.unbox(params)
    encode = lambda name, w: _encode(name, w, qtype_name)
    if any(quant.is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(
            params, is_leaf=quant.is_quantized)):
        # Quantized params (load_gguf(quantized=True)): blocks are written as they are.
        tensors = export_tensors(params, config, encode, permute_qk)
    else:
        tensors = _float_tensors(params, config, encode)
    writer = gguf.GGUFWriter(os.fspath(path), ARCH)
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    h = config.effective_head_dim
    if h * config.num_heads != config.embed_dim:
        writer.add_key_length(h)
        writer.add_value_length(h)
    writer.add_rope_dimension_count(h)
    writer.add_rope_freq_base(float(config.rope_base))
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_vocab(writer, vocab)

    for gguf_name, data, raw_dtype in tensors:
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def _float_tensors(params, config: ModelConfig, encode) -> list:
    """[(GGUF name, data, raw ggml type or None)] of float params (any layer layout)."""
    hf = params_to_hf(params, config)
    to_gguf = {hf_name: g for g, hf_name in GGUF_TO_HF.items()}
    for i in range(config.num_layers):
        to_gguf.update({f'model.layers.{i}.{hf_part}.weight': f'blk.{i}.{part}.weight'
                        for part, hf_part in LAYER_TO_HF.items()})
    if config.tie_embeddings:
        hf.pop('lm_head.weight')
    tensors = []
    for hf_name, array in hf.items():
        gguf_name = to_gguf[hf_name]
        if gguf_name.endswith(('attn_q.weight', 'attn_k.weight')):
            heads = config.num_heads if 'attn_q' in gguf_name else config.num_kv_heads
            array = permute_qk(array, heads)
        tensors.append((gguf_name, *encode(gguf_name, array)))
    return tensors
