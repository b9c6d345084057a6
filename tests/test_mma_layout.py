"""The matrix shim's fragment layouts, checked on the CPU against the vendors' own tables.

portability/mma_layout.cuh says, per instruction, which tile element each lane holds in each
fragment slot; the kernels load and store fragments with exactly those functions. Here a small host
C++ driver (g++, no GPU headers) includes that header unchanged and prints every (lane, slot) ->
(row, col) of A, B and C. The result must equal, element for element:

- on gfx90a, gfx942 and gfx1100: AMD's matrix instruction calculator tables
  (tests/data/amd-matrix-layouts.json, provenance in tests/data/README.md), for every instruction
  the shim emits there: the fp16 and bf16 16x16x16 MFMA/WMMA. The tables' 32x32x8 MFMA entries are
  not tested: the shim never emits them;
- on NVIDIA: the PTX ISA's fragment layout of mma.m16n8k16 (f16/bf16 inputs, f32 accumulators),
  written below from the ISA's formulas. (The H100 run of test_matrix_shim_tile_product executes
  that one for real.)

Which layout struct a target uses is read from the shim itself: the preprocessor runs
vendor_hip.cuh / vendor_cuda.cuh for the target and mma.cuh for the macro they define.
Slot numbering (mma_layout.cuh): slot s is the s-th 16-bit element (A, B) or the s-th fp32 (C)
a lane holds, so a 16-bit element in VGPR v, bits lo..hi is slot 2v + (lo == 16), and fp32 D in
VGPR v is slot v.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ikport.backends.target import Target

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "portability"
TABLES = Path(__file__).resolve().parent / "data" / "amd-matrix-layouts.json"
AMD_TARGETS = ["gfx90a", "gfx942", "gfx1100"]
SHIM_SHAPE = "16x16x16"  # the only MFMA/WMMA shape mma.cuh emits

DRIVER = r"""
#include <cstdio>
#include "mma_layout.cuh"

using Fn = int (*)(int, int);

static void operand(const char* key, int lanes, int slots, Fn row, Fn col) {
  std::printf("\"%s\": [", key);
  for (int l = 0; l < lanes; ++l)
    for (int s = 0; s < slots; ++s)
      std::printf("%s[%d, %d, %d, %d]", l || s ? ", " : "", l, s, row(l, s), col(l, s));
  std::printf("]");
}

template <class L>
static void layout(const char* name, const char* sep) {
  // The index math must be constexpr on the host as well: the kernels rely on it folding away.
  static_assert(L::c_row(L::kLanes - 1, L::kC - 1) < 16 && L::a_col(L::kLanes - 1, L::kA - 1) < 16);
  std::printf("\"%s\": {\"lanes\": %d, ", name, L::kLanes);
  operand("A", L::kLanes, L::kA, L::a_row, L::a_col);
  std::printf(", ");
  operand("B", L::kLanes, L::kB, L::b_row, L::b_col);
  std::printf(", ");
  operand("C", L::kLanes, L::kC, L::c_row, L::c_col);
  std::printf("}%s", sep);
}

int main() {
  std::printf("{");
  layout<ik::layout::NvM16n8k16x2>("NvM16n8k16x2", ", ");
  layout<ik::layout::AmdMfma16x16x16>("AmdMfma16x16x16", ", ");
  layout<ik::layout::AmdWmma16x16x16W32>("AmdWmma16x16x16W32", "");
  std::printf("}\n");
}
"""

Places = dict[tuple[int, int], tuple[int, int]]  # (lane, slot) -> (row, col)


def host_cxx() -> str | None:
    return next((c for c in ("g++", "c++", "clang++", "clang++-19") if shutil.which(c)), None)


CXX = host_cxx()
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler (g++ or clang++)")


def sh(args: list, **kw) -> str:
    """Run a command; on failure the assertion message carries its stderr (compiler errors)."""
    p = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, args))} failed:\n{p.stderr[-4000:]}"
    return p.stdout


def dump_layouts(include_dir: Path, workdir: Path) -> dict:
    """Build the driver against `include_dir`/mma_layout.cuh and return what it prints."""
    src, exe = workdir / "layout_dump.cpp", workdir / "layout_dump"
    src.write_text(DRIVER)
    sh([CXX, "-std=c++17", "-O0", "-Wall", "-Werror", f"-I{include_dir}", src, "-o", exe])
    return json.loads(sh([exe]))


def shim_places(dump: dict, struct: str, operand: str) -> Places:
    places = {}
    for lane, slot, row, col in dump[struct][operand]:
        places[lane, slot] = (row, col)
    return places


# ---- the references ----------------------------------------------------------------------------
def amd_places(instruction: dict, operand: str) -> Places:
    """AMD's table for one operand ("A", "B" or "D") as (lane, slot) -> (row, col)."""
    places: Places = {}
    for i, row in enumerate(instruction[operand]):
        for j, where in enumerate(row):
            for vgpr, lane, lo, hi in where:
                if operand == "D":
                    assert (lo, hi) == (0, 31), f"D[{i}][{j}] is not a whole fp32 VGPR: {where}"
                    slot = vgpr
                else:
                    assert (lo, hi) in ((0, 15), (16, 31)), f"{operand}[{i}][{j}]: {where}"
                    slot = 2 * vgpr + (lo == 16)
                assert (lane, slot) not in places, f"two elements in lane {lane} slot {slot}"
                places[lane, slot] = (i, j)
    return places


