"""ModelConfig: validation names the offending field; derived values; enum coercion."""

import re

import pytest

from rustgpt_jax.config import (
    FeedForwardType,
    ModelConfig,
    NormType,
    WindowStrategy,
    preset,
    rustgpt_modern,
)

# (field the error must name, overrides on top of the defaults)
INVALID = [
    ('vocab_size', dict(vocab_size=0)),
    ('embed_dim', dict(embed_dim=-8)),
    ('hidden_dim', dict(hidden_dim=0)),
    ('num_layers', dict(num_layers=True)),
    ('num_heads', dict(num_heads=0)),
    ('num_kv_heads', dict(num_heads=8, num_kv_heads=3)),
    ('max_seq_len', dict(max_seq_len=0)),
    ('head_dim', dict(embed_dim=100, num_heads=8)),
    ('head_dim', dict(head_dim=15)),
    ('rope_base', dict(rope_base=1.0)),
    ('norm_eps', dict(norm_eps=0.0)),
    ('window_size', dict(window_size=0)),
    ('min_window', dict(min_window=0)),
    ('min_window', dict(min_window=10, max_window=5)),
    ('max_window', dict(window_strategy='sequence_length')),
    ('window_ema_alpha', dict(window_ema_alpha=0.0)),
    ('dropout_rate', dict(dropout_rate=1.0)),
    ('dtype', dict(dtype='int8')),
    ('param_dtype', dict(param_dtype='float64')),
    ('norm', dict(norm='batch_norm')),
    ('feed_forward', dict(feed_forward='gelu')),
    ('attention_impl', dict(attention_impl='flash3')),
    ('adaattn_ranks', dict(adaattn_ranks=())),
    ('adaattn_ranks', dict(adaattn_ranks=(64,), attention_variant='adaptive_rank')),
    ('adaattn_rank_threshold', dict(adaattn_rank_threshold=1.5)),
    ('hrm_cycles', dict(hrm_cycles=0)),
    ('hypermixer_hidden_dim', dict(hypermixer_hidden_dim=0)),
    ('init_std', dict(init_std=0.0)),
]


@pytest.mark.parametrize('field,overrides', INVALID,
                         ids=[f'{f}-{i}' for i, (f, _) in enumerate(INVALID)])
def test_invalid_config_names_field(field, overrides):
    with pytest.raises(ValueError, match=rf'ModelConfig\.{re.escape(field)}\b'):
        ModelConfig(**overrides)


def test_replace_revalidates():
    with pytest.raises(ValueError, match=r'ModelConfig\.num_kv_heads\b'):
        rustgpt_modern().replace(num_kv_heads=3)


def test_enum_strings_are_coerced():
    config = ModelConfig(norm='layer_norm', feed_forward='relu', window_strategy='fixed')
    assert config.norm is NormType.LAYER_NORM
    assert config.feed_forward is FeedForwardType.RELU
    assert config.window_strategy is WindowStrategy.FIXED


def test_derived_values():
    config = ModelConfig(embed_dim=96, num_heads=6, num_kv_heads=2, max_seq_len=50)
    assert config.effective_head_dim == 16 and config.head_dim == 16
    assert config.queries_per_kv == 3
    assert config.cache_length == 50  # full causal: one slot per position
    assert config.replace(window_size=8).cache_length == 8  # ring of W slots
    assert config.replace(window_size=80).cache_length == 50  # never more than max_seq_len
    explicit = ModelConfig(embed_dim=96, num_heads=6, num_kv_heads=6, head_dim=32)
    assert explicit.effective_head_dim == 32
    adaptive = config.replace(window_strategy='sequence_length', max_window=12)
    assert adaptive.static_window == 12 and adaptive.cache_length == 12


def test_adaattn_ranks_are_sorted_unique():
    assert ModelConfig(adaattn_ranks=(8, 2, 8)).adaattn_ranks == (2, 8)
    # Standard attention ignores the ranks, so small heads keep the default (8,).
    assert ModelConfig(embed_dim=16, num_heads=4, num_kv_heads=4).effective_head_dim == 4


def test_unknown_preset():
    with pytest.raises(ValueError, match='unknown preset'):
        preset('gpt5')
    assert preset('rustgpt_modern', num_layers=1).num_layers == 1
