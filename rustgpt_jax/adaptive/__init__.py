"""Adaptive attention: window strategies (SPEC §2) and AdaAttn (SPEC §4).

Public API:
  observe_loss(adaptive_state, loss, config): feeds the PerplexityBased strategy.
  summarize_intermediates(intermediates): window / AdaAttn metrics for the log.
  make_attention_core(variant, ...): the one dispatch on AttentionVariant.
"""

from rustgpt_jax.adaptive.adaattn import AdaAttn, make_attention_core
from rustgpt_jax.adaptive.entropy import (
                                          attention_entropy,
                                          normalized_entropy,
                                          reduce_entropy,
                                          row_entropy,
)
from rustgpt_jax.adaptive.precision import (
                                          LEVELS,
                                          AdaptivePrecisionAttention,
                                          choose_precision,
                                          policy_base_index,
                                          supported_levels,
)
from rustgpt_jax.adaptive.rank import (
                                          AdaptiveRankAttention,
                                          focus_score,
                                          hardware_penalty,
                                          low_rank_attention,
                                          rank_branch,
)
from rustgpt_jax.adaptive.stats import summarize_intermediates
from rustgpt_jax.adaptive.window_state import (
                                          COLLECTION,
                                          ema_update,
                                          entropy_window,
                                          observe_loss,
                                          perplexity_window,
                                          sequence_length_window,
                                          window_from_fraction,
)

__all__ = [
    'COLLECTION', 'LEVELS', 'AdaAttn', 'AdaptivePrecisionAttention', 'AdaptiveRankAttention',
    'attention_entropy', 'choose_precision', 'ema_update', 'entropy_window', 'focus_score',
    'hardware_penalty', 'low_rank_attention', 'make_attention_core', 'normalized_entropy',
    'observe_loss', 'perplexity_window', 'policy_base_index', 'rank_branch', 'reduce_entropy',
    'row_entropy', 'sequence_length_window', 'summarize_intermediates', 'supported_levels',
    'window_from_fraction',
]
