"""The append kernel's launch (kernels_src/kv_append.cuh, KVCache.append on a GPU): a wave per new
row (K's and V's; KIVI: V's), then KIVI's group block per sequence and KV head, in one 1-D grid.
"""

from __future__ import annotations

from ..backends.target import ArchFacts
from ..manifest import KernelSpec
from .launch import Launch


def block_threads(head_dim: int) -> int:
    """Threads a block (kv_append::threads in the kernel: a KIVI group block holds a row's channel
    pairs, up to 128, in one pass)."""
    return 256 if head_dim > 128 else 128


def grid_blocks(*, batch: int, kv_heads: int, new_tokens: int, head_dim: int, kivi: bool, warp_size: int) -> int:
    """Blocks of the launch (at least one: the last block sets the lengths)."""
    per_tensor = batch * kv_heads * new_tokens
    rows = per_tensor if kivi else 2 * per_tensor
    waves = block_threads(head_dim) // warp_size
    return max(1, -(-rows // waves) + (batch * kv_heads if kivi else 0))


def launch_of(s: KernelSpec, facts: ArchFacts) -> Launch | None:
    """Block size and dynamic shared memory of `s`'s launch; None for another family."""
    if s.family != "kv_append":
        return None
    return Launch(block_threads(dict(s.params)["head_dim"]), 0, False, False)
