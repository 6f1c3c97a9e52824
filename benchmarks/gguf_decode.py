"""GGUF load time and batch-1 decode tokens/s: rustgpt_jax vs llama.cpp vs the bandwidth bound.

Writes a TinyLlama-shaped (1.1B) random-weight GGUF per file type (F32, F16), then for
each file measures
  - load_gguf wall time and llama.cpp's `Llama(...)` load time,
  - greedy batch-1 decode tokens/s: our jitted one-token `Transformer.apply(decode=True)`
    step against `Llama.eval([token])` with the same thread count,
  - the memory-bandwidth bound: weight bytes read per token / measured copy bandwidth.
Our params are float32 whatever the file type (load_gguf dequantises), so the F16 row
compares llama.cpp reading 2-byte weights with us reading 4-byte ones.

With --wakeup_latency_us N both sides run while this process holds a CPU wake-up latency
request (`decoding.wakeup`, Linux PM QoS, needs root; see decode_speed.py).

Usage: python benchmarks/gguf_decode.py [--small] [--threads 2] [--steps 32]
       [--wakeup_latency_us 0]
(the full size needs ~15 GB RAM for F32: 4.4 GB file, params and the writer's copy).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import tempfile
import time

import machine  # benchmarks/machine.py
import numpy as np


def _random_params(config, seed=0):
    """Scanned numpy params of Transformer(config); small scale keeps activations finite."""
    rng = np.random.default_rng(seed)
    d, f, v, lc = config.embed_dim, config.hidden_dim, config.vocab_size, config.num_layers
    n, k, h = config.num_heads, config.num_kv_heads, config.effective_head_dim
    w = lambda *s: (rng.standard_normal(s, np.float32) * (0.5 / np.sqrt(s[-1]))).astype(np.float32)
    return {'embedder': {'token_embedding': w(v, d), 'lm_head': w(d, v)},
            'final_norm': {'scale': np.ones(d, np.float32)},
            'layers': {'attention': {'q_proj': {'kernel': w(lc, d, n, h)},
                                     'k_proj': {'kernel': w(lc, d, k, h)},
                                     'v_proj': {'kernel': w(lc, d, k, h)},
                                     'o_proj': {'kernel': w(lc, n, h, d)}},
                       'ffn': {'w1': {'kernel': w(lc, d, f)}, 'w3': {'kernel': w(lc, d, f)},
                               'w2': {'kernel': w(lc, f, d)}},
                       'attn_norm': {'scale': np.ones((lc, d), np.float32)},
                       'ffn_norm': {'scale': np.ones((lc, d), np.float32)}}}


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 3) -> float:
    """Bytes/s of a large numpy copy (read + write counted)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float('inf')
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes_per_token(path: str) -> int:
    """Bytes of every tensor a decode step reads: all but the embedding table (one row)."""
    from rustgpt_jax.interop.gguf import read_header
    header = read_header(np.memmap(path, mode='r'), path)
    total = 0
    for t in header.tensors:
        total += t.nbytes // t.shape[0] if t.name == 'token_embd.weight' else t.nbytes
    return total


def ours(path: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from rustgpt_jax.decoding import prepare_for_decode
    from rustgpt_jax.interop.gguf import load_gguf

    t = time.perf_counter()
    config, params, _ = load_gguf(path, max_seq_len=steps + 8)
    # The decode form `rustgpt-generate --gguf` uses (decoding.prepare_for_decode):
    # unrolled layers (the scanned stack slices every layer's weights out of the stacked
    # arrays per token) and packed projections (nn.packing).
    decode_form = prepare_for_decode(config, params)
    params = jax.block_until_ready(jax.device_put(decode_form.params))  # usable device arrays
    load_s = time.perf_counter() - t
    model = decode_form.model
    one = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one, decode=True))['cache']
    cache = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.full(s.shape, -1 if 'positions' in str(p[-1]) else 0, s.dtype), shapes)

    # params is an argument, not a closure: a closed-over 4.4 GB tree would be embedded in
    # the compiled program as constants (a second copy in memory and a slow compile).
    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache, token, pos):
        logits, mut = model.apply({'params': params, 'cache': cache}, token, positions=pos,
                                  decode=True, mutable=['cache'])
        return mut['cache'], jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]

    token = jnp.ones((1, 1), jnp.int32)
    cache, token = step(params, cache, token, jnp.zeros((1, 1), jnp.int32))  # compile
    jax.block_until_ready(token)
    t = time.perf_counter()
    for i in range(1, steps + 1):
        cache, token = step(params, cache, token, jnp.full((1, 1), i, jnp.int32))
    jax.block_until_ready(token)
    return {'load_s': load_s, 'tokens_per_s': steps / (time.perf_counter() - t)}


