"""Sharded train state and batches for the trainer (a `ShardingPlan` per run).

Shardings come from logical axis names: the train state is traced abstractly with its
`nn.LogicallyPartitioned` boxes intact (optax states mirror the params' boxes), so
params, optimizer moments and the adaptive state all follow one rules table.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.models import build_model
from rustgpt_jax.sharding.mesh import MeshConfig, make_mesh
from rustgpt_jax.sharding.partition import batch_sharding, tree_shardings


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where every array of a run lives.

    Attributes:
      mesh: the device mesh.
      rules: the logical-axis rules table.
      state: NamedShardings shaped like `TrainState.checkpoint_tree()`.
      batch: NamedSharding of (B, T) batch arrays.
    """
    mesh: Mesh
    rules: tuple
    state: Any
    batch: NamedSharding

    @contextlib.contextmanager
    def activate(self):
        """Mesh and rules for tracing (activation constraints inside the model use them)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def place_state(self, state):
        """`state` (a TrainState) with its arrays moved to their shardings."""
        return state.replace_tree(jax.device_put(state.checkpoint_tree(), self.state))

    def state_prefix(self, state):
        """A TrainState whose leaves are shardings (for jit in/out_shardings)."""
        return state.replace_tree(self.state)

    def global_batch(self, batch: dict) -> dict:
        """Global jax arrays from the batch every process computed identically.

        Each process contributes only its own contiguous rows (per-host loading), so a
        multi-host run never copies the whole batch to every host's devices.
        """
        count, index = jax.process_count(), jax.process_index()
        out = {}
        for key, value in batch.items():
            value = np.asarray(value)
            if value.shape[0] % count:
                raise ValueError(f'batch of {value.shape[0]} rows does not split over '
                                 f'{count} processes')
            rows = value.shape[0] // count
            local = value[index * rows:(index + 1) * rows]
            out[key] = jax.make_array_from_process_local_data(self.batch, local, value.shape)
        return out


def make_plan(mesh_config: MeshConfig, model: ModelConfig, tx: optax.GradientTransformation,
              batch_size: int, seq_len: int) -> ShardingPlan:
    """Builds the mesh and the shardings of a train state for `model` and `tx`.

    Args:
      mesh_config: mesh shape, axis names and strategy.
      model: the model config.
      tx: the optimizer (its state structure is traced, nothing is allocated).
      batch_size, seq_len: the micro-batch shape used to trace the model.
    """
    mesh = make_mesh(mesh_config)
    rules = mesh_config.rules
    module = build_model(model)
    tokens = jnp.zeros((batch_size, seq_len), jnp.int32)

    def boxed_tree(key):
        variables = module.init({'params': key, 'dropout': key}, tokens, deterministic=True)
        params = variables['params']
        return {'step': jnp.zeros((), jnp.int32), 'params': params,
                'opt_state': tx.init(params), 'adaptive': variables.get('adaptive', {}),
                'rng': jax.random.key_data(key)}

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(boxed_tree, jax.random.PRNGKey(0))
        state = tree_shardings(abstract, mesh, rules)
    data_axis = rules_batch_axis(rules)
    if data_axis is not None and batch_size % mesh.shape[data_axis]:
        raise ValueError(f'batch_size {batch_size} is not divisible by the {data_axis!r} mesh '
                         f'axis ({mesh.shape[data_axis]} devices)')
    return ShardingPlan(mesh=mesh, rules=rules, state=state,
                        batch=batch_sharding(mesh, rules))


def rules_batch_axis(rules) -> Any:
    """The mesh axis the 'batch' logical axis maps to, or None."""
    for name, mesh_axis in rules:
        if name == 'batch':
            return mesh_axis
    return None
