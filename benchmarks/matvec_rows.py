"""Matrix-vector bandwidth of XLA:CPU by kernel shape: whole rows vs row blocks.

Batch-1 decoding is a chain of (1, in) x (out, in)^T products that stream the weights
once. This times such chains for the block kernels of the decode_speed.py model (and a
few other shapes) two ways in one run: as one dot over the whole (out, in) matrix (the
reference), and as one batched dot over S blocks of out / S rows (the free reshape
`runtime.Execution.row_blocks` uses). Each chain holds enough distinct matrices
(~--megabytes in total) that the weights come from memory, as in decoding, not from
cache.

Printed: microseconds per product and GB/s read, per shape and S (table + JSON).

Usage: python benchmarks/matvec_rows.py [--blocks 1 2 4] [--megabytes 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

# (out, in): qkv, o_proj, w13 (gate/up), w2 (down) of the 110M decode model, its LM head
# rows, then TinyLlama's w2 and a few others.
SHAPES = [(2304, 768), (768, 768), (4096, 768), (768, 2048), (2048, 5632), (768, 3072),
          (1024, 2048), (512, 1408)]
ROUNDS = 8


def chain_seconds(weights, x, blocks: int, repeats: int = 5) -> float:
    """Best time of ROUNDS passes over the chain, per matrix-vector product."""
    out, inn = weights[0].shape

    @jax.jit
    def run(weights, x):
        def body(_, x):
            for w in weights:
                if blocks == 1:
                    y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
                else:
                    y = jnp.einsum('sbi,soi->bso', jnp.broadcast_to(x, (blocks,) + x.shape),
                                   w.reshape(blocks, out // blocks, inn))
                x = x + 1e-9 * jnp.sum(y)  # every output feeds the next product
            return x
        return jax.lax.fori_loop(0, ROUNDS, body, x)

    jax.block_until_ready(run(weights, x))  # compile
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(weights, x))
        best = min(best, time.perf_counter() - start)
    return best / (ROUNDS * len(weights))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--blocks', type=int, nargs='+', default=[1, 2, 4])
    parser.add_argument('--megabytes', type=int, default=400)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    if 1 not in args.blocks:
        args.blocks = [1] + args.blocks  # the reference
    rows = []
    print(f'{"shape":>12} ' + ' '.join(f'{"S=" + str(s) + " us":>9} {"GB/s":>5}'
                                       for s in args.blocks))
    for out, inn in SHAPES:
        count = max(1, args.megabytes * 2**20 // (out * inn * 4))
        keys = jax.random.split(jax.random.key(0), count)
        weights = [jax.random.normal(k, (out, inn), jnp.float32) for k in keys]
        x = jnp.ones((1, inn), jnp.float32)
        line = f'{out:>5} x {inn:<4} '
        for blocks in args.blocks:
            if out % blocks:
                line += f'{"-":>9} {"-":>5} '
                continue
            seconds = chain_seconds(weights, x, blocks)
            gbs = out * inn * 4 / seconds / 1e9
            rows.append(dict(out=out, inn=inn, blocks=blocks, us=seconds * 1e6, gb_s=gbs))
            line += f'{seconds * 1e6:>9.1f} {gbs:>5.1f} '
        print(line, flush=True)
        del weights
    print(json.dumps(dict(devices=str(jax.devices()), rows=rows)))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
