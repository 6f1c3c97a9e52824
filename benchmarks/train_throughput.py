"""Training tokens/s of rustgpt_jax vs Hugging Face MistralForCausalLM (torch CPU), side by side.

Both sides train the same architecture (pre-norm RMSNorm, SwiGLU, RoPE, GQA, no bias,
untied head, full causal attention) on the same random token batches with AdamW
(lr 3e-4, betas (0.9, 0.95), weight decay 0.1) and global-norm clipping at 1.0, float32
parameters and compute. torch uses sdpa attention and `torch.optim.AdamW`; JAX uses
this codebase's jitted `train_step` (donated state, optax AdamW).

Configurations (the issue's):
  a: hidden 256, 4 layers, 8 heads, 4 KV heads, SwiGLU 704, vocab 256, batch 8 x 256
  b: hidden 512, 6 layers, 8 heads, 4 KV heads, SwiGLU 1408, vocab 256, batch 8 x 512

Timing: compile / warm-up steps excluded; rounds alternate JAX and torch (A B A B ...)
so load from other processes hits both alike; each round times `--steps` steps ending
in a device sync. tokens/s and the ratio come from each side's fastest round (the
least disturbed by other processes on a shared machine); the median round is reported
beside it. Threads: both use `--threads` (the machine's cores by default).

The 'tuned' JAX variant unrolls the layer stack (`scan_layers=False`): on XLA:CPU the
scanned stack runs as a while loop whose body cannot be fused or scheduled with its
neighbours and whose stacked gradients are written with dynamic-update-slices. It also
uses the blocked attention (`attention_impl='blocked'`, `ops.blocked`: a flash-style
forward and one-pass backward that skip key blocks above the diagonal). 'packed' adds the
packed q/k/v and gate/up projections (`Execution(packed=True)`).

Where the time goes, per op family on both sides: `train_profile.py`. The measured tables,
and what earlier changes bought, are in benchmarks/RESULTS.md ("Training throughput").

Usage:
  python benchmarks/train_throughput.py [--configs a b] [--steps 5] [--rounds 3]
      [--threads N] [--memory] [--json PATH]

Prints a table, then one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--configs', nargs='+', default=['a', 'b'], choices=['a', 'b'])
    p.add_argument('--steps', type=int, default=5, help='steps per timed round')
    p.add_argument('--rounds', type=int, default=3, help='alternating timed rounds per side')
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--jax_variants', nargs='+', default=['tuned', 'packed'],
                   choices=['tuned', 'packed', 'plain', 'packed-bf16'],
                   help="tuned: the settings this script recommends; packed: tuned with "
                        "packed projections (nn.packing); plain: scanned layers and "
                        "reference attention (the straightforward step); packed-bf16: "
                        "packed with bfloat16 compute, float32 parameters and loss")
    p.add_argument('--torch_bf16', action='store_true',
                   help='also time torch under bfloat16 autocast (the bf16 rows compare '
                        'against it)')
    p.add_argument('--memory', action='store_true',
                   help="also measure each side's peak memory during steps, each in a fresh "
                        "process (memory_worker)")
    p.add_argument('--memory_worker', nargs=2, metavar=('CONFIG', 'IMPL'),
                   help=argparse.SUPPRESS)
    p.add_argument('--json', default=None)
    return p.parse_args(argv)


# XLA reads its flags when the backend starts, so they are set before jax is imported
# (from --threads alone: train_profile.py imports this module with its own arguments).
_threads = argparse.ArgumentParser(add_help=False)
_threads.add_argument('--threads', type=int, default=os.cpu_count())
os.environ.setdefault('XLA_FLAGS', f'--xla_cpu_multi_thread_eigen=true '
                      f'intra_op_parallelism_threads='
                      f'{_threads.parse_known_args(sys.argv[1:])[0].threads}')

import jax  # noqa: E402
import machine  # noqa: E402  (benchmarks/machine.py)
import numpy as np  # noqa: E402

from rustgpt_jax.config import ModelConfig  # noqa: E402
from rustgpt_jax.runtime import Execution  # noqa: E402
from rustgpt_jax.training import optim, steps  # noqa: E402
from rustgpt_jax.training import state as state_lib  # noqa: E402

CONFIGS = {
    'a': dict(embed_dim=256, num_layers=4, num_heads=8, num_kv_heads=4, hidden_dim=704,
              vocab_size=256, batch=8, seq_len=256),
    'b': dict(embed_dim=512, num_layers=6, num_heads=8, num_kv_heads=4, hidden_dim=1408,
              vocab_size=256, batch=8, seq_len=512),
}
LR, BETAS, WD, CLIP, EPS = 3e-4, (0.9, 0.95), 0.1, 1.0, 1e-8


def jax_config(c: dict, variant: str) -> ModelConfig:
    tuned = variant in ('tuned', 'packed', 'packed-bf16')
    return ModelConfig(
        dtype='bfloat16' if variant.endswith('bf16') else 'float32', param_dtype='float32',
        vocab_size=c['vocab_size'], embed_dim=c['embed_dim'], hidden_dim=c['hidden_dim'],
        num_layers=c['num_layers'], num_heads=c['num_heads'], num_kv_heads=c['num_kv_heads'],
        max_seq_len=c['seq_len'], norm='rms_norm', feed_forward='swiglu', positions='rope',
        use_bias=False, norm_placement='pre', window_size=None,
        scan_layers=not tuned, attention_impl='blocked' if tuned else 'reference')


def batches(c: dict, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, t = c['batch'], c['seq_len']
    out = []
    for _ in range(n):
        toks = rng.integers(0, c['vocab_size'], (b, t + 1), dtype=np.int32)
        out.append({'tokens': toks[:, :-1], 'targets': toks[:, 1:],
                    'loss_mask': np.ones((b, t), np.float32),
                    'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                    'segment_ids': np.ones((b, t), np.int32)})
    return out


class JaxSide:
    def __init__(self, c: dict, variant: str):
        cfg = jax_config(c, variant)
        ocfg = optim.OptimizerConfig(learning_rate=LR, warmup_steps=0, decay_steps=10**6,
                                     final_lr_fraction=1.0, b1=BETAS[0], b2=BETAS[1],
                                     eps=EPS, weight_decay=WD, grad_clip_norm=CLIP)
        self.state = state_lib.create_train_state(
            cfg, optim.make_optimizer(ocfg), 0, c['batch'], c['seq_len'],
            Execution(packed=variant.startswith('packed')))
        self.step_fn = steps.make_train_step(cfg)
        self.data = [jax.device_put(b) for b in batches(c, 2)]
        self.params = state_lib.count_params(self.state.params)

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            self.state, metrics = self.step_fn(self.state, self.data[i % 2])
        jax.block_until_ready(metrics['loss'])
        return time.perf_counter() - t0


class TorchSide:
    def __init__(self, c: dict, threads: int, bf16: bool = False):
        import torch
        from transformers import MistralConfig, MistralForCausalLM
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        hf = MistralConfig(
            vocab_size=c['vocab_size'], hidden_size=c['embed_dim'],
            intermediate_size=c['hidden_dim'], num_hidden_layers=c['num_layers'],
            num_attention_heads=c['num_heads'], num_key_value_heads=c['num_kv_heads'],
            max_position_embeddings=c['seq_len'], sliding_window=None, rms_norm_eps=1e-5,
            tie_word_embeddings=False, attention_dropout=0.0)
        hf._attn_implementation = 'sdpa'
        self.torch = torch
        self.bf16 = bf16  # autocast: bfloat16 matmuls, float32 parameters and loss
        self.model = MistralForCausalLM(hf).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS,
                                     weight_decay=WD)
        self.data = [{k: torch.from_numpy(v.astype(np.int64)) for k, v in b.items()
                      if k in ('tokens', 'targets')} for b in batches(c, 2)]
        self.params = sum(p.numel() for p in self.model.parameters())

    def step(self, batch):
        torch = self.torch
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=batch['tokens'], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 batch['targets'].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        return loss

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            loss = self.step(self.data[i % 2])
        loss.item()
        return time.perf_counter() - t0


def measure(name: str, args) -> list[dict]:
    c = CONFIGS[name]
    tokens = c['batch'] * c['seq_len'] * args.steps
    sides = {f'jax-{v}': JaxSide(c, v) for v in args.jax_variants}
    sides['torch'] = TorchSide(c, args.threads)
    if args.torch_bf16:
        sides['torch-bf16'] = TorchSide(c, args.threads, bf16=True)
    times = {k: [] for k in sides}
    for side in sides.values():
        side.run(2)  # compile / warm-up
    for _ in range(args.rounds):
        for key, side in sides.items():
            times[key].append(side.run(args.steps))
    rows = []
    for key, side in sides.items():
        # bf16 rows against torch's bf16 autocast when it ran, else float32 torch.
        ref = 'torch-bf16' if key.endswith('bf16') and 'torch-bf16' in times else 'torch'
        torch_tps = tokens / min(times[ref])
        tps = tokens / min(times[key])
        rows.append({'config': name, 'impl': key, 'params': side.params,
                     'batch': f"{c['batch']}x{c['seq_len']}", 'tokens_per_s': round(tps, 1),
                     'median_tokens_per_s': round(tokens / statistics.median(times[key]), 1),
                     'step_ms': round(1000 * min(times[key]) / args.steps, 1),
                     'vs_torch': round(tps / torch_tps, 3), 'torch_reference': ref,
                     'rounds_s': [round(t, 3) for t in times[key]]})
    return rows


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def memory_worker(name: str, impl: str, threads: int) -> dict:
    """Peak memory of one side's training steps, measured in this (fresh) process.

    After two warm-up steps (compilation, torch's lazily created AdamW moments) the
    resident size is read, the kernel's high-water mark reset (/proc/self/clear_refs),
    and three steps run; `step_peak_mb` is the high-water mark above the resident size
    before them: activations, gradients and temporaries, not the state both sides keep.
    The parent sets MALLOC_MMAP_THRESHOLD_ so that freed buffers leave the process
    instead of staying in malloc's heap, where they would hide from the next step.
    """
    c = CONFIGS[name]
    side = TorchSide(c, threads) if impl == 'torch' else JaxSide(c, impl[len('jax-'):])
    side.run(2)
    before = _status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    side.run(3)
    row = {'config': name, 'impl': impl, 'rss_before_mb': round(before / 1024, 1),
           'step_peak_mb': round((_status_kb('VmHWM') - before) / 1024, 1)}
    if impl != 'torch':  # XLA's own account of the step's temporaries, as a cross-check
        analysis = side.step_fn.lower(side.state, side.data[0]).compile().memory_analysis()
        row['xla_temp_mb'] = round(analysis.temp_size_in_bytes / 2**20, 1)
    return row


def measure_memory(name: str, args) -> list[dict]:
    """memory_worker for every side of `name`, each in its own process."""
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    rows = []
    for impl in [f'jax-{v}' for v in args.jax_variants] + ['torch']:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), '--memory_worker',
                              name, impl, '--threads', str(args.threads)], env=env,
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return rows


def main(args) -> None:
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args.threads)))
        return
    info = machine.describe()
    print(machine.banner(info))
    rows = []
    for name in args.configs:
        rows.extend(measure(name, args))
    print(f"{'config':<7}{'impl':<17}{'params':>11}{'batch':>9}{'tokens/s':>11}{'median':>9}"
          f"{'step ms':>10}{'vs torch':>10}  (bf16 rows: vs torch bf16 autocast)")
    for r in rows:
        print(f"{r['config']:<7}{r['impl']:<17}{r['params']:>11,}{r['batch']:>9}"
              f"{r['tokens_per_s']:>11,.0f}{r['median_tokens_per_s']:>9,.0f}"
              f"{r['step_ms']:>10.1f}{r['vs_torch']:>10.2f}")
    memory = [m for name in args.configs for m in measure_memory(name, args)] \
        if args.memory else []
    if memory:
        print(f"{'config':<7}{'impl':<17}{'step peak MB':>14}{'RSS before MB':>15}"
              f"{'XLA temp MB':>13}")
        for m in memory:
            print(f"{m['config']:<7}{m['impl']:<17}{m['step_peak_mb']:>14,.1f}"
                  f"{m['rss_before_mb']:>15,.1f}{m.get('xla_temp_mb', float('nan')):>13,.1f}")
    doc = {'benchmark': 'train_throughput', 'machine': info, 'threads': args.threads,
           'xla_flags': os.environ.get('XLA_FLAGS', ''), 'jax': jax.__version__,
           'steps_per_round': args.steps, 'rounds': args.rounds, 'results': rows,
           'memory': memory}
    print(json.dumps(doc))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(doc, f, indent=1)


if __name__ == '__main__':
    main(_parse_args(sys.argv[1:]))
