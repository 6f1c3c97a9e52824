"""The CPU matrix-vector kernel (native.cpu_gemv), against float64 numpy."""

import os
import re
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rustgpt_jax.native import cpu_gemv


def _require_kernel():
    # Skipped only where the hardware or toolchain cannot run it at all; a build that
    # fails with a compiler present is a failure.
    if not cpu_gemv._cpu_has_kernels() or cpu_gemv._compiler() is None:
        pytest.skip(f'cpu_gemv cannot run here: {cpu_gemv.unavailable_reason()}')
    assert cpu_gemv.available(), cpu_gemv.unavailable_reason()


# Each copy of the kernels (cpu_gemv.cc: AVX-512F and AVX2), forced; a CPU without
# AVX-512F runs the AVX2 one only.
ISAS = ['avx512f', 'avx2']


def _require_isa(isa):
    _require_kernel()
    if isa == 'avx512f' and 'avx512f' not in cpu_gemv._cpu_flags():
        pytest.skip('this CPU has no AVX-512F; the AVX2 copy runs')


def _case(rows, n_in, n_out, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, n_in)).astype(np.float32),
            rng.normal(size=(n_out, n_in)).astype(np.float32))


def _oracle(x, w, input_major=False):
    w = w.astype(np.float64)
    return x.astype(np.float64) @ (w if input_major else w.T)


