"""ModelConfig: one frozen, validated description of every model this codebase builds.

Every modernisation step of the seed reports is a switch here (SPEC §1), so the baseline
and the modern stack can be trained side by side. Enum-valued fields also accept their
string values ("rms_norm", "swiglu", ...) so gin files and CLIs can set them.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

import jax.numpy as jnp


class _RemovedField:
    """The value a removed field reads as: any use says what replaced it.

    Naming a removed field in `ModelConfig(...)` (or a gin binding) raises; reading one
    returns this object, whose attributes and truth value raise the same message, so an
    old `if config.packed_projections:` fails loudly rather than silently.
    """

    def __init__(self, name: str):
        object.__setattr__(self, '_name', name)

    def _fail(self):
        raise AttributeError(f'ModelConfig.{self._name} was removed: '
                             f'{REMOVED_FIELDS[self._name]}')

    def __getattr__(self, attribute):
        self._fail()

    def __bool__(self):
        self._fail()

    def __repr__(self):
        return f'<removed field ModelConfig.{self._name}>'


class NormType(enum.Enum):
    LAYER_NORM = 'layer_norm'  # scale + bias, eps inside the sqrt
    RMS_NORM = 'rms_norm'  # scale only


class FeedForwardType(enum.Enum):
    RELU = 'relu'  # Dense-ReLU-Dense
    SWIGLU = 'swiglu'  # W2 (silu(W1 x) * W3 x)


class PositionType(enum.Enum):
    LEARNED = 'learned'  # absolute position embeddings added to the tokens
    ROPE = 'rope'  # rotary embeddings on q and k; no position parameters


class NormPlacement(enum.Enum):
    PRE = 'pre'  # LLaMA / Mistral: x + f(norm(x)), final norm before the head
    POST = 'post'  # the Rust code: norm(x + f(x)), no final norm


class WindowStrategy(enum.Enum):
    """How the attention window is chosen (SPEC §2)."""
    FIXED = 'fixed'
    SEQUENCE_LENGTH = 'sequence_length'
    ATTENTION_ENTROPY = 'attention_entropy'
    PERPLEXITY = 'perplexity'


class AttentionImpl(enum.Enum):
    """Which kernel computes softmax(q k^T) v; all share one mask predicate.

    AUTO picks one of the others per backend and call (`runtime.auto.choose`); the
    explicit values stay for tests and benchmarks.
    """
    AUTO = 'auto'  # the best of the below for the backend and the call
    REFERENCE = 'reference'  # dense einsum, float32 softmax
    BLOCKED = 'blocked'  # XLA flash-style loop that skips fully masked key blocks
    PALLAS = 'pallas'  # fused Pallas kernel (rustgpt_jax.kernels)
    CUDNN = 'cudnn'  # cuDNN fused attention where its mask fits, else the Pallas kernel


class AttentionVariant(enum.Enum):
    """What the attention layer does around the kernel (SPEC §4)."""
    STANDARD = 'standard'
    ADAPTIVE_RANK = 'adaptive_rank'  # run-time dense / low-rank Q,K switch
    ADAPTIVE_PRECISION = 'adaptive_precision'  # run-time fp32/bf16/fp16/fp8 switch
    ADAATTN = 'adaattn'  # joint rank + precision decision


class PrecisionPolicy(enum.Enum):
    """AdaAttn precision policy: quality -> fp32, speed -> lowest allowed, balanced -> middle."""
    QUALITY = 'quality'
    BALANCED = 'balanced'
    SPEED = 'speed'


class Architecture(enum.Enum):
    TRANSFORMER = 'transformer'
    HYPERMIXER = 'hypermixer'  # token mixing by hypernetwork-generated MLPs (SPEC §5)
    HRM = 'hrm'  # hierarchical reasoning model: L and H modules iterate (SPEC §5)


class RematPolicy(enum.Enum):
    """Named rematerialisation policies for the scanned layer stack."""
    NONE = 'none'  # no remat: keep every activation
    FULL = 'full'  # save nothing, recompute the block in the backward pass
    DOTS = 'dots'  # save matmul outputs without batch dims


_ENUM_FIELDS = {
        'norm': NormType,
        'feed_forward': FeedForwardType,
        'positions': PositionType,
        'norm_placement': NormPlacement,
        'window_strategy': WindowStrategy,
        'attention_impl': AttentionImpl,
        'attention_variant': AttentionVariant,
        'architecture': Architecture,
    'precision_policy': PrecisionPolicy,
        'remat_policy': RematPolicy,
}

_DTYPES = ('float32', 'bfloat16', 'float16')

# Fields that choose how the same model executes (the same parameters, the same
# function): a checkpoint may be restored or resumed with other values of these, and
# every other field must match.
IMPLEMENTATION_FIELDS = ('attention_impl', 'remat_policy')


# Removed fields and what replaced them (execution choices moved to the runtime layer).
REMOVED_FIELDS: dict[str, str] = {
    'packed_projections': 'the parameter layout is an execution choice now: '
                          'rustgpt_jax.runtime.Execution(packed=True) '
                          '(decoding.prepare_for_decode packs automatically)',
    'matvec_row_blocks': 'use rustgpt_jax.runtime.Execution(row_blocks=...) '
                         '(decoding.prepare_for_decode picks them for the backend)',
    'matvec_impl': "use rustgpt_jax.runtime.Execution(matvec='xla' or 'cpu_gemv') "
                   '(decoding.prepare_for_decode picks it for the backend)',
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only language model.

    Attributes:
        vocab_size: number of token ids.
        embed_dim: model width D.
        hidden_dim: feed-forward inner width F.
        num_layers: number of blocks.
        num_heads: query heads N.
        num_kv_heads: key/value heads K; N % K == 0 (K == N is MHA, K == 1 is MQA).
        head_dim: per-head width H; None means embed_dim // num_heads (read the
      resolved value from `effective_head_dim`, so `replace(embed_dim=...)` stays
      consistent).
        max_seq_len: longest sequence (learned positions table size, cache length).
        window_size: sliding window W for the FIXED strategy; None means full causal.
        min_window, max_window: bounds of the adaptive strategies.
        window_ema_alpha: EMA factor of the entropy / perplexity strategies.
        adaattn_ranks: static set of low ranks r the adaptive-rank path may use.
        adaattn_rank_threshold: focus threshold above which a head goes low-rank.
        precision_policy: AdaAttn precision policy.
        hrm_cycles, hrm_steps: HRM's N (high-level updates) and T (low-level steps per
            high-level update); hrm_low_layers / hrm_high_layers: blocks in L and H.
        hypermixer_hidden_dim: width of HyperMixer's generated token-mixing MLP
            (default: hidden_dim).
    """
    vocab_size: int = 256
    embed_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 3
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: Optional[int] = None
    max_seq_len: int = 80
    norm: NormType = NormType.RMS_NORM
    norm_eps: float = 1e-5
    feed_forward: FeedForwardType = FeedForwardType.SWIGLU
    positions: PositionType = PositionType.ROPE
    rope_base: float = 10000.0
    use_bias: bool = False
    norm_placement: NormPlacement = NormPlacement.PRE
    tie_embeddings: bool = False
    window_strategy: WindowStrategy = WindowStrategy.FIXED
    window_size: Optional[int] = None
    min_window: int = 1
    max_window: Optional[int] = None
    window_ema_alpha: float = 0.2
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    attention_variant: AttentionVariant = AttentionVariant.STANDARD
    architecture: Architecture = Architecture.TRANSFORMER
    adaattn_ranks: tuple = (8,)
    adaattn_rank_threshold: float = 0.95
    precision_policy: PrecisionPolicy = PrecisionPolicy.BALANCED
    hrm_cycles: int = 2
    hrm_steps: int = 2
    hrm_low_layers: int = 1
    hrm_high_layers: int = 1
    hypermixer_hidden_dim: Optional[int] = None
    dropout_rate: float = 0.0
    dtype: str = 'float32'
    param_dtype: str = 'float32'
    remat_policy: RematPolicy = RematPolicy.NONE
    scan_layers: bool = True
    init_std: float = 0.02
    # Removed fields: naming one raises an error that says what replaced it.
    packed_projections: dataclasses.InitVar[Any] = _RemovedField('packed_projections')
    matvec_row_blocks: dataclasses.InitVar[Any] = _RemovedField('matvec_row_blocks')
    matvec_impl: dataclasses.InitVar[Any] = _RemovedField('matvec_impl')

    def __post_init__(self, packed_projections, matvec_row_blocks, matvec_impl):
        for name, value in (('packed_projections', packed_projections),
                            ('matvec_row_blocks', matvec_row_blocks),
                            ('matvec_impl', matvec_impl)):
            if not isinstance(value, _RemovedField):
                raise ValueError(f'ModelConfig.{name} was removed: {REMOVED_FIELDS[name]}')
        for name, enum_cls in _ENUM_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, enum_cls):
                try:
                    object.__setattr__(self, name, enum_cls(value))
                except ValueError:
                    allowed = ', '.join(repr(m.value) for m in enum_cls)
                    raise ValueError(
                            f'ModelConfig.{name}={value!r} is not one of {allowed}') from None
        if self.head_dim is None:
            if self.num_heads >= 1 and self.embed_dim % self.num_heads:
                _fail('head_dim', f'embed_dim ({self.embed_dim}) must be divisible by '
                            f'num_heads ({self.num_heads}) when head_dim is not set')
            if self.num_heads >= 1:
                object.__setattr__(self, 'head_dim', self.embed_dim // self.num_heads)
        self._validate()

    def _validate(self):
        for name in ('vocab_size', 'embed_dim', 'hidden_dim', 'num_layers',
                                  'num_heads', 'num_kv_heads', 'max_seq_len'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, f'must be an integer >= 1, got {value!r}')
        if not isinstance(self.head_dim, int) or self.head_dim < 1:
            _fail('head_dim', f'must be an integer >= 1 or None, got {self.head_dim!r}')
        if self.num_heads % self.num_kv_heads:
            _fail('num_kv_heads', f'num_heads ({self.num_heads}) must be divisible by '
                        f'num_kv_heads ({self.num_kv_heads})')
        if self.positions == PositionType.ROPE and self.head_dim % 2:
            _fail('head_dim', f'RoPE rotates pairs of channels, so head_dim must be '
                        f'even, got {self.head_dim}')
        if self.rope_base <= 1.0:
            _fail('rope_base', f'must be > 1, got {self.rope_base}')
        if not self.norm_eps > 0:
            _fail('norm_eps', f'must be > 0, got {self.norm_eps}')
        if self.window_size is not None and self.window_size < 1:
            _fail('window_size', f'must be >= 1 or None (full causal), got '
                        f'{self.window_size}')
        if self.min_window < 1:
            _fail('min_window', f'must be >= 1, got {self.min_window}')
        if self.max_window is not None and self.min_window > self.max_window:
            _fail('min_window', f'min_window ({self.min_window}) must be <= '
                        f'max_window ({self.max_window})')
        if self.window_strategy != WindowStrategy.FIXED and self.max_window is None:
            _fail('max_window', f'window_strategy={self.window_strategy.value!r} '
                        'needs max_window (the adaptive window upper bound)')
        if not 0.0 < self.window_ema_alpha <= 1.0:
            _fail('window_ema_alpha', f'must be in (0, 1], got {self.window_ema_alpha}')
        if not 0.0 <= self.dropout_rate < 1.0:
            _fail('dropout_rate', f'must be in [0, 1), got {self.dropout_rate}')
        for name in ('dtype', 'param_dtype'):
            if getattr(self, name) not in _DTYPES:
                _fail(name, f'must be one of {_DTYPES}, got {getattr(self, name)!r}')
        ranks = self.adaattn_ranks
        if (not isinstance(ranks, (tuple, list)) or not ranks
                or any(not isinstance(r, int) or r < 1 for r in ranks)):
            _fail('adaattn_ranks', f'must be a non-empty tuple of integers >= 1, got {ranks!r}')
        # Only the low-rank variants use the ranks; the default (8,) must not reject
        # standard models with head_dim < 8.
        uses_ranks = self.attention_variant in (AttentionVariant.ADAPTIVE_RANK,
                                                AttentionVariant.ADAATTN)
        if uses_ranks and max(ranks) > self.effective_head_dim:
            _fail('adaattn_ranks', f'ranks {tuple(ranks)} must be <= head_dim '
                  f'({self.effective_head_dim})')
        object.__setattr__(self, 'adaattn_ranks', tuple(sorted(set(ranks))))
        if not 0.0 <= self.adaattn_rank_threshold <= 1.0:
            _fail('adaattn_rank_threshold', f'must be in [0, 1], got {self.adaattn_rank_threshold}')
        for name in ('hrm_cycles', 'hrm_steps', 'hrm_low_layers', 'hrm_high_layers'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, f'must be an integer >= 1, got {value!r}')
        if self.hypermixer_hidden_dim is not None and self.hypermixer_hidden_dim < 1:
            _fail('hypermixer_hidden_dim',
                  f'must be >= 1 or None, got {self.hypermixer_hidden_dim}')
        if self.init_std <= 0:
            _fail('init_std', f'must be > 0, got {self.init_std}')

    # -- derived quantities ---------------------------------------------------

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    @property
    def effective_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.embed_dim // self.num_heads

    @property
    def queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def static_window(self) -> Optional[int]:
        """Largest window any strategy may use, or None for full causal."""
        if self.window_strategy == WindowStrategy.FIXED:
            return self.window_size
        return self.max_window

    @property
    def cache_length(self) -> int:
        """KV-cache slots per sequence: a ring of W slots when windowed (SPEC §3)."""
        window = self.static_window
        return self.max_seq_len if window is None else min(window, self.max_seq_len)

    def replace(self, **changes) -> 'ModelConfig':
        return dataclasses.replace(self, **changes)


def _fail(field: str, rule: str):
    raise ValueError(f'ModelConfig.{field}: {rule}')


# -- presets ------------------------------------------------------------------


def _build(overrides: dict, **defaults) -> ModelConfig:
    return ModelConfig(**{**defaults, **overrides})


def rustgpt_baseline(**overrides) -> ModelConfig:
    """The Rust code's original stack: post-norm LayerNorm, ReLU FFN, learned positions."""
    return _build(
            overrides, vocab_size=256, embed_dim=128, hidden_dim=256, num_layers=3,
            num_heads=8, num_kv_heads=8, max_seq_len=80,
            norm=NormType.LAYER_NORM, feed_forward=FeedForwardType.RELU,
            positions=PositionType.LEARNED, use_bias=True,
            norm_placement=NormPlacement.POST)


def rustgpt_modern(**overrides) -> ModelConfig:
    """RustGPT after phases 1-3: RMSNorm, SwiGLU, RoPE, no bias, GQA 8/4, window 32."""
    return _build(
            overrides, vocab_size=256, embed_dim=128, hidden_dim=256, num_layers=3,
            num_heads=8, num_kv_heads=4, max_seq_len=80,
            norm=NormType.RMS_NORM, feed_forward=FeedForwardType.SWIGLU,
            positions=PositionType.ROPE, use_bias=False,
            norm_placement=NormPlacement.PRE, window_size=32)


def mistral_7b(**overrides) -> ModelConfig:
    """Mistral 7B v0.1 shapes (sliding window 4096)."""
    return _build(
            overrides, vocab_size=32000, embed_dim=4096, hidden_dim=14336, num_layers=32,
            num_heads=32, num_kv_heads=8, max_seq_len=32768, window_size=4096,
            rope_base=10000.0, norm_eps=1e-5)


def tinyllama_1_1b(**overrides) -> ModelConfig:
    """TinyLlama-1.1B shapes (LLaMA-2 architecture, GQA 32/4)."""
    return _build(
            overrides, vocab_size=32000, embed_dim=2048, hidden_dim=5632, num_layers=22,
            num_heads=32, num_kv_heads=4, max_seq_len=2048,
            rope_base=10000.0, norm_eps=1e-5)


def mistral_tiny(**overrides) -> ModelConfig:
    """A Mistral-shaped model small enough for a CPU: GQA, sliding window."""
    return _build(
            overrides, vocab_size=256, embed_dim=256, hidden_dim=704, num_layers=4,
            num_heads=8, num_kv_heads=4, max_seq_len=256, window_size=128
    )


PRESETS = {
        'rustgpt_baseline': rustgpt_baseline,
        'rustgpt_modern': rustgpt_modern,
        'mistral_tiny': mistral_tiny,
        'mistral_7b': mistral_7b,
        'tinyllama_1_1b': tinyllama_1_1b,
}


def preset(name: str, **overrides) -> ModelConfig:
    """Returns the named preset with overrides applied."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; known: {sorted(PRESETS)}')
    return PRESETS[name](**overrides)
