"""On-disk cache of compiled modules.

Key: sha256 over the full source text (headers inlined), options, target, compiler id + version
and ikport's version. Entry: magic, sha256 of the payload, payload length, payload; written to a
temporary file and renamed into place, so a reader sees a whole entry or none. An entry whose
checksum or length does not match reads as a miss and is rebuilt, never loaded. A cache directory
that cannot be written falls back to memory with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

from .base import CompiledModule, KernelResources
from .target import Target

log = logging.getLogger("ikport")

_MAGIC = b"IKPORT-CACHE-1\n"
_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """IKPORT_CACHE_DIR, else $XDG_CACHE_HOME/ikport, else ~/.cache/ikport (read at each call, so
    tests can set it; ikport/knobs.py documents every environment variable)."""
    env = os.environ.get("IKPORT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ikport"


def cache_key(
    source: str, names: Sequence[str], options: Sequence[str], target: Target, compiler: str,
    library_version: str,
) -> str:
    h = hashlib.sha256()
    for part in (_FORMAT_VERSION, source, "\0".join(names), "\0".join(options), target.arch,
                 compiler, library_version):
        h.update(part.encode())
        h.update(b"\xff")
    return h.hexdigest()


def _encode(module: CompiledModule) -> bytes:
    meta = {
        "arch": module.target.arch,
        "lowered_names": module.lowered_names,
        "compiler": module.compiler,
        "log": module.log,
        "resources": {k: vars(v) for k, v in module.resources.items()},
        "assembly": module.assembly,
    }
    m = json.dumps(meta).encode()
    return len(m).to_bytes(8, "little") + m + module.binary


def _decode(payload: bytes) -> CompiledModule:
    n = int.from_bytes(payload[:8], "little")
    meta = json.loads(payload[8 : 8 + n])
    return CompiledModule(
        target=Target(meta["arch"]),
        binary=payload[8 + n :],
        lowered_names=meta["lowered_names"],
        compiler=meta["compiler"],
        log=meta["log"],
        resources={k: KernelResources(**v) for k, v in meta["resources"].items()},
        assembly=meta.get("assembly", ""),
    )


class DiskCache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._writable = True

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.bin"

    def get(self, key: str) -> CompiledModule | None:
        p = self.path(key)
        try:
            data = p.read_bytes()
        except OSError:
            return None
        head = len(_MAGIC)
        if len(data) < head + 40 or not data.startswith(_MAGIC):
            log.warning("ikport cache: %s is damaged (bad header); rebuilding", p)
            return None
        digest, size = data[head : head + 32], int.from_bytes(data[head + 32 : head + 40], "little")
        payload = data[head + 40 :]
        if len(payload) != size or hashlib.sha256(payload).digest() != digest:
            log.warning("ikport cache: %s is truncated or altered; rebuilding", p)
            return None
        try:
            return _decode(payload)
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ikport cache: %s could not be decoded (%s); rebuilding", p, e)
            return None

    def put(self, key: str, module: CompiledModule) -> None:
        if not self._writable:
            return
        payload = _encode(module)
        blob = _MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "little") + payload
        p = self.path(key)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=".bin")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, p)  # atomic: readers see the old entry or the new one
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            self._writable = False
            warnings.warn(
                f"ikport: cannot write the kernel cache at {self.root} ({e}); compiled kernels "
                "are kept in memory for this process only (set IKPORT_CACHE_DIR to fix)",
                RuntimeWarning,
                stacklevel=2,
            )
