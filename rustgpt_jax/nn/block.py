"""One transformer block: attention + feed-forward with pre- or post-norm residuals."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.config import FeedForwardType, ModelConfig, NormPlacement, NormType, PositionType
from rustgpt_jax.nn.attention import Attention
from rustgpt_jax.nn.feed_forward import ReluFeedForward, SwiGLU
from rustgpt_jax.nn.norms import LayerNorm, RMSNorm
from rustgpt_jax.nn.window import WindowController
from rustgpt_jax.runtime.auto import attention_call
from rustgpt_jax.runtime.execution import Execution


def make_norm(config: ModelConfig, name: str) -> nn.Module:
    """The configured normalisation layer."""
    cls = {NormType.RMS_NORM: RMSNorm, NormType.LAYER_NORM: LayerNorm}[config.norm]
    return cls(eps=config.norm_eps, dtype=config.compute_dtype,
               param_dtype=config.params_dtype, name=name)


def make_feed_forward(config: ModelConfig, name: str,
                      execution: Execution = Execution()) -> nn.Module:
    """The configured feed-forward layer."""
    cls = {FeedForwardType.SWIGLU: SwiGLU, FeedForwardType.RELU: ReluFeedForward}[
        config.feed_forward]
    return cls(hidden_dim=config.hidden_dim, use_bias=config.use_bias,
               init_std=config.init_std, dtype=config.compute_dtype,
               param_dtype=config.params_dtype, execution=execution, name=name)


class Block(nn.Module):
    """Pre-norm: x + f(norm(x)). Post-norm (the Rust code): norm(x + f(x)).

    Attributes:
      config: the model.
      execution: how its products run (`runtime.Execution`).
      deterministic: disables dropout when True.
      decode: use and update the `cache` collection.
    """
    config: ModelConfig
    execution: Execution = Execution()
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        """Args: x (B, T, D); positions (B, T); segment_ids (B, T) or None.

        Returns:
          (x, None): the scan carry and no per-layer output.
        """
        cfg = self.config
        seq_len = jnp.max(positions) + 1 if self.decode else x.shape[1]
        controller = WindowController(cfg.window_strategy, cfg.window_size, cfg.min_window,
                                      cfg.max_window, cfg.window_ema_alpha, cfg.vocab_size,
                                      name='window')
        window = controller(seq_len)
        # The entropy strategy observes this pass's attention entropy (train / eval only).
        with_entropy = controller.wants_entropy and not self.decode
        attention = Attention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.effective_head_dim, use_bias=cfg.use_bias,
            use_rope=cfg.positions == PositionType.ROPE, rope_base=cfg.rope_base,
            impl=cfg.attention_impl, cache_length=cfg.cache_length, decode=self.decode,
            init_std=cfg.init_std, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype,
            variant=cfg.attention_variant, adaattn_ranks=cfg.adaattn_ranks,
            adaattn_rank_threshold=cfg.adaattn_rank_threshold,
            precision_policy=cfg.precision_policy, with_entropy=with_entropy,
            execution=self.execution, call=attention_call(cfg), name='attention')

        def attend(h):
            if not with_entropy:
                return attention(h, positions, segment_ids, window)
            out, entropy = attention(h, positions, segment_ids, window)
            controller.observe_entropy(entropy)
            return out

        ffn = make_feed_forward(cfg, 'ffn', self.execution)
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        attn_norm, ffn_norm = make_norm(cfg, 'attn_norm'), make_norm(cfg, 'ffn_norm')

        if cfg.norm_placement == NormPlacement.PRE:
            x = x + drop(attend(attn_norm(x)))
            x = x + drop(ffn(ffn_norm(x)))
        else:
            x = attn_norm(x + drop(attend(x)))
            x = ffn_norm(x + drop(ffn(x)))
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return x, None
