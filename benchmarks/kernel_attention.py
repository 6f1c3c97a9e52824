"""Throughput of the Pallas flash attention kernel vs XLA / cuDNN / the einsum reference.

Prints a table and a JSON list of measured TFLOP/s for the forward pass and for
forward + backward (jax.grad w.r.t. q, k, v), bf16, head_dim 128, causal and sliding
window (W = 4096), over sequence lengths 1k..16k (32k for the sliding-window claim of
SPEC section 7). FLOPs are counted as the *useful* attention FLOPs of the mask
(4 * B * N * H * visible pairs forward, 3.5x that for forward + backward), so a kernel
that skips masked blocks gets credit only for the work the mask requires.

Without a GPU it still runs: tiny sizes, XLA paths only (Pallas interpret mode measures
the interpreter, not the kernel), and says so.

Usage: python benchmarks/kernel_attention.py [--json out.json] [--seqs 1024,2048]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import timing  # benchmarks/timing.py

from rustgpt_jax.kernels import flash_attention
from rustgpt_jax.ops.reference import mha_reference

SLIDING = 4096


def visible_pairs(t: int, window: int | None) -> int:
    """Number of (query, key) pairs allowed by causal (+ sliding) masking."""
    if window is None or window >= t:
        return t * (t + 1) // 2
    return window * (window + 1) // 2 + (t - window) * window


def _xla_impl(impl):
    def fn(q, k, v, pos, window):
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                            implementation=impl)
    return fn


def _pallas(q, k, v, pos, window):
    w = jnp.int32(2**30 if window is None else window)
    return flash_attention(q, k, v, q_positions=pos, kv_positions=pos, window=w)


def _reference(q, k, v, pos, window):
    w = 2**30 if window is None else window
    return mha_reference(q, k, v, q_positions=pos, kv_positions=pos, window=w)




def bench_one(name, impl, b, t, n, k, h, window, dtype, iters):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), dtype)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    fwd = jax.jit(lambda q, k, v: impl(q, k, v, pos, window))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(impl(q, k, v, pos, window)
                                                    .astype(jnp.float32)), (0, 1, 2)))
    flops = 4.0 * b * n * h * visible_pairs(t, window)
    row = dict(impl=name, seq=t, window=window or 'causal', batch=b, heads=n, kv_heads=k,
               head_dim=h, dtype=jnp.dtype(dtype).name)
    for label, fn, mult in (('fwd', fwd, 1.0), ('fwd_bwd', grad, 3.5)):
        try:
            sec = timing.best_seconds(fn, (q, kk, v), iters)
            row[f'{label}_ms'] = round(sec * 1e3, 3)
            row[f'{label}_tflops'] = round(mult * flops / sec / 1e12, 3)
        except Exception as err:  # noqa: BLE001 - report unsupported paths, keep going
            row[f'{label}_error'] = f'{type(err).__name__}: {str(err).splitlines()[0][:120]}'
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--json', default=None, help='also write the JSON rows here')
    parser.add_argument('--seqs', default=None, help='comma-separated sequence lengths')
    parser.add_argument('--tokens', type=int, default=16384,
                        help='batch * seq kept about constant (GPU)')
    parser.add_argument('--iters', type=int, default=5)
    args = parser.parse_args()

    on_gpu = jax.default_backend() == 'gpu'
    if on_gpu:
        seqs = [1024, 2048, 4096, 8192, 16384]
        impls = {'pallas': _pallas, 'xla': _xla_impl('xla'), 'cudnn': _xla_impl('cudnn'),
                 'reference': _reference}
        n, k, h, dtype = 16, 4, 128, jnp.bfloat16
        configs = [(t, w) for t in seqs for w in (None, SLIDING) if w is None or w < t]
        configs += [(32768, None), (32768, SLIDING)]
    else:
        print(f'no GPU (backend: {jax.default_backend()}): tiny sizes, XLA paths only; the '
              'Pallas kernel runs here only in interpret mode, which is not a timing.')
        seqs = [128, 256]
        impls = {'xla': _xla_impl('xla'), 'reference': _reference}
        n, k, h, dtype = 4, 2, 64, jnp.float32
        configs = [(t, w) for t in seqs for w in (None, 64)]
    if args.seqs:
        wanted = {int(s) for s in args.seqs.split(',')}
        configs = [c for c in configs if c[0] in wanted]

    rows = []
    for t, window in configs:
        b = max(1, args.tokens // t) if on_gpu else 1
        for name, impl in impls.items():
            if name == 'reference' and on_gpu and t > 8192:
                continue  # the dense (B, N, T, T) float32 logits no longer fit
            rows.append(bench_one(name, impl, b, t, n, k, h, window, dtype, args.iters))
            r = rows[-1]
            print(f"{r['impl']:>10} seq={t:>6} window={str(r['window']):>7} b={b:>3} "
                  f"fwd {r.get('fwd_tflops', r.get('fwd_error', '-'))!s:>8} TFLOP/s "
                  f"({r.get('fwd_ms', '-')} ms)  fwd+bwd "
                  f"{r.get('fwd_bwd_tflops', r.get('fwd_bwd_error', '-'))!s:>8} TFLOP/s "
                  f"({r.get('fwd_bwd_ms', '-')} ms)", flush=True)
    print(json.dumps(dict(device=str(jax.devices()[0]), rows=rows), indent=1))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=str(jax.devices()[0]), rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
