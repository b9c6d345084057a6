"""Launch state shared by the kernels: torch's raw stream and the split-K arrival counters."""

from __future__ import annotations

import torch

from .backends.base import Backend

# Split-K arrival counters per (device, stream): zero at rest, reset by the kernel's last block,
# so one buffer serves every call on a stream (calls on one stream never overlap). They live
# outside torch's allocator (a CUDA-graph pool must not own them). A stream being captured gets
# none: a replay on another stream must not race eager calls for them. The caller records
# something stateless instead (decode: the separate merge launch; W4A16: counters zeroed inside
# the graph), which computes the same bits.
_counters: dict[tuple[int, int], tuple[int, int]] = {}  # (device, stream) -> (pointer, ints)


def split_counters(backend: Backend, device: int, stream: int, n: int) -> int:
    """Device pointer to >= n zeroed counters, or 0 (none while capturing: see above)."""
    if torch.cuda.is_current_stream_capturing():
        return 0  # a graph must not share counters with eager calls or other graphs
    ptr, size = _counters.get((device, stream), (0, 0))
    if size >= n:
        return ptr
    try:
        size = max(n, 16384)
        ptr = backend.alloc_zeroed(device, size * 4)  # a smaller old buffer is left allocated
    except NotImplementedError:
        return 0
    _counters[(device, stream)] = (ptr, size)
    return ptr


def raw_stream(device_index: int) -> int:
    """Raw handle of torch's current stream (a CUDA graph capture records on it)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


