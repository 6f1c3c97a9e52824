"""Logical-axis rules per parallelism strategy: sharding is this table, not code.

Mesh axes are 'data' (batch; also parameters under FSDP) and 'model' (tensor parallel
over heads, MLP width and vocabulary). Flax resolves a logical axis to the first rule
whose mesh axis is still free in that array, so activations whose batch dim already took
'data' leave their 'embed' dim replicated under FSDP.
"""

from __future__ import annotations

import enum

from rustgpt_jax import axes

DATA = 'data'
MODEL = 'model'


class Strategy(enum.Enum):
    DP = 'dp'  # replicate params, split the batch
    FSDP = 'fsdp'  # split the batch and every parameter's embed dim over 'data'
    TP = 'tp'  # split heads / mlp / vocab over 'model'
    DP_TP = 'dp_tp'
    FSDP_TP = 'fsdp_tp'


_BATCH = ((axes.BATCH, DATA),)
_FSDP = ((axes.EMBED, DATA),)
_TP = ((axes.HEADS, MODEL), (axes.KV_HEADS, MODEL), (axes.MLP, MODEL), (axes.VOCAB, MODEL))
# Named so every logical axis resolves (to replication) under every strategy. The packed
# kernels' fused dims (nn.packing) stay whole under TP: a split would mix query and KV
# heads (or gate and up columns) on one device; their embed dim still follows FSDP.
_REPLICATED = tuple((name, None) for name in (
    axes.BATCH, axes.LENGTH, axes.EMBED, axes.VOCAB, axes.HEADS, axes.KV_HEADS,
    axes.HEAD_DIM, axes.MLP, axes.LAYERS, axes.NORM, axes.QKV_HEADS, axes.MLP_PACKED))

_TABLE = {
    Strategy.DP: _BATCH,
    Strategy.FSDP: _BATCH + _FSDP,
    Strategy.TP: _TP,
    Strategy.DP_TP: _BATCH + _TP,
    Strategy.FSDP_TP: _BATCH + _FSDP + _TP,
}


def logical_axis_rules(strategy) -> tuple:
    """The rules table for `strategy` (a Strategy or its string value)."""
    try:
        strategy = Strategy(strategy)
    except ValueError:
        known = ', '.join(repr(s.value) for s in Strategy)
        raise ValueError(f'unknown sharding strategy {strategy!r}; known: {known}') from None
    return _TABLE[strategy] + _REPLICATED
