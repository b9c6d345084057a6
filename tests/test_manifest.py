"""The manifest: specs, URIs, name expressions, and refusals (CPU)."""

import pytest

from ikport import manifest


def test_spec_name_expression_and_uri():
    s = manifest.spec("attention_decode", "split", dtype="bf16", head_dim=96, rows=4, paged=True, threads=128,
                      unroll=4, stages=3)
    assert s.name_expr == "attn_decode_split<ik::bf16_t, 96, 4, true, 128, 4, 3>"
    assert s.uri == "attention_decode.split[dtype=bf16,head_dim=96,rows=4,paged=true,threads=128,unroll=4,stages=3]"
    assert s.params_type == "DecodeParams" and s.source_file == "attention_decode.cuh"


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
    assert {s.family for s in specs} == {"attention_decode", "mma_tile", "w4a16"}
