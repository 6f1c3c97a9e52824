"""Shared tiny models for the decoding tests (jitted: eager Flax is slow on 2 cores)."""

import functools

import flax
import jax
import jax.numpy as jnp

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.models import build_model
from rustgpt_jax.runtime import Execution


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, embed_dim=32, hidden_dim=64, num_layers=2, num_heads=4,
                num_kv_heads=4, max_seq_len=16)
    return ModelConfig(**{**base, **overrides})


def init_params(config: ModelConfig, execution: Execution = Execution(), seed: int = 0):
    model = build_model(config, execution)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4), jnp.int32))['params'])
    return flax.core.meta.unbox(init(jax.random.key(seed)))


@functools.lru_cache(maxsize=None)
def _forward(model):
    return jax.jit(lambda params, tokens: model.apply({'params': params}, tokens))


def full_logits(model, params, tokens):
    """The oracle: the full forward pass (no cache), (B, T) -> (B, T, V) float32."""
    return _forward(model)(params, jnp.asarray(tokens, jnp.int32))
