"""Decode speed: rustgpt_jax `generate` vs Hugging Face `generate` on identical weights.

A ~110M-parameter llama-shaped model (dim 768, 12 layers, 12 heads, FFN 2048, vocab
32000) is initialised by `transformers` (torch, CPU, float32) and loaded into
rustgpt_jax through `interop.hf.params_from_hf`. Both sides decode greedily, with a
KV cache, a 128-token prompt and exactly 128 new tokens, at batch 1 and 8, in one run.
Four JAX rows: 'jax packed' (`decoding.prepare_for_decode`: unrolled layers, packed
projections and, on CPU, the `native.cpu_gemv` matrix-vector kernel where it builds;
what the CLIs use), 'jax xla dot' (the same with XLA's dot and the FFN down projection in
two row blocks), 'jax whole rows' (XLA's dot without row blocks) and 'jax unrolled' (the
training layout, unrolled).

Printed (table + JSON):
  * tokens/s end to end (prefill + decode) and for the decode phase alone (the
    difference between 128 and 1 new tokens), per side, and the JAX/HF ratio;
  * the memory-bandwidth bound of batch-1 decode: weight bytes read per token (all
    weights but the embedding table, of which one row is read) over the copy bandwidth
    measured with numpy (bytes read + bytes written per second of a large `np.copyto`);
  * KV-cache bytes against the generated length for full causal attention and a
    sliding window (flat beyond W: the cache is a ring of W slots).

Both sides are timed under each CPU idle setting named by --wakeup (default: both):
'default' (the machine's idle states) and '0us' (this process holds a 0 us wake-up latency
request, `decoding.wakeup.cpu_wakeup_latency`, Linux PM QoS; needs root, else left out
with a note). On a VM an idle vCPU halts, and XLA:CPU shares each product over its pool
threads and resumes the step on another pool thread after it, so the request mostly
helps the JAX side; every ratio compares the two sides under the same setting.

Usage: python benchmarks/decode_speed.py [--batches 1 8] [--repeats 3]
       [--wakeup default 0us] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import machine  # benchmarks/machine.py
import numpy as np

from rustgpt_jax.config import ModelConfig
from rustgpt_jax.decoding import DecodeModel, generate, prepare_for_decode, unstack_layers
from rustgpt_jax.decoding.cache import _cache_shapes
from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency
from rustgpt_jax.interop.hf import config_from_hf, hf_config_from, params_from_hf
from rustgpt_jax.models import build_model
from rustgpt_jax.native import cpu_gemv
from rustgpt_jax.runtime import Execution

# CPU idle settings (--wakeup): context managers; one that yields False was not applied.
SETTINGS = {'default': lambda: contextlib.nullcontext(True),
            '0us': lambda: cpu_wakeup_latency(0)}

MODEL = dict(vocab_size=32000, embed_dim=768, hidden_dim=2048, num_layers=12, num_heads=12,
             num_kv_heads=12, max_seq_len=256)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn, repeats: int) -> float:
    fn()  # compile / warm up
    return min(_timed(fn) for _ in range(repeats))


def jax_seconds(model, params, prompts, new_tokens, repeats):
    tokens = np.asarray(prompts, np.int32)
    lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)

    def run(n):
        out = generate(model, params, tokens, lengths, max_new_tokens=n)
        return out.tokens
    return _best(lambda: run(new_tokens), repeats), _best(lambda: run(1), repeats), run(new_tokens)


def hf_seconds(hf_model, prompts, new_tokens, repeats):
    import torch
    ids = torch.as_tensor(np.asarray(prompts, np.int64))
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                    max_new_tokens=n, min_new_tokens=n, use_cache=True,
                                    pad_token_id=0)
        return out[:, ids.shape[1]:].numpy()
    return _best(lambda: run(new_tokens), repeats), _best(lambda: run(1), repeats), run(new_tokens)


def cache_bytes(config: ModelConfig) -> int:
    shapes = _cache_shapes(build_model(config), 1)
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree_util.tree_leaves(shapes))


def time_batch(hf_model, variants, prompts, args, bound, wakeup):
    """Times HF and every JAX variant on `prompts` (batch, prompt_len); prints and returns
    one row per side."""
    batch = prompts.shape[0]
    hf_total, hf_first, hf_tokens = hf_seconds(hf_model, prompts, args.new_tokens,
                                               args.repeats)
    timed = {'hf torch': (hf_total, hf_first, hf_tokens)}
    for name, form in variants.items():
        timed[name] = jax_seconds(form.model, form.params, prompts, args.new_tokens,
                                  args.repeats)
    hf_decode = (args.new_tokens - 1) * batch / (hf_total - hf_first)
    rows = []
    for name, (total, first, tokens) in timed.items():
        decode = (args.new_tokens - 1) * batch / (total - first)
        row = dict(wakeup=wakeup, impl=name, batch=batch,
                   e2e_tokens_s=args.new_tokens * batch / total,
                   decode_tokens_s=decode, vs_hf=decode / hf_decode,
                   of_bound=decode / bound if batch == 1 else None,
                   greedy_match=float(np.mean(tokens == hf_tokens)))
        rows.append(row)
        of_bound = f'{row["of_bound"]:.0%}' if row['of_bound'] is not None else '-'
        print(f'{wakeup:<12} {name:<14} {batch:>5} {row["e2e_tokens_s"]:>10.1f} '
              f'{decode:>13.1f} {row["vs_hf"]:>11.2f}x {of_bound:>9} '
              f'{row["greedy_match"]:>11.0%}')
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--prompt_len', type=int, default=128)
    parser.add_argument('--new_tokens', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
    parser.add_argument('--scanned', action='store_true', help='also time the scanned stack')
    parser.add_argument('--wakeup', nargs='+', choices=SETTINGS, default=list(SETTINGS),
                        help='CPU idle settings to time both sides under, in turn')
    parser.add_argument('--json', default=None, help='also write the results here')
    args = parser.parse_args()

    import torch
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(args.torch_threads)
    base = ModelConfig(**{**MODEL, 'max_seq_len': max(MODEL['max_seq_len'],
                                                      args.prompt_len + args.new_tokens)})
    hf_model = transformers.LlamaForCausalLM(hf_config_from(base)).eval()
    config = config_from_hf(hf_model.config, max_seq_len=base.max_seq_len)
    params = params_from_hf(hf_model.state_dict(), config)
    # 'jax packed' is what the CLIs decode with (decoding.prepare_for_decode); 'jax xla
    # dot' uses XLA's dot (with row blocks) instead of the cpu_gemv kernel; 'jax whole
    # rows' drops the row blocks too; 'jax unrolled' keeps the training layout of the
    # projections (nn.packing).
    packed = prepare_for_decode(config, params)
    print(f'jax packed: matvec={packed.execution.matvec.value!r}'
          + ('' if cpu_gemv.available() else f' ({cpu_gemv.unavailable_reason()})'))
    variants = {'jax packed': packed,
                'jax xla dot': prepare_for_decode(config, params, matvec='xla'),
                'jax whole rows': prepare_for_decode(config, params, row_blocks=(),
                                                     matvec='xla'),
                'jax unrolled': DecodeModel(*unstack_layers(config, params), Execution())}
    if args.scanned:  # the nn.scan layer stack, for comparison (one more compile)
        variants['jax scanned'] = DecodeModel(config, params, Execution())

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    weight_bytes = (n_params - config.vocab_size * config.embed_dim) * 4
    bandwidth = machine.copy_bandwidth()
    bound = bandwidth / weight_bytes  # batch-1 tokens/s if only weight reads cost time
    info = machine.describe()
    print(machine.banner(info))
    results = dict(machine=info, devices=str(jax.devices()), params=n_params,
                   weight_bytes=weight_bytes, copy_bandwidth_gbs=bandwidth / 1e9,
                   bound_tokens_s=bound, rows=[])

    print(f'{n_params / 1e6:.1f}M params, {weight_bytes / 1e9:.3f} GB weights read per token, '
          f'copy bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound:.1f} tokens/s (batch 1)')
    header = (f'{"idle wake-up":<12} {"impl":<14} {"batch":>5} {"e2e tok/s":>10} '
              f'{"decode tok/s":>13} {"vs HF decode":>12} {"of bound":>9} {"greedy = HF":>11}')
    print(header)
    for wakeup in args.wakeup:
        with SETTINGS[wakeup]() as held:
            if held is False:
                print(f'{wakeup:<12} left out: no wake-up latency request (see the warning)')
                continue
            rng = np.random.default_rng(0)  # the same prompts under every setting
            for batch in args.batches:
                prompts = rng.integers(3, config.vocab_size, (batch, args.prompt_len))
                results['rows'] += time_batch(hf_model, variants, prompts, args, bound, wakeup)

    print('\nKV-cache bytes per sequence (float32) against the generated length')
    lengths = [256, 1024, 4096, 16384]
    window = 256
    cache_rows = []
    for n in lengths:
        full = cache_bytes(config.replace(max_seq_len=n))
        ring = cache_bytes(config.replace(max_seq_len=n, window_size=window))
        cache_rows.append(dict(length=n, full_causal_bytes=full, window_bytes=ring))
        print(f'  length {n:>6}: full causal {full / 2**20:8.1f} MiB   window {window}: '
              f'{ring / 2**20:6.1f} MiB')
    results['kv_cache'] = dict(window=window, rows=cache_rows)
    print(json.dumps(results))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    jnp.zeros(())  # initialise the backend before timing anything
    main()
