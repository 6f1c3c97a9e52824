"""`weight`: a layer's parameter, or a quantized `QArray` held in its place.

Flax's `Module.param` checks a stored value's leaves against the shape its initialiser
would make; a QArray's one leaf is its raw blocks, so that check cannot apply. A layer
asks for its weights through `weight`, which returns a stored QArray after checking its
logical shape, and otherwise is `Module.param`. The layer then hands the weight to
`runtime.products`, which knows how to compute with either.
"""

from __future__ import annotations

import flax.linen as nn

from rustgpt_jax import quant


def weight(module: nn.Module, name: str, init, shape: tuple, dtype):
    """module.param(name, init, shape, dtype), or the QArray (or QConcat) stored there.

    Raises:
      ValueError: a stored QArray whose logical shape is not `shape`, naming the param.
    """
    if module.has_variable('params', name):
        value = module.get_variable('params', name)
        if quant.is_quantized(value):
            if value.shape != tuple(shape):
                path = '/'.join(module.path + (name,))
                raise ValueError(f'quantized param {path} has shape {value.shape}; the model '
                                 f'expects {tuple(shape)}')
            return value
    return module.param(name, init, shape, dtype)
