"""The prepared GPU suite: kernel tests natively, attention TFLOP/s, training MFU, decoding.

One command on one GPU (sized for <= 8 minutes on an H100/H200) writes
`accelerator_suite.json` and `accelerator_suite.md` into `--out`:

  1. tests: the kernel and AUTO tests run natively (Pallas -> Triton compiled, cuDNN
     called), not in interpret mode;
  2. attention: forward and forward + backward TFLOP/s of the Pallas kernel, cuDNN
     (`jax.nn.dot_product_attention(implementation='cudnn')`) and the einsum reference,
     bf16, head_dim 128, causal / sliding (W = 4096) / adaptive (a traced per-row window,
     which cuDNN cannot take) over sequences 2k..32k, ~16k tokens per batch. FLOPs count
     only the pairs the mask allows (as benchmarks/kernel_attention.py);
  3. training: tokens/s and MFU of a ~100M-parameter model with attention_impl='auto'
     (bf16 compute, float32 parameters, sequence 2048);
  4. decoding: tokens/s of batch 1 and batch 8 greedy generation with 'auto'.

`--tiny` runs the same code on CPU at toy sizes (tests/test_accelerator_suite.py runs it
in CI, so the script cannot rot); its numbers time XLA:CPU and the Pallas interpreter,
not a kernel. A section that fails records its error and the suite goes on.

Usage: python benchmarks/accelerator_suite.py [--tiny] [--out DIR] [--tests PYTEST_ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's package, whichever one is installed (the suite tests what it ships with).
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))  # its helpers, also when loaded as a module

import timing  # noqa: E402  (benchmarks/timing.py)

from rustgpt_jax import masks  # noqa: E402
from rustgpt_jax.config import ModelConfig  # noqa: E402
from rustgpt_jax.decoding import generate, prepare_for_decode  # noqa: E402
from rustgpt_jax.kernels import flash_attention  # noqa: E402
from rustgpt_jax.models import build_model  # noqa: E402
from rustgpt_jax.ops.reference import mha_reference  # noqa: E402
from rustgpt_jax.runtime import attention as attention_runtime  # noqa: E402
from rustgpt_jax.runtime.auto import attention_call  # noqa: E402
from rustgpt_jax.summary import parameter_counts  # noqa: E402
from rustgpt_jax.training import optim, steps  # noqa: E402
from rustgpt_jax.training import state as state_lib  # noqa: E402

GPU_TESTS = ['tests/test_kernels_flash.py', 'tests/test_kernels_decode.py',
             'tests/test_auto_attention.py']
TINY_TESTS = ['tests/test_kernels_flash.py::test_block_ranges_literal']
SLIDING = 4096
# Dense bf16 peak FLOP/s by device kind (vendor data sheets); unknown kinds get no MFU.
PEAK_FLOPS = {'H100 80GB HBM3': 989e12, 'H100 SXM': 989e12, 'H100 PCIe': 756e12,
              'H200': 989e12, 'A100': 312e12}


def visible_pairs(t: int, window) -> float:
    """(query, key) pairs the causal mask of `window` allows, averaged over rows' windows."""
    ws = [t] if window is None else np.atleast_1d(np.asarray(window)).tolist()
    total = 0
    for w in ws:
        w = min(int(w), t)
        total += w * (w + 1) // 2 + (t - w) * w
    return total / len(ws)


