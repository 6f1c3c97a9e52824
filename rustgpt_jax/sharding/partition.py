"""Shardings for parameters, optimizer state and batches from logical axis names."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rustgpt_jax import axes


def tree_shardings(boxed_tree, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

    Works on abstract trees (from `jax.eval_shape`), so nothing is materialised.
    Unboxed leaves (step counters, RNG keys) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    _check_divisible(strip_boxes(boxed_tree), shardings)
    return shardings


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of (B, T) batch arrays: the batch dim over whatever 'batch' maps to."""
    spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def strip_boxes(tree):
    """Leaf values without applying sharding constraints (nn.unbox would, eagerly)."""
    return jax.tree.map(lambda x: x.value if isinstance(x, nn.LogicallyPartitioned) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def _check_divisible(tree, shardings) -> None:
    """Names the array and dim that a mesh axis does not divide (JAX's error does not)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_shardings):
        spec = sharding.spec
        for dim, names in enumerate(spec):
            if names is None:
                continue
            names = names if isinstance(names, tuple) else (names,)
            size = int(np.prod([sharding.mesh.shape[n] for n in names]))
            if leaf.shape[dim] % size:
                raise ValueError(
                    f'{jax.tree_util.keystr(path)}: dim {dim} of shape {tuple(leaf.shape)} is '
                    f'not divisible by mesh axes {names} (size {size}); change the mesh shape '
                    'or the sharding strategy')
