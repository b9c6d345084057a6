"""portability/warp.cuh executed on the CPU with 32 and 64 lanes, checked against numpy.

tests/emu/wave_main.cpp includes the real warp.cuh, unchanged, after tests/emu/wave_emu.hpp, a
host stand-in for the ik::vendor layer: one std::thread per lane, shuffles and ballots through a
shared array between barrier phases. So lane ids, xor-shuffles, broadcasts, the group/warp sum and
max butterflies and ballot/any run the shim's own code for each wave configuration of
backends/target.py's ARCH_TABLE: NVIDIA (32 lanes, 32-bit ballot), RDNA3 gfx1100 (32 lanes, 64-bit
ballot) and CDNA gfx90a/gfx942 (64 lanes, 64-bit ballot). The ballot type is the one the vendor
header declares. Inputs are random (numpy); sums are held to fp32 rounding, everything else
exactly.

What this does not cover: the vendor intrinsics themselves (__shfl_xor, ds_bpermute, ...), which
only run on the GPUs (nox -s test-cuda / test-hip).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ikport.backends.target import ARCH_TABLE

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "portability"
EMU = Path(__file__).resolve().parent / "emu"
VENDOR_HEADER = {"cuda": SHIM / "vendor_cuda.cuh", "hip": SHIM / "vendor_hip.cuh"}
TRIALS = 12


def host_cxx() -> str | None:
    return next((c for c in ("g++", "c++", "clang++", "clang++-19") if shutil.which(c)), None)


CXX = host_cxx()
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++ or clang++)")


def wave_configs() -> dict[str, tuple[str, int]]:
    """One emulator build per (vendor, wave size) in ARCH_TABLE, named after its targets."""
    by_kind: dict[tuple[str, int], list[str]] = {}
    for arch, facts in ARCH_TABLE.items():
        by_kind.setdefault((facts.vendor, facts.warp_size), []).append(arch)
    return {f"{v}-wave{w}[{','.join(archs)}]": (v, w) for (v, w), archs in sorted(by_kind.items())}


CONFIGS = wave_configs()


def lane_mask_type(vendor: str) -> str:
    """The ballot type `vendor`'s header declares (the emulator must use the same one)."""
    text = VENDOR_HEADER[vendor].read_text()
    return re.search(r"using lane_mask_t = ([^;]+);", text).group(1)


def sh(args: list, **kw) -> str:
    """Run a command; on failure the assertion message carries its stderr (compiler errors)."""
    p = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, args))} failed:\n{p.stderr[-4000:]}"
    return p.stdout


def build(vendor: str, wave: int, warp_dir: Path, out: Path) -> Path:
    """The emulator for one configuration, with warp.cuh taken from `warp_dir`."""
    sh(
        [CXX, "-std=c++20", "-O2", "-pthread", "-Wall", "-Wextra", "-Werror",
         "-Wno-unknown-pragmas",  # warp.cuh's #pragma unroll
         f"-DIK_WARP_SIZE={wave}", f"-DEMU_LANE_MASK_T={lane_mask_type(vendor)}",
         f"-I{warp_dir}", f"-I{EMU}", EMU / "wave_main.cpp", "-o", out]
    )
    return out


