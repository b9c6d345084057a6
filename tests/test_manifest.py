"""The manifest: specs, URIs, name expressions, and refusals (CPU)."""

import pytest

from ikport import manifest


def test_spec_name_expression_and_uri():
    s = manifest.spec("attention_decode", "split", dtype="bf16", head_dim=96, rows=4, paged=True, threads=128,
                      unroll=4, stages=3, loader="dense")
    assert s.name_expr == "attn_decode_split<ik::bf16_t, 96, 4, true, 128, 4, 3, decode::DenseLoader>"
    assert s.uri == ("attention_decode.split[dtype=bf16,head_dim=96,rows=4,paged=true,threads=128,unroll=4,stages=3,"
                     "loader=dense]")
    assert s.params_type == "DecodeParams" and s.source_file == "attention/decode.cuh"


def test_family_defaults_fill_parameters_left_out():
    """`loader` (the split kernels' KV loader) defaults to dense: call sites written before it
    existed get the same kernel, and their URIs name it."""
    kw = dict(dtype="fp16", head_dim=128, rows=4, paged=False, threads=64, stages=2)
    s = manifest.spec("attention_decode", "split_mma", **kw)
    assert s == manifest.spec("attention_decode", "split_mma", **kw, loader="dense")
    assert dict(s.params)["loader"] == "dense" and s.uri.endswith(",loader=dense]")
    # a kernel without the parameter takes no default for it
    assert "loader" not in dict(manifest.spec("attention_decode", "combine", dtype="fp16", head_dim=128).params)
    # every default is an allowed value of a parameter some kernel of its family takes
    for fam, info in manifest.load()["families"].items():
        for name, value in info.get("defaults", {}).items():
            assert any(name in k["template"] for k in info["kernels"].values()), (fam, name)
            assert value in info["allowed"][name], (fam, name, value)


def test_string_values_map_to_cpp_names_through_the_manifest():
    assert manifest.cpp_name("attention_decode", "loader", "dense") == "decode::DenseLoader"
    assert manifest.cpp_name("attention_decode", "loader", "int8") == "decode::Int8Loader"
    assert manifest.cpp_name("w4a16", "dtype", "bf16") == "ik::bf16_t"  # the manifest-wide names
    with pytest.raises(ValueError, match="loader='int4'"):
        manifest.cpp_name("attention_decode", "loader", "int4")
    # every allowed string value has a C++ name
    for fam, info in manifest.load()["families"].items():
        for name, rule in info["allowed"].items():
            for value in rule if isinstance(rule, list) else []:
                if isinstance(value, str):
                    assert manifest.cpp_name(fam, name, value)


def test_manifest_refuses_a_loader_it_does_not_allow():
    with pytest.raises(ValueError, match="loader='int4'"):
        manifest.spec("attention_decode", "split", dtype="fp16", head_dim=128, rows=4, paged=False, threads=128,
                      unroll=2, stages=2, loader="int4")


@pytest.mark.parametrize("kw,match", [
    (dict(dtype="fp32", head_dim=128), "dtype='fp32'"),
    (dict(dtype="fp16", head_dim=72), "head_dim=72"),
    (dict(dtype="fp16", head_dim=272), "head_dim=272"),
    (dict(dtype="fp16"), "takes template parameters"),
])
def test_manifest_refuses(kw, match):
    with pytest.raises(ValueError, match=match):
        manifest.spec("attention_decode", "naive", **kw)


def test_default_instantiations_are_unique_and_allowed():
    specs = list(manifest.default_instantiations())
    assert len(specs) == len({s.uri for s in specs}) >= 30
    assert {s.family for s in specs} == {"attention_decode", "attention_prefill", "kv_append", "mma_tile",
                                         "read_pass", "w4a16"}
