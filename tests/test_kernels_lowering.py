"""Every Pallas kernel lowers for its accelerator, checked without one.

`jax.jit(f).trace(...).lower(lowering_platforms=('cuda',))` runs the real Pallas ->
Triton lowering on CPU; the kernel must appear as a `__gpu$xla.gpu.triton` custom call.
TPU lowering needs a chip generation, which an abstract mesh supplies
(`jax.sharding.AbstractDevice(device_kind=...)`, docs/DESIGN.md); it lowers to Mosaic
`tpu_custom_call`s. Lowering is not compiling: Triton's and Mosaic's own compilers run
only on the device (benchmarks/accelerator_suite.py runs the kernel tests there).

The cases are a pairwise covering design over the axes (every pair of values of any
two axes appears in some case), not the full product, so the file runs in seconds.
"""

import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from rustgpt_jax import masks
from rustgpt_jax.kernels import flash_attention, flash_decode
from rustgpt_jax.ops.tiling import BlockSizes

TRITON = '__gpu$xla.gpu.triton'

FLASH_AXES = {
    'dtype': ('float32', 'bfloat16', 'float16'),
    'head_dim': (64, 128, 33),
    'heads': ('mha', 'gqa', 'mqa'),
    'window': ('full', 'sliding', 'traced'),
    'segments': (False, True),
    'blocks': ((128, 64, 64, 64), (64, 64, 64, 64), (32, 32, 32, 32), (64, 128, 128, 32)),
}
DECODE_AXES = {
    'dtype': ('float32', 'bfloat16', 'float16'),
    'head_dim': (64, 128, 33),
    'heads': ('mha', 'gqa', 'mqa'),
    'window': ('full', 'sliding', 'traced'),
    'block_k': (16, 64, 128),
}
HEADS = {'mha': (4, 4), 'gqa': (8, 2), 'mqa': (4, 1)}  # (N, K)


def pairwise(axes: dict) -> list[dict]:
    """A greedy covering design: each pair of values of two axes is in some case."""
    names = list(axes)
    todo = {(a, x, b, y) for a, b in itertools.combinations(names, 2)
            for x in axes[a] for y in axes[b]}
    cases = []
    while todo:
        a, x, b, y = min(todo, key=repr)  # deterministic
        case = {a: x, b: y}
        for name in names:
            if name not in case:
                case[name] = max(axes[name], key=lambda v: sum(
                    (p, case[p], name, v) in todo or (name, v, p, case[p]) in todo
                    for p in case))
        todo -= {(p, case[p], q, case[q]) for p, q in itertools.combinations(names, 2)}
        cases.append({name: case[name] for name in names})
    return cases


FLASH_CASES = pairwise(FLASH_AXES)
DECODE_CASES = pairwise(DECODE_AXES)


def _ids(cases):
    return ['-'.join(str(v) for v in c.values()).replace(' ', '') for c in cases]


@pytest.mark.parametrize('cases, axes', [(FLASH_CASES, FLASH_AXES),
                                         (DECODE_CASES, DECODE_AXES)])
def test_lowering_design_covers_every_pair(cases, axes):
    for a, b in itertools.combinations(axes, 2):
        seen = {(c[a], c[b]) for c in cases}
        assert seen == set(itertools.product(axes[a], axes[b])), (a, b)
    assert len(cases) <= 20  # far below the full product


def _window(kind: str, b: int):
    """(window value, whether it is a jit argument): full / sliding are constants."""
    if kind == 'full':
        return jnp.int32(masks.NO_WINDOW), False
    if kind == 'sliding':
        return jnp.int32(48), False
    return jnp.array([17, 96][:b], jnp.int32), True  # traced per-row window


