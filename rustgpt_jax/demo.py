"""`make demo`: train the default config on Shakespeare for a few minutes, then sample.

Runs `configs/demo.gin` (the modern RustGPT, character tokenizer) into a fresh
`runs/demo-<time>` directory, prints the validation loss, and generates a sample with
the KV-cache decoder from the best checkpoint. Extra arguments are gin bindings, e.g.
`python -m rustgpt_jax.demo "run_config.time_budget_s = 60"`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import gin
import jax
import numpy as np

from rustgpt_jax import cli_errors
from rustgpt_jax.decoding import SamplingConfig, context_limit, generate
from rustgpt_jax.models import build_model
from rustgpt_jax.train import load_run_config
from rustgpt_jax.training import load_for_inference, train
from rustgpt_jax.training.loop import prepare

DEMO_CONFIG = 'configs/demo.gin'
PROMPT = 'ROMEO:\n'


def restrict_vocab(config, params, num_ids: int):
    """The model restricted to token ids [0, num_ids): exactly the original model with
    the logits of the ids no tokenizer produces set to -inf (the embedding rows and head
    columns of those ids are dropped), so sampling never picks them.

    Args:
      config: the ModelConfig (vocab_size V >= num_ids).
      params: its parameters; the embedder holds `token_embedding` (V, D) and, untied,
        `lm_head` (D, V).
    """
    embedder = dict(params['embedder'])
    embedder['token_embedding'] = embedder['token_embedding'][:num_ids]
    if 'lm_head' in embedder:
        embedder['lm_head'] = embedder['lm_head'][:, :num_ids]
    return config.replace(vocab_size=num_ids), {**params, 'embedder': embedder}


def sample(run_dir: str, prompt: str = PROMPT, max_new_tokens: int = 300,
           temperature: float = 0.8, seed: int = 0) -> str:
    """Text generated from the best checkpoint of `run_dir` after `prompt`."""
    config, params, tokenizer = load_for_inference(run_dir)
    config, params = restrict_vocab(config, params, tokenizer.vocab_size)
    ids = tokenizer.encode(prompt)
    out = generate(build_model(config), params, np.asarray([ids], np.int32),
                   np.asarray([len(ids)], np.int32), max_new_tokens=max_new_tokens,
                   sampling=SamplingConfig(temperature=temperature), eos_id=tokenizer.eos_id,
                   pad_id=tokenizer.pad_id, rng=jax.random.key(seed),
                   limit=context_limit(config))
    return prompt + tokenizer.decode(out.row(0))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the demo; a bad binding is one line, `rustgpt-demo: error: ...`, status 2."""
    bindings = list(sys.argv[1:] if argv is None else argv)
    return cli_errors.run('rustgpt-demo', lambda: _demo(bindings))


def _demo(bindings: Sequence[str]) -> int:
    run_dir = os.path.join('runs', time.strftime('demo-%Y%m%d-%H%M%S'))
    with cli_errors.config_errors():
        run = load_run_config([DEMO_CONFIG], [f"run_config.run_dir = '{run_dir}'"] + bindings)
    prepared = prepare(run)  # its errors are user errors by type
    print(f'rustgpt_jax demo: {DEMO_CONFIG} -> {run.run_dir} '
          f'(at most {run.total_steps} steps or {run.time_budget_s} s)')
    t0 = time.perf_counter()
    result = train(run, gin_config=gin.config_str(), prepared=prepared)
    minutes = (time.perf_counter() - t0) / 60
    val = result.validation
    print(f'\ntrained {result.step} steps in {minutes:.1f} min; validation loss '
          f'{val["loss"]:.4f} nats/char (perplexity {val["perplexity"]:.2f})')
    print('\n--- sample (temperature 0.8) ---')
    print(sample(run.run_dir))
    print('---')
    print(f'checkpoints: {run.run_dir}/checkpoints   TensorBoard: '
          f'tensorboard --logdir {run.run_dir}/tensorboard')
    return 0


if __name__ == '__main__':
    sys.exit(main())
