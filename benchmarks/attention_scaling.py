"""Forward+backward time of full causal vs sliding-window attention, blocked vs reference.

SPEC §7: a sliding window of W keys should make attention O(N W). The blocked XLA path
(`rustgpt_jax.ops.blocked`) skips key blocks outside the window, so its window/causal
time ratio should approach 2W/N; the dense einsum reference computes all N^2 logits
either way and serves as the baseline measured in the same run.

Each case times `jax.grad` of sum(out * cotangent) w.r.t. q, k, v under `jax.jit`, with
the window passed as a traced argument (one compile per implementation and length).
Compilation is excluded (one warm-up call), every call ends in `block_until_ready`, and
the median of `--repeats` calls is reported. A reference case whose compiled temporary
memory exceeds the memory available now is skipped and reported as such.

Usage:
  python benchmarks/attention_scaling.py [--lengths 2048 4096 8192] [--window 1024]
      [--json PATH]

Prints a table, then one JSON document on stdout (also written to --json PATH).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax import masks as masks_lib
from rustgpt_jax.ops import blocked, reference


def _mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a huge value where unreadable."""
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _make_step(impl: str, block_sizes: blocked.BlockSizes):
    """Jitted (q, k, v, dout, window) -> (dq, dk, dv) of the chosen implementation."""

    def attend(q, k, v, pos, window):
        kwargs = dict(q_positions=pos, kv_positions=pos, window=window)
        if impl == 'blocked':
            return blocked.blocked_attention(q, k, v, block_sizes=block_sizes, **kwargs)
        return reference.mha_reference(q, k, v, **kwargs)

    def loss(q, k, v, dout, window):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
        return jnp.sum(attend(q, k, v, pos, window).astype(jnp.float32) * dout)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(step, args, repeats: int) -> float:
    jax.block_until_ready(step(*args))  # warm-up (compiled before this call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(lengths, window: int, heads: int, kv_heads: int, head_dim: int, repeats: int,
        block_sizes: blocked.BlockSizes, impls):
    rows = []
    rng = np.random.default_rng(0)
    for n in lengths:
        q = jnp.asarray(rng.normal(size=(1, n, heads, head_dim)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(1, n, kv_heads, head_dim)), jnp.float32)
        v = jnp.asarray(rng.normal(size=(1, n, kv_heads, head_dim)), jnp.float32)
        dout = jnp.asarray(rng.normal(size=(1, n, heads, head_dim)), jnp.float32)
        for impl in impls:
            row = dict(impl=impl, seq_len=n, window=window)
            step = _make_step(impl, block_sizes)
            args = (q, k, v, dout, jnp.int32(masks_lib.NO_WINDOW))
            compiled = step.lower(*args).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            row['temp_bytes'] = int(temp)
            if temp > 0.8 * _mem_available_bytes():
                row['skipped'] = (f'needs {temp / 2**30:.1f} GiB temporaries, '
                                  f'{_mem_available_bytes() / 2**30:.1f} GiB available')
                rows.append(row)
                continue
            # The window is a traced argument: both cases reuse this one executable.
            row['causal_s'] = _time(compiled, args, repeats)
            row['window_s'] = _time(compiled, args[:4] + (jnp.int32(window),), repeats)
            row['ratio'] = row['window_s'] / row['causal_s']
            row['pair_ratio'] = _pair_ratio(n, window)
            rows.append(row)
            print(_format_row(row), file=sys.stderr, flush=True)
    return rows


def _pair_ratio(n: int, window: int) -> float:
    """Allowed (query, key) pairs with the window over those of full causal (~2W/N)."""
    w = min(window, n)
    return (w * (w + 1) / 2 + (n - w) * w) / (n * (n + 1) / 2)


def _format_row(row) -> str:
    head = f"{row['impl']:>9} {row['seq_len']:>6} {row['window']:>6}"
    if 'skipped' in row:
        return f"{head}  skipped: {row['skipped']}"
    return (f"{head} {row['causal_s']:>10.3f} {row['window_s']:>10.3f} "
            f"{row['ratio']:>7.3f} {row['pair_ratio']:>7.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--lengths', type=int, nargs='+', default=[2048, 4096, 8192])
    parser.add_argument('--window', type=int, default=1024)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--kv-heads', type=int, default=8)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--block-q', type=int, default=blocked.BlockSizes.for_xla().block_q)
    parser.add_argument('--block-kv', type=int, default=blocked.BlockSizes.for_xla().block_k)
    parser.add_argument('--impls', nargs='+', default=['blocked', 'reference'],
                        choices=['blocked', 'reference'])
    parser.add_argument('--json', default=None, help='also write the JSON here')
    args = parser.parse_args(argv)
    block_sizes = blocked.BlockSizes(args.block_q, args.block_kv)

    header = (f"{'impl':>9} {'N':>6} {'W':>6} {'causal_s':>10} {'window_s':>10} "
              f"{'ratio':>7} {'pairs':>7}")
    print(header, file=sys.stderr, flush=True)
    rows = run(args.lengths, args.window, args.heads, args.kv_heads, args.head_dim,
               args.repeats, block_sizes, args.impls)
    print('\n' + header)
    for row in rows:
        print(_format_row(row))
    doc = dict(benchmark='attention_scaling', backend=jax.default_backend(),
               device=str(jax.devices()[0]), batch=1, heads=args.heads,
               kv_heads=args.kv_heads, head_dim=args.head_dim, dtype='float32',
               repeats=args.repeats, block_q=block_sizes.block_q,
               block_k=block_sizes.block_k, timing='median seconds of fwd+bwd',
               rows=rows)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        with open(args.json, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
