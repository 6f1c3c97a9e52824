"""Hold a CPU wake-up latency request (Linux PM QoS) while decoding on CPU.

A batch-1 decode step on XLA:CPU is a chain of ~50 matrix-vector products. Each is
shared out over the pool threads, and the step goes on as a new pool task when it ends;
in between, the other thread has usually gone idle. On a virtual machine an idle vCPU
halts, and waking it costs tens of microseconds: a profiler trace of the 110M benchmark
model showed the second thread joining a product 25-70 us late and ~1.5 ms of a ~18.5 ms
token spent waiting (benchmarks/RESULTS.md). Writing a latency bound to
`/dev/cpu_dma_latency` asks the kernel to keep idle CPUs in states that wake within it
(0: poll instead of halting), which removes most of that wait.

The request lasts exactly as long as the file stays open: the kernel drops it when the
descriptor closes, also when the process dies, so nothing outlives the context. Opening
the device needs root (or a udev rule granting access); without it the request is not
made and, unless `required`, decoding simply runs at the default latency with a warning.
Idle CPUs that poll draw more power: a setting for latency-bound interactive or
benchmark runs, not a default.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from typing import Iterator, Optional

PM_QOS_DEVICE = '/dev/cpu_dma_latency'


@contextlib.contextmanager
def cpu_wakeup_latency(max_us: int = 0, *, required: bool = False,
                       device: Optional[str] = None) -> Iterator[bool]:
    """Keeps idle CPUs able to wake within `max_us` microseconds while the context is open.

    Args:
      max_us: the wake-up latency bound in microseconds (0: idle CPUs poll).
      required: raise if the request cannot be made (else warn and go on without it).
      device: the PM QoS device (default `PM_QOS_DEVICE`).

    Yields:
      True if the request is held, False if it could not be made (and not `required`).

    Raises:
      ValueError: `max_us` is not a non-negative integer that fits the kernel's int32.
      PermissionError / OSError: `required` and the device cannot be opened or written;
        the message names the device and why.
    """
    if isinstance(max_us, bool) or not isinstance(max_us, int) or not 0 <= max_us < 2**31:
        raise ValueError(f'cpu_wakeup_latency: max_us must be an integer in [0, 2**31), '
                         f'got {max_us!r}')
    device = PM_QOS_DEVICE if device is None else device
    try:
        fd = os.open(device, os.O_WRONLY)
    except OSError as e:
        problem = f'cannot hold a CPU wake-up latency request: {device}: {e.strerror}'
        if isinstance(e, PermissionError):
            problem += ' (writing it needs root or a udev rule granting access)'
        if required:
            raise type(e)(e.errno, problem) from e
        warnings.warn(problem + '; decoding at the default latency', RuntimeWarning,
                      stacklevel=3)
        yield False
        return
    try:
        try:
            os.write(fd, struct.pack('=i', max_us))  # the binary form: a native int32
        except OSError as e:
            raise type(e)(e.errno, f'cpu_wakeup_latency: writing {device} failed: '
                                   f'{e.strerror}') from e
        yield True
    finally:
        os.close(fd)  # drops the request


def current_wakeup_latency(device: Optional[str] = None) -> int:
    """The latency bound in force now (microseconds): the smallest request held by any
    process, or the kernel default (2e9, no bound) when none is. Reading needs the same
    access as writing."""
    with open(PM_QOS_DEVICE if device is None else device, 'rb') as f:
        return struct.unpack('=i', f.read(4))[0]
