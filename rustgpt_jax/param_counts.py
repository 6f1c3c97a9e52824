"""Analytical parameter counts of every architecture, from the ModelConfig alone.

Pure arithmetic (no model is built), so the summary of a 7B configuration is instant;
tests/test_presets.py, test_hypermixer.py and test_hrm.py check each formula against
the shapes `jax.eval_shape` gives for the real model. Every formula is built from the
per-layer counts below, written once.
"""

from __future__ import annotations

from rustgpt_jax.config import (
    AttentionVariant,
    FeedForwardType,
    ModelConfig,
    NormPlacement,
    NormType,
    PositionType,
)


def norm_param_count(config: ModelConfig) -> int:
    """Parameters of one norm layer: RMSNorm has a scale, LayerNorm a scale and a bias."""
    return config.embed_dim * (2 if config.norm == NormType.LAYER_NORM else 1)


def feed_forward_param_count(config: ModelConfig) -> int:
    """Parameters of one feed-forward layer (D -> F -> D; SwiGLU has two up projections)."""
    d, f = config.embed_dim, config.hidden_dim
    if config.feed_forward == FeedForwardType.SWIGLU:
        return 3 * d * f + (2 * f + d if config.use_bias else 0)
    return 2 * d * f + (f + d if config.use_bias else 0)


def attention_param_count(config: ModelConfig) -> int:
    """Parameters of one attention layer: Q/K/V/O (GQA shrinks only K/V), plus the learned
    per-rank projections of q (N, H, r) and k (K, H, r) of the low-rank variants (SPEC §4)."""
    d, h = config.embed_dim, config.effective_head_dim
    q, kv = config.num_heads * h, config.num_kv_heads * h
    count = 2 * d * q + 2 * d * kv + (q + 2 * kv + d if config.use_bias else 0)
    if config.attention_variant in (AttentionVariant.ADAPTIVE_RANK, AttentionVariant.ADAATTN):
        count += sum((config.num_heads + config.num_kv_heads) * h * r
                     for r in config.adaattn_ranks)
    return count


def embedding_param_counts(config: ModelConfig) -> dict:
    """{'embedding': token (+ learned position) table, 'head': untied output head or 0}."""
    d = config.embed_dim
    embedding = config.vocab_size * d
    if config.positions == PositionType.LEARNED:
        embedding += config.max_seq_len * d
    return {'embedding': embedding, 'head': 0 if config.tie_embeddings else d * config.vocab_size}


def _final_norms(config: ModelConfig) -> int:
    return 1 if config.norm_placement == NormPlacement.PRE else 0


def transformer_parameter_counts(config: ModelConfig) -> dict:
    """Parameter counts of the Transformer (`arch.transformer`), by component.

    Returns:
      dict with 'embedding', 'positions', 'attention', 'feed_forward', 'norms', 'head'
      (model totals), 'per_layer' (a dict of 'attention', 'feed_forward', 'norms',
      'total' for one block) and 'total'.
    """
    d, layers = config.embed_dim, config.num_layers
    attention, ffn = attention_param_count(config), feed_forward_param_count(config)
    norms = 2 * norm_param_count(config)
    per_layer = {'attention': attention, 'feed_forward': ffn, 'norms': norms,
                 'total': attention + ffn + norms}
    embedding = embedding_param_counts(config)
    counts = {
        'embedding': config.vocab_size * d,
        'positions': embedding['embedding'] - config.vocab_size * d,
        'attention': layers * attention,
        'feed_forward': layers * ffn,
        'norms': layers * norms + _final_norms(config) * norm_param_count(config),
        'head': embedding['head'],
        'per_layer': per_layer,
    }
    counts['total'] = sum(value for key, value in counts.items() if key != 'per_layer')
    return counts


def hypermixer_hidden_dim(config: ModelConfig) -> int:
    """d': `config.hypermixer_hidden_dim`, defaulting to `config.hidden_dim`."""
    return config.hypermixer_hidden_dim or config.hidden_dim


def parameter_counts_hypermixer(config: ModelConfig) -> dict:
    """Analytical parameter counts of `HyperMixerLM(config)`.

    Per layer: two hypernetworks (D*D + D*d' weights, D + d' biases with use_bias),
    the feed-forward, and two norms; plus the embedding, the head (0 when tied) and the
    final norm (pre-norm only).

    Returns:
      dict with 'embedding', 'head', 'token_mixing', 'feed_forward', 'norms' and
      'total' (their sum).
    """
    d, c, layers = config.embed_dim, hypermixer_hidden_dim(config), config.num_layers
    hyper = d * d + d * c + (d + c if config.use_bias else 0)
    counts = dict(embedding_param_counts(config))
    counts['token_mixing'] = layers * 2 * hyper
    counts['feed_forward'] = layers * feed_forward_param_count(config)
    counts['norms'] = (2 * layers + _final_norms(config)) * norm_param_count(config)
    counts['total'] = sum(counts.values())
    return counts


def parameter_counts_hrm(config: ModelConfig) -> dict:
    """Analytical parameter counts of `HRMLM(config)`.

    L and H are stacks of hrm_low_layers / hrm_high_layers Transformer blocks (plus an
    out norm each with pre-norm); their weights are shared across iterations, so N and T
    do not change the count.

    Returns:
      dict with 'embedding', 'head', 'initial_states' (2 D), 'low_module',
      'high_module', 'norms' (embed_norm and, pre-norm only, final_norm) and 'total'.
    """
    pre = _final_norms(config)
    norm = norm_param_count(config)
    block = attention_param_count(config) + feed_forward_param_count(config) + 2 * norm
    counts = dict(embedding_param_counts(config))
    counts['initial_states'] = 2 * config.embed_dim
    counts['low_module'] = config.hrm_low_layers * block + pre * norm
    counts['high_module'] = config.hrm_high_layers * block + pre * norm
    counts['norms'] = norm * (1 + pre)
    counts['total'] = sum(counts.values())
    return counts
