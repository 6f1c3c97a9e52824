"""architecture_summary: figures equal the formulas; presets name their architecture."""

import pytest

from rustgpt_jax import masks
from rustgpt_jax.config import Architecture, ModelConfig, preset, rustgpt_modern
from rustgpt_jax.summary import (
    PARAMETER_FORMULAS,
    architecture_summary,
    attended_pairs,
    gqa_reduction,
    kv_cache_bytes_per_token,
    matched_architecture,
    parameter_counts,
    register_parameter_formula,
)

MATCHES = {
    'mistral_7b': 'Mistral 7B (sliding window)',
    'tinyllama_1_1b': 'TinyLlama-1.1B',
    'rustgpt_baseline': 'RustGPT baseline',
    'rustgpt_modern': 'Mistral-style (sliding window, GQA)',
    'mistral_tiny': 'Mistral-style (sliding window, GQA)',
}


@pytest.mark.parametrize('name', sorted(MATCHES))
def test_summary_of_presets(name):
    config = preset(name)
    text = architecture_summary(config)
    assert text.splitlines()[0].startswith(f'Architecture: {MATCHES[name]}')
    assert f'[preset {name}]' in text
    counts = parameter_counts(config)
    assert f'{counts["total"]:,}' in text
    assert f'{counts["per_layer"]["total"]:,}' in text
    h = config.embed_dim // config.num_heads
    per_token = 2 * config.num_layers * config.num_kv_heads * h * 4  # float32 cache
    assert kv_cache_bytes_per_token(config) == per_token
    assert f'bytes per token    {per_token:,}' in text
    assert f'{per_token * config.num_heads // config.num_kv_heads:,} bytes per token' in text


def test_gqa_figures_for_published_models():
    tiny = preset('tinyllama_1_1b')
    assert gqa_reduction(tiny) == 8.0
    assert kv_cache_bytes_per_token(tiny.replace(dtype='bfloat16')) == 2 * 22 * 4 * 64 * 2
    assert 'GQA reduction 8x' in architecture_summary(tiny)
    mistral = preset('mistral_7b', dtype='bfloat16')
    assert kv_cache_bytes_per_token(mistral) == 131_072  # 2 * 32 * 8 * 128 * 2 bytes
    text = architecture_summary(mistral)
    assert 'GQA reduction 4x' in text and 'Mistral 7B' in text  # dtype does not matter
    # At 32k tokens with W = 4096: N/W = 8; causal pairs 536,887,296 vs 125,831,168.
    assert 'N/W = 8' in text and '125,831,168' in text and '536,887,296' in text


@pytest.mark.parametrize('seq,window', [(8, 1), (8, 3), (8, 8), (9, 20), (10, None)])
def test_attended_pairs_counts_the_mask(seq, window):
    mask = masks.sliding_window_mask(seq, masks.window_or_full(window))
    assert attended_pairs(seq, window) == int(mask.sum())


FAMILIES = [
    (dict(num_kv_heads=8), 'LLaMA'),
    (dict(num_kv_heads=2), 'LLaMA-2 with GQA'),
    (dict(num_kv_heads=1), 'LLaMA-style with MQA'),
    (dict(num_kv_heads=8, window_size=16), 'Mistral-style (sliding window)'),
    (dict(norm='layer_norm', feed_forward='relu', positions='learned', use_bias=True),
     'GPT-2-style baseline'),
    (dict(norm='layer_norm', feed_forward='relu', positions='learned', use_bias=True,
          norm_placement='post'), 'RustGPT baseline'),
    (dict(feed_forward='relu'), 'custom (norm=rms_norm, feed_forward=relu'),
]


@pytest.mark.parametrize('overrides,family', FAMILIES, ids=[f for _, f in FAMILIES])
def test_matched_families(overrides, family):
    config = ModelConfig(**{'num_heads': 8, 'window_size': None, **overrides})
    assert matched_architecture(config).startswith(family)


def test_pluggable_formula(monkeypatch):
    config = rustgpt_modern(architecture='hrm')
    monkeypatch.delitem(PARAMETER_FORMULAS, Architecture.HRM, raising=False)
    with pytest.raises(ValueError, match="architecture='hrm'"):
        parameter_counts(config)
    assert 'unavailable' in architecture_summary(config)
    # setitem first so that teardown also undoes the register call below.
    monkeypatch.setitem(PARAMETER_FORMULAS, Architecture.HRM, PARAMETER_FORMULAS[
        Architecture.TRANSFORMER])
    register_parameter_formula('hrm', lambda c: {'total': 1234567, 'attention': 7})
    text = architecture_summary(config)
    assert '1,234,567' in text and 'HRM' in text.splitlines()[0]


def test_summary_says_which_attention_runs_and_why(monkeypatch):
    text = architecture_summary(rustgpt_modern())  # max_seq_len 80: below one tile
    assert ('  full sequences     auto -> reference (cpu: dense reference for sequences '
            'shorter than one blocked tile (256 tokens)') in text
    text = architecture_summary(rustgpt_modern(max_seq_len=4096))
    assert ('  full sequences     auto -> blocked (cpu: blocked XLA attention (skips masked '
            'key blocks); the dense reference for sequences shorter than 256 tokens)') in text
    assert '  decode step        auto (cpu: the cached XLA step)' in text
    assert '  full sequences     pallas (explicit)' in architecture_summary(
        rustgpt_modern(attention_impl='pallas'))
    monkeypatch.setattr('jax.default_backend', lambda: 'gpu')
    text = architecture_summary(rustgpt_modern())  # float32: not cuDNN
    assert 'auto -> pallas (gpu: Pallas Triton kernel; not cuDNN: dtype float32' in text
    text = architecture_summary(rustgpt_modern(dtype='bfloat16'))
    assert 'auto -> cudnn (gpu: cuDNN fused attention' in text
    assert 'decode step        auto (gpu: Pallas flash-decoding' in text
