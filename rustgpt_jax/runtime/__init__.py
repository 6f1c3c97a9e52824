"""The runtime layer: how the model's products and attention execute.

The model (`nn`, `arch`) states the math; this package owns every execution choice:
`Execution` (parameter layout, row blocks, the matrix-vector kernel and its settings),
`products` (the weight products under an `Execution`), `attention` (the one dispatch
on `AttentionImpl`) and `auto` (what AttentionImpl.AUTO picks per backend and call).
It sits between the kernels it calls (`ops`, `kernels`, `native`) and the layers that
call it (docs/DESIGN.md draws the layers).
"""

from rustgpt_jax.runtime.attention import AttentionKernels, attention_kernels, dot_product_attention
from rustgpt_jax.runtime.execution import Execution, MatvecImpl

__all__ = ['AttentionKernels', 'Execution', 'MatvecImpl', 'attention_kernels',
           'dot_product_attention']
