"""How a kernel is launched, as the planners launch it: what the portability report's occupancy
and instruction checks need."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    threads: int  # per block
    dynamic_shared_bytes: int  # requested at launch, on top of the static shared memory
    async_copy: bool  # the kernel calls the ik::cp_async* shim on its hot path
    matrix: bool  # the kernel calls the ik::mma shim
    smem_fragments: bool = True  # ... and loads fragments from shared memory (ldmatrix on NVIDIA)
