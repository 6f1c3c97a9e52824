"""A dense projection over trailing dims, with logical axis names on every param.

nn.DenseGeneral initialises a flattened 2-D kernel, which cannot carry the 3-D logical
annotations ('embed', 'heads', 'head_dim') that sharding rules need; this one creates
the kernel at its real shape. How the product runs is `runtime.products.project`'s
business, given the `Execution` the layer receives.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax.nn.weights import weight
from rustgpt_jax.runtime import products
from rustgpt_jax.runtime.execution import Execution


class Projection(nn.Module):
    """y = x . kernel (+ bias), contracting the last `contract` dims of x.

    Attributes:
      features: output dims.
      kernel_axes: logical names of the kernel dims (contracted dims first).
      contract: how many trailing input dims are contracted.
      use_bias, init_std, dtype, param_dtype: as in ModelConfig.
      execution: with `packed`, the kernel is stored output-major, (*features,
        *contracted dims) (torch's Linear layout), and evaluated with the row blocks
        `execution.blocks_for(name)`; the product itself is `runtime.products.project`.
    """
    features: tuple
    kernel_axes: tuple
    contract: int = 1
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    execution: Execution = Execution()

    @nn.compact
    def __call__(self, x):
        """Args: x (..., *contracted dims). Returns (..., *features) in `dtype`."""
        in_dims = tuple(x.shape[x.ndim - self.contract:])
        features = tuple(self.features)
        kernel_axes = tuple(self.kernel_axes)
        packed = self.execution.packed
        if packed:  # (*features, *contracted)
            kernel_axes = kernel_axes[self.contract:] + kernel_axes[:self.contract]
            shape = features + in_dims
        else:
            shape = in_dims + features
        kernel = weight(  # a float array, or a quantized QArray (runtime.products)
            self, 'kernel', nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                         kernel_axes),
            shape, self.param_dtype)
        blocks = self.execution.blocks_for(self.name) if packed else 1
        y = products.project(x, kernel, contract=self.contract, output_major=packed,
                             blocks=blocks, dtype=self.dtype, execution=self.execution,
                             name=self.name)
        if self.use_bias:
            bias = self.param(
                'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                     self.kernel_axes[self.contract:]),
                features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(name: str, x, features, kernel_axes: Sequence[str], *, contract: int = 1,
          use_bias: bool, init_std: float, dtype: Any, param_dtype: Any,
          execution: Execution):
    """Applies a `Projection` named `name` in the calling module's compact scope.

    Args:
      name: parameter scope name.
      x: input (..., *contracted dims).
      features: int or tuple of output dims.
      kernel_axes: logical names of the kernel's dims (contracted dims first).
      contract: how many trailing input dims are contracted.
      use_bias, init_std, dtype, param_dtype, execution: the `Projection` fields.

    Returns:
      (..., *features) in `dtype`.
    """
    features = features if isinstance(features, tuple) else (features,)
    return Projection(features=features, kernel_axes=tuple(kernel_axes), contract=contract,
                      use_bias=use_bias, init_std=init_std, dtype=dtype,
                      param_dtype=param_dtype, execution=execution, name=name)(x)
