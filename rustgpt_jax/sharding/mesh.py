"""Device meshes and multi-host start-up with JAX's own runtime."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rustgpt_jax.sharding.rules import DATA, MODEL, Strategy, logical_axis_rules


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How to lay devices out and shard the model.

    Attributes:
      shape: devices per mesh axis, e.g. (4, 2); -1 once means "the rest".
      axis_names: mesh axis names, matching the rules table ('data', 'model').
      strategy: a `Strategy` value naming the rules table.
    """
    shape: Sequence[int] = (-1, 1)
    axis_names: Sequence[str] = (DATA, MODEL)
    strategy: str = Strategy.DP.value

    @property
    def rules(self) -> tuple:
        return logical_axis_rules(self.strategy)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple:
    """Replaces a single -1 in `shape` so the product equals `num_devices`."""
    shape = [int(s) for s in shape]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f'mesh shape {tuple(shape)}: use positive sizes and at most one -1')
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f'mesh shape {tuple(shape)} does not divide {num_devices} devices')
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f'mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, '
                         f'{num_devices} are available')
    return tuple(shape)


def make_mesh(config: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    """Builds a mesh with Auto axis types (Flax logical constraints drive the sharding)."""
    devices = list(jax.devices() if devices is None else devices)
    if len(config.shape) != len(config.axis_names):
        raise ValueError(f'mesh shape {tuple(config.shape)} and axis names '
                         f'{tuple(config.axis_names)} differ in length')
    shape = resolve_shape(config.shape, len(devices))
    return jax.make_mesh(shape, tuple(config.axis_names),
                         axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Starts JAX's multi-host runtime from flags, else the environment.

    Reads RUSTGPT_COORDINATOR, RUSTGPT_NUM_PROCESSES and RUSTGPT_PROCESS_ID when the
    flags are not given; with none of them set, JAX's own cluster detection (SLURM,
    TPU pod metadata) is used. A single process without any of these does nothing.
    """
    coordinator_address = coordinator_address or os.environ.get('RUSTGPT_COORDINATOR')
    if num_processes is None and 'RUSTGPT_NUM_PROCESSES' in os.environ:
        num_processes = int(os.environ['RUSTGPT_NUM_PROCESSES'])
    if process_id is None and 'RUSTGPT_PROCESS_ID' in os.environ:
        process_id = int(os.environ['RUSTGPT_PROCESS_ID'])
    explicit = (coordinator_address, num_processes, process_id)
    if all(v is None for v in explicit):
        if any(k in os.environ for k in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES')):
            jax.distributed.initialize()
        return
    if any(v is None for v in explicit):
        raise ValueError('multi-host start needs coordinator address, process count and process '
                         f'id together; got {explicit}')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