def llama_cpp_run(path: str, steps: int, threads: int) -> dict:
    import llama_cpp
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=steps + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    llm.eval([1])
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    rate = steps / (time.perf_counter() - t)
    llm.close()
    return {'load_s': load_s, 'tokens_per_s': rate}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--small', action='store_true', help='a ~20M-parameter model')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--steps', type=int, default=32)
    parser.add_argument('--ftypes', default='f32,f16')
    parser.add_argument('--dir', default=None, help='where to write the GGUF files')
    parser.add_argument('--wakeup_latency_us', type=int, default=None,
                        help='hold this CPU wake-up latency request for the whole run')
    args = parser.parse_args()
    from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency
    with (contextlib.nullcontext() if args.wakeup_latency_us is None
          else cpu_wakeup_latency(args.wakeup_latency_us, required=True)):
        run(args)


def run(args):
    from rustgpt_jax.config import ModelConfig, tinyllama_1_1b
    from rustgpt_jax.interop.gguf import save_gguf

    config = (ModelConfig(vocab_size=4096, embed_dim=512, hidden_dim=1408, num_layers=4,
                          num_heads=8, num_kv_heads=2, max_seq_len=2048)
              if args.small else tinyllama_1_1b())
    bandwidth = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        params = _random_params(config)
        for ftype in args.ftypes.split(','):
            path = save_gguf(os.path.join(tmp, f'model-{ftype}.gguf'), config, params, None,
                             ftype=ftype)
            nbytes = weight_bytes_per_token(path)
            row = {'ftype': ftype, 'file_gb': os.path.getsize(path) / 1e9,
                   'bound_tokens_per_s': bandwidth / nbytes,
                   'ours': ours(path, args.steps), 'llama_cpp': None}
            try:
                row['llama_cpp'] = llama_cpp_run(path, args.steps, args.threads)
            except ImportError as e:
                row['llama_cpp_error'] = str(e)
            rows.append(row)
            os.remove(path)
    wakeup = 'default' if args.wakeup_latency_us is None else f'{args.wakeup_latency_us} us'
    print(f'copy bandwidth {bandwidth / 1e9:.1f} GB/s, threads {args.threads}, '
          f'{"small" if args.small else "TinyLlama-1.1B"} shapes, idle wake-up {wakeup}')
    print(f'{"ftype":6} {"file GB":>8} {"load ours":>10} {"load llama":>10} {"tok/s ours":>11} '
          f'{"tok/s llama":>11} {"ours/llama":>10} {"bound":>8}')
    for r in rows:
        lc = r['llama_cpp'] or {'load_s': float('nan'), 'tokens_per_s': float('nan')}
        print(f'{r["ftype"]:6} {r["file_gb"]:8.2f} {r["ours"]["load_s"]:10.2f} '
              f'{lc["load_s"]:10.2f} {r["ours"]["tokens_per_s"]:11.1f} '
              f'{lc["tokens_per_s"]:11.1f} '
              f'{r["ours"]["tokens_per_s"] / lc["tokens_per_s"]:10.2f} '
              f'{r["bound_tokens_per_s"]:8.1f}')
    info = machine.describe()
    print(machine.banner(info))
    print(json.dumps({'machine': info, 'bandwidth_bytes_per_s': bandwidth, 'threads': args.threads,
                      'small': args.small, 'wakeup': wakeup, 'rows': rows}))


if __name__ == '__main__':
    main()
