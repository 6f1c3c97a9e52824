"""Hugging Face LlamaForCausalLM / MistralForCausalLM (torch, eager attention) as the oracle."""

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers import masking_utils

from rustgpt_jax import masks
from rustgpt_jax.arch.transformer import Transformer
from rustgpt_jax.config import rustgpt_baseline, rustgpt_modern
from rustgpt_jax.interop import hf

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5)

CASES = {
    'llama_mha_untied_theta500': ('llama', dict(num_key_value_heads=4, rope_theta=500.0)),
    'llama_gqa_tied': ('llama', dict(num_key_value_heads=2, tie_word_embeddings=True)),
    'llama_head_dim_16': ('llama', dict(num_key_value_heads=2, head_dim=16)),
    'mistral_gqa_window3': ('mistral', dict(num_key_value_heads=2, sliding_window=3,
                                            rope_theta=2000.0)),
    'mistral_mqa_window5_tied': ('mistral', dict(num_key_value_heads=1, sliding_window=5,
                                                 tie_word_embeddings=True)),
}


def _hf_model(kind, seed=0, **overrides):
    config_cls, model_cls = {
        'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    config = config_cls(**{**BASE, **overrides})
    config._attn_implementation = 'eager'
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger than the init so that every layer matters
        for name, param in model.named_parameters():
            param.normal_(1.0 if 'norm' in name else 0.0, 0.3 if 'norm' in name else 0.2)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.RandomState(0).randint(0, 64, (2, 12))  # longer than every window


@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_hf(name):
    kind, overrides = CASES[name]
    model = _hf_model(kind, **overrides)
    config = hf.config_from_hf(model.config)
    assert config.window_size == overrides.get('sliding_window')
    assert config.rope_base == overrides.get('rope_theta', 10000.0)
    assert config.tie_embeddings == overrides.get('tie_word_embeddings', False)
    params = hf.params_from_hf(model.state_dict(), config)
    ours = Transformer(config).apply({'params': params}, TOKENS)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _hf_logits(model, TOKENS), atol=1e-4, rtol=1e-4)


def test_unrolled_layers_and_missing_lm_head():
    model = _hf_model('mistral', num_key_value_heads=2, sliding_window=4)
    reference = _hf_logits(model, TOKENS)
    config = hf.config_from_hf(model.config, scan_layers=False)
    params = hf.params_from_hf(model.state_dict(), config)
    assert 'layer_1' in params and 'layers' not in params
    np.testing.assert_allclose(Transformer(config).apply({'params': params}, TOKENS),
                               reference, atol=1e-4, rtol=1e-4)
    # A checkpoint saved without lm_head decodes with the embedding table (tied).
    state = {k: v for k, v in model.state_dict().items() if k != 'lm_head.weight'}
    params = hf.params_from_hf(state, config)
    np.testing.assert_array_equal(params['embedder']['lm_head'],
                                  params['embedder']['token_embedding'].T)


def test_sliding_window_convention_matches_transformers():
    # transformers' own mask predicate vs ours, elementwise: both say i - j < W.
    for window in (1, 3, 6):
        predicate = masking_utils.sliding_window_causal_mask_function(window)
        theirs = np.array([[bool(predicate(0, 0, torch.tensor(i), torch.tensor(j)))
                            for j in range(8)] for i in range(8)])
        np.testing.assert_array_equal(masks.sliding_window_mask(8, window), theirs)


def test_export_round_trip_into_fresh_hf_model():
    source = _hf_model('mistral', num_key_value_heads=2, sliding_window=3, rope_theta=900.0)
    config = hf.config_from_hf(source.config)
    params = hf.params_from_hf(source.state_dict(), config)
    hf_config = hf.hf_config_from(config)
    assert isinstance(hf_config, transformers.MistralConfig)
    assert hf.config_from_hf(hf_config) == config
    hf_config._attn_implementation = 'eager'
    target = transformers.MistralForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf(params, config).items()}
    target.load_state_dict(state, strict=True)
    np.testing.assert_allclose(_hf_logits(target, TOKENS), _hf_logits(source, TOKENS),
                               atol=1e-5, rtol=1e-5)


