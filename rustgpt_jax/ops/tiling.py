"""`BlockSizes`: the tile sizes of every blocked attention, XLA loops and Pallas kernels.

One class for `ops.blocked` (plain XLA loops) and `kernels.flash_attention` (Pallas);
each picks its own defaults (`for_xla`, `for_triton`, `for_tpu`) because the best tiles
differ by backend (benchmarks/RESULTS.md, "Blocked attention").
"""

from __future__ import annotations

import dataclasses
from typing import Optional


def is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of a blocked attention.

    Attributes:
      block_q: query rows per forward tile (with GQA, all G query heads of a KV head are
        tiled together in the XLA loops, so a tile there has G * block_q rows).
      block_k: keys per forward tile.
      block_q_bwd, block_k_bwd: the same for the backward pass; None means the forward
        sizes.

    Every size is clamped to the (padded) sequence length, so small inputs still run.
    The Pallas kernels also need powers of 2 (`check_power_of_2`).
    """
    block_q: int = 128
    block_k: int = 64
    block_q_bwd: Optional[int] = None
    block_k_bwd: Optional[int] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name.endswith('_bwd'):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f'BlockSizes.{field.name} must be a positive int, got '
                                 f'{value!r}')

    @property
    def backward(self) -> tuple[int, int]:
        """(block_q_bwd, block_k_bwd) with the forward sizes filled in."""
        return (self.block_q if self.block_q_bwd is None else self.block_q_bwd,
                self.block_k if self.block_k_bwd is None else self.block_k_bwd)

    def check_power_of_2(self) -> 'BlockSizes':
        """Returns self, or raises naming the first size that is not a power of 2."""
        for name, value in (('block_q', self.block_q), ('block_k', self.block_k),
                            ('block_q_bwd', self.backward[0]),
                            ('block_k_bwd', self.backward[1])):
            if not is_power_of_2(value):
                raise ValueError(f'BlockSizes.{name} must be a positive power of 2 for the '
                                 f'Pallas kernels, got {value!r}')
        return self

    @classmethod
    def for_xla(cls, batch_heads: int = 8) -> 'BlockSizes':
        """The XLA loops' default for `batch_heads` (batch x query heads) tiles at once.

        Square tiles of the largest power of 2 up to 256 whose logits, over the whole
        batch and every head, hold at most 2^19 floats (2 MB): XLA runs each tile's
        elementwise work as whole-array passes, which stay in cache only while the
        tile does. At batch 1 with 8 heads that is 256 (long sequences,
        benchmarks/attention_scaling.py); a training batch of 8 x 8 heads gets 64,
        which halved attention's forward + backward against 256 at T = 256 and 512
        (benchmarks/RESULTS.md, "Training throughput").
        """
        block = 256
        while block > 16 and batch_heads * block * block > 1 << 19:
            block //= 2
        return cls(block_q=block, block_k=block)

    @classmethod
    def for_triton(cls) -> 'BlockSizes':
        """The GPU kernel's default."""
        return cls(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64)

    @classmethod
    def for_tpu(cls) -> 'BlockSizes':
        """The TPU kernel's default: block_k* are lane dims (multiples of 128)."""
        return cls(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)
