"""Presets at full size under jax.eval_shape: shapes vs the analytic parameter formula."""

import flax
import jax
import jax.numpy as jnp
import pytest

from rustgpt_jax.config import PRESETS, preset, rustgpt_modern
from rustgpt_jax.models import build_model
from rustgpt_jax.summary import parameter_counts


def _component(path: str) -> str:
    if 'token_embedding' in path:
        return 'embedding'
    if 'position_embedding' in path:
        return 'positions'
    if 'lm_head' in path:
        return 'head'
    if 'attention' in path:
        return 'attention'
    if "['ffn']" in path:
        return 'feed_forward'
    if 'norm' in path:
        return 'norms'
    raise AssertionError(f'unclassified parameter {path}')


def counts_from_shapes(config) -> dict:
    """Parameter counts per component from the real model's shapes (zero compute)."""
    tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    shapes = jax.eval_shape(build_model(config).init, jax.random.key(0), tokens)['params']
    counts = dict.fromkeys(('embedding', 'positions', 'attention', 'feed_forward', 'norms',
                            'head'), 0)
    for path, leaf in jax.tree_util.tree_leaves_with_path(flax.core.meta.unbox(shapes)):
        counts[_component(jax.tree_util.keystr(path))] += leaf.size
    counts['total'] = sum(counts.values())
    return counts


def _formula(config) -> dict:
    return {k: v for k, v in parameter_counts(config).items() if k != 'per_layer'}


@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_shapes_match_formula(name):
    config = preset(name)
    assert counts_from_shapes(config) == _formula(config)


def test_published_totals():
    # TinyLlama: 2 * 32000 * 2048 (embed + head) + 22 * (q,o 2*2048^2 + k,v 2*2048*256
    # + 3*2048*5632 + 2*2048) + 2048 = 1,100,048,384.
    assert parameter_counts(preset('tinyllama_1_1b'))['total'] == 1_100_048_384
    # Mistral 7B: 2 * 32000 * 4096 + 32 * (2*4096^2 + 2*4096*1024 + 3*4096*14336 + 2*4096)
    # + 4096 = 7,241,732,096.
    assert parameter_counts(preset('mistral_7b'))['total'] == 7_241_732_096
    per_layer = parameter_counts(preset('mistral_7b'))['per_layer']
    assert per_layer['attention'] == 2 * 4096 * 4096 + 2 * 4096 * 1024
    assert per_layer['feed_forward'] == 3 * 4096 * 14336


VARIANTS = {
    'tied': dict(tie_embeddings=True),
    'bias_swiglu': dict(use_bias=True),
    'layer_norm_learned_relu': dict(norm='layer_norm', positions='learned',
                                    feed_forward='relu'),
    'post_norm_mqa': dict(norm_placement='post', num_kv_heads=1),
    'head_dim_override': dict(head_dim=24),
    'unrolled': dict(scan_layers=False),
    # Low-rank variants add learned q/k rank projections per rank (SPEC §4).
    'adaptive_rank': dict(attention_variant='adaptive_rank', adaattn_ranks=(4, 8)),
    'adaattn': dict(attention_variant='adaattn', adaattn_ranks=(2,)),
    'adaptive_precision': dict(attention_variant='adaptive_precision'),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_variant_shapes_match_formula(name):
    config = rustgpt_modern(num_layers=2, **VARIANTS[name])
    assert counts_from_shapes(config) == _formula(config)