def test_export_initialised_model_matches_hf():
    # Our own init (boxed params, unrolled layers, tied) exported to LlamaForCausalLM.
    config = rustgpt_modern(vocab_size=48, embed_dim=32, hidden_dim=40, num_layers=2,
                            num_heads=4, num_kv_heads=2, max_seq_len=16, window_size=None,
                            tie_embeddings=True, scan_layers=False, init_std=0.2)
    variables = jax.jit(Transformer(config).init)(jax.random.key(0), TOKENS[:, :8] % 48)
    hf_config = hf.hf_config_from(config)
    assert isinstance(hf_config, transformers.LlamaConfig)
    hf_config._attn_implementation = 'eager'
    target = transformers.LlamaForCausalLM(hf_config).eval()
    state = {k: torch.from_numpy(v) for k, v in hf.params_to_hf(variables['params'],
                                                                 config).items()}
    target.load_state_dict(state, strict=True)
    tokens = TOKENS % 48
    ours = jax.jit(Transformer(config).apply)(variables, tokens)
    np.testing.assert_allclose(ours, _hf_logits(target, tokens), atol=1e-4, rtol=1e-4)


def test_bfloat16_torch_tensors_load():
    model = _hf_model('llama', num_key_value_heads=2)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    config = hf.config_from_hf(model.config, param_dtype='bfloat16')
    params = hf.params_from_hf(state, config)
    kernel = params['layers']['attention']['q_proj']['kernel']
    assert kernel.dtype == jax.numpy.bfloat16
    expected = state['model.layers.1.self_attn.q_proj.weight'].float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel[1], np.float32).reshape(32, 32), expected.T)


UNSUPPORTED = [
    (dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 1e4}),
     'rope scaling'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
]


@pytest.mark.parametrize('overrides,message', UNSUPPORTED, ids=[m for _, m in UNSUPPORTED])
def test_unsupported_hf_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf(transformers.LlamaConfig(**{**BASE, **overrides}))


def test_config_json_dicts():
    # transformers 4.x config.json style: rope_theta / rope_scaling at the top level.
    config = hf.config_from_hf({**BASE, 'model_type': 'llama', 'rope_theta': 321.0,
                                'num_key_value_heads': 2, 'rope_scaling': None})
    assert config.rope_base == 321.0 and config.num_kv_heads == 2
    with pytest.raises(ValueError, match='model_type'):
        hf.config_from_hf({**BASE, 'model_type': 'gpt2'})
    with pytest.raises(ValueError, match='dynamic'):
        hf.config_from_hf({**BASE, 'model_type': 'llama',
                           'rope_scaling': {'type': 'dynamic', 'factor': 2.0}})


def test_bad_state_dicts_name_the_tensor():
    model = _hf_model('llama', num_key_value_heads=2)
    config = hf.config_from_hf(model.config)
    state = dict(model.state_dict())
    name = 'model.layers.1.mlp.up_proj.weight'
    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(ValueError, match=f'missing tensor .{name}.'):
        hf.params_from_hf(missing, config)
    wrong = {**state, name: torch.zeros(47, 32)}
    with pytest.raises(ValueError, match=rf'{name}.* \(47, 32\), expected \(48, 32\)'):
        hf.params_from_hf(wrong, config)
    extra = {**state, 'model.layers.0.self_attn.q_proj.bias': torch.zeros(32)}
    with pytest.raises(ValueError, match='unexpected tensors.*q_proj.bias'):
        hf.params_from_hf(extra, config)
    # A bare LlamaModel state dict (no `model.` prefix) loads too.
    bare = {k.removeprefix('model.'): v for k, v in state.items()}
    np.testing.assert_array_equal(hf.params_from_hf(bare, config)['final_norm']['scale'],
                                  state['model.norm.weight'].numpy())


def test_incompatible_model_config_is_rejected():
    with pytest.raises(ValueError, match=r'ModelConfig\.norm='):
        hf.hf_config_from(rustgpt_baseline())
    with pytest.raises(ValueError, match=r'ModelConfig\.window_strategy='):
        hf.params_to_hf({}, rustgpt_modern(window_strategy='sequence_length', max_window=8))