def make_trials(wave: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    trials = []
    for k in range(TRIALS):
        x = (rng.standard_normal(wave) * 10.0 ** rng.integers(-2, 3)).astype(np.float32)
        p = rng.random(wave) < rng.choice([0.05, 0.5, 0.95])
        if k == 0:  # all negative (a max that starts at 0 fails), no predicate set
            x, p = -np.abs(x) - 1, np.zeros(wave, bool)
        if k == 1:  # only the last lane: bit wave-1 of the ballot
            p = np.arange(wave) == wave - 1
        if k == 2:
            p = np.ones(wave, bool)
        trials.append({"x": x, "n": rng.integers(-10**6, 10**6, wave), "p": p,
                       "src": int(rng.integers(0, wave)), "warp_index": int(rng.integers(0, 4))})
    return trials


def run(exe: Path, trials: list[dict]) -> list[dict[str, list[str]]]:
    lines = [str(len(trials))]
    for t in trials:
        lines.append(f"{t['src']} {t['warp_index']}")
        lines += [f"{x:.9g} {n} {int(p)}" for x, n, p in zip(t["x"].tolist(), t["n"], t["p"])]
    text = sh([exe], input="\n".join(lines) + "\n", timeout=120)
    results, current = [], {}
    for line in text.splitlines():
        if line == "end":
            results.append(current)
            current = {}
        else:
            name, *values = line.split()
            current[name] = values
    return results


def floats(v: list[str]) -> np.ndarray:
    return np.array([float(s) for s in v], np.float64).astype(np.float32)


def ints(v: list[str]) -> np.ndarray:
    return np.array([int(s) for s in v], np.int64)


def check(trials: list[dict], results: list[dict], vendor: str, wave: int) -> list[str]:
    """Every disagreement between the emulated shim and numpy, one line each."""
    bad: list[str] = []
    lane = np.arange(wave)

    def expect(k: int, name: str, ok: np.ndarray, got, want) -> None:
        if not np.all(ok):
            i = np.flatnonzero(~np.asarray(ok))[:4]
            bad.append(f"trial {k} {name}: lanes {i.tolist()} got {np.asarray(got)[i].tolist()} "
                       f"want {np.asarray(want)[i].tolist()}")

    assert len(results) == len(trials), "the emulator lost trials"
    for k, (t, r) in enumerate(zip(trials, results)):
        x, x64 = t["x"], t["x"].astype(np.float64)
        expect(k, "lane_id", ints(r["lane_id"]) == lane, ints(r["lane_id"]), lane)
        warp = np.full(wave, t["warp_index"])
        expect(k, "warp_id", ints(r["warp_id"]) == warp, ints(r["warp_id"]), warp)
        widths = [1 << i for i in range(wave.bit_length())]
        assert {f"group_sum_{g}" for g in widths} <= set(r), sorted(r)
        for g in widths:
            groups = x64.reshape(-1, g)
            want = np.repeat(groups.sum(1), g)
            tol = np.repeat(np.abs(groups).sum(1), g) * 1e-6 + 1e-30  # fp32 butterfly rounding
            got = floats(r[f"group_sum_{g}"])
            expect(k, f"group_sum<{g}>", np.abs(got - want) <= tol, got, want)
            # The butterfly leaves the bit-identical result in every lane of the group.
            first = np.repeat(got.reshape(-1, g)[:, 0], g)
            expect(k, f"group_sum<{g}> lanes agree", got == first, got, first)
            want = np.repeat(x.reshape(-1, g).max(1), g)
            got = floats(r[f"group_max_{g}"])
            expect(k, f"group_max<{g}>", got == want, got, want)
        got, want = floats(r["warp_sum"]), np.full(wave, x64.sum())
        expect(k, "warp_sum", np.abs(got - want) <= np.abs(x64).sum() * 1e-6 + 1e-30, got, want)
        got, want = floats(r["warp_max"]), np.full(wave, x.max())
        expect(k, "warp_max", got == want, got, want)
        for m in (1 << i for i in range(wave.bit_length() - 1)):
            got, want = floats(r[f"shfl_xor_f_{m}"]), x[lane ^ m]
            expect(k, f"shfl_xor(float, {m})", got == want, got, want)
            got, want = ints(r[f"shfl_xor_i_{m}"]), t["n"][lane ^ m]
            expect(k, f"shfl_xor(int, {m})", got == want, got, want)
        for w in widths:
            src = lane // w * w + t["src"] % w
            got, want = floats(r[f"broadcast_f_{w}"]), x[src]
            expect(k, f"broadcast(float, width {w})", got == want, got, want)
            got, want = ints(r[f"broadcast_i_{w}"]), t["n"][src]
            expect(k, f"broadcast(int, width {w})", got == want, got, want)
        mask = sum(1 << i for i in range(wave) if t["p"][i])
        got = [int(s) for s in r["ballot"]]
        expect(k, "ballot", np.array([g == mask for g in got]), got, [mask] * wave)
        any_ = np.full(wave, int(t["p"].any()))
        expect(k, "any", ints(r["any"]) == any_, ints(r["any"]), any_)
        want_bytes = 4 if vendor == "cuda" else 8  # __ballot_sync is 32-bit; HIP's __ballot 64-bit
        expect(k, "sizeof(lane_mask_t)", ints(r["mask_bytes"]) == want_bytes, ints(r["mask_bytes"]),
               [want_bytes] * wave)
    return bad


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wave-emu")
    return {name: build(v, w, SHIM, out / f"emu-{v}-{w}") for name, (v, w) in CONFIGS.items()}


def test_every_wave_size_is_covered():
    assert {w for _, w in CONFIGS.values()} == {32, 64}
    assert {"cuda", "hip"} == {v for v, _ in CONFIGS.values()}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_warp_shim_on_emulated_wave(builds, config):
    vendor, wave = CONFIGS[config]
    trials = make_trials(wave, seed=wave + len(vendor))
    bad = check(trials, run(builds[config], trials), vendor, wave)
    assert not bad, f"{config}: {len(bad)} wrong results, e.g.\n" + "\n".join(bad[:10])


@pytest.mark.slow
def test_a_reduction_that_stops_at_32_lanes_is_caught(tmp_path):
    """Mutation: warp.cuh's butterflies start at 16 when WIDTH is 64 (code written for 32
    lanes). The wave64 emulation must fail group_sum<64>, group_max<64>, warp_sum and warp_max;
    the wave32 ones cannot see it."""
    src = (SHIM / "warp.cuh").read_text()
    loop = "for (int o = WIDTH / 2; o > 0; o /= 2)"
    assert src.count(loop) == 2, "warp.cuh's reduction loops changed: update this mutation"
    stops_at_32 = "for (int o = (WIDTH > 32 ? 16 : WIDTH / 2); o > 0; o /= 2)"
    (tmp_path / "warp.cuh").write_text(src.replace(loop, stops_at_32))
    for name, (vendor, wave) in CONFIGS.items():
        trials = make_trials(wave, seed=7)
        mutant = build(vendor, wave, tmp_path, tmp_path / f"mutant-{wave}-{vendor}")
        bad = check(trials, run(mutant, trials), vendor, wave)
        if wave == 64:
            caught = {b.split(":")[0].split(" ", 2)[2] for b in bad}
            assert {"group_sum<64>", "group_max<64>", "warp_sum", "warp_max"} <= caught, caught
        else:
            assert not bad, (name, bad[:3])
