"""Every environment variable ikport reads, in one place (read at use, so tests can set them).

IKPORT_CACHE_DIR   where compiled kernels are kept (default: ~/.cache/ikport, or $XDG_CACHE_HOME/ikport)
IKPORT_BACKEND     force a backend for GPU tensors: "cuda" or "hip" (default: from torch's build)
IKPORT_LOG         logging level of the "ikport" logger: debug, info, warning (default: warning)
IKPORT_NO_DISK_CACHE  set to 1 to compile in memory only
IKPORT_CHECK_TABLES   set to 1 to range-check paged_attention's block table (and attention_varlen's
                      cu_seqlens offsets) on the GPU too, on every call (a debugging aid: each
                      check synchronizes with the host; the CPU path always checks; skipped while
                      a CUDA graph is being captured). Read when an input layout is first seen, so
                      set it before the calls it should check.
"""

from __future__ import annotations

import os
from pathlib import Path

from .backends.cache import default_cache_dir


def cache_dir() -> Path:
    return default_cache_dir()  # the backends need it too, and import nothing of ikport's


def disk_cache_enabled() -> bool:
    return os.environ.get("IKPORT_NO_DISK_CACHE", "") not in ("1", "true", "yes")


def check_tables() -> bool:
    return os.environ.get("IKPORT_CHECK_TABLES", "") in ("1", "true", "yes")


def forced_backend() -> str | None:
    value = os.environ.get("IKPORT_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in ("cuda", "hip"):
        raise ValueError(f"IKPORT_BACKEND={value!r}: expected 'cuda' or 'hip'")
    return value


def log_level() -> str:
    return os.environ.get("IKPORT_LOG", "warning").upper()
