"""Decode-step (rows = 1) or prompt (--rows 128) rate of the native quantized kernels,
beside a plain read of the same bytes in the same process.

Compiles `kernel_stream.cc` (which includes the library's `native/quant_matmul.cc` and
calls its `Run`: a product as `native.quant_matmul` computes it, activation set-up and
pool dispatch included, without JAX around it) with the library's compiler and flags,
then for each weight type and thread count times:
- cache: a 256 x 2048 matrix, repeated: the kernel's arithmetic rate (weight GB/s);
- stream: a 512 MB matrix: the rate from memory, where a decode step lives.
The reference, in the same process over the same buffer and threads, is a read of every
cache line in the kernels' vector width (AVX-512 where the library runs its VNNI copy,
AVX2 where it runs its AVX2 one; the table names it). Rounds alternate the types; each
row is the best round. This is the tool for kernel changes (prefetch distance,
unpacking): the JAX-level
`quant_matmul.py` adds the FFI call and dispatch around each product, whose noise on a
shared VM hid differences of 10-20% here.

Usage: python benchmarks/kernel_stream.py [--types F16 Q8_0 Q4_0 Q4_K Q5_K Q6_K]
       [--threads 1 2] [--modes cache stream] [--rounds 3] [--rows 1] [--json PATH]
(--rows 128 times a prompt's products: the same weights, 128 activation rows.)
Needs AVX2 + FMA + F16C at least (the library's AVX2 kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.dirname(__file__))
from machine import banner, describe  # noqa: E402

from rustgpt_jax.native import build, cpu_gemv  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.dirname(os.path.abspath(build.__file__))
TYPES = ['F16', 'Q8_0', 'Q4_0', 'Q4_K', 'Q5_K', 'Q6_K']


def compile_harness(directory: str) -> str:
    import jax
    cxx = build.compiler()
    if cxx is None:
        raise SystemExit('kernel_stream: no C++ compiler (g++ or $CXX)')
    exe = os.path.join(directory, 'kernel_stream')
    subprocess.run([cxx, *[f for f in build.FLAGS if f != '-fPIC'], '-pthread', '-w',
                    '-I', NATIVE, '-I', jax.ffi.include_dir(),
                    os.path.join(HERE, 'kernel_stream.cc'), '-o', exe], check=True)
    return exe


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--types', nargs='+', default=TYPES, choices=TYPES)
    p.add_argument('--threads', nargs='+', type=int, default=[1, 2], choices=[1, 2])
    p.add_argument('--modes', nargs='+', default=['cache', 'stream'],
                   choices=['cache', 'stream'])
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--rows', type=int, default=1,
                   help='activation rows per product: 1 is a decode step, 128 a prompt')
    p.add_argument('--json', default=None)
    args = p.parse_args()
    info = describe()
    print(banner(info))
    runs = {}  # (type, mode, threads) -> the rounds' rows
    with tempfile.TemporaryDirectory() as d:
        exe = compile_harness(d)
        for _ in range(args.rounds):
            for mode in args.modes:
                for threads in args.threads:
                    for name in args.types:
                        done = subprocess.run(
                            [exe, str(int(T[name])), mode, str(threads),
                             str(cpu_gemv.spin_setting()), str(args.rows)],
                            capture_output=True, text=True)
                        if done.returncode:
                            raise SystemExit(f'kernel_stream {name}: {done.stderr.strip()}')
                        row = json.loads(done.stdout)
                        runs.setdefault((name, mode, threads), []).append(row)
    isa = next(iter(runs.values()))[0]['isa']
    print(f'kernels: {isa}; {args.rows} activation row(s) per product (weight GB/s; the '
          f'read is of the same bytes once)')
    print(f"{'type':6} {'mode':7} {'threads':>7} {'kernel GB/s':>12} {'read GB/s':>10} "
          f"{'ratio':>6} {'GMAC/s':>8}")
    rows = []
    for (name, mode, threads), found in sorted(runs.items(), key=lambda kv: (
            kv[0][1], kv[0][2], TYPES.index(kv[0][0]))):
        kernel = max(r['kernel_gbps'] for r in found)
        read = max(r['read_gbps'] for r in found)
        block, size = GGML_QUANT_SIZES[T[name]]
        gmacs = kernel / (size / block) * args.rows  # weight values per s, times the rows
        row = {'type': name, 'mode': mode, 'threads': threads, 'kernel_gbps': kernel,
               'read_gbps': read, 'ratio': round(kernel / read, 3), 'gmac_per_s': gmacs,
               'kernel_rounds': [r['kernel_gbps'] for r in found]}
        rows.append(row)
        print(f"{name:6} {mode:7} {threads:7d} {kernel:12.2f} {read:10.1f} "
              f"{row['ratio']:6.2f} {gmacs:8.1f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'benchmark': 'kernel_stream', 'machine': info, 'isa': isa,
                       'activation_rows': args.rows, 'rounds': args.rounds, 'rows': rows},
                      f, indent=1)


if __name__ == '__main__':
    main()
