"""The one place the trainer talks to `rustgpt_jax.adaptive`.

Contract: the train step applies the model with `mutable=['adaptive', 'intermediates']`;
after the step, `adaptive.observe_loss(adaptive_state, loss, config)` feeds the model's
own loss to the PerplexityBased window strategy (SPEC §2), and the loop logs
`adaptive.summarize_intermediates(intermediates)`.
"""

from __future__ import annotations

from typing import Any

from rustgpt_jax import adaptive
from rustgpt_jax.config import ModelConfig

MUTABLE = ['adaptive', 'intermediates']


def observe_loss(adaptive_state: Any, loss, config: ModelConfig) -> Any:
    """Traced: the 'adaptive' collection after observing the mean loss (nats)."""
    if not adaptive_state:
        return adaptive_state
    return adaptive.observe_loss(adaptive_state, loss, config)


def summarize_intermediates(intermediates: Any) -> dict[str, float]:
    """Host side: scalar metrics from the sown 'intermediates' ({} when there are none)."""
    if not intermediates:
        return {}
    return {str(k): float(v) for k, v in adaptive.summarize_intermediates(intermediates).items()}
