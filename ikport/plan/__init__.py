"""The planners: one per kernel family, pure functions from a problem shape, the device's facts and
frozen options to a launch plan. The call path, warmup, the report and the benchmarks ask them;
nothing else computes a launch.

    decode   ikport.attention / paged_attention (DecodeOptions, DecodeProblem -> DecodePlan)
    prefill  ikport.attention / paged_attention / attention_varlen past decode's query lengths
             (PrefillOptions, PrefillProblem -> PrefillPlan)
    w4a16    ikport.w4a16_matmul (W4A16Options, W4A16Problem -> W4A16Plan)
    kv_append  ikport.KVCache.append (a fixed launch shape: block threads and grid)
"""

from __future__ import annotations

from ..backends.target import ArchFacts
from ..manifest import KernelSpec
from . import decode, kv_append, prefill, w4a16
from .decode import DecodeOptions
from .launch import Launch
from .prefill import PrefillOptions
from .w4a16 import W4A16Options

__all__ = ["DecodeOptions", "Launch", "PrefillOptions", "W4A16Options", "decode", "kv_append", "launch_of", "prefill",
           "w4a16"]


def launch_of(s: KernelSpec, facts: ArchFacts) -> Launch | None:
    """Threads per block and dynamic shared memory the planners launch kernel `s` with on a target
    of `facts`; None for a kernel no planner launches yet."""
    if s.family == "mma_tile":
        return Launch(facts.warp_size, 0, False, True)  # one warp/wave per 16x16 tile (tests)
    if s.family == "read_pass":
        return Launch(512, 0, False, False)  # the benchmarks' read floor (bench.harness.measure_read_pass)
    return (decode.launch_of(s, facts) or prefill.launch_of(s, facts) or w4a16.launch_of(s, facts)
            or kv_append.launch_of(s, facts))
