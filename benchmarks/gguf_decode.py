"""GGUF files as people download them: rustgpt_jax's quantized runtime vs llama.cpp.

Writes a TinyLlama-shaped (1.1B) random-weight F32 GGUF with `save_gguf`, has llama.cpp's
own quantizer (`llama_cpp.llama_model_quantize`) make the F16 / Q8_0 / Q4_0 / Q4_K_M
files, and for each measures, beside llama.cpp in the same run and with the same threads:
  - load: `load_gguf(quantized=True)` until the params are device arrays, against
    `Llama(...)`; time to the first token (compilation included) on its own line;
  - prompt processing: a 128-token prompt into the KV cache, tokens/s;
  - batch-1 greedy decode tokens/s, and the bound (weight bytes per token / copy bandwidth);
  - peak RSS (VmHWM) of a fresh process that loads the file and decodes 32 tokens.
Ours runs in a fresh subprocess per file (`--worker`), so every process starts cold and
its VmHWM is its own. JAX's compilation cache is off in the worker (first_token_s counts
the compile). Rounds alternate ours / llama.cpp (`--rounds`, default 3) and each side's
best round is reported (all rounds are in the JSON): on a shared VM one round moved by
up to 20%.

`--context N` sizes both sides' KV cache (default: prompt + steps + 8 slots; the CLIs
size ours by the file's context length, 2048 for TinyLlama).

Usage: python benchmarks/gguf_decode.py [--small] [--threads 2] [--steps 32] [--rounds 3]
       [--ftypes f16,q8_0,q4_0,q4_k_m] [--context N] [--json PATH] [--dir DIR]
(the full size writes a 4.4 GB F32 file first; --dir picks where).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import machine  # benchmarks/machine.py
import numpy as np

LLAMA_FTYPES = {'f16': 1, 'q8_0': 7, 'q4_0': 2, 'q4_k_m': 15, 'q5_k_m': 17, 'q6_k': 18}


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


def weight_bytes_per_token(path: str) -> int:
    """Bytes of every tensor a decode step reads: all but the embedding table (one row)."""
    from rustgpt_jax.interop.gguf import read_header
    header = read_header(np.memmap(path, mode='r'), path)
    total = 0
    for t in header.tensors:
        total += t.nbytes // t.shape[0] if t.name == 'token_embd.weight' else t.nbytes
    return total


def _vm_hwm_bytes() -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
    return -1


def worker(path: str, steps: int, prompt_len: int, context: int) -> dict:
    """Ours, in this (fresh) process: load, prompt, decode, peak RSS."""
    import jax
    import jax.numpy as jnp

    from rustgpt_jax.decoding import prepare_for_decode
    from rustgpt_jax.interop.gguf import load_gguf

    t = time.perf_counter()
    config, params, _ = load_gguf(path, max_seq_len=context, quantized=True)
    form = prepare_for_decode(config, params)  # what rustgpt-generate --gguf runs
    params = jax.block_until_ready(jax.device_put(form.params))
    load_s = time.perf_counter() - t
    model = form.model
    one = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one, decode=True))['cache']
    fresh_cache = lambda: jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.full(s.shape, -1 if 'positions' in str(p[-1]) else 0, s.dtype), shapes)

    # params is an argument, not a closure: closed-over weights would be compiled in as
    # constants. The cache is donated, so the step updates it in place as `generate`'s
    # loop does (without donation every step copied all 44 cache arrays).
    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache, tokens, pos):
        # last_only: the head on the last position, as `decoding.prefill` (and llama.cpp's
        # prompt evaluation) computes it.
        logits, mut = model.apply({'params': params, 'cache': cache}, tokens, positions=pos,
                                  decode=True, last_only=True, mutable=['cache'])
        return mut['cache'], jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]

    prompt = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size,
                                                           (1, prompt_len)), jnp.int32)
    positions = jnp.arange(prompt_len, dtype=jnp.int32)[None]
    t = time.perf_counter()
    cache, token = step(params, fresh_cache(), prompt[:, :1], positions[:, :1])
    jax.block_until_ready(token)
    first_token_s = time.perf_counter() - t  # includes compiling the one-token step
    jax.block_until_ready(step(params, fresh_cache(), prompt, positions))  # compile prompt
    best_prompt = float('inf')
    for _ in range(2):
        t = time.perf_counter()
        cache, token = step(params, fresh_cache(), prompt, positions)
        jax.block_until_ready(token)
        best_prompt = min(best_prompt, time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(steps):
        cache, token = step(params, cache, token, jnp.full((1, 1), prompt_len + i, jnp.int32))
    jax.block_until_ready(token)
    return {'load_s': load_s, 'first_token_s': first_token_s,
            'tokens_per_s': steps / (time.perf_counter() - t),
            'prompt_tokens_per_s': prompt_len / best_prompt,
            'peak_rss_bytes': _vm_hwm_bytes(), 'execution': repr(form.execution)}


def ours(path: str, steps: int, prompt_len: int, context: int, threads: int) -> dict:
    env = dict(os.environ, RGJ_GEMV_THREADS=str(threads), JAX_COMPILATION_CACHE_DIR='')
    done = subprocess.run([sys.executable, __file__, '--worker', path, '--steps', str(steps),
                           '--prompt_len', str(prompt_len), '--context', str(context)],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f'worker failed on {path}:\n{done.stderr[-3000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_cpp_run(path: str, steps: int, prompt_len: int, context: int, threads: int) -> dict:
    import llama_cpp
    t = time.perf_counter()
    # n_batch covers the prompt and the decoded tokens (one llm.eval call each).
    llm = llama_cpp.Llama(model_path=path, n_ctx=context,
                          n_batch=prompt_len + steps + 8,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, llm.n_vocab(), prompt_len)]
    best_prompt = float('inf')
    for _ in range(2):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        best_prompt = min(best_prompt, time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    rate = steps / (time.perf_counter() - t)
    llm.close()
    return {'load_s': load_s, 'tokens_per_s': rate, 'prompt_tokens_per_s': prompt_len / best_prompt}


def _best(results: list) -> dict:
    """Each side's best round (the least disturbed by other processes): the highest
    rates, the lowest times and peak RSS; the fields of the first round otherwise."""
    best = dict(results[0])
    for key in best:
        values = [r[key] for r in results]
        if key.endswith('_per_s'):
            best[key] = max(values)
        elif key.endswith(('_s', '_bytes')):
            best[key] = min(values)
    return best


def make_files(config, ftypes, directory, threads) -> dict:
    """ftype -> path: an F32 file from save_gguf, quantized by llama.cpp's quantizer."""
    import llama_cpp

    from rustgpt_jax.interop.gguf import save_gguf
    source = save_gguf(os.path.join(directory, 'model-f32.gguf'), config,
                       _random_params(config), None, ftype='f32')
    files = {}
    for ftype in ftypes:
        out = os.path.join(directory, f'model-{ftype}.gguf')
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = LLAMA_FTYPES[ftype], threads
        if llama_cpp.llama_model_quantize(source.encode(), out.encode(), params):
            raise RuntimeError(f'llama_model_quantize failed for {ftype}')
        files[ftype] = out
    os.remove(source)
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--small', action='store_true', help='a ~20M-parameter model')
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--steps', type=int, default=32)
    parser.add_argument('--prompt_len', type=int, default=128)
    parser.add_argument('--rounds', type=int, default=3,
                        help='alternating rounds per side; the best round is reported')
    parser.add_argument('--ftypes', default='f16,q8_0,q4_0,q4_k_m')
    parser.add_argument('--context', type=int, default=0,
                        help='KV-cache slots on both sides (default: prompt + steps + 8)')
    parser.add_argument('--dir', default=None, help='where to write the GGUF files')
    parser.add_argument('--json', default=None, help='also write the rows as JSON here')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    least = args.prompt_len + args.steps + 8
    if args.context and args.context < least:
        parser.error(f'--context {args.context} is below prompt + steps + 8 = {least}')
    args.context = args.context or least
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.prompt_len, args.context)))
        return
    from rustgpt_jax.config import ModelConfig, tinyllama_1_1b
    config = (ModelConfig(vocab_size=4096, embed_dim=512, hidden_dim=1536, num_layers=4,
                          num_heads=8, num_kv_heads=2, max_seq_len=2048)
              if args.small else tinyllama_1_1b())
    bandwidth = machine.copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        files = make_files(config, args.ftypes.split(','), tmp, args.threads)
        for ftype, path in files.items():
            nbytes = weight_bytes_per_token(path)
            rounds = {'ours': [], 'llama_cpp': []}
            for _ in range(args.rounds):  # alternating, so other load hits both sides alike
                rounds['ours'].append(ours(path, args.steps, args.prompt_len, args.context,
                                           args.threads))
                rounds['llama_cpp'].append(llama_cpp_run(path, args.steps, args.prompt_len,
                                                         args.context, args.threads))
            rows.append({'ftype': ftype, 'file_gb': os.path.getsize(path) / 1e9,
                         'bound_tokens_per_s': bandwidth / nbytes,
                         'ours': _best(rounds['ours']), 'llama_cpp': _best(rounds['llama_cpp']),
                         'rounds': rounds})
            os.remove(path)
    info = machine.describe()
    print(machine.banner(info))
    print(f'copy bandwidth {bandwidth / 1e9:.1f} GB/s, threads {args.threads}, '
          f'{args.context} KV-cache slots, '
          f'{"small" if args.small else "TinyLlama-1.1B"} shapes, random weights')
    print(f'{"ftype":7} {"GB":>5} {"load ours":>9} {"llama":>6} {"decode ours":>11} '
          f'{"llama":>6} {"ratio":>6} {"bound":>6} {"% bound":>7} {"prompt ours":>11} '
          f'{"llama":>6} {"ratio":>6} {"peak RSS GB":>11}')
    for r in rows:
        o, lc = r['ours'], r['llama_cpp']
        print(f'{r["ftype"]:7} {r["file_gb"]:5.2f} {o["load_s"]:9.2f} {lc["load_s"]:6.2f} '
              f'{o["tokens_per_s"]:11.1f} {lc["tokens_per_s"]:6.1f} '
              f'{o["tokens_per_s"] / lc["tokens_per_s"]:6.2f} {r["bound_tokens_per_s"]:6.1f} '
              f'{100 * o["tokens_per_s"] / r["bound_tokens_per_s"]:6.0f}% '
              f'{o["prompt_tokens_per_s"]:11.1f} {lc["prompt_tokens_per_s"]:6.1f} '
              f'{o["prompt_tokens_per_s"] / lc["prompt_tokens_per_s"]:6.2f} '
              f'{o["peak_rss_bytes"] / 1e9:11.2f}')
    for r in rows:
        print(f'{r["ftype"]}: time to first token (load excluded, compile included) '
              f'{r["ours"]["first_token_s"]:.2f} s; {r["ours"]["execution"]}')
    document = {'machine': info, 'bandwidth_bytes_per_s': bandwidth, 'threads': args.threads,
                'context': args.context, 'small': args.small, 'rows': rows}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(document, f, indent=1)
    print(json.dumps(document))


if __name__ == '__main__':
    main()
