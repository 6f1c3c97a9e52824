"""A dense projection with logical axis names on its kernel and bias."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn


def dense(module: nn.Module, name: str, x, features, kernel_axes: Sequence[str],
          contract: int = 1):
    """Applies nn.DenseGeneral named `name` inside `module`'s compact scope.

    Reads `use_bias`, `init_std`, `dtype` and `param_dtype` from `module`.

    Args:
      module: the calling module (its fields configure the projection).
      name: parameter scope name.
      x: input (..., *contracted dims).
      features: int or tuple of output dims.
      kernel_axes: logical names of the kernel's dims (contracted dims first).
      contract: how many trailing input dims are contracted.

    Returns:
      (..., *features) in `module.dtype`.
    """
    features = features if isinstance(features, tuple) else (features,)
    init = nn.initializers.normal(module.init_std)
    return nn.DenseGeneral(
        features=features if len(features) > 1 else features[0],
        axis=tuple(range(-contract, 0)),
        use_bias=module.use_bias,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=nn.with_logical_partitioning(init, tuple(kernel_axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               tuple(kernel_axes[contract:])),
        name=name,
    )(x)
