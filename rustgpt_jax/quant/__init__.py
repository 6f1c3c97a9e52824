"""Quantized weights that stay in their GGUF block encodings (`QArray`), and their
float values computed inside a jitted step (`dequantize`, `take_rows`).

How a product with a `QArray` runs (native kernel or XLA) is `runtime.products`'
business; this package only says what the blocks mean.
"""

from rustgpt_jax.quant.formats import BLOCK_TYPES, block_size, row_bytes, type_name
from rustgpt_jax.quant.qarray import (
    QArray,
    QConcat,
    concat_rows,
    dequantize,
    is_quantized,
    parts,
    quantize_activations,
    relabel,
    take_rows,
)

__all__ = ['BLOCK_TYPES', 'QArray', 'QConcat', 'block_size', 'concat_rows', 'dequantize',
           'is_quantized', 'parts', 'quantize_activations', 'relabel', 'row_bytes', 'take_rows',
           'type_name']
