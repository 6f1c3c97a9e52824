"""Training tokens/s and per-device state memory against mesh shape and strategy.

On CPU the devices are simulated (`--xla_force_host_platform_device_count`) and share
the same cores, so tokens/s shows overhead, not speed-up; the per-device bytes show
what each strategy shards. On a GPU/TPU host the same script measures real devices.

    python benchmarks/scaling.py [--devices 8] [--steps 5] [--json out.json]
"""

import argparse
import json
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--devices', type=int, default=8, help='simulated CPU devices')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--seq', type=int, default=128)
    parser.add_argument('--json', default=None)
    args = parser.parse_args()
    os.environ.setdefault('XLA_FLAGS',
                          f'--xla_force_host_platform_device_count={args.devices}')

    import jax
    import numpy as np

    from rustgpt_jax import config as config_lib
    from rustgpt_jax import sharding
    from rustgpt_jax.sharding.training import make_plan
    from rustgpt_jax.training import optim, steps
    from rustgpt_jax.training.state import create_train_state

    model = config_lib.mistral_tiny(max_seq_len=args.seq)
    tx = optim.make_optimizer(optim.OptimizerConfig())
    n = jax.device_count()
    cases = [('single', None), ('dp', (n, 1)), ('fsdp', (n, 1)), ('tp', (n // 2, 2)),
             ('dp_tp', (n // 2, 2)), ('fsdp_tp', (n // 2, 2))]
    # 'tp' on (n/2, 2) leaves the data axis unused: batch rows replicate over it.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
             'loss_mask': np.ones((args.batch, args.seq), np.float32),
             'positions': np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                          (args.batch, args.seq)).copy(),
             'segment_ids': np.ones((args.batch, args.seq), np.int32)}
    rows = []
    for name, shape in cases:
        state = create_train_state(model, tx, 0, args.batch, args.seq)
        if shape is None:
            step_fn = steps.make_train_step(model)
            device_batch, context = batch, None
        else:
            plan = make_plan(sharding.MeshConfig(shape=shape, strategy=name), model, tx,
                             args.batch, args.seq)
            context = plan.activate()
            context.__enter__()
            state = plan.place_state(state)
            step_fn = steps.make_train_step(model, shardings=(plan.state_prefix(state),
                                                              plan.batch))
            device_batch = plan.global_batch(batch)
        state, _ = step_fn(state, device_batch)  # compile
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = step_fn(state, device_batch)
        jax.block_until_ready(metrics['loss'])
        seconds = (time.perf_counter() - t0) / args.steps
        per_device = {}
        for leaf in jax.tree.leaves(state.checkpoint_tree()):
            for shard in leaf.addressable_shards:
                key = str(shard.device)
                per_device[key] = per_device.get(key, 0) + shard.data.nbytes
        if context is not None:
            context.__exit__(None, None, None)
        rows.append({'strategy': name, 'mesh': list(shape) if shape else [1],
                     'tokens_per_s': args.batch * args.seq / seconds,
                     'state_mb_per_device_max': max(per_device.values()) / 2**20,
                     'loss': float(metrics['loss'])})
    print(f'{"strategy":<9} {"mesh":<8} {"tokens/s":>10} {"state MB/device":>16} {"loss":>8}')
    for r in rows:
        print(f'{r["strategy"]:<9} {str(tuple(r["mesh"])):<8} {r["tokens_per_s"]:>10,.0f} '
              f'{r["state_mb_per_device_max"]:>16.2f} {r["loss"]:>8.4f}')
    out = {'backend': jax.default_backend(), 'devices': n, 'rows': rows}
    print(json.dumps(out))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
