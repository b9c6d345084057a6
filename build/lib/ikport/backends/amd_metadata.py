"""What an AMD code object says about its kernels, read without any ROCm tool.

An AMD code object is an ELF file whose NT_AMDGPU_METADATA note holds a msgpack map; its
"amdhsa.kernels" list gives each kernel's registers, LDS and scratch. Both AMD routes
(backends/hip.py: hipRTC, backends/amd_offline.py: clang-19) read resources from it here.

It also maps name expressions to symbols when the compiler cannot: HIP 5.x's
hiprtcGetLoweredName compares the expression's text with demangled names, so an alias such as
`ik::half_t` (demangles as `__half`) never matches, and clang has no such API at all. One empty
probe kernel per expression, `ik_lowered_name_probe<i, &expr>`, makes the compiler spell the
kernel's mangled name inside the probe's own mangled name; `lowered_from_probes` reads it back.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import Any

from .base import KernelResources

NT_AMDGPU_METADATA = 32
_SHT_NOTE = 7
PROBE_NAME = "ik_lowered_name_probe"


# ---- ELF notes ---------------------------------------------------------------------------------
def elf_notes(blob: bytes) -> list[tuple[str, int, bytes]]:
    """(owner name, type, descriptor) of every note in the SHT_NOTE sections of a 64-bit ELF."""
    if blob[:4] != b"\x7fELF" or blob[4] != 2 or blob[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file (an AMD code object is one)")
    (shoff,) = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", blob, 0x3A)
    notes = []
    for i in range(shnum):
        (sh_type,) = struct.unpack_from("<I", blob, shoff + i * shentsize + 4)
        if sh_type != _SHT_NOTE:
            continue
        offset, size = struct.unpack_from("<QQ", blob, shoff + i * shentsize + 0x18)
        notes += _parse_notes(blob[offset : offset + size])
    return notes


def _align4(n: int) -> int:  # AMDGPU notes pad the name and the descriptor to 4 bytes
    return (n + 3) & ~3


def _parse_notes(data: bytes) -> list[tuple[str, int, bytes]]:
    out, pos = [], 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name = data[pos + 12 : pos + 12 + namesz].rstrip(b"\0").decode(errors="replace")
        desc_at = pos + 12 + _align4(namesz)
        out.append((name, ntype, data[desc_at : desc_at + descsz]))
        pos = desc_at + _align4(descsz)
    return out


# ---- msgpack (the subset the AMDGPU metadata uses, plus the rest of the plain types) -----------
def unpackb(data: bytes) -> Any:
    """Decode one msgpack value; a small reader so no msgpack package is needed."""
    value, _ = _unpack(data, 0)
    return value


# fmt: off
_FIXED = {  # type byte -> (struct format, kind)
    0xCA: (">f", "num"), 0xCB: (">d", "num"),
    0xCC: (">B", "num"), 0xCD: (">H", "num"), 0xCE: (">I", "num"), 0xCF: (">Q", "num"),
    0xD0: (">b", "num"), 0xD1: (">h", "num"), 0xD2: (">i", "num"), 0xD3: (">q", "num"),
    0xD9: (">B", "str"), 0xDA: (">H", "str"), 0xDB: (">I", "str"),
    0xC4: (">B", "bin"), 0xC5: (">H", "bin"), 0xC6: (">I", "bin"),
    0xDC: (">H", "array"), 0xDD: (">I", "array"), 0xDE: (">H", "map"), 0xDF: (">I", "map"),
}
# fmt: on


def _unpack(data: bytes, pos: int) -> tuple[Any, int]:
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF:
        return _unpack_payload(data, pos, "str", b & 0x1F)
    if 0x90 <= b <= 0x9F:
        return _unpack_payload(data, pos, "array", b & 0x0F)
    if 0x80 <= b <= 0x8F:
        return _unpack_payload(data, pos, "map", b & 0x0F)
    if b in (0xC0, 0xC2, 0xC3):
        return {0xC0: None, 0xC2: False, 0xC3: True}[b], pos
    if b not in _FIXED:
        raise ValueError(f"msgpack type 0x{b:02x} at offset {pos - 1} is not supported")
    fmt, kind = _FIXED[b]
    (n,) = struct.unpack_from(fmt, data, pos)
    pos += struct.calcsize(fmt)
    return (n, pos) if kind == "num" else _unpack_payload(data, pos, kind, n)


def _unpack_payload(data: bytes, pos: int, kind: str, n: int) -> tuple[Any, int]:
    if kind in ("str", "bin"):
        raw = data[pos : pos + n]
        return (raw.decode(errors="replace") if kind == "str" else bytes(raw)), pos + n
    if kind == "array":
        items = []
        for _ in range(n):
            item, pos = _unpack(data, pos)
            items.append(item)
        return items, pos
    mapping = {}
    for _ in range(n):
        key, pos = _unpack(data, pos)
        mapping[key], pos = _unpack(data, pos)
    return mapping, pos


# ---- kernels and their resources ---------------------------------------------------------------
def code_object_metadata(blob: bytes) -> dict[str, Any]:
    """The decoded NT_AMDGPU_METADATA map of a code object (code object v3 and later)."""
    for name, ntype, desc in elf_notes(blob):
        if name == "AMDGPU" and ntype == NT_AMDGPU_METADATA:
            return unpackb(desc)
    raise ValueError("the code object has no AMDGPU metadata note (code object v2?)")


def kernel_metadata(blob: bytes) -> dict[str, dict[str, Any]]:
    """Each kernel's metadata map, keyed by its mangled name (`.name`; `.symbol` adds `.kd`)."""
    kernels = code_object_metadata(blob).get("amdhsa.kernels", [])
    return {k.get(".name") or k[".symbol"].removesuffix(".kd"): k for k in kernels}