def _window_value(kind: str, t: int, b: int):
    if kind == 'causal':
        return None
    if kind == 'sliding':
        return SLIDING
    # Adaptive: a traced per-row window, as the entropy / perplexity strategies produce.
    return np.linspace(SLIDING // 2, SLIDING, b).astype(np.int32) if b > 1 else np.array(
        [SLIDING * 3 // 4], np.int32)


def _pallas(q, k, v, pos, window):
    w = masks.NO_WINDOW if window is None else window
    return flash_attention(q, k, v, q_positions=pos, kv_positions=pos,
                           window=jnp.asarray(w, jnp.int32))


def _cudnn(q, k, v, pos, window):
    if window is not None and np.ndim(window):
        raise ValueError('cuDNN takes no traced per-row window')
    local = None if window is None or window >= q.shape[1] else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation='cudnn')


def _reference(q, k, v, pos, window):
    w = masks.NO_WINDOW if window is None else window
    return mha_reference(q, k, v, q_positions=pos, kv_positions=pos,
                         window=jnp.asarray(w, jnp.int32))




def attention_rows(sizes: dict, iters: int) -> list[dict]:
    """TFLOP/s of every implementation, sequence and window kind."""
    impls = {'pallas': _pallas, 'cudnn': _cudnn, 'reference': _reference}
    n, k, h, dtype = sizes['heads'], sizes['kv_heads'], sizes['head_dim'], sizes['dtype']
    rows = []
    for t in sizes['seqs']:
        b = max(1, sizes['tokens'] // t)
        keys = jax.random.split(jax.random.key(t), 3)
        q = jax.random.normal(keys[0], (b, t, n, h), dtype)
        kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
        v = jax.random.normal(keys[2], (b, t, k, h), dtype)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        for kind in ('causal', 'sliding', 'adaptive'):
            window = _window_value(kind, t, b)
            if kind == 'sliding' and window >= t:
                continue  # the same mask as causal
            flops = 4.0 * b * n * h * visible_pairs(t, window)
            for name, impl in impls.items():
                if name == 'reference' and t > sizes['reference_max_seq']:
                    continue  # the dense (B, N, T, T) float32 logits stop fitting
                row = dict(impl=name, seq=t, window=kind, batch=b)
                fwd = jax.jit(lambda q, k, v, impl=impl, w=window: impl(q, k, v, pos, w))
                grad = jax.jit(jax.grad(
                    lambda q, k, v, impl=impl, w=window: jnp.sum(
                        impl(q, k, v, pos, w).astype(jnp.float32)), (0, 1, 2)))
                for label, fn, mult in (('fwd', fwd, 1.0), ('fwd_bwd', grad, 3.5)):
                    try:
                        sec = timing.best_seconds(fn, (q, kk, v), iters)
                        row[f'{label}_ms'] = _sig(sec * 1e3)
                        row[f'{label}_tflops'] = _sig(mult * flops / sec / 1e12)
                    except Exception as err:  # noqa: BLE001 - record and go on
                        row[f'{label}_error'] = _short(err)
                rows.append(row)
                print('attention', row, flush=True)
    return rows


def _sig(x: float) -> float:
    """x to 4 significant digits (toy sizes on CPU reach only ~1e-3 TFLOP/s)."""
    return float(f'{x:.4g}')


def _short(err: Exception) -> str:
    return f'{type(err).__name__}: {str(err).strip().splitlines()[0][:160]}'


def _peak_flops():
    kind = jax.devices()[0].device_kind
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None


def training_row(config: ModelConfig, batch: int, seq: int, steps_timed: int) -> dict:
    """Tokens/s and MFU of `train_step` with the config's attention_impl."""
    ocfg = optim.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, decay_steps=10**6)
    state = state_lib.create_train_state(config, optim.make_optimizer(ocfg), 0, batch, seq)
    step = steps.make_train_step(config)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, config.vocab_size, (batch, seq + 1), dtype=np.int32)
    data = jax.device_put({'tokens': toks[:, :-1], 'targets': toks[:, 1:],
                           'loss_mask': np.ones((batch, seq), np.float32),
                           'positions': np.broadcast_to(np.arange(seq, dtype=np.int32),
                                                        (batch, seq)).copy(),
                           'segment_ids': np.ones((batch, seq), np.int32)})
    for _ in range(2):  # compile and warm up
        state, metrics = step(state, data)
    jax.block_until_ready(metrics['loss'])
    start = time.perf_counter()
    for _ in range(steps_timed):
        state, metrics = step(state, data)
    jax.block_until_ready(metrics['loss'])
    sec = (time.perf_counter() - start) / steps_timed
    counts = parameter_counts(config)
    # 6 N per token for the weight products (the embedding lookup is no product) plus
    # the attention's 12 * L * N * H * (visible keys per query) for forward + backward.
    matmul_params = counts['total'] - counts.get('embedding', 0)
    window = config.static_window
    attn = (12 * config.num_layers * config.num_heads * config.effective_head_dim
            * visible_pairs(seq, window) / seq)
    flops_per_token = 6 * matmul_params + attn
    tokens_per_s = batch * seq / sec
    peak = _peak_flops()
    full, _ = attention_runtime.describe(config.attention_impl, attention_call(config))
    return dict(params=counts['total'], batch=batch, seq=seq, step_ms=round(sec * 1e3, 2),
                tokens_per_s=round(tokens_per_s, 1), attention=full,
                mfu=None if peak is None else round(tokens_per_s * flops_per_token / peak, 4))


def decode_rows(config: ModelConfig, prompt: int, new_tokens: int) -> list[dict]:
    """Greedy generation tokens/s at batch 1 and 8 with the config's attention_impl."""
    params = build_model(config).init(jax.random.key(0),
                                      jnp.zeros((1, prompt), jnp.int32))['params']
    decode = prepare_for_decode(config, params)
    module = decode.model
    _, step = attention_runtime.describe(config.attention_impl, attention_call(config))
    rows = []
    for batch in (1, 8):
        tokens = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, prompt),
                                                       dtype=np.int32)
        lengths = np.full((batch,), prompt, np.int32)

        def run(n, tokens=tokens, lengths=lengths):
            out = generate(module, decode.params, tokens, lengths, max_new_tokens=n)
            return jax.block_until_ready(out.tokens)

        run(new_tokens)
        run(1)
        start = time.perf_counter()
        run(new_tokens)
        whole = time.perf_counter() - start
        start = time.perf_counter()
        run(1)
        first = time.perf_counter() - start  # prefill + one token
        per_token = max(whole - first, 1e-9) / max(new_tokens - 1, 1)
        rows.append(dict(batch=batch, prompt=prompt, new_tokens=new_tokens,
                         tokens_per_s=round(batch / per_token, 1), decode_step=step))
        print('decode', rows[-1], flush=True)
    return rows


