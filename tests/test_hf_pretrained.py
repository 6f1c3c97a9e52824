"""Hugging Face model directories both ways, with transformers itself as the oracle.

transformers writes a directory (single file and sharded) that `load_pretrained` reads;
`save_pretrained` writes one that `AutoModelForCausalLM` / `AutoTokenizer` read. Logits
are compared in float32 within 1e-4, tokenizer ids exactly.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from test_gguf_format import random_params
from test_hf_parity import TOKENS, _hf_logits, _hf_model

from rustgpt_jax.arch.transformer import Transformer
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data import (
    CHAT_TEMPLATE,
    CharTokenizer,
    WordTokenizer,
    build_tokenizer,
    format_prompt,
)
from rustgpt_jax.interop import hf
from rustgpt_jax.interop.gguf import GGUFTokenizer

TEXT = ("To be, or not to be: that is the question.\nWhether 'tis nobler - in the mind?\n"
        "café naïve 日本語 🙂 x_y a1b2 ½\ttabs  and   spaces\n") * 4
STRINGS = ['To be, or not', 'question.\nWhether', "'tis nobler", 'café 日本語 🙂',
           'unknown: ¿Qué? Ωmega', '', ' ', '  two  spaces\n\n', 'x_y a1b2 ½', 'tab\there']


def _ours(config, params, tokens):
    return np.asarray(Transformer(config).apply({'params': params}, tokens))


@pytest.mark.parametrize('kind,overrides,shard', [
    ('llama', dict(num_key_value_heads=2, tie_word_embeddings=True), None),
    ('mistral', dict(num_key_value_heads=2, sliding_window=3, rope_theta=900.0), '20KB')])
def test_load_pretrained_reads_what_transformers_saved(tmp_path, kind, overrides, shard):
    model = _hf_model(kind, **overrides)
    model.save_pretrained(tmp_path, **({'max_shard_size': shard} if shard else {}))
    assert (tmp_path / 'model.safetensors.index.json').exists() == bool(shard)
    config, params, tokenizer = hf.load_pretrained(tmp_path)
    assert tokenizer is None and config.window_size == overrides.get('sliding_window')
    np.testing.assert_allclose(_ours(config, params, TOKENS), _hf_logits(model, TOKENS),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('overrides', [
    dict(tie_embeddings=False), dict(tie_embeddings=True, window_size=4, num_kv_heads=1)])
def test_save_pretrained_loads_in_transformers(tmp_path, overrides):
    config = ModelConfig(vocab_size=64, embed_dim=32, hidden_dim=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=32, rope_base=500.0).replace(**overrides)
    params = random_params(config, seed=1)
    hf.save_pretrained(tmp_path, config, params)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation='eager', dtype=torch.float32).eval()
    expected = 'Mistral' if config.window_size else 'Llama'
    assert type(model).__name__ == f'{expected}ForCausalLM'
    np.testing.assert_allclose(_hf_logits(model, TOKENS), _ours(config, params, TOKENS),
                               atol=1e-4, rtol=1e-4)
    assert not (tmp_path / 'tokenizer.json').exists()
    again, params_again, _ = hf.load_pretrained(tmp_path)
    assert again == config
    np.testing.assert_array_equal(params_again['layers']['ffn']['w2']['kernel'],
                                  params['layers']['ffn']['w2']['kernel'])


@pytest.mark.parametrize('kind', ['char', 'word', 'bpe'])
def test_exported_tokenizer_gives_our_ids_in_transformers(tmp_path, kind):
    tok = {'char': lambda: CharTokenizer.from_text(TEXT),
           'word': lambda: WordTokenizer.from_text(TEXT),
           'bpe': lambda: build_tokenizer('bpe', TEXT * 5, vocab_size=300)}[kind]()
    config = ModelConfig(vocab_size=tok.vocab_size, embed_dim=16, hidden_dim=32,
                         num_layers=1, num_heads=2, num_kv_heads=2, max_seq_len=16)
    hf.save_pretrained(tmp_path, config, random_params(config), tok)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _, _, loaded = hf.load_pretrained(tmp_path)
    for text in STRINGS + [TEXT]:
        ours = tok.encode(text)
        assert theirs(text, add_special_tokens=False)['input_ids'] == ours, (kind, text)
        assert loaded.encode(text) == ours, (kind, text)
    assert theirs.eos_token_id == tok.eos_id and theirs.pad_token_id == tok.pad_id
    assert json.loads((tmp_path / 'config.json').read_text())['eos_token_id'] == tok.eos_id
    # Our runs' prompt format travels as the chat template.
    chat = [{'role': 'user', 'content': 'To be?'}]
    assert loaded.chat_template == CHAT_TEMPLATE
    assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        format_prompt('To be?'))


def test_unsupported_directories_name_the_field(tmp_path):
    model = _hf_model('llama', num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    path = tmp_path / 'config.json'
    values = json.loads(path.read_text())
    for change, message in [({'architectures': ['GPT2LMHeadModel']}, 'architectures'),
                            ({'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0}},
                             "rope scaling 'yarn'"),
                            ({'attention_bias': True}, 'attention_bias'),
                            ({'model_type': 'gemma'}, 'model_type')]:
        path.write_text(json.dumps({**values, **change}))
        with pytest.raises(ValueError, match=message):
            hf.load_pretrained(tmp_path)
    (tmp_path / 'model.safetensors').unlink()
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match='neither model.safetensors'):
        hf.load_pretrained(tmp_path)
    config = ModelConfig(vocab_size=8, embed_dim=16, hidden_dim=32, num_layers=1,
                         num_heads=2, num_kv_heads=2, max_seq_len=16)
    gguf_tok = GGUFTokenizer('llama', [f't{i}' for i in range(8)], eos_id=1)
    with pytest.raises(ValueError, match="kind 'gguf' has no tokenizers-JSON mapping"):
        hf.save_pretrained(tmp_path / 'out', config, random_params(config), gguf_tok)
