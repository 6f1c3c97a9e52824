"""The one place the trainer talks to `rustgpt_jax.adaptive` (optional module).

Contract: the train step applies the model with `mutable=['adaptive', 'intermediates']`;
after the step, `adaptive.observe_loss(adaptive_state, loss, config)` feeds the model's
own loss to the PerplexityBased window strategy (SPEC §2), and the loop logs
`adaptive.summarize_intermediates(intermediates)` when it exists. Without the module
both are no-ops.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional

from rustgpt_jax.config import ModelConfig

MUTABLE = ['adaptive', 'intermediates']


def _adaptive_function(name: str) -> Optional[Callable]:
    try:
        module = importlib.import_module('rustgpt_jax.adaptive')
    except ModuleNotFoundError as e:
        if e.name not in ('rustgpt_jax.adaptive',):
            raise  # the module exists but one of its own imports is broken
        return None
    return getattr(module, name, None)


def observe_loss(adaptive_state: Any, loss, config: ModelConfig) -> Any:
    """Traced: the 'adaptive' collection after observing the mean loss (nats)."""
    fn = _adaptive_function('observe_loss')
    if fn is None or not adaptive_state:
        return adaptive_state
    return fn(adaptive_state, loss, config)


def summarize_intermediates(intermediates: Any) -> dict[str, float]:
    """Host side: scalar metrics from the sown 'intermediates' ({} when unavailable)."""
    fn = _adaptive_function('summarize_intermediates')
    if fn is None or not intermediates:
        return {}
    return {str(k): float(v) for k, v in fn(intermediates).items()}
