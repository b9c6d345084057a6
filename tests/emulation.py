"""Building kernels for the block emulator (tests/emu/block_emu.hpp): shared by
test_decode_emulation.py and test_w4a16_emulation.py."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ikport.toolchain import default_jobs

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "emu"
KERNELS = ROOT / "kernels_src"
GXX = next((c for c in ("g++", "clang++", "clang++-19") if shutil.which(c)), None)
CLANG = next((c for c in ("clang++-19", "clang++") if shutil.which(c)), None)  # ext_vector_type
_ALIGNED = r"(?:__attribute__\(\(aligned\(\d+\)\)\)\s+)?"


def emulated_source(text: str) -> str:
    """A kernel text with each `__shared__` declaration made a per-block emulator call: the
    dynamic array a pointer, each static array a reference to an array of the same type."""
    text = re.sub(rf"extern __shared__\s+{_ALIGNED}([\w:][\w:\s]*?)\s+(\w+)\[\];",
                  r"\1* \2 = emu::dynamic_smem<\1>();", text)
    text = re.sub(rf"__shared__\s+{_ALIGNED}([\w:][\w:\s]*?)\s+(\w+)((?:\[[^\]]+\])+);",
                  r'auto& \2 = *emu::static_smem<\1\3>("\2");', text)
    assert "__shared__" not in text, "a __shared__ declaration the emulator cannot place"
    return text


def compile_library(kernels: list[Path], main: str, defines: dict[str, object], out: Path,
                    cxx: str) -> Path:
    """tests/emu/`main` with the kernel files `kernels` (rewritten by emulated_source, at their
    paths under kernels_src/, so `main` includes e.g. "attention/decode.cuh") as the shared
    library `out`."""
    src = out.parent / f"{out.stem}-src"
    for kernel in kernels:
        dest = src / kernel.relative_to(KERNELS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(emulated_source(kernel.read_text()))
    # (-fno-gnu-unique: each build keeps its own emulator state, though several share the process)
    args = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
            "-Wno-unused-variable", "-Wno-unused-but-set-variable", "-Wno-psabi",
            *(["-fno-gnu-unique"] if Path(cxx).name.startswith("g++") else []),
            *[f"-D{k}={v}" for k, v in defines.items()],
            f"-I{src}", f"-I{EMU}", f"-I{ROOT / 'portability'}", EMU / main, "-o", out]
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return out


def build(kernels: list[Path], main: str, defines: dict[str, object], out: Path,
          cxx: str) -> ctypes.CDLL:
    return ctypes.CDLL(str(compile_library(kernels, main, defines, out, cxx)))


def compile_libraries(builds: list[tuple]) -> list[Path]:
    """compile_library(*b) for each of `builds`, several at once (compilers are child processes)."""
    with ThreadPoolExecutor(max_workers=default_jobs()) as pool:
        return list(pool.map(lambda b: compile_library(*b), builds))


def selected_params(request, name: str) -> set:
    """The values of parameter `name` in the tests of the requesting fixture's module that this
    run selected (what a module fixture must build)."""
    values = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is request.module and name in params:
            values.add(params[name])
    return values


def poison_cache(cache, g) -> None:
    """What a kernel must not read of an ikport.KVCache (run the oracle on the clean cache first):
    int8, the scales past each sequence's length NaN (K) and inf (V); kivi4, the V pairs past each
    length and the residual's rows past it NaN, the K codes at or past the quantized length
    random."""
    import torch

    nan, page, table = float("nan"), cache.page_size, cache.block_table
    Hkv, D = cache.kv_heads, cache.head_dim
    for b, n in enumerate(cache.lens.tolist()):
        past = torch.arange(n, cache.capacity)
        at = (table[b, past // page].long(), slice(None), past % page) if page else (b, slice(None), past)
        if cache.kv_format == "int8":
            cache.k_scale[at] = nan
            cache.v_scale[at] = float("inf")
            continue
        G = cache.kivi_group
        cache.k_resid[b, :, n % G:] = nan
        cache.v_scale[at] = nan
        stale = torch.arange(n // G * G, cache.capacity)
        codes = torch.randint(0, 256, (len(stale), Hkv, D // 2), generator=g, dtype=torch.uint8)
        if page:
            cache.k[table[b, stale // page].long(), :, stale % page] = codes
        else:
            cache.k[b, :, stale] = codes.transpose(0, 1)


# ---- compressed caches the emulator suites fill ----------------------------------------------------
def shuffled_table(g: torch.Generator, batch: int, length: int, page: int) -> torch.Tensor | None:
    """A block table [batch, ceil(length / page)] of shuffled page ids, or None where page is 0."""
    if not page:
        return None
    per_seq = -(-length // page)
    return torch.randperm(batch * per_seq, generator=g).to(torch.int32).view(batch, per_seq)


def outlier_rows(g: torch.Generator, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """rows(n) -> (k, v), [batch, kv_heads, n, head_dim] in `dtype`: K with persistent per-channel
    outliers (a tenth of the channels about 4x) and offsets, as KIVI found keys to have; V plain."""
    channel = 1 + 3 * (torch.rand(head_dim, generator=g) < 0.1) + torch.rand(head_dim, generator=g)
    offset = torch.randn(head_dim, generator=g)

    def rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.randn(batch, kv_heads, n, head_dim, generator=g) * channel + offset
        return k.to(dtype), torch.randn(batch, kv_heads, n, head_dim, generator=g).to(dtype)
    return rows