# (in, out): whole 16-lane chunks and tails (in % 16 != 0), four-row groups and tails
# (out % 4 != 0), outputs below the 64 rows where the product is shared out.
SHAPES = [(16, 64), (37, 7), (771, 130), (100, 2051), (5, 257)]


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('n_in,n_out', SHAPES)
@pytest.mark.parametrize('rows', [1, 2, 5, 8])
def test_gemv_equals_float64_numpy(rows, n_in, n_out, isa):
    _require_isa(isa)
    x, w = _case(rows, n_in, n_out)
    got = np.asarray(jax.jit(cpu_gemv.gemv, static_argnums=(2, 3, 4, 5))(x, w, False, None,
                                                                          None, isa))
    expected = _oracle(x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# Input-major (in, out), e.g. the output head: columns in 16-lane vectors with tails,
# products cut into column chunks, and an output wider than one chunk's 4,096 columns.
SHAPES_INPUT_MAJOR = [(16, 64), (37, 7), (6, 300), (129, 2051), (7, 9000)]


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('n_in,n_out', SHAPES_INPUT_MAJOR)
@pytest.mark.parametrize('rows', [1, 3, 8])
def test_input_major_gemv_equals_float64_numpy(rows, n_in, n_out, isa):
    _require_isa(isa)
    x, w = _case(rows, n_in, n_out)
    w = np.ascontiguousarray(w.T)  # (in, out)
    got = np.asarray(jax.jit(cpu_gemv.gemv, static_argnums=(2, 3, 4, 5))(x, w, True, None,
                                                                          None, isa))
    expected = _oracle(x, w, input_major=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize('isa', ISAS)
@pytest.mark.parametrize('input_major', [False, True])
@pytest.mark.parametrize('lead,rows,n_in,n_out', [((12,), 1, 64, 256), ((2, 3), 4, 37, 21),
                                                  ((5,), 8, 256, 64)])
def test_batched_gemv_equals_float64_numpy(lead, rows, n_in, n_out, input_major, isa):
    # Independent products, e.g. per KV head in decode attention: (P, G, H) . (P, C, H).
    _require_isa(isa)
    rng = np.random.default_rng(2)
    x = rng.normal(size=lead + (rows, n_in)).astype(np.float32)
    w = rng.normal(size=lead + ((n_in, n_out) if input_major else (n_out, n_in)))
    w = w.astype(np.float32)
    got = np.asarray(jax.jit(cpu_gemv.gemv, static_argnums=(2, 3, 4, 5))(
        x, w, input_major, None, None, isa))
    w64 = w.astype(np.float64)
    expected = x.astype(np.float64) @ (w64 if input_major else np.swapaxes(w64, -1, -2))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_gemv_runs_inside_a_compiled_loop():
    _require_kernel()
    x, w = _case(1, 96, 96)
    w = w / np.sqrt(96)

    def body(h, _):
        h = jnp.tanh(cpu_gemv.gemv(h, w))
        return h, h.sum()

    _, sums = jax.jit(lambda h: jax.lax.scan(body, h, None, length=20))(x)
    h, expected = x.astype(np.float64), []
    for _ in range(20):
        h = np.tanh(_oracle(h, w))
        expected.append(h.sum())
    np.testing.assert_allclose(sums, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('input_major', [False, True])
def test_gemv_gradients_equal_the_analytic_ones(input_major):
    _require_kernel()
    x, w = _case(3, 40, 72)
    c = np.random.default_rng(1).normal(size=(3, 72)).astype(np.float32)
    w_in = np.ascontiguousarray(w.T) if input_major else w
    loss = lambda x, w: jnp.sum(c * cpu_gemv.gemv(x, w, input_major))
    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w_in)
    c64 = c.astype(np.float64)
    expected_dw = c64.T @ x.astype(np.float64)  # (out, in)
    np.testing.assert_allclose(dx, c64 @ w.astype(np.float64), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dw, expected_dw.T if input_major else expected_dw, rtol=1e-5,
                               atol=1e-4)


def test_concurrent_calls_from_several_threads_are_correct():
    # The worker pool serves one product at a time; a second caller computes alone.
    _require_kernel()
    run = jax.jit(cpu_gemv.gemv)
    cases = [_case(1 + i % 8, 300, 900, seed=i) for i in range(4)]
    errors = []

    def worker(x, w):
        try:
            for _ in range(30):
                got = np.asarray(run(x, w))
            np.testing.assert_allclose(got, _oracle(x, w), rtol=1e-5, atol=1e-3)
        except Exception as error:  # reported below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=worker, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), 'a call hung'
    assert not errors, errors


def test_other_platforms_lower_to_xla_dot():
    # jax.lax.platform_dependent: the custom call is emitted for CPU only.
    _require_kernel()
    x, w = _case(1, 32, 64)
    w_in = np.ascontiguousarray(w.T)
    for platform, expect_call in (('cpu', True), ('cuda', False), ('tpu', False)):
        for target, args in ((cpu_gemv.TARGET, (x, w, False)),
                             (cpu_gemv.TARGET_INPUT_MAJOR, (x, w_in, True))):
            exported = jax.export.export(
                jax.jit(cpu_gemv.gemv, static_argnums=2), platforms=[platform],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
            assert (f'@{target}(' in exported.mlir_module()) == expect_call, (platform, target)


@pytest.mark.parametrize('x_shape,w_shape,dtype,message', [
    ((9, 16), (32, 16), np.float32, 'x has 9 rows; the kernel takes 1 to 8'),
    ((1, 16), (32, 8), np.float32, 'expected x (..., rows, in) and w (..., out, in)'),
    ((16,), (32, 16), np.float32, 'expected x (..., rows, in) and w (..., out, in)'),
    ((1, 32), (32, 16), np.float32, 'expected x (..., rows, in) and w (..., out, in)'),
    ((2, 1, 16), (3, 32, 16), np.float32, 'with the same leading dims'),
    ((1, 16), (32, 16), jnp.bfloat16, 'float32 only'),
])
def test_gemv_rejects_bad_input_by_name(x_shape, w_shape, dtype, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cpu_gemv.gemv(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype))


def test_an_unknown_isa_raises():
    _require_kernel()
    with pytest.raises(ValueError, match="isa must be None or one of"):
        cpu_gemv.gemv(jnp.zeros((1, 16), jnp.float32), jnp.zeros((8, 16), jnp.float32),
                      isa='sse2')


def test_build_errors_name_the_compiler_problem(tmp_path, monkeypatch):
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with pytest.raises(RuntimeError, match='no C\\+\\+ compiler found'):
        cpu_gemv.build(tmp_path)
    broken = tmp_path / 'broken-cxx'
    broken.write_text('#!/bin/sh\necho "cc1plus: fatal error: out of memory" >&2\nexit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv('CXX', str(broken))
    with pytest.raises(RuntimeError, match='building cpu_gemv.cc failed') as error:
        cpu_gemv.build(tmp_path / 'cache')
    assert 'out of memory' in str(error.value)
    assert not list((tmp_path / 'cache').glob('*.so')) + list((tmp_path / 'cache').glob('*.tmp'))


def test_concurrent_builds_produce_one_library(tmp_path):
    if shutil.which('g++') is None and shutil.which('c++') is None:
        pytest.skip('no C++ compiler')
    script = ('import sys; from rustgpt_jax.native import cpu_gemv; '
              'print(cpu_gemv.build(sys.argv[1]))')
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    procs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1 and os.path.exists(paths.pop())
    assert len(list(tmp_path.glob('*.so'))) == 1 and not list(tmp_path.glob('*.tmp'))


@pytest.mark.parametrize('threads,spin_us', [(1, 0), (2, 0), (3, 50), (None, None)])
def test_thread_and_spin_settings_reach_the_kernel_and_keep_the_result(threads, spin_us):
    # Each setting is an attribute of the call: a new pool per setting, same products.
    _require_kernel()
    x, w = _case(4, 771, 2051, seed=threads or 0)
    got = np.asarray(jax.jit(cpu_gemv.gemv, static_argnums=(2, 3, 4))(x, w, False, threads,
                                                                        spin_us))
    expected = _oracle(x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    text = jax.jit(cpu_gemv.gemv, static_argnums=(2, 3, 4)).lower(
        x, w, False, threads, spin_us).as_text()
    want_threads = cpu_gemv.threads_setting(threads)
    assert re.search(rf'threads = {want_threads} : i64', text), text[-2000:]


def test_settings_come_from_the_environment_only_where_not_given(monkeypatch):
    monkeypatch.setenv('RGJ_GEMV_THREADS', '3')
    monkeypatch.setenv('RGJ_GEMV_SPIN_US', '7')
    monkeypatch.setenv('RGJ_CACHE_DIR', '/tmp/rgj-env-cache')
    assert cpu_gemv.threads_setting() == 3 and cpu_gemv.threads_setting(5) == 5
    assert cpu_gemv.spin_setting() == 7 and cpu_gemv.spin_setting(0) == 0
    assert str(cpu_gemv.cache_dir()) == '/tmp/rgj-env-cache'
    assert str(cpu_gemv.cache_dir('/tmp/explicit')) == '/tmp/explicit'
    monkeypatch.setenv('RGJ_GEMV_THREADS', 'many')
    with pytest.raises(ValueError, match=r'\$RGJ_GEMV_THREADS must be an integer'):
        cpu_gemv.threads_setting()
    monkeypatch.delenv('RGJ_GEMV_THREADS')
    monkeypatch.delenv('RGJ_GEMV_SPIN_US')
    assert cpu_gemv.threads_setting() == min(len(os.sched_getaffinity(0)), 8)
    assert cpu_gemv.spin_setting() == 1000
