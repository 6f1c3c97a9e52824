"""HyperMixer (Mai et al., ACL 2023, arXiv:2203.03691) as a causal language model.

Token mixing is an MLP across the sequence whose weights are generated per token by two
hypernetworks (SPEC §5). For token j with representation x_j and position features p_j:

    W1[j] = MLP1(x_j + p_j),  W2[j] = MLP2(x_j + p_j)        # (d',) each
    out_t = W2[t] . gelu(M_t),   M_t = mean_{j <= t} W1[j] (x) x_j   # M_t: (d', D)

The paper mixes all N tokens (`W2 gelu(W1^T X)`). A language model must not see the
future, so the sum over tokens becomes a prefix sum over j <= t (restarting at every
packed-segment boundary, skipping padding), and it is divided by the number of tokens
summed: without that the activation `gelu` would see inputs whose scale grows with t.
The hypernetworks are `D -> D -> d'` GELU MLPs as in the authors' code
(idiap/hypermixing); p_j are parameter-free sinusoidal features of the token position, so
the mixing knows where each token is whatever `config.positions` says (with LEARNED, the
embedder also adds its learned table to the tokens; with ROPE there is nothing to rotate
and only the sinusoids carry position). Attention switches (heads, window, attention
kernel) do not apply: the mixing always covers the whole causal prefix.

Decoding: the prefix sum is a recurrent state, so `decode=True` keeps per layer a
`cache` of the running sum (B, d', D) and the token count (B,) in float32: constant
memory per sequence and O(1) work per generated token. Contract (as for the
Transformer): `model.init(..., decode=True)` only creates an empty cache; each later
call passes the tokens that *follow* the cached ones (a prompt chunk, then one token at a
time) with their positions; left padding carries negative positions and is skipped.
Re-feeding tokens that are already cached counts them twice, and `segment_ids` are
refused in decode mode (one sequence per row).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rustgpt_jax import axes
from rustgpt_jax.arch._stack import LanguageModel, LayerStack
from rustgpt_jax.config import ModelConfig, NormPlacement
from rustgpt_jax.nn.block import make_feed_forward, make_norm
from rustgpt_jax.nn.dense import dense
from rustgpt_jax.param_counts import hypermixer_hidden_dim, parameter_counts_hypermixer
from rustgpt_jax.runtime.execution import Execution

__all__ = ['CausalHyperMixing', 'HyperMixerBlock', 'HyperMixerLM', 'hypermixer_hidden_dim',
           'parameter_counts_hypermixer', 'sinusoidal_features']


def sinusoidal_features(positions, dim: int):
    """Parameter-free position features: sin/cos pairs at frequencies 10000^(-2i/dim).

    Args:
      positions: (B, T) int32; negative (padding) is treated as 0.
      dim: feature width.

    Returns:
      (B, T, dim) float32.
    """
    half = (dim + 1) // 2
    freq = 10000.0 ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / dim)  # (dim/2,)
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * freq  # (B, T, dim/2)
    pairs = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # (B, T, dim/2, 2)
    return pairs.reshape(positions.shape + (2 * half,))[..., :dim]


def segmented_prefix_sum(values, starts):
    """Inclusive prefix sum over axis 1 that restarts wherever `starts` is True.

    Output t is a function of values[:, :t+1] only (an associative scan never combines
    an element with later ones), so the sum is exactly causal and exactly isolates
    segments (no subtraction of an earlier running total).

    Args:
      values: (B, T, ...) float.
      starts: (B, T) bool, True where a new segment begins.

    Returns:
      (B, T, ...) like `values`.
    """
    flags = starts.reshape(starts.shape + (1,) * (values.ndim - 2))

    def combine(a, b):
        a_flag, a_sum = a
        b_flag, b_sum = b
        return a_flag | b_flag, jnp.where(b_flag, b_sum, a_sum + b_sum)

    _, sums = jax.lax.associative_scan(combine, (flags, values), axis=1)
    return sums


class HyperNetwork(nn.Module):
    """Generates one row of a token-mixing weight matrix per token: D -> D -> d' (GELU).

    Kernel axes mirror the feed-forward layer (up: embed -> mlp, down: mlp -> embed) so
    tensor parallelism splits the hidden layer exactly as it splits the FFN.
    """
    features: int
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        """Args: z (B, T, D). Returns (B, T, d')."""
        fields = dict(use_bias=self.use_bias, init_std=self.init_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, execution=Execution())
        h = dense('up', z, z.shape[-1], (axes.EMBED, axes.MLP), **fields)  # (B, T, D)
        return dense('down', jax.nn.gelu(h), self.features, (axes.MLP, axes.EMBED), **fields)


class CausalHyperMixing(nn.Module):
    """Causal HyperMixer token mixing (see the module docstring for the formula).

    Attributes:
      hidden_dim: d', the width of the generated token-mixing MLP.
      decode: use and update the running-sum `cache`.
    """
    hidden_dim: int
    use_bias: bool = False
    init_std: float = 0.02
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, segment_ids):
        """Args: x (B, T, D); positions (B, T) int32 (negative = padding);
        segment_ids (B, T) int32 or None.

        Returns:
          (B, T, D) in `dtype`.
        """
        b, t, d = x.shape
        hyper = dict(features=self.hidden_dim, use_bias=self.use_bias, init_std=self.init_std,
                     dtype=self.dtype, param_dtype=self.param_dtype)
        z = x + sinusoidal_features(positions, d).astype(self.dtype)  # (B, T, D)
        w1 = HyperNetwork(**hyper, name='hyper_w1')(z)  # (B, T, C)
        w2 = HyperNetwork(**hyper, name='hyper_w2')(z)  # (B, T, C)
        valid = (positions >= 0).astype(jnp.float32)  # (B, T)
        # Outer products in float32: the prefix sum must not accumulate in bf16.
        terms = jnp.einsum('BTC,BTD->BTCD', w1.astype(jnp.float32) * valid[..., None],
                           x.astype(jnp.float32))  # (B, T, C, D)
        if self.decode:
            sums, counts = self._sums_with_cache(terms, valid, segment_ids)
        elif segment_ids is None:
            sums, counts = jnp.cumsum(terms, axis=1), jnp.cumsum(valid, axis=1)
        else:
            starts = jnp.concatenate(
                [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
            sums = segmented_prefix_sum(terms, starts)  # (B, T, C, D)
            counts = segmented_prefix_sum(valid, starts)  # (B, T)
        mean = sums / jnp.maximum(counts, 1.0)[:, :, None, None]  # (B, T, C, D)
        hidden = jax.nn.gelu(mean).astype(self.dtype)
        return jnp.einsum('BTC,BTCD->BTD', w2, hidden)  # (B, T, D)

    def _sums_with_cache(self, terms, valid, segment_ids):
        """Prefix sums continuing the cached running sum; updates the cache."""
        if segment_ids is not None:
            raise ValueError('decode mode does not take segment_ids: decode one sequence per '
                             'row (left-pad prompts with negative positions instead)')
        b = terms.shape[0]
        initialised = self.has_variable('cache', 'sum')
        cache_sum = self.variable('cache', 'sum', jnp.zeros, (b,) + terms.shape[2:], jnp.float32)
        cache_count = self.variable('cache', 'count', jnp.zeros, (b,), jnp.float32)
        if cache_sum.value.shape[0] != b:
            raise ValueError(f'cache was built for batch {cache_sum.value.shape[0]}, got {b}')
        sums = cache_sum.value[:, None] + jnp.cumsum(terms, axis=1)  # (B, T, C, D)
        counts = cache_count.value[:, None] + jnp.cumsum(valid, axis=1)  # (B, T)
        if initialised:  # model.init(..., decode=True) only creates the empty cache.
            cache_sum.value, cache_count.value = sums[:, -1], counts[:, -1]
        return sums, counts


class HyperMixerBlock(nn.Module):
    """Token mixing + channel mixing, with the Transformer block's residual/norm layout.

    Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)). Same call signature as
    `rustgpt_jax.nn.Block`, so it stacks with `nn.scan` the same way. `execution`
    applies to the feed-forward layer (the hypernetworks keep the standard layout).
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
        mixing = CausalHyperMixing(
            hidden_dim=hypermixer_hidden_dim(cfg), use_bias=cfg.use_bias,
            init_std=cfg.init_std, decode=self.decode, dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype, name='token_mixing')
        ffn = make_feed_forward(cfg, 'ffn', self.execution)
        drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
        mix_norm, ffn_norm = make_norm(cfg, 'mix_norm'), make_norm(cfg, 'ffn_norm')
        if cfg.norm_placement == NormPlacement.PRE:
            x = x + drop(mixing(mix_norm(x), positions, segment_ids))
            x = x + drop(ffn(ffn_norm(x)))
        else:
            x = mix_norm(x + drop(mixing(x, positions, segment_ids)))
            x = ffn_norm(x + drop(ffn(x)))
        x = nn.with_logical_constraint(x, (axes.BATCH, axes.LENGTH, axes.EMBED))
        return x, None


class HyperMixerLM(LanguageModel):
    """Embedder, `num_layers` HyperMixer blocks, final norm (pre-norm only), head."""

    def mix(self, x, positions, segment_ids, deterministic: bool, decode: bool):
        """The HyperMixer blocks: (B, T, D) -> (B, T, D)."""
        return LayerStack(self.config, HyperMixerBlock, self.config.num_layers,
                          execution=self.execution, deterministic=deterministic, decode=decode,
                          name='stack')(x, positions, segment_ids)
