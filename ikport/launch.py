"""Launch state shared by the kernels: torch's raw stream, the split-K arrival counters and the
split-K scratch for partial results."""

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


def capturing() -> bool:
    """Whether torch's current stream is being captured into a CUDA graph (one driver query:
    a call that needs the answer twice asks once and passes it on)."""
    return torch._C._cuda_isCurrentStreamCapturing()  # torch.cuda's wrapper, minus its checks


def split_counters(backend: Backend, device: int, stream: int, n: int, *,
                   in_capture: bool | None = None) -> int:
    """Device pointer to >= n zeroed counters, or 0 (none while capturing: see above)."""
    if capturing() if in_capture is None else in_capture:
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


# Split-K partial results per (device, stream), reused by every call on that stream: calls on one
# stream never overlap, and each call's kernels consume its partials before the next call's
# start. This saves a torch allocation (~4 us of host time) per call. The buffers come from the
# driver's stream-ordered allocator, outside torch's: torch.compile's CUDA-graph trees forbid
# tensors that outlive a call inside their pools. Requests above SCRATCH_KEEP_BYTES are not kept.
SCRATCH_KEEP_BYTES = 64 << 20
_scratch: dict[tuple[int, int], tuple[int, int]] = {}  # (device, stream) -> (pointer, bytes)


def split_scratch(backend: Backend, device: int, stream: int, nbytes: int, *,
                  in_capture: bool | None = None) -> tuple[int, torch.Tensor | None]:
    """Device pointer to >= nbytes of scratch for split-K partials, and the tensor that owns it
    when torch does (keep it alive until the launch is queued): while capturing a graph (a replay
    must not share memory with eager calls), for oversize requests, and on backends without a
    stream-ordered allocator."""
    if not (capturing() if in_capture is None else in_capture) and nbytes <= SCRATCH_KEEP_BYTES:
        ptr, size = _scratch.get((device, stream), (0, 0))
        if size >= nbytes:
            return ptr, None
        try:
            size = max(nbytes, 1 << 18)
            new = backend.alloc_async(device, size, stream)
        except NotImplementedError:
            pass
        else:
            if ptr:
                backend.free_async(ptr, stream)  # after the work already queued on this stream
            _scratch[(device, stream)] = (new, size)
            return new, None
    t = torch.empty(-(-nbytes // 4), dtype=torch.float32, device=torch.device("cuda", device))
    return t.data_ptr(), t
