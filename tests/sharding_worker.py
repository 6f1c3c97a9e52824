"""Runs sharded training cases in a fresh process (device count is fixed at start-up).

Usage: python tests/sharding_worker.py CASE [args]; prints one JSON line of results.
CASE is `strategies`, `restore DIR` or `distributed PROCESS_ID PORT`.
"""

import json
import os
import sys

if sys.argv[1] == 'distributed':
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
else:
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from rustgpt_jax import config as config_lib  # noqa: E402
from rustgpt_jax import sharding  # noqa: E402
from rustgpt_jax.models import build_model  # noqa: E402

CONFIG = config_lib.mistral_tiny(embed_dim=64, hidden_dim=128, num_layers=2, num_heads=4,
                                 num_kv_heads=2, max_seq_len=32, window_size=8, vocab_size=64)
MODEL = build_model(CONFIG)
TX = optax.sgd(0.5)
STEPS = 3


def make_batch():
    toks = jax.random.randint(jax.random.key(1), (8, 17), 0, CONFIG.vocab_size)
    return {'tokens': np.asarray(toks[:, :-1]), 'targets': np.asarray(toks[:, 1:])}


def init(rng):
    params = MODEL.init(rng, jnp.zeros((1, 16), jnp.int32))['params']
    return {'params': params, 'opt': TX.init(params)}


def step(state, batch):
    def loss_fn(params):
        logits = MODEL.apply({'params': params}, batch['tokens'])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets']).mean()
    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt = TX.update(grads, state['opt'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt': opt}, loss


def run(mesh_config, batch, steps=STEPS, devices=None, state=None):
    """Trains `steps` steps on a mesh; returns (state, losses, param specs)."""
    mesh = sharding.make_mesh(mesh_config, devices)
    rules = mesh_config.rules
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = sharding.tree_shardings(abstract, mesh, rules)
        if state is None:
            state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(
                jax.random.key(0))
        else:
            state = jax.device_put(state, shardings)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v)
                 for k, v in batch.items()}
        train = jax.jit(step, in_shardings=(shardings, batch_sharding),
                        out_shardings=(shardings, sharding.replicated(mesh)))
        losses = []
        for _ in range(steps):
            state, loss = train(state, batch)
            losses.append(float(loss))
    specs = jax.tree.map(lambda a: str(a.sharding.spec), state['params'])
    return state, losses, specs


def single_device(batch):
    return run(sharding.MeshConfig(shape=(1, 1)), batch, devices=jax.devices()[:1])


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def strategies():
    batch = make_batch()
    ref_state, ref_losses, _ = single_device(batch)
    out = {'reference_losses': ref_losses}
    for name, shape in [('dp', (8, 1)), ('fsdp', (8, 1)), ('tp', (1, 2)), ('dp_tp', (4, 2)),
                        ('fsdp_tp', (4, 2))]:
        devices = jax.devices()[:int(np.prod(shape))]
        state, losses, specs = run(sharding.MeshConfig(shape=shape, strategy=name), batch,
                                   devices=devices)
        out[name] = {'losses': losses, 'param_diff': max_diff(state, ref_state),
                     'q_proj_spec': specs['layers']['attention']['q_proj']['kernel'],
                     'w1_spec': specs['layers']['ffn']['w1']['kernel'],
                     'embedding_spec': specs['embedder']['token_embedding']}
    return out


def restore(directory):
    """Saves sharded state on a (4, 2) FSDP x TP mesh; restores it onto (8, 1) DP."""
    import orbax.checkpoint as ocp
    batch = make_batch()
    state, _, _ = run(sharding.MeshConfig(shape=(4, 2), strategy='fsdp_tp'), batch, steps=1)
    path = os.path.join(directory, 'state')
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
    target = sharding.MeshConfig(shape=(8, 1), strategy='dp')
    mesh = sharding.make_mesh(target)
    with jax.set_mesh(mesh), nn.logical_axis_rules(target.rules):
        abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = sharding.tree_shardings(abstract, mesh, target.rules)
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               sharding.strip_boxes(abstract), shardings)
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, targets)
    specs = jax.tree.map(lambda a: str(a.sharding.spec), restored['params'])
    return {'diff': max_diff(restored, state),
            'restored_spec': specs['layers']['ffn']['w1']['kernel'],
            'saved_spec': str(state['params']['layers']['ffn']['w1']['kernel'].sharding.spec)}


