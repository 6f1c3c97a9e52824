"""Sharded training with JAX's runtime: meshes, logical-axis rules, shardings."""

from rustgpt_jax.sharding.mesh import MeshConfig, initialize_distributed, make_mesh
from rustgpt_jax.sharding.partition import batch_sharding, replicated, strip_boxes, tree_shardings
from rustgpt_jax.sharding.rules import DATA, MODEL, Strategy, logical_axis_rules

__all__ = ['DATA', 'MODEL', 'MeshConfig', 'Strategy', 'batch_sharding', 'initialize_distributed',
           'logical_axis_rules', 'make_mesh', 'replicated', 'strip_boxes',
           'tree_shardings']