def run_tests(tests: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           *tests], cwd=REPO, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return dict(args=tests, returncode=proc.returncode, seconds=round(
        time.perf_counter() - start, 1), summary=tail[-1] if tail else '', tail=tail)


def sizes_for(tiny: bool) -> dict:
    if tiny:
        return dict(
            attention=dict(seqs=[64], tokens=128, heads=2, kv_heads=1, head_dim=32,
                           dtype=jnp.float32, reference_max_seq=1 << 30),
            model=ModelConfig(vocab_size=256, embed_dim=64, hidden_dim=128, num_layers=2,
                              num_heads=2, num_kv_heads=1, max_seq_len=64),
            train=dict(batch=2, seq=64, steps_timed=1),
            decode=dict(prompt=8, new_tokens=2), iters=1)
    return dict(
        attention=dict(seqs=[2048, 4096, 8192, 16384, 32768], tokens=16384, heads=16,
                       kv_heads=4, head_dim=128, dtype=jnp.bfloat16,
                       reference_max_seq=8192),
        # ~101M parameters: 12 layers of width 768, GQA 6/2, head_dim 128.
        model=ModelConfig(vocab_size=16384, embed_dim=768, hidden_dim=2048, num_layers=12,
                          num_heads=6, num_kv_heads=2, head_dim=128, max_seq_len=2048,
                          dtype='bfloat16', param_dtype='float32'),
        train=dict(batch=8, seq=2048, steps_timed=10),
        decode=dict(prompt=128, new_tokens=128), iters=5)


def markdown(result: dict) -> str:
    lines = [f"# Accelerator suite on {result['device']}", '']
    t = result.get('tests', {})
    lines += [f"Tests ({' '.join(t.get('args', []))}): {t.get('summary', t.get('error'))}", '',
              '| impl | seq | window | batch | fwd TFLOP/s | fwd+bwd TFLOP/s |',
              '|---|---|---|---|---|---|']
    for r in result.get('attention', []):
        lines.append(f"| {r['impl']} | {r['seq']} | {r['window']} | {r['batch']} | "
                     f"{r.get('fwd_tflops', r.get('fwd_error', '-'))} | "
                     f"{r.get('fwd_bwd_tflops', r.get('fwd_bwd_error', '-'))} |")
    tr = result.get('training', {})
    lines += ['', '| training | params | batch x seq | step ms | tokens/s | MFU | attention |',
              '|---|---|---|---|---|---|---|',
              f"| auto | {tr.get('params')} | {tr.get('batch')} x {tr.get('seq')} | "
              f"{tr.get('step_ms', tr.get('error'))} | {tr.get('tokens_per_s')} | "
              f"{tr.get('mfu')} | {tr.get('attention')} |",
              '', '| decode batch | prompt | new tokens | tokens/s | decode step |',
              '|---|---|---|---|---|']
    for r in result.get('decode', []):
        lines.append(f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | "
                     f"{r['tokens_per_s']} | {r['decode_step']} |")
    if result.get('notes'):
        lines += [''] + [f'Note: {n}' for n in result['notes']]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tiny', '--cpu', action='store_true',
                        help='toy sizes on any backend (CI); the numbers are no timing')
    parser.add_argument('--out', default='.', help='directory for the JSON and markdown')
    parser.add_argument('--tests', default=None,
                        help='pytest arguments, space separated (default per mode)')
    parser.add_argument('--skip', nargs='*', default=[],
                        choices=['tests', 'attention', 'training', 'decode'])
    args = parser.parse_args(argv)
    sizes = sizes_for(args.tiny)
    result = dict(device=str(jax.devices()[0]), backend=jax.default_backend(),
                  tiny=args.tiny, notes=[])
    if jax.default_backend() != 'gpu':
        result['notes'].append(f'backend {jax.default_backend()}: Pallas runs in interpret '
                               'mode and cuDNN is absent, so these numbers are no timing')
    start = time.perf_counter()
    sections = {
        'tests': lambda: run_tests(args.tests.split() if args.tests else
                                   (TINY_TESTS if args.tiny else GPU_TESTS)),
        'attention': lambda: attention_rows(sizes['attention'], sizes['iters']),
        'training': lambda: training_row(sizes['model'], **sizes['train']),
        'decode': lambda: decode_rows(sizes['model'], **sizes['decode']),
    }
    for name, fn in sections.items():
        if name in args.skip:
            continue
        section_start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the rest
            result[name] = dict(error=_short(err))
        result[f'{name}_seconds'] = round(time.perf_counter() - section_start, 1)
        print(f'{name}: {time.perf_counter() - section_start:.1f} s', flush=True)
    result['seconds'] = round(time.perf_counter() - start, 1)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'accelerator_suite.json').write_text(json.dumps(result, indent=1, default=str))
    (out / 'accelerator_suite.md').write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == '__main__':
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    main()
