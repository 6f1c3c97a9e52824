"""Decoding: KV-cache generation loop, samplers, beam search with adaptive width, CLIs."""

from rustgpt_jax.decoding.beam import BeamConfig, BeamOutput, adapt_width, beam_search, entropy
from rustgpt_jax.decoding.cache import (
    DecodeModel,
    cache_batch_axes,
    context_limit,
    default_matvec_impl,
    default_row_blocks,
    init_cache,
    left_pad,
    prepare_for_decode,
    prompt_positions,
    reorder_cache,
    unstack_layers,
)
from rustgpt_jax.decoding.generate import GenerationOutput, decode_step, generate, prefill
from rustgpt_jax.decoding.sampling import (
    SamplingConfig,
    filtered_logits,
    sample_logits,
    top_k_filter,
    top_p_filter,
)
from rustgpt_jax.decoding.streaming import TextStreamer, stream, truncate_at_stop
from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency, current_wakeup_latency

__all__ = [
    'BeamConfig', 'BeamOutput', 'DecodeModel', 'GenerationOutput', 'SamplingConfig', 'TextStreamer',
    'adapt_width', 'beam_search', 'cache_batch_axes', 'context_limit', 'cpu_wakeup_latency',
    'current_wakeup_latency', 'decode_step', 'default_matvec_impl', 'default_row_blocks',
    'entropy', 'filtered_logits', 'generate', 'init_cache', 'left_pad', 'prefill',
    'prepare_for_decode', 'prompt_positions', 'reorder_cache', 'sample_logits', 'stream',
    'top_k_filter', 'top_p_filter', 'truncate_at_stop', 'unstack_layers',
]
