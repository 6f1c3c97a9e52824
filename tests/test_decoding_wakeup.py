"""The CPU wake-up latency request (decoding.wakeup) against the kernel's own PM QoS state.

The oracle is the Linux kernel: reading /dev/cpu_dma_latency returns the smallest request
any process holds. Where this process may not open the device (not root), the tests check
the other branch instead: a clear error that names the device, or a warning and no request.
"""

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from rustgpt_jax.decoding import wakeup
from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency, current_wakeup_latency

ACCESS = os.access(wakeup.PM_QOS_DEVICE, os.R_OK | os.W_OK)


@contextlib.contextmanager
def one_request_test_at_a_time():
    """Tests that hold requests exclude each other across pytest-xdist workers (each
    reads the machine-wide value the others would change)."""
    with open(os.path.join(tempfile.gettempdir(), 'rustgpt_jax_tests_pm_qos.lock'), 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture
def exclusive():
    with one_request_test_at_a_time():
        yield


def test_request_is_held_exactly_while_the_context_is_open(exclusive):
    if not ACCESS:
        with pytest.raises(OSError, match='cpu_dma_latency'):
            with cpu_wakeup_latency(0, required=True):
                pass
        return
    before = current_wakeup_latency()  # 2e9 unless another process holds a request
    with cpu_wakeup_latency(7) as held:
        assert held and current_wakeup_latency() == min(before, 7)
        with cpu_wakeup_latency(0) as inner:  # the kernel keeps the smallest request
            assert inner and current_wakeup_latency() == 0
        assert current_wakeup_latency() == min(before, 7)
    assert current_wakeup_latency() == before


def test_request_ends_with_the_process_that_held_it(exclusive):
    if not ACCESS:  # the holder cannot make it: it exits with the reason
        failed = subprocess.run([sys.executable, '-c', 'from rustgpt_jax.decoding.wakeup '
                                 'import cpu_wakeup_latency as c\nwith c(3, required=True): '
                                 'pass'], capture_output=True, text=True)
        assert failed.returncode != 0 and 'cpu_dma_latency' in failed.stderr
        return
    before = current_wakeup_latency()
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent("""
        import sys, time
        from rustgpt_jax.decoding.wakeup import cpu_wakeup_latency
        with cpu_wakeup_latency(3, required=True):
            print('held', flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert current_wakeup_latency() == min(before, 3)
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs
        holder.wait()
    deadline = time.monotonic() + 10
    while current_wakeup_latency() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert current_wakeup_latency() == before


def test_unavailable_device_warns_or_raises_naming_it(tmp_path):
    missing = str(tmp_path / 'no_such_device')
    with pytest.warns(RuntimeWarning, match='no_such_device: No such file'):
        with cpu_wakeup_latency(0, device=missing) as held:
            assert held is False
    with pytest.raises(FileNotFoundError, match='no_such_device'):
        with cpu_wakeup_latency(0, required=True, device=missing):
            pass


@pytest.mark.parametrize('bad', [-1, 2**31, 1.5, True, '0'])
def test_bad_latency_is_refused(bad):
    with pytest.raises(ValueError, match='max_us'):
        with cpu_wakeup_latency(bad):
            pass
