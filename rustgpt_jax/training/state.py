"""The train state: params, optimizer state, step, base RNG and the 'adaptive' collection."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.models import build_model
from rustgpt_jax.runtime.execution import Execution

# Flax collections that the model may carry besides 'params'. 'adaptive' holds the
# per-layer window EMA state of the adaptive strategies (SPEC §2) and is checkpointed.
ADAPTIVE = 'adaptive'


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes; a pytree (jit/donate/checkpoint).

    Attributes:
      step: int32 scalar, optimizer updates done so far.
      params: the model parameters (float32 unless ModelConfig.param_dtype says else).
      opt_state: the optax state.
      adaptive: the model's 'adaptive' collection ({} when the model has none).
      rng: (2,) uint32 base key; step s uses fold_in(rng, s), so a resumed run draws the
        same dropout masks as an uninterrupted one.
      apply_fn, tx: static (not part of the pytree).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    adaptive: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self) -> dict:
        """The Flax variables dict for `apply`."""
        if self.adaptive:
            return {'params': self.params, ADAPTIVE: self.adaptive}
        return {'params': self.params}

    def checkpoint_tree(self) -> dict:
        """The arrays a checkpoint stores (no functions)."""
        return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state,
                'adaptive': self.adaptive, 'rng': self.rng}

    def replace_tree(self, tree: dict) -> 'TrainState':
        """This state with the arrays of `checkpoint_tree()` form `tree`."""
        return self.replace(**{k: tree[k] for k in ('step', 'params', 'opt_state',
                                                     'adaptive', 'rng')})


def init_variables(config: ModelConfig, seed: int, batch_size: int, seq_len: int,
                   execution: Execution = Execution()) -> dict:
    """Unboxed model variables for a (batch_size, seq_len) input, initialised under jit.

    Args:
      config: the model.
      seed: parameter-init seed.
      batch_size, seq_len: the training batch shape (collections such as 'adaptive'
        may depend on it).
      execution: parameter layout and products (`runtime.Execution`).
    """
    model = build_model(config, execution)
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)

    @jax.jit
    def init(key):
        return model.init({'params': key, 'dropout': key}, tokens, deterministic=True)

    variables = nn.meta.unbox(init(jax.random.PRNGKey(seed)))
    return {k: v for k, v in variables.items() if k in ('params', ADAPTIVE)}


def create_train_state(config: ModelConfig, tx: optax.GradientTransformation, seed: int,
                       batch_size: int, seq_len: int, execution: Execution = Execution(),
                       params: Any = None) -> TrainState:
    """A fresh state (step 0, new optimizer state): params from `seed` or given, dropout
    base key from `seed + 1`.

    Args:
      config: the model.
      tx: the optimizer (`optim.make_optimizer`).
      seed: run seed.
      batch_size, seq_len: the micro-batch shape the model sees.
      execution: parameter layout and products (`runtime.Execution`); runs and their
        checkpoints use the default, the standard layout.
      params: start from these (e.g. pretrained, `training.init_from`; cast to
        `config.param_dtype`) instead of a random initialisation; the caller checks
        their shapes.
    """
    if params is None:
        variables = init_variables(config, seed, batch_size, seq_len, execution)
        params = variables['params']
    else:
        params = jax.tree.map(lambda a: jnp.asarray(a, config.params_dtype), params)
        abstract = jax.eval_shape(
            lambda: init_variables(config, seed, batch_size, seq_len, execution))
        # Only the adaptive strategies' statistics are initialised (they start fresh).
        variables = (init_variables(config, seed, batch_size, seq_len, execution)
                     if abstract.get(ADAPTIVE) else {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
        adaptive=variables.get(ADAPTIVE, {}),
        rng=jax.random.key_data(jax.random.PRNGKey(seed + 1)),
        apply_fn=build_model(config, execution).apply, tx=tx)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