def ptx_m16n8k16() -> dict[str, Places]:
    """The PTX ISA's fragments of mma.sync.m16n8k16 with .f16/.bf16 A and B and .f32 C/D
    (section "Matrix Fragments for mma.m16n8k16 with floating point type"):
    groupID = laneid >> 2, threadID_in_group = laneid % 4;
      A (16x16) a0..a7: row = groupID for a0,a1,a4,a5, groupID + 8 for a2,a3,a6,a7;
                        col = threadID_in_group * 2 + (i & 1), + 8 for a4..a7
      B (16x8)  b0..b3: row = threadID_in_group * 2 + (i & 1), + 8 for b2,b3; col = groupID
      C (16x8)  c0..c3: row = groupID, + 8 for c2,c3; col = threadID_in_group * 2 + (i & 1)
    The shim puts two of them side by side (N = 16): B and C slot s belongs to the n8 half s // 4.
    """
    a: Places = {}
    b: Places = {}
    c: Places = {}
    for lane in range(32):
        group, tid = lane >> 2, lane % 4
        for i in range(8):
            row = group if i in (0, 1, 4, 5) else group + 8
            a[lane, i] = (row, tid * 2 + (i & 1) + (8 if i >= 4 else 0))
        for half in range(2):
            for i in range(4):
                b[lane, 4 * half + i] = (tid * 2 + (i & 1) + (8 if i >= 2 else 0), group + 8 * half)
                c[lane, 4 * half + i] = (group + (8 if i >= 2 else 0), tid * 2 + (i & 1) + 8 * half)
    return {"A": a, "B": b, "C": c}


def differences(expected: Places, got: Places) -> list[str]:
    """Every (lane, slot) where the shim and the reference disagree, readable."""
    out = []
    for key in sorted(expected.keys() | got.keys()):
        e, g = expected.get(key), got.get(key)
        if e != g:
            out.append(f"lane {key[0]} slot {key[1]}: reference {e}, shim {g}")
    return out


# ---- which layout the shim picks per target (read from the headers by the preprocessor) --------
def preprocess(header: Path, defines: list[str], include: list[Path], dump_macros: bool) -> str:
    args = [CXX, "-E", "-P", "-x", "c++", *defines, *(f"-I{d}" for d in include)]
    args += ["-dM"] if dump_macros else []
    return sh([*args, header])


def layout_struct_for(target: str, stub_dir: Path) -> str:
    """The ik::layout struct mma.cuh uses on `target`: the IK_MMA_* macro the vendor header
    defines for it, then mma.cuh's `using Layout = ...` under that macro."""
    if target.startswith("gfx"):  # hipRTC mode: vendor_hip.cuh includes nothing
        hiprtc = ["-D__HIPCC_RTC__", f"-D__{target}__"]  # + the backend's -D facts, as it compiles
        hiprtc += [f"-D{k}={v}" for k, v in Target(target).defines().items()]
        macros = preprocess(SHIM / "vendor_hip.cuh", hiprtc, [], True)
    else:  # the CUDA headers are not needed to see the macros: empty stand-ins
        macros = preprocess(SHIM / "vendor_cuda.cuh", [], [stub_dir], True)
    selected = re.findall(r"#define (IK_MMA_\w+) 1", macros)
    assert len(selected) == 1, f"{target}: expected one IK_MMA_* macro, found {selected}"
    text = preprocess(SHIM / "mma.cuh", [f"-D{selected[0]}=1", "-DIK_WARP_SIZE=0"], [], False)
    return re.search(r"using Layout = layout::(\w+);", text).group(1)


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> dict:
    return dump_layouts(SHIM, tmp_path_factory.mktemp("layout"))


@pytest.fixture(scope="module")
def structs(tmp_path_factory) -> dict[str, str]:
    stubs = tmp_path_factory.mktemp("cuda-stubs")
    for h in ("cuda_fp16.h", "cuda_bf16.h"):
        (stubs / h).write_text("")
    return {t: layout_struct_for(t, stubs) for t in [*AMD_TARGETS, "sm_90"]}


