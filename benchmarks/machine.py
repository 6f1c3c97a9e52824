"""The machine a benchmark ran on: CPU model and the instruction sets that matter.

Ratios are only compared within one run, and runs are only compared on the same CPU, so
every benchmark prints this line and stores it in its JSON.
"""

from __future__ import annotations

import os

# Flags that change which kernels run (XLA:CPU's oneDNN/Eigen paths, native/ kernels).
FLAGS = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')


def describe() -> dict:
    """{'cpu': model name, 'flags': the FLAGS present, 'cpus': CPUs this process may use}."""
    model, flags = 'unknown', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name') and model == 'unknown':
                    model = line.split(':', 1)[1].strip()
                elif line.startswith('flags') and not flags:
                    flags = set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return {'cpu': model, 'flags': [f for f in FLAGS if f in flags],
            'cpus': len(os.sched_getaffinity(0))}


def banner(info: dict) -> str:
    return (f"machine: {info['cpu']} ({info['cpus']} CPUs allowed; "
            f"{' '.join(info['flags']) or 'none of ' + ' '.join(FLAGS)})")


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by numpy copying an `nbytes` buffer, best of
    `repeats` (one thread). The "bound" of the decode benchmarks divides by this."""
    import time

    import numpy as np
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best
