"""Cross-module wiring: the Pallas decode kernel in the model, summaries of every architecture."""

import jax
import jax.numpy as jnp
import numpy as np

from rustgpt_jax import config as config_lib
from rustgpt_jax import summary
from rustgpt_jax.models import build_model


def test_pallas_decode_kernel_in_cached_decode_matches_full_forward():
    # impl=PALLAS routes one-token cached steps through kernels.flash_decode (interpret
    # mode on CPU); the ring buffer (window 4) wraps during the 9 generated positions.
    cfg = config_lib.mistral_tiny(embed_dim=32, hidden_dim=48, num_layers=2, num_heads=4,
                                  num_kv_heads=2, max_seq_len=16, window_size=4, vocab_size=32,
                                  attention_impl='pallas')
    reference_cfg = cfg.replace(attention_impl='reference')
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    model = build_model(cfg)
    params = build_model(reference_cfg).init(jax.random.key(1), tokens)['params']
    full = build_model(reference_cfg).apply({'params': params}, tokens)

    @jax.jit
    def step(cache, token, position):
        logits, mutated = model.apply({'params': params, 'cache': cache}, token,
                                      positions=position, decode=True, mutable=['cache'])
        return logits, mutated['cache']

    cache = model.init(jax.random.key(1), tokens[:, :1], decode=True)['cache']
    logits, cache = step(cache, tokens[:, :3], jnp.broadcast_to(jnp.arange(3), (2, 3)))
    outs = [logits]
    for t in range(3, 12):
        logits, cache = step(cache, tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32))
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_summary_lists_components_of_every_architecture():
    base = config_lib.rustgpt_modern()
    hyper = summary.architecture_summary(base.replace(architecture='hypermixer'))
    assert 'token_mixing' in hyper and 'no KV cache' in hyper
    hrm_cfg = base.replace(architecture='hrm', hrm_cycles=2, hrm_steps=3)
    hrm = summary.architecture_summary(hrm_cfg)
    assert 'low_module' in hrm and 'high_module' in hrm
    # 2*3*1 low + 2*1 high = 8 cached layer applications: 2 * 8 * K=4 * H=16 * 4 bytes.
    assert f'{2 * 8 * 4 * 16 * 4:,} (2 x L=8' in hrm
    for cfg in (base.replace(architecture='hypermixer'), hrm_cfg):
        variables = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                                   jnp.zeros((1, 8), jnp.int32))
        n = sum(x.size for x in jax.tree.leaves(variables['params']))
        assert summary.parameter_counts(cfg)['total'] == n
        assert f'{n:,}' in summary.architecture_summary(cfg)
