"""From a KernelSpec to a launchable kernel: source assembly, disk + in-process cache, load.

A kernel is compiled at most once per process (in-memory map by backend, target and URI) and at
most once per machine (the disk cache), and loaded once per device.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import knobs
from ._version import __version__
from .backends.base import Backend, CompiledModule
from .backends.cache import DiskCache, cache_key
from .backends.source import kernel_source
from .backends.target import Target
from .manifest import KernelSpec

log = logging.getLogger("ikport")


# By-value kernel arguments. Each mirrors the C struct of the same name field for field
# (kernels_src/*.cuh); ctypes lays them out with the C rules the device ABI uses.
class DecodeParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("part_out", ctypes.c_void_p), ("part_lse", ctypes.c_void_p),
        ("kv_lens", ctypes.c_void_p), ("block_table", ctypes.c_void_p),
        ("split_counters", ctypes.c_void_p),
        ("q_sb", ctypes.c_int64), ("q_sh", ctypes.c_int64), ("q_st", ctypes.c_int64),
        ("k_sb", ctypes.c_int64), ("k_sh", ctypes.c_int64), ("k_st", ctypes.c_int64),
        ("v_sb", ctypes.c_int64), ("v_sh", ctypes.c_int64), ("v_st", ctypes.c_int64),
        ("o_sb", ctypes.c_int64), ("o_sh", ctypes.c_int64), ("o_st", ctypes.c_int64),
        ("bt_sb", ctypes.c_int64),
        ("batch", ctypes.c_int32), ("num_q_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32), ("q_len", ctypes.c_int32),
        ("kv_capacity", ctypes.c_int32), ("page_size_log2", ctypes.c_int32),
        ("num_splits", ctypes.c_int32), ("rows_per_split", ctypes.c_int32),
        ("causal", ctypes.c_int32), ("scale_log2", ctypes.c_float), ("num_pages", ctypes.c_int32),
        # appended (every field above keeps its offset): the INT8 cache's fp32 scales and strides
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
        ("ks_sb", ctypes.c_int64), ("ks_sh", ctypes.c_int64), ("ks_st", ctypes.c_int64),
        ("vs_sb", ctypes.c_int64), ("vs_sh", ctypes.c_int64), ("vs_st", ctypes.c_int64),
        # appended: the KIVI INT4 cache's full-precision K residual and its strides
        ("k_resid", ctypes.c_void_p), ("kr_sb", ctypes.c_int64), ("kr_sh", ctypes.c_int64), ("kr_st", ctypes.c_int64),
    ]


class PrefillParams(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("lse", ctypes.c_void_p), ("cu_q", ctypes.c_void_p),
        ("cu_k", ctypes.c_void_p), ("q_lens", ctypes.c_void_p), ("kv_lens", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p),
        ("q_sb", ctypes.c_int64), ("q_sh", ctypes.c_int64), ("q_st", ctypes.c_int64),
        ("k_sb", ctypes.c_int64), ("k_sh", ctypes.c_int64), ("k_st", ctypes.c_int64),
        ("v_sb", ctypes.c_int64), ("v_sh", ctypes.c_int64), ("v_st", ctypes.c_int64),
        ("o_sb", ctypes.c_int64), ("o_sh", ctypes.c_int64), ("o_st", ctypes.c_int64),
        ("lse_sb", ctypes.c_int64), ("lse_sh", ctypes.c_int64),
        ("bt_sb", ctypes.c_int64),
        ("batch", ctypes.c_int32), ("num_q_heads", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32),
        ("q_capacity", ctypes.c_int32), ("kv_capacity", ctypes.c_int32), ("page_size_log2", ctypes.c_int32),
        ("causal", ctypes.c_int32), ("longest_first", ctypes.c_int32), ("scale_log2", ctypes.c_float),
        # a quantized cache's side tensors (loader int8 / kivi4_g*), as DecodeParams'
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p),
        ("ks_sb", ctypes.c_int64), ("ks_sh", ctypes.c_int64), ("ks_st", ctypes.c_int64),
        ("vs_sb", ctypes.c_int64), ("vs_sh", ctypes.c_int64), ("vs_st", ctypes.c_int64),
        ("k_resid", ctypes.c_void_p),
        ("kr_sb", ctypes.c_int64), ("kr_sh", ctypes.c_int64), ("kr_st", ctypes.c_int64),
    ]


class MmaTileParams(ctypes.Structure):
    _fields_ = [
        ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("c", ctypes.c_void_p),
        ("m", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
    ]


class W4A16Params(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p), ("qweight", ctypes.c_void_p), ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p), ("out", ctypes.c_void_p), ("partials", ctypes.c_void_p),
        ("tile_counters", ctypes.c_void_p),
        ("x_sm", ctypes.c_int64), ("o_sm", ctypes.c_int64),
        ("m", ctypes.c_int32), ("n", ctypes.c_int32), ("k", ctypes.c_int32),
        ("packed_k", ctypes.c_int32), ("group_log2", ctypes.c_int32), ("num_splits", ctypes.c_int32),
        ("chunks_per_split", ctypes.c_int32),
    ]


class KvAppendParams(ctypes.Structure):
    _fields_ = [
        ("k_new", ctypes.c_void_p), ("v_new", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p), ("k_resid", ctypes.c_void_p),
        ("block_table", ctypes.c_void_p), ("positions", ctypes.c_void_p), ("lens", ctypes.c_void_p),
        ("counter", ctypes.c_void_p),
        ("kn_sb", ctypes.c_int64), ("kn_sh", ctypes.c_int64), ("kn_st", ctypes.c_int64),
        ("vn_sb", ctypes.c_int64), ("vn_sh", ctypes.c_int64), ("vn_st", ctypes.c_int64),
        ("s_sb", ctypes.c_int64), ("s_sh", ctypes.c_int64), ("s_st", ctypes.c_int64),
        ("sc_sb", ctypes.c_int64), ("sc_sh", ctypes.c_int64), ("sc_st", ctypes.c_int64),
        ("kp_sb", ctypes.c_int64), ("kp_sh", ctypes.c_int64), ("kp_sg", ctypes.c_int64),
        ("kr_sb", ctypes.c_int64), ("kr_sh", ctypes.c_int64), ("kr_st", ctypes.c_int64),
        ("bt_sb", ctypes.c_int64),
        ("batch", ctypes.c_int32), ("kv_heads", ctypes.c_int32), ("new_tokens", ctypes.c_int32),
        ("capacity", ctypes.c_int32), ("page_size_log2", ctypes.c_int32), ("k_groups", ctypes.c_int32),
        ("rewrite", ctypes.c_int32),
    ]


class ReadPassParams(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("sink", ctypes.c_void_p), ("n16", ctypes.c_int64)]


PARAMS_TYPES: dict[str, type[ctypes.Structure]] = {
    "DecodeParams": DecodeParams,
    "PrefillParams": PrefillParams,
    "MmaTileParams": MmaTileParams,
    "W4A16Params": W4A16Params,
    "KvAppendParams": KvAppendParams,
    "ReadPassParams": ReadPassParams,
}


_lock = threading.Lock()
_compiled: dict[tuple[str, str, str], CompiledModule] = {}
_loaded: dict[tuple[str, str, int], "Kernel"] = {}


def _disk_cache() -> DiskCache | None:
    return DiskCache(knobs.cache_dir()) if knobs.disk_cache_enabled() else None


def compile_spec(spec: KernelSpec, backend: Backend, target: Target) -> CompiledModule:
    """Compiled code of `spec` for `target`: from memory, else the disk cache, else the compiler."""
    mem_key = (backend.name, target.arch, spec.uri)
    with _lock:
        if mem_key in _compiled:
            return _compiled[mem_key]
        source = kernel_source(spec.source_file, [(spec.name_expr, spec.params_type)])
        names = [spec.name_expr]
        compiler = backend.compiler_version()
        key = cache_key(source, names, [], target, compiler, __version__)
        cache = _disk_cache()
        module = cache.get(key) if cache else None
        if module is None:
            log.debug("compile %s for %s: %s %s name=%s", spec.uri, target.arch, compiler,
                      " ".join(getattr(backend, "base_options", lambda t: [])(target)), names[0])
            t0 = time.perf_counter()
            module = backend.compile(source, names, [], target)
            log.info("compiled %s for %s in %.2f s", spec.uri, target.arch, time.perf_counter() - t0)
            if cache:
                cache.put(key, module)
        else:
            log.debug("cache hit %s for %s", spec.uri, target.arch)
        _compiled[mem_key] = module
        return module


@dataclass
class Kernel:
    """A loaded kernel on one device: launch it with its params struct on a stream."""

    spec: KernelSpec
    backend: Backend
    fn: Any
    static_shared: int = 0  # bytes of static shared memory / LDS, as the compiler reported them
    max_dynamic_shared: int = 0  # the opt-in limit set so far (static shared memory comes on top)

    def _allow_shared(self, shared_bytes: int) -> None:
        # NVIDIA wants an opt-in once static + dynamic shared memory passes 48 KB; set it for every
        # new high-water mark (one driver call each), whatever the static part.
        if shared_bytes > self.max_dynamic_shared:
            self.backend.set_max_dynamic_shared(self.fn, shared_bytes)
            self.max_dynamic_shared = shared_bytes

    def occupancy(self, block_threads: int, shared_bytes: int) -> int | None:
        """Blocks of this kernel resident on one SM/CU at once with this launch shape, or None
        where the backend cannot say. The limit is raised first: the driver counts `shared_bytes`
        against the kernel's opt-in limit and answers 0 above it, so a plan made before the
        kernel's first launch took the fallback estimate (v11's first D1 plan: 6 splits, not 2)."""
        self._allow_shared(shared_bytes)
        return self.backend.occupancy(self.fn, block_threads, shared_bytes)

    def launch(self, grid, block, shared_bytes: int, params: ctypes.Structure, stream: int) -> None:
        self._allow_shared(shared_bytes)
        self.backend.launch(self.fn, grid, block, shared_bytes, params, stream)

    def bind(self, grid, block, shared_bytes: int) -> Callable[[ctypes.Structure, int], None]:
        """A launcher with grid, block and shared memory fixed: call it with (params, stream)."""
        self._allow_shared(shared_bytes)
        return self.backend.bind_launch(self.fn, tuple(grid), tuple(block), shared_bytes)


def get_kernel(spec: KernelSpec, backend: Backend, device: int) -> Kernel:
    key = (backend.name, spec.uri, device)
    k = _loaded.get(key)
    if k is not None:
        return k
    target = backend.target_for(device)
    module = compile_spec(spec, backend, target)
    with _lock:
        if key not in _loaded:
            loaded = backend.load(module, device)
            res = module.resources.get(spec.name_expr)
            static = res.shared_bytes if res is not None and res.shared_bytes is not None else 0
            _loaded[key] = Kernel(spec, backend, backend.get_function(loaded, module, spec.name_expr), static)
        return _loaded[key]
