"""A dense projection over trailing dims, with logical axis names on every param.

nn.DenseGeneral initialises a flattened 2-D kernel, which cannot carry the 3-D logical
annotations ('embed', 'heads', 'head_dim') that sharding rules need; this one creates
the kernel at its real shape.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from rustgpt_jax.kernels import cpu_gemv

# Row blocks apply to matrix-vector-like products only (decode steps up to batch 8):
# a batch-8 prompt of 128 tokens (1,024 rows) prefilled 1.6x slower in blocks, while
# batch-1 and batch-8 decode steps were faster (benchmarks/decode_speed.py).
MATVEC_MAX_ROWS = 8


class Projection(nn.Module):
    """y = x . kernel (+ bias), contracting the last `contract` dims of x.

    Attributes:
      features: output dims.
      kernel_axes: logical names of the kernel dims (contracted dims first).
      output_major: store the kernel as (*features, *contracted dims), torch's Linear
        layout. XLA:CPU's matrix-vector products (batch-1 decoding) read this layout
        about 20% faster: each output is one contiguous dot product.
      row_blocks: (output-major only) evaluate the (out, in) kernel as a batched dot
        over this many blocks of out / row_blocks rows when x has at most
        MATVEC_MAX_ROWS rows: the same products, but XLA:CPU's matrix-vector product
        (Eigen, shared out over the pool threads) streams some shapes much faster split
        (`ModelConfig.matvec_row_blocks`). The reshape of the kernel is free.
      matvec_impl: (output-major only) 'cpu_gemv' computes products of at most
        MATVEC_MAX_ROWS float32 rows with `kernels.cpu_gemv` (row blocks then do not
        apply on CPU); 'xla' with XLA's dot (`ModelConfig.matvec_impl`).
    """
    features: tuple
    kernel_axes: tuple
    contract: int = 1
    output_major: bool = False
    row_blocks: int = 1
    matvec_impl: str = 'xla'
    use_bias: bool = False
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_dims = tuple(x.shape[x.ndim - self.contract:])
        features = tuple(self.features)
        letters = 'abcdefgh'
        batch = letters[:x.ndim - self.contract]
        contracted = 'ijk'[:self.contract]
        out = 'uvw'[:len(features)]
        kernel_axes = tuple(self.kernel_axes)
        if self.output_major:  # (*features, *contracted)
            kernel_axes = kernel_axes[self.contract:] + kernel_axes[:self.contract]
            shape = features + in_dims
        else:
            shape = in_dims + features
        kernel = self.param(
            'kernel', nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                   kernel_axes),
            shape, self.param_dtype)
        if self.output_major:
            # As one 2-D (out, in) matrix: XLA:CPU canonicalises a dot with several
            # output or contracted kernel dims by transpose-copying the kernel (every
            # call, i.e. every decode step); reshapes of row-major arrays are free.
            lead = x.shape[:x.ndim - self.contract]
            rows, blocks = math.prod(features), self.row_blocks
            if rows % blocks:  # checked at any input size, not only where blocks apply
                raise ValueError(f'{self.name}: {rows} output rows do not split into '
                                 f'{blocks} row blocks')
            x2 = x.reshape(lead + (-1,)).astype(self.dtype)  # (..., in)
            if cpu_gemv.applies(self.matvec_impl, math.prod(lead), x2, kernel):
                y = cpu_gemv.gemv(x2.reshape(-1, x2.shape[-1]), kernel.reshape(rows, -1))
                y = y.reshape(lead + (rows,))
            elif blocks == 1 or math.prod(lead) > MATVEC_MAX_ROWS:
                y = jnp.einsum('...i,oi->...o', x2, kernel.reshape(rows, -1).astype(self.dtype))
            else:
                # The block axis leads on both sides: XLA runs it as one batched dot
                # over contiguous (rows / blocks, in) slices, with no copy of the kernel.
                xb = jnp.broadcast_to(x2, (blocks,) + x2.shape)  # (S, ..., in)
                kb = kernel.reshape(blocks, rows // blocks, -1).astype(self.dtype)
                y = jnp.einsum('s...i,soi->...so', xb, kb)  # (..., S, rows / S)
            y = y.reshape(lead + features)
        else:
            y = jnp.einsum(f'{batch}{contracted},{contracted}{out}->{batch}{out}',
                           x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                     self.kernel_axes[self.contract:]),
                tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense(module: nn.Module, name: str, x, features, kernel_axes: Sequence[str],
          contract: int = 1):
    """Applies a `Projection` named `name` inside `module`'s compact scope.

    Reads `use_bias`, `init_std`, `dtype`, `param_dtype` and (if it has them) `packed`,
    which selects the output-major kernel layout, `row_blocks` ((name, blocks)
    pairs, `ModelConfig.matvec_row_blocks`) and `matvec_impl` from `module`.

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
    return Projection(features=features, kernel_axes=tuple(kernel_axes), contract=contract,
                      output_major=getattr(module, 'packed', False),
                      row_blocks=dict(getattr(module, 'row_blocks', ())).get(name, 1),
                      matvec_impl=getattr(module, 'matvec_impl', 'xla'),
                      use_bias=module.use_bias, init_std=module.init_std, dtype=module.dtype,
                      param_dtype=module.param_dtype, name=name)(x)
