"""Speed of native.quant_matmul (GGUF-encoded weights) beside references from the same run.

For each weight type and TinyLlama-sized product ((out, in) = (5632, 2048): gate/up;
(2048, 5632): down), two row counts:
- rows = 1 (decode): GB/s of weight bytes read, beside numpy's copy bandwidth (bytes
  read per second by np.copyto of a 256 MB array, one thread) measured in this run. The
  products run as a chain over enough distinct copies of the matrix (~--megabytes) that
  the weights come from memory, not from cache.
- rows = 128 (prefill): GFLOP/s (2 rows out in / s), beside XLA's float32 dot of the
  dequantized matrix (jnp.dot, the "dequantize, then dot" route) in this run.
Then products that share their input, rows = 1: TinyLlama's q/k/v (2048 in; 2048 + 256 +
256 out, Q4_K/Q4_K/Q6_K as in Q4_K_M) and gate+up (2 x 5632, Q4_K), as one
quant_matmul_multi call beside one quant_matmul call per weight, each chained over enough
copies (~--megabytes) that the weights come from memory.

Usage: python benchmarks/quant_matmul.py [--threads 2] [--megabytes 160] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

sys.path.insert(0, os.path.dirname(__file__))
from machine import banner, copy_bandwidth, describe  # noqa: E402
from timing import best_seconds  # noqa: E402

from rustgpt_jax.native import quant_matmul as qm  # noqa: E402

TYPES = [T.F16, T.BF16, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0]
SHAPES = [(5632, 2048), (2048, 5632)]
# name -> (type, out) per part, all with in = 2048.
MULTI = {'qkv': [(T.Q4_K, 2048), (T.Q4_K, 256), (T.Q6_K, 256)],
         'gate+up': [(T.Q4_K, 5632), (T.Q4_K, 5632)]}
SCALES = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def random_blocks(kind, out: int, n_in: int, rng) -> np.ndarray:
    """(out, row_bytes) uint8: random codes with finite f16 scales (the speed does not
    depend on the values)."""
    values, size = GGML_QUANT_SIZES[kind]
    if kind in (T.F16, T.BF16):
        return rng.normal(size=(out, n_in)).astype(np.float16).view(np.uint8)
    blocks = rng.integers(0, 256, size=(out, n_in // values, size), dtype=np.uint8)
    for offset in SCALES[kind]:
        blocks[..., offset:offset + 2] = np.array([0.01], np.float16).view(np.uint8)
    return blocks.reshape(out, -1)


def chain_seconds(kind, blocks_list, x, threads: int) -> float:
    """Best seconds per product of a chain over every matrix in `blocks_list`."""
    @jax.jit
    def run(x, blocks_list):
        for blocks in blocks_list:  # each output feeds the next: no concurrent calls
            x = x + 1e-30 * jnp.sum(qm.quant_matmul(x, blocks, kind, threads=threads))
        return x
    return best_seconds(run, (x, blocks_list), iters=5) / len(blocks_list)


def measure(kind, out: int, n_in: int, threads: int, megabytes: float, rng) -> list[dict]:
    blocks = random_blocks(kind, out, n_in, rng)
    copies = max(1, int(megabytes * 1e6 // blocks.nbytes))
    chain = [jnp.asarray(blocks)] + [jnp.asarray(blocks.copy()) for _ in range(copies - 1)]
    rows = []
    x1 = jnp.asarray(rng.normal(size=(1, n_in)).astype(np.float32))
    seconds = chain_seconds(kind, chain, x1, threads)
    rows.append({'type': kind.name, 'out': out, 'in': n_in, 'rows': 1,
                 'us': seconds * 1e6, 'weight_gbps': blocks.nbytes / seconds / 1e9})
    x = jnp.asarray(rng.normal(size=(128, n_in)).astype(np.float32))
    seconds = best_seconds(jax.jit(lambda x, b: qm.quant_matmul(x, b, kind, threads=threads)),
                           (x, chain[0]), iters=3)
    w = jnp.asarray(dequantize(blocks, kind).astype(np.float32))
    xla = best_seconds(jax.jit(lambda x, w: jnp.dot(x, w.T)), (x, w), iters=3)
    flops = 2 * 128 * out * n_in
    rows.append({'type': kind.name, 'out': out, 'in': n_in, 'rows': 128, 'us': seconds * 1e6,
                 'weight_gbps': blocks.nbytes / seconds / 1e9, 'gflops': flops / seconds / 1e9,
                 'xla_f32_gflops': flops / xla / 1e9})
    return rows


def measure_multi(name: str, threads: int, megabytes: float, rng) -> dict:
    """Microseconds per multi call and per set of single calls, rows = 1."""
    parts = [(random_blocks(kind, out, 2048, rng), kind) for kind, out in MULTI[name]]
    nbytes = sum(b.nbytes for b, _ in parts)
    copies = max(1, int(megabytes * 1e6 // nbytes))
    chain = [[(jnp.asarray(b.copy()), k) for b, k in parts] for _ in range(copies)]
    kinds = tuple(k for _, k in parts)
    x = jnp.asarray(rng.normal(size=(1, 2048)).astype(np.float32))

    def timed(product):
        @jax.jit
        def run(x, chain):
            for blocks in chain:  # each output feeds the next: no concurrent calls
                x = x + 1e-30 * jnp.sum(product(x, blocks))
            return x
        blocks = [tuple(b for b, _ in copy) for copy in chain]
        return best_seconds(run, (x, blocks), iters=5) / copies

    multi = timed(lambda x, bs: qm.quant_matmul_multi(x, list(zip(bs, kinds)), threads=threads))
    singles = timed(lambda x, bs: jnp.concatenate(
        [qm.quant_matmul(x, b, k, threads=threads) for b, k in zip(bs, kinds)], axis=1))
    return {'product': name, 'parts': [f'{k.name}:{b.shape[0]}' for b, k in parts], 'rows': 1,
            'multi_us': multi * 1e6, 'singles_us': singles * 1e6,
            'multi_gbps': nbytes / multi / 1e9}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--megabytes', type=float, default=160,
                        help='weight bytes per rows=1 chain (more than the caches)')
    parser.add_argument('--types', nargs='*', default=[t.name for t in TYPES])
    parser.add_argument('--multi', nargs='*', default=list(MULTI),
                        help='shared-input products to time (none: skip)')
    parser.add_argument('--json', help='write the results here as JSON')
    args = parser.parse_args()
    info = describe()
    print(banner(info))
    if not qm.available():
        raise SystemExit(f'quant_matmul is unavailable: {qm.unavailable_reason()}')
    copy = copy_bandwidth(256 << 20) / 2 / 1e9  # GB/s copied (one direction)
    print(f'kernel ISA: {qm.isa()}; threads: {args.threads}; numpy copy: {copy:.1f} GB/s read')
    print(f"{'type':6} {'out x in':>11} {'rows':>4} {'us':>9} {'GB/s':>6} {'/copy':>6} "
          f"{'GFLOP/s':>8} {'XLA f32':>8}")
    rng = np.random.default_rng(0)
    results = []
    for name in args.types:
        for out, n_in in SHAPES:
            for row in measure(T[name], out, n_in, args.threads, args.megabytes, rng):
                results.append(row)
                flops = (f"{row['gflops']:8.1f} {row['xla_f32_gflops']:8.1f}"
                         if 'gflops' in row else '')
                print(f"{row['type']:6} {out:>5}x{n_in:<5} {row['rows']:>4} {row['us']:9.1f} "
                      f"{row['weight_gbps']:6.1f} {row['weight_gbps'] / copy:6.2f} {flops}",
                      flush=True)
    if args.multi:
        print(f"{'shared x':8} {'parts':>28} {'rows':>4} {'multi us':>9} {'singles us':>10} "
              f"{'GB/s':>6}")
    for name in args.multi:
        row = measure_multi(name, args.threads, args.megabytes, rng)
        results.append(row)
        print(f"{name:8} {' '.join(row['parts']):>28} {1:>4} {row['multi_us']:9.1f} "
              f"{row['singles_us']:10.1f} {row['multi_gbps']:6.1f}", flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'machine': info, 'isa': qm.isa(), 'threads': args.threads,
                       'copy_gbps': copy, 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
