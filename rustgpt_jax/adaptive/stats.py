"""Turns the sown `intermediates` of a forward pass into flat scalar metrics.

The window controllers sow `window/current` (and `window/entropy` for the entropy
strategy); the AdaAttn cores sow `low_rank`, `rank`, `precision` (one-hot over
precision.LEVELS), `focus`, `entropy`, `head_votes`. With a scanned layer stack each
sown value carries a leading layer axis; unscanned stacks name layers `layer_i`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

from rustgpt_jax.adaptive.precision import LEVELS

_ADAATTN_MEANS = {'low_rank': 'low_rank_fraction', 'rank': 'mean_rank', 'focus': 'mean_focus',
                  'head_votes': 'head_low_rank_votes'}


def _last(value) -> np.ndarray:
    """A sown value is a tuple of calls; the last call is the current one."""
    if isinstance(value, (tuple, list)):
        value = value[-1]
    return np.asarray(value)


def _layer_names(path: tuple, count: int) -> list:
    if path and path[-1] == 'layers':  # a scanned stack: one entry per layer
        stem = '/'.join(str(p) for p in path[:-1] + ('layer',))
        return [f'{stem}_{i}' for i in range(count)]
    owner = '/'.join(str(p) for p in path) or 'model'
    return [owner] if count == 1 else [f'{owner}_{i}' for i in range(count)]


def summarize_intermediates(intermediates: Any) -> dict:
    """Flat float metrics for the trainer's log.

    Args:
      intermediates: the `intermediates` collection of a forward pass.

    Returns:
      {'window/<layer>': window, 'window_entropy/<layer>': H,
       'adaattn/low_rank_fraction', 'adaattn/mean_rank', 'adaattn/precision_<level>'
       (fraction of attention calls at each level), ...}: only the keys whose values
      were sown.
    """
    flat = traverse_util.flatten_dict(dict(intermediates or {}))
    out, pooled, histogram = {}, {}, np.zeros(len(LEVELS))
    for path, value in sorted(flat.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if not isinstance(path, tuple) or len(path) < 2:
            continue
        array = _last(value).astype(np.float64)
        name, owner = path[-1], path[:-2]
        if path[-2] == 'window' and name in ('current', 'entropy'):
            prefix = 'window' if name == 'current' else 'window_entropy'
            values = array.reshape(-1)
            for layer, v in zip(_layer_names(owner, values.size), values):
                out[f'{prefix}/{layer}'] = float(v)
        elif name == 'precision' and array.shape[-1:] == (len(LEVELS),):
            histogram += array.reshape(-1, len(LEVELS)).sum(axis=0)
        elif name in _ADAATTN_MEANS or name == 'entropy':
            pooled.setdefault(_ADAATTN_MEANS.get(name, 'mean_entropy'), []).extend(
                array.reshape(-1).tolist())
    for key, values in pooled.items():
        out[f'adaattn/{key}'] = float(np.mean(values))
    if histogram.sum() > 0:
        for level, count in zip(LEVELS, histogram / histogram.sum()):
            out[f'adaattn/precision_{level}'] = float(count)
    return out
