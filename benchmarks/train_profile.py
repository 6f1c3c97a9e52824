"""Where a training step's time goes, per op family, for JAX and torch side by side.

The step and the configurations are train_throughput.py's (float32, AdamW with clipping,
HF MistralForCausalLM with sdpa beside it). Each side is traced over `--steps` steps after
warm-up:
- JAX: `jax.profiler` writes a Perfetto trace; every event named after an instruction of
  the compiled step's HLO is charged to a family read from that instruction's
  `op_name` metadata (the Flax module path and JAX's jvp / transpose markers).
- torch: `torch.profiler` self CPU time per aten op, charged to a family by op name
  (module paths do not survive into the backward pass).
Families: matmuls (projections, FFN, output head), attention core (scores, softmax,
weighted values, their backward), RoPE and head layout, norms, SwiGLU, embedding, loss,
optimizer (AdamW, clipping). XLA runs independent instructions at the same time (the
two weight-gradient dots of a layer, say), each then taking longer, so JAX's busy time
adds up to more than the step's wall time; the 'of wall' column scales each family's
busy time by wall / busy.

Usage:
  python benchmarks/train_profile.py [--configs a b] [--steps 3] [--variant packed]
      [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax  # noqa: E402
import machine  # noqa: E402
import train_throughput as tt  # noqa: E402  (sets XLA_FLAGS before jax is imported)

FAMILIES = ('matmul: attention projections', 'matmul: FFN', 'matmul: output head',
            'attention core', 'RoPE and head layout', 'norms', 'SwiGLU and residuals',
            'embedding', 'loss', 'optimizer', 'other')


def jax_family(op_name: str, matmul: bool) -> tuple[str, str]:
    """(family, 'fwd' | 'bwd' | 'update') of one HLO instruction from its op_name."""
    direction = 'bwd' if 'transpose(' in op_name else 'fwd'
    if 'Transformer' not in op_name:
        if 'jvp(' in op_name or 'take_along_axis' in op_name:
            return 'loss', direction
        return 'optimizer', 'update'
    if 'embedder.decode' in op_name:
        return ('matmul: output head' if matmul else 'other'), direction
    if 'embedder.encode' in op_name:
        return 'embedding', direction
    if '_norm' in op_name:
        return 'norms', direction
    if '/attention/' in op_name:
        if 'qkv_proj' in op_name or 'o_proj' in op_name:
            return ('matmul: attention projections' if matmul else 'other'), direction
        if '/while/' in op_name:
            return 'attention core', direction
        return 'RoPE and head layout', direction
    if '/ffn/' in op_name:
        return ('matmul: FFN' if matmul else 'SwiGLU and residuals'), direction
    return 'SwiGLU and residuals', direction


def jax_profile(side, steps: int) -> tuple[dict, float]:
    """({(family, direction): ms per step}, wall ms per step) of a traced JAX side."""
    hlo = side.step_fn.lower(side.state, side.data[0]).compile().as_text()
    names = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]*)"',
                         hlo, re.M):
        if m.group(1).startswith(('while', 'conditional', 'call')):
            continue  # containers: their bodies' instructions are traced themselves
        line_matmul = 'ynn_fusion' in m.group(1) or m.group(1).startswith(('dot', 'custom'))
        names[m.group(1)] = jax_family(m.group(2), line_matmul)
    side.run(2)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        start = time.perf_counter()
        side.run(steps)
        wall = (time.perf_counter() - start) * 1000 / steps
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, '**', 'perfetto_trace.json.gz'), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get('ph') == 'X' and e.get('name') in names:
            ms[names[e['name']]] += e['dur'] / 1000 / steps
    return dict(ms), wall


TORCH_FAMILIES = [  # (pattern on the aten op name, family); first match wins
    (r'scaled_dot_product|flash_attention|_efficient_attention', 'attention core'),
    (r'aten::(mm|addmm|bmm|matmul|linear)$', 'matmul'),
    (r'adam|_foreach|clip|norm_|aten::(lerp|addcmul|addcdiv)', 'optimizer'),
    (r'softmax|nll_loss|cross_entropy', 'loss'),
    (r'embedding', 'embedding'),
    (r'rsqrt|pow|aten::mean', 'norms'),
    (r'silu', 'SwiGLU and residuals'),
    (r'aten::(cat|neg|cos|sin|slice|transpose|view|reshape|expand|contiguous|clone|copy_)',
     'RoPE and head layout'),
]


def torch_profile(side, steps: int) -> tuple[dict, float]:
    """({family: ms per step}, wall ms per step) of a torch side (self CPU time)."""
    import torch
    side.run(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        side.run(steps)
        wall = (time.perf_counter() - start) * 1000 / steps
    ms = collections.Counter()
    for ev in prof.key_averages():
        family = next((f for p, f in TORCH_FAMILIES if re.search(p, ev.key)),
                      'elementwise (mul, add, ...)')
        ms[family] += ev.self_cpu_time_total / 1000 / steps
    return dict(ms), wall


def main(argv) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--configs', nargs='+', default=['a', 'b'], choices=['a', 'b'])
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--variant', default='packed', choices=['tuned', 'packed', 'plain'])
    p.add_argument('--threads', type=int, default=os.cpu_count())
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    info = machine.describe()
    print(machine.banner(info))
    doc = {'benchmark': 'train_profile', 'machine': info, 'variant': args.variant,
           'steps': args.steps, 'configs': {}}
    for name in args.configs:
        c = tt.CONFIGS[name]
        jax_ms, jax_wall = jax_profile(tt.JaxSide(c, args.variant), args.steps)
        torch_ms, torch_wall = torch_profile(tt.TorchSide(c, args.threads), args.steps)
        print(f'\nconfig {name}: JAX {args.variant} step {jax_wall:.1f} ms wall, '
              f'torch {torch_wall:.1f} ms wall (ms per step)')
        busy = sum(jax_ms.values())
        print(f"{'JAX family (busy ms)':<32}{'fwd':>9}{'bwd':>9}{'update':>9}{'total':>9}"
              f"{'of wall':>9}")
        for fam in FAMILIES:
            row = [jax_ms.get((fam, d), 0.0) for d in ('fwd', 'bwd', 'update')]
            if sum(row):
                print(f'{fam:<32}' + ''.join(f'{v:>9.1f}' for v in row) +
                      f'{sum(row):>9.1f}{sum(row) * jax_wall / busy:>9.1f}')
        print(f"{'JAX busy total':<59}{busy:>9.1f}{jax_wall:>9.1f}")
        print(f"{'torch family (self CPU)':<32}{'total':>9}")
        for fam, v in sorted(torch_ms.items(), key=lambda kv: -kv[1]):
            print(f'{fam:<32}{v:>9.1f}')
        print(f"{'torch total':<32}{sum(torch_ms.values()):>9.1f}")
        doc['configs'][name] = {
            'jax_wall_ms': round(jax_wall, 1), 'torch_wall_ms': round(torch_wall, 1),
            'jax_ms': [{'family': f, 'direction': d, 'ms': round(v, 2)}
                       for (f, d), v in sorted(jax_ms.items())],
            'torch_ms': {f: round(v, 2) for f, v in sorted(torch_ms.items())}}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(doc, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1:])