def _lower(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _flash_grad_fn(case, window, traced, backend):
    seg = case['segments']

    def loss(q, k, v, pos, *w):
        out = flash_attention(q, k, v, q_positions=pos, kv_positions=pos,
                              window=w[0] if traced else window,
                              q_segment_ids=pos // 50 if seg else None,
                              kv_segment_ids=pos // 50 if seg else None,
                              block_sizes=BlockSizes(*case['blocks']), backend=backend,
                              interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, (0, 1, 2))


def _flash_args(case, b=2, t=200):
    n, k = HEADS[case['heads']]
    h, dtype = case['head_dim'], jnp.dtype(case['dtype'])
    window, traced = _window(case['window'], b)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    args = (jnp.zeros((b, t, n, h), dtype), jnp.zeros((b, t, k, h), dtype),
            jnp.zeros((b, t, k, h), dtype), pos) + ((window,) if traced else ())
    return args, window, traced


@pytest.mark.parametrize('case', FLASH_CASES, ids=_ids(FLASH_CASES))
def test_flash_forward_and_backward_lowering_for_cuda(case):
    args, window, traced = _flash_args(case)
    text = _lower(_flash_grad_fn(case, window, traced, 'triton'), args, 'cuda')
    names = re.findall(r'name = "(flash_attention_\w+)"', text)
    assert sorted(names) == ['flash_attention_dkv', 'flash_attention_dq',
                             'flash_attention_fwd']
    assert text.count(TRITON) == 3


@pytest.mark.parametrize('case', DECODE_CASES, ids=_ids(DECODE_CASES))
def test_flash_decode_lowering_for_cuda(case):
    b, s = 2, 300
    n, k = HEADS[case['heads']]
    h, dtype = case['head_dim'], jnp.dtype(case['dtype'])
    window, traced = _window(case['window'], b)
    # A ring cache: slot order is not position order.
    kv_pos = (jnp.arange(s, dtype=jnp.int32)[None] + jnp.array([[0], [123]])) % s
    q_pos = jnp.full((b, 1), s, jnp.int32)

    def step(q, kc, vc, *w):
        return flash_decode(q, kc, vc, q_positions=q_pos, kv_positions=kv_pos,
                            window=w[0] if traced else window, block_k=case['block_k'],
                            interpret=False)

    args = (jnp.zeros((b, 1, n, h), dtype), jnp.zeros((b, s, k, h), dtype),
            jnp.zeros((b, s, k, h), dtype)) + ((window,) if traced else ())
    text = _lower(step, args, 'cuda')
    assert re.findall(r'name = "(flash_\w+)"', text) == ['flash_decode']
    assert text.count(TRITON) == 1


TPU_CASES = [  # (device kind, case): the generations Pallas names, each Mosaic path
    ('TPU v4', dict(FLASH_CASES[0], window='full', segments=False)),
    ('TPU v5 lite', dict(FLASH_CASES[0], dtype='bfloat16', window='traced',
                         segments=True)),
    ('TPU v6 lite', dict(FLASH_CASES[0], dtype='float32', window='sliding', heads='gqa')),
]


@pytest.mark.parametrize('kind, case', TPU_CASES, ids=[k for k, _ in TPU_CASES])
def test_flash_mosaic_lowering_for_a_tpu_generation(kind, case):
    case = dict(case, blocks=(128, 128, 128, 128), head_dim=128)
    args, window, traced = _flash_args(case, t=256)  # arrays made outside the mesh
    mesh = AbstractMesh((1,), ('x',), (AxisType.Explicit,), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=1, platform='tpu'))
    with jax.sharding.use_abstract_mesh(mesh):
        text = _lower(_flash_grad_fn(case, window, traced, 'mosaic'), args, 'tpu')
    names = re.findall(r'kernel_name = "(flash_attention_\w+)"', text)
    assert sorted(names) == ['flash_attention_dkv', 'flash_attention_dq',
                             'flash_attention_fwd']
    assert text.count('tpu_custom_call') == 3


def test_mosaic_lowering_without_a_generation_fails_off_tpu():
    # What the abstract device is for: on a CPU host Pallas asks the default device.
    case = dict(FLASH_CASES[0], blocks=(128, 128, 128, 128))
    args, window, traced = _flash_args(case, t=256)
    with pytest.raises(ValueError, match='Unsupported TPU device kind: cpu'):
        _lower(_flash_grad_fn(case, window, traced, 'mosaic'), args, 'tpu')
