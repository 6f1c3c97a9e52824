"""XLA:CPU library options for the training step, each measured beside torch.

Runs `train_throughput.py` once per flag set in a fresh process (XLA reads its flags when
the backend starts), with the same configs and rounds, and tabulates the best JAX
variant's tokens/s and its ratio to torch measured in that same process. Which sets:
  baseline     the thread flags train_throughput.py sets by default
  onednn       + --xla_cpu_use_onednn=true (oneDNN matmuls)
  no-xnnpack   + --xla_cpu_use_xnnpack=false (XLA's own dot emitters)
  fast-math    + --xla_cpu_enable_fast_math=true
  concurrency  + --xla_cpu_enable_concurrency_optimized_scheduler=true

Usage: python benchmarks/xla_cpu_flags.py [--configs a b] [--rounds 3] [--steps 5]
       [--sets baseline onednn ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import machine  # benchmarks/machine.py

HERE = os.path.dirname(os.path.abspath(__file__))
SETS = {
    'baseline': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'no-xnnpack': '--xla_cpu_use_xnnpack=false',
    'fast-math': '--xla_cpu_enable_fast_math=true',
    'concurrency': '--xla_cpu_enable_concurrency_optimized_scheduler=true',
}


def run_set(flags: str, args) -> dict:
    threads = len(os.sched_getaffinity(0))
    env = dict(os.environ, XLA_FLAGS=f'--xla_cpu_multi_thread_eigen=true '
                                     f'intra_op_parallelism_threads={threads} {flags}'.strip())
    with tempfile.NamedTemporaryFile(suffix='.json') as out:
        done = subprocess.run(
            [sys.executable, os.path.join(HERE, 'train_throughput.py'), '--configs',
             *args.configs, '--rounds', str(args.rounds), '--steps', str(args.steps),
             '--jax_variants', *args.jax_variants, '--json', out.name],
            env=env, capture_output=True, text=True, cwd=HERE)
        if done.returncode:
            return {'error': done.stderr.strip().splitlines()[-1:]}
        return json.load(open(out.name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--configs', nargs='+', default=['a', 'b'])
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--jax_variants', nargs='+', default=['packed'])
    parser.add_argument('--sets', nargs='+', default=list(SETS), choices=list(SETS))
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    results = {name: run_set(SETS[name], args) for name in args.sets}
    print(machine.banner(machine.describe()))
    print(f'{"flags":<13}{"config":<8}{"jax tok/s":>11}{"torch tok/s":>13}{"vs torch":>10}')
    for name, doc in results.items():
        if 'error' in doc:
            print(f'{name:<13}failed: {doc["error"]}')
            continue
        for config in args.configs:
            rows = [r for r in doc['results'] if r['config'] == config]
            torch = next(r for r in rows if r['impl'] == 'torch')
            best = max((r for r in rows if r['impl'].startswith('jax')),
                       key=lambda r: r['tokens_per_s'])
            print(f'{name:<13}{config:<8}{best["tokens_per_s"]:>11,.0f}'
                  f'{torch["tokens_per_s"]:>13,.0f}{best["vs_torch"]:>10.2f}')
    document = {'machine': machine.describe(), 'sets': {k: SETS[k] for k in args.sets},
                'results': results}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(document, f, indent=1)
    print(json.dumps(document))


if __name__ == '__main__':
    main()
