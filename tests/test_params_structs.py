"""Every by-value kernel parameter struct in ikport/kernels.py mirrors its C declaration in
kernels_src/ field by field (name, order, width): a mismatch would hand a kernel shifted
arguments, and nothing else on a CPU machine would notice."""

from __future__ import annotations

import ctypes
import re

import pytest

from ikport.backends.source import KERNELS_DIR
from ikport.kernels import PARAMS_TYPES

C_TYPES = {"void*": ctypes.c_void_p, "float*": ctypes.c_void_p, "int*": ctypes.c_void_p,
           "unsigned int*": ctypes.c_void_p, "long long": ctypes.c_int64, "int": ctypes.c_int32,
           "float": ctypes.c_float}


def c_struct_fields(source: str, name: str) -> list[tuple[str, type]]:
    """(field, ctypes type) of `struct name { ... };` in a kernel source, in declaration order."""
    body = re.sub(r"//[^\n]*", "", source)  # comments first: they may hold braces and semicolons
    body = body[body.index(f"struct {name} {{"):]
    body = body[body.index("{") + 1:body.index("};")]
    fields = []
    for decl in body.split(";"):
        decl = " ".join(decl.replace("const ", "").split())
        if not decl:
            continue
        ctype, names = re.match(r"((?:unsigned )?(?:long long|int|float|void)\*?) (.*)", decl).groups()
        fields += [(n.strip(), C_TYPES[ctype]) for n in names.split(",")]
    return fields


@pytest.mark.parametrize("struct,source", [("DecodeParams", "attention/common.cuh"),
                                           ("PrefillParams", "attention/prefill.cuh"),
                                           ("W4A16Params", "w4a16.cuh"), ("MmaTileParams", "mma_tile.cuh"),
                                           ("KvAppendParams", "kv_append.cuh"), ("ReadPassParams", "read_pass.cuh")])
def test_params_structs_mirror_the_kernels(struct, source):
    c_fields = c_struct_fields((KERNELS_DIR / source).read_text(), struct)
    assert [(n, t) for n, t in PARAMS_TYPES[struct]._fields_] == c_fields