def distributed(process_id, port):
    """One of two processes (2 CPU devices each) training data-parallel over 4 devices."""
    sharding.initialize_distributed(f'127.0.0.1:{port}', 2, process_id)
    batch = make_batch()
    local = {k: v[process_id * 4:(process_id + 1) * 4] for k, v in batch.items()}
    _, losses, _ = run(sharding.MeshConfig(shape=(4, 1), strategy='dp'), local)
    return {'process_id': process_id, 'losses': losses,
            'global_devices': jax.device_count(), 'local_devices': jax.local_device_count()}


def trainer(directory):
    """The real trainer: single device vs a (4, 2) FSDP x TP mesh, then a run killed on
    (4, 2) and resumed on (8, 1)."""
    import pathlib
    import sys as _sys
    _sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import dataclasses

    from rustgpt_jax.training.loop import train
    from tests.test_training_helpers import tiny_run as _tiny_run
    from tests.test_training_helpers import write_corpus

    def tiny_run(*args, **kwargs):  # batch 8 so every mesh's data axis divides it
        run = _tiny_run(*args, **kwargs)
        return dataclasses.replace(run, phases=tuple(
            dataclasses.replace(p, batch_size=8) for p in run.phases))
    root = pathlib.Path(directory)
    corpus = write_corpus(root)
    quiet = dict(log=lambda *_: None)
    single = train(tiny_run(root, corpus, steps=6, name='single'), **quiet)
    fsdp_tp = sharding.MeshConfig(shape=(4, 2), strategy='fsdp_tp')
    meshed = train(tiny_run(root, corpus, steps=6, name='meshed', mesh=fsdp_tp), **quiet)
    killed = tiny_run(root, corpus, steps=6, name='killed', mesh=fsdp_tp)
    train(killed, stop_at_step=5, **quiet)
    resumed = train(tiny_run(root, corpus, steps=6, name='killed',
                             mesh=sharding.MeshConfig(shape=(8, 1), strategy='dp')),
                    resume=True, **quiet)
    spec = str(meshed.state.params['layers']['ffn']['w1']['kernel'].sharding.spec)
    return {'single': single.train_losses, 'meshed': meshed.train_losses,
            'resumed': resumed.train_losses,
            'meshed_param_diff': max_diff(meshed.state.params, single.state.params),
            'resumed_param_diff': max_diff(resumed.state.params, single.state.params),
            'meshed_w1_spec': spec,
            'validation': [single.validation['loss'], meshed.validation['loss'],
                           resumed.validation['loss']]}


def pallas():
    """A Pallas-attention model trained on a (4, 2) DP x TP mesh vs the reference on one device."""
    global MODEL
    batch = make_batch()
    _, ref_losses, _ = single_device(batch)
    MODEL = build_model(CONFIG.replace(attention_impl='pallas'))
    mesh_config = sharding.MeshConfig(shape=(4, 2), strategy='dp_tp')
    state, losses, _ = run(mesh_config, batch, steps=2)
    with jax.set_mesh(sharding.make_mesh(mesh_config)), nn.logical_axis_rules(mesh_config.rules):
        jaxpr = str(jax.make_jaxpr(lambda p, t: MODEL.apply({'params': p}, t))(
            state['params'], batch['tokens']))
    return {'reference': ref_losses[:2], 'pallas': losses,
            'shard_maps': jaxpr.count('shard_map['), 'pallas_calls': jaxpr.count('pallas_call')}


if __name__ == '__main__':
    case = sys.argv[1]
    if case == 'strategies':
        result = strategies()
    elif case == 'restore':
        result = restore(sys.argv[2])
    elif case == 'distributed':
        result = distributed(int(sys.argv[2]), int(sys.argv[3]))
    elif case == 'trainer':
        result = trainer(sys.argv[2])
    elif case == 'pallas':
        result = pallas()
    elif case == 'reference':
        result = {'losses': single_device(make_batch())[1]}
    else:
        raise SystemExit(f'unknown case {case!r}')
    print('RESULT ' + json.dumps(result))
