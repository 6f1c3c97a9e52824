"""Adaptive windows and AdaAttn variants vs dense full causal attention, on Shakespeare.

Every configuration trains the same small model (byte-level, vocab 256) on the same
batches for a fixed wall-clock budget (compilation excluded), then reports:
  * ms/step: median train-step time, and its ratio to the dense baseline;
  * temp MB: XLA's compiled temporary memory of the train step (activations and
    workspace), from `compiled.memory_analysis()`;
  * val loss: mean next-token loss (nats) on fixed validation batches after the budget,
    with the `adaptive` window state read-only (steps differ: faster methods get more);
  * AdaAttn usage: fraction of attention calls that ran low-rank, precision histogram;
  * the final adaptive windows per layer.
A verdict column says where each method wins and loses against dense in this run.

Caveats printed with the table: with `--impl reference` a window only masks logits (all
T^2 are computed), so windows cannot be faster; `--impl blocked` skips masked key
blocks. SPEC §4's CPU penalty (+0.1) puts the default rank threshold 0.95 above any
possible focus, so on CPU the rank variants only switch with a lower `--rank-threshold`.

Usage:
  python benchmarks/adaptive_attention.py [--budget 30] [--seq-len 128] [--impl reference]
      [--configs dense entropy ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rustgpt_jax import adaptive
from rustgpt_jax.arch.transformer import Transformer
from rustgpt_jax.config import ModelConfig
from rustgpt_jax.data import (
    LMBatchIterator,
    LMValidationBatches,
    shakespeare_text,
    train_validation_split,
)


def configs(args) -> dict:
    """name -> ModelConfig overrides; 'dense' is the reference."""
    t = args.seq_len
    adaptive_range = dict(min_window=max(2, t // 8), max_window=t)
    ranks = dict(adaattn_ranks=(args.rank,), adaattn_rank_threshold=args.rank_threshold)
    return {
        'dense': {},
        'fixed': dict(window_size=t // 4),
        'sequence_length': dict(window_strategy='sequence_length', **adaptive_range),
        'attention_entropy': dict(window_strategy='attention_entropy', **adaptive_range),
        'perplexity': dict(window_strategy='perplexity', **adaptive_range),
        'adaptive_rank': dict(attention_variant='adaptive_rank', **ranks),
        'adaptive_precision': dict(attention_variant='adaptive_precision',
                                   precision_policy=args.policy),
        'adaattn': dict(attention_variant='adaattn', precision_policy=args.policy, **ranks),
    }


def _model_config(args, overrides) -> ModelConfig:
    return ModelConfig(vocab_size=256, embed_dim=args.embed_dim, hidden_dim=2 * args.embed_dim,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_seq_len=args.seq_len, attention_impl=args.impl, **overrides)


def run_config(name, cfg, train_tokens, val_tokens, args) -> dict:
    model = Transformer(cfg)
    batches = LMBatchIterator(train_tokens, args.batch, args.seq_len, seed=args.seed)
    first = next(batches)
    variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(args.seed), first['tokens']))
    params, state = variables['params'], variables.get('adaptive', {})
    tx = optax.adam(args.lr)
    opt_state = tx.init(params)

    def loss_fn(params, state, batch):
        logits, mutated = model.apply({'params': params, 'adaptive': state}, batch['tokens'],
                                      mutable=['adaptive', 'intermediates'])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
        return loss, mutated

    def step(params, opt_state, state, batch):
        (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        state = adaptive.observe_loss(mutated.get('adaptive', {}), loss, cfg)
        return (optax.apply_updates(params, updates), opt_state, state, loss,
                mutated['intermediates'])

    def eval_loss(params, state, batch):
        logits, mutated = model.apply({'params': params, 'adaptive': state}, batch['tokens'],
                                      positions=batch['positions'], mutable=['intermediates'])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
        return jnp.sum(nll * batch['loss_mask']), jnp.sum(batch['loss_mask'])

    batch = {k: jnp.asarray(first[k]) for k in ('tokens', 'targets')}
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, state,
                                                          batch).compile()
    memory = compiled.memory_analysis()
    temp_mb = None if memory is None else memory.temp_size_in_bytes / 2**20
    params, opt_state, state, loss, _ = compiled(params, opt_state, state, batch)  # warm-up
    jax.block_until_ready(loss)

    times, usage = [], []
    start = time.perf_counter()
    while time.perf_counter() - start < args.budget:
        raw = next(batches)
        batch = {k: jnp.asarray(raw[k]) for k in ('tokens', 'targets')}
        t0 = time.perf_counter()
        params, opt_state, state, loss, inter = compiled(params, opt_state, state, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
        usage.append(adaptive.summarize_intermediates(jax.device_get(inter)))

    evaluate = jax.jit(eval_loss)
    total = count = 0.0
    for vb in LMValidationBatches(val_tokens, args.batch, args.seq_len,
                                  num_batches=args.eval_batches):
        s, c = evaluate(params, state, {k: jnp.asarray(v) for k, v in vb.items()})
        total, count = total + float(s), count + float(c)

    means = {k: float(np.mean([u[k] for u in usage if k in u]))
             for k in usage[-1] if k.startswith('adaattn/')}
    windows = {k.split('/', 1)[1]: v for k, v in usage[-1].items() if k.startswith('window/')}
    return {'name': name, 'steps': len(times) + 1, 'ms_per_step': 1e3 * statistics.median(times),
            'temp_mb': temp_mb, 'train_loss': float(loss), 'val_loss': total / max(count, 1.0),
            'adaattn': means, 'final_windows': windows}


def _verdict(row, dense) -> str:
    if row['name'] == 'dense':
        return 'reference'
    speed = row['ms_per_step'] / dense['ms_per_step']
    loss = row['val_loss'] - dense['val_loss']
    notes = ['faster' if speed < 0.95 else 'slower' if speed > 1.05 else 'same speed']
    notes.append('better loss' if loss < -0.01 else 'worse loss' if loss > 0.01 else 'same loss')
    if row['temp_mb'] is not None and dense['temp_mb']:
        mem = row['temp_mb'] / dense['temp_mb']
        notes.append('less memory' if mem < 0.95 else 'more memory' if mem > 1.05
                     else 'same memory')
    return ', '.join(notes)


def _usage(row) -> str:
    a = row['adaattn']
    if not a:
        return '-'
    parts = []
    if 'adaattn/low_rank_fraction' in a:
        parts.append(f"low-rank {100 * a['adaattn/low_rank_fraction']:.0f}%")
    hist = [(k.rsplit('_', 1)[1], v) for k, v in a.items() if k.startswith('adaattn/precision_')]
    if hist:
        parts.append(' '.join(f'{lv} {100 * v:.0f}%' for lv, v in hist if v > 0))
    return '; '.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--budget', type=float, default=30.0,
                        help='training seconds per configuration (compilation excluded)')
    parser.add_argument('--configs', nargs='*', default=None)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--embed-dim', type=int, default=64)
    parser.add_argument('--layers', type=int, default=2)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--kv-heads', type=int, default=2)
    parser.add_argument('--impl', default='reference', choices=['reference', 'blocked', 'pallas'])
    parser.add_argument('--rank', type=int, default=4)
    parser.add_argument('--rank-threshold', type=float, default=0.5)
    parser.add_argument('--policy', default='balanced', choices=['quality', 'balanced', 'speed'])
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--corpus-chars', type=int, default=1_000_000)
    parser.add_argument('--eval-batches', type=int, default=8)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None)
    args = parser.parse_args(argv)

    table = configs(args)
    names = args.configs or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f'unknown configs {unknown}; known: {list(table)}')
    if 'dense' not in names:
        names = ['dense'] + names
    text = shakespeare_text()[:args.corpus_chars]
    tokens = np.frombuffer(text.encode('ascii', 'replace'), np.uint8).astype(np.int32)
    train_tokens, val_tokens = train_validation_split(tokens)

    rows = []
    for name in names:
        row = run_config(name, _model_config(args, table[name]), train_tokens, val_tokens, args)
        rows.append(row)
        print(f'{name}: {row["steps"]} steps, {row["ms_per_step"]:.1f} ms/step, '
              f'val {row["val_loss"]:.3f}', file=sys.stderr, flush=True)
    dense = rows[0]
    header = (f'{"config":<19} {"steps":>5} {"ms/step":>8} {"x dense":>7} {"temp MB":>8} '
              f'{"val loss":>8} {"d loss":>7}  {"AdaAttn usage":<28} verdict')
    print(f'backend {jax.default_backend()}, impl {args.impl}, T={args.seq_len}, B={args.batch}, '
          f'D={args.embed_dim}, L={args.layers}, budget {args.budget:.0f} s/config')
    print(header)
    for row in rows:
        temp = '-' if row['temp_mb'] is None else f'{row["temp_mb"]:.2f}'
        print(f'{row["name"]:<19} {row["steps"]:>5} {row["ms_per_step"]:>8.1f} '
              f'{row["ms_per_step"] / dense["ms_per_step"]:>7.2f} {temp:>8} '
              f'{row["val_loss"]:>8.3f} {row["val_loss"] - dense["val_loss"]:>+7.3f}  '
              f'{_usage(row):<28} {_verdict(row, dense)}')
    for row in rows:
        if row['final_windows']:
            ws = ', '.join(f'{k} {v:.0f}' for k, v in row['final_windows'].items()
                           if v < 2**30)
            if ws:
                print(f'  final windows {row["name"]}: {ws}')
    doc = {'args': vars(args), 'backend': jax.default_backend(), 'rows': rows}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