@pytest.fixture(scope="module")
def tables() -> dict:
    return json.loads(TABLES.read_text())


def shim_instructions(tables: dict, target: str) -> dict[str, dict]:
    """The table's instructions on `target` the shim can emit: fp16 and bf16 16x16x16."""
    found = {name: ins for name, ins in tables["layouts"][target].items() if SHIM_SHAPE in name}
    assert sorted("bf16" in n for n in found) == [False, True], f"{target}: {sorted(found)}"
    return found


def check_against_amd(shim: dict, struct: str, instruction: dict) -> dict[str, list[str]]:
    """Per operand, every disagreement between the shim's struct and AMD's table."""
    assert shim[struct]["lanes"] == instruction["wave"], "the struct assumes another wave size"
    shim_name = {"A": "A", "B": "B", "D": "C"}
    return {op: differences(amd_places(instruction, op), shim_places(shim, struct, shim_name[op]))
            for op in ("A", "B", "D")}


# ---- the tests ---------------------------------------------------------------------------------
def test_tables_have_provenance_and_every_target(tables):
    assert "amd_matrix_instruction_calculator" in tables["source"]
    assert set(AMD_TARGETS) <= set(tables["layouts"])


def test_each_target_uses_the_expected_layout(structs):
    assert structs == {"gfx90a": "AmdMfma16x16x16", "gfx942": "AmdMfma16x16x16",
                       "gfx1100": "AmdWmma16x16x16W32", "sm_90": "NvM16n8k16x2"}


@pytest.mark.parametrize("target", AMD_TARGETS)
def test_amd_fragments_match_amd_tables(shim, structs, tables, target):
    """Every element of A, B and D is where AMD's calculator puts it (RDNA3: in both lane l and
    l + 16 for A and B), for the fp16 and the bf16 instruction."""
    for name, instruction in shim_instructions(tables, target).items():
        bad = check_against_amd(shim, structs[target], instruction)
        for op, diffs in bad.items():
            shown = "; ".join(diffs[:6])
            assert not diffs, f"{target} {name} {op}: {len(diffs)} misplaced: {shown}"


def test_nvidia_fragments_match_the_ptx_isa(shim, structs):
    ptx = ptx_m16n8k16()
    for op in ("A", "B", "C"):
        diffs = differences(ptx[op], shim_places(shim, structs["sm_90"], op))
        assert not diffs, f"mma.m16n8k16 {op}: " + "; ".join(diffs[:6])


def test_every_tile_element_is_held_somewhere(shim):
    """A complete fragment: each of the 256 elements of A, B and C has a (lane, slot)."""
    for struct, d in shim.items():
        for op in ("A", "B", "C"):
            cells = {(r, c) for _, _, r, c in d[op]}
            assert cells == {(r, c) for r in range(16) for c in range(16)}, (struct, op)


def test_comparison_catches_one_moved_element(tables):
    """The comparison itself: swap two D elements of AMD's table and it disagrees in two places."""
    original = tables["layouts"]["gfx942"]["v_mfma_f32_16x16x16_f16"]
    moved = json.loads(json.dumps(original))
    d = moved["D"]
    d[5][3], d[5][4] = d[5][4], d[5][3]
    assert len(differences(amd_places(original, "D"), amd_places(moved, "D"))) == 2


def test_a_wrong_accumulator_formula_is_caught(tmp_path, tables, shim):
    """Mutation: gfx942's accumulator rows computed with gfx1100's c_row formula must fail the
    comparison (and only D: A and B are untouched)."""
    src = (SHIM / "mma_layout.cuh").read_text()
    c_row = r"static constexpr IK_HD int c_row\(int l, int s\) \{[^}]*\}"
    mfma = re.search(r"struct AmdMfma16x16x16 \{.*?\n\};", src, re.DOTALL).group(0)
    wmma = re.search(r"struct AmdWmma16x16x16W32 \{.*?\n\};", src, re.DOTALL).group(0)
    wrong = re.sub(c_row, lambda _: re.search(c_row, wmma).group(0), mfma)
    assert wrong != mfma, "the mutation did not change the MFMA struct"
    (tmp_path / "mma_layout.cuh").write_text(src.replace(mfma, wrong))
    mutant = dump_layouts(tmp_path, tmp_path)

    assert mutant["AmdMfma16x16x16"]["C"] != shim["AmdMfma16x16x16"]["C"]
    for target in ("gfx90a", "gfx942"):
        for name, instruction in shim_instructions(tables, target).items():
            bad = check_against_amd(mutant, "AmdMfma16x16x16", instruction)
            assert not bad["A"] and not bad["B"], (target, name)
            assert len(bad["D"]) > 200, f"{target} {name}: the wrong c_row was not caught"