def resources_from_metadata(k: dict[str, Any]) -> KernelResources:
    return KernelResources(
        registers=k.get(".vgpr_count"),
        agprs=k.get(".agpr_count"),
        sgprs=k.get(".sgpr_count"),
        shared_bytes=k.get(".group_segment_fixed_size"),
        spill_bytes=k.get(".private_segment_fixed_size"),
        wavefront_size=k.get(".wavefront_size"),
    )


def resources_by_name(blob: bytes, lowered: dict[str, str]) -> dict[str, KernelResources]:
    """Resources of each name expression's kernel (`lowered`: name expression -> symbol)."""
    kernels = kernel_metadata(blob)
    return {
        n: resources_from_metadata(kernels[s]) if s in kernels else KernelResources()
        for n, s in lowered.items()
    }


# ---- name expression -> mangled symbol, through probe kernels ----------------------------------
def probe_source(names: Sequence[str]) -> str:
    """Text to append to a source: one empty probe kernel per name expression (index i)."""
    if not names:
        return ""
    lines = [
        "",
        "// ---- ikport: one probe per name expression, to find its mangled symbol",
        f"template <int I, auto F> __global__ void {PROBE_NAME}() {{}}",
    ]
    lines += [f"template __global__ void {PROBE_NAME}<{i}, &{n}>();" for i, n in enumerate(names)]
    return "\n".join(lines) + "\n"


_PROBE_INDEX = re.compile(rf"{PROBE_NAME}ILi(\d+)E")


def lowered_from_probes(blob: bytes, names: Sequence[str]) -> dict[str, str]:
    """Name expression -> mangled kernel symbol, read from the probes of `probe_source(names)`.
    A probe's symbol embeds its kernel's symbol (`..._probeILi0EXadL<symbol>EEEvv`): the
    longest kernel symbol found inside the probe's is the one."""
    symbols = list(kernel_metadata(blob))
    kernels = [s for s in symbols if PROBE_NAME not in s]
    lowered: dict[str, str] = {}
    for probe in symbols:
        m = _PROBE_INDEX.search(probe)
        if not m or int(m.group(1)) >= len(names):
            continue
        inside = [k for k in kernels if k in probe[m.end() :]]
        if inside:
            lowered[names[int(m.group(1))]] = max(inside, key=len)
    missing = [n for n in names if n not in lowered]
    if missing:
        raise RuntimeError(
            f"no kernel symbol found for name expression(s) {missing} in the code "
            f"object (kernels: {kernels})"
        )
    return lowered
