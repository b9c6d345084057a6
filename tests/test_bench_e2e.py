"""CPU tests of the end-to-end benchmark's plumbing: the workloads and their ids, the model builder
(no initializers, random weights), and the area run whole at a toy size on the CPU (the ikport rows
through the reference path, eager), writing its JSON. Skipped without transformers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from ikport import kvquant  # noqa: E402
from ikport.bench import __main__ as bench_main  # noqa: E402
from ikport.bench import e2e  # noqa: E402


def test_workloads_match_the_protocol():
    assert {w: (x.batch, x.prompt, x.new) for w, x in e2e.WORKLOADS.items()} == {
        "E1": (16, 512, 512), "E1b": (1, 512, 512), "E2": (8, 8192, 256)}
    assert e2e.workload_id(e2e.WORKLOADS["E1"], 32, 512) == "E1"
    assert e2e.workload_id(e2e.WORKLOADS["E1"], 4, 64) == "E1-L4-new64"


def test_implementations_and_kivi(monkeypatch):
    names = e2e.all_impls()
    assert names[:3] == ["hf-eager", "hf-sdpa", "hf-static"] and "ikport" in names and "ikport-w4a16" in names
    if e2e.kivi_format() is None:
        assert not any("kivi" in n for n in names)
    monkeypatch.setattr(kvquant, "KV_FORMATS", (*kvquant.KV_FORMATS, "kivi4"))
    assert e2e.kivi_format() == "kivi4"
    assert {"ikport-kivi", "ikport-w4a16-kivi"} <= set(e2e.all_impls())


def test_llama3_8b_config_shape():
    c = e2e.llama3_8b_config()
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.vocab_size) == (32, 4096, 14336, 32, 8, 128, 128256)
    assert c.max_position_embeddings >= 8192 + 256 and not c.tie_word_embeddings


def test_build_model_draws_random_weights_without_initializers():
    model = e2e.build_model(e2e.tiny_config(1), torch.bfloat16, torch.device("cpu"))
    assert model.dtype == torch.bfloat16 and model.generation_config.eos_token_id is None
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025 and abs(w.mean().item()) < 0.005
    assert torch.equal(model.model.norm.weight.float(), torch.ones(128))


def test_leading_match():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = a.clone()
    assert e2e.leading_match(a, b) == 4
    b[1, 2] = 0
    assert e2e.leading_match(a, b) == 2


def test_the_area_runs_at_a_toy_size(tmp_path):
    out = tmp_path / "e2e.json"
    impls = "hf-sdpa,hf-static,ikport,ikport-int8,ikport-w4a16"
    code = bench_main.main(["e2e", "--device", "cpu", "--tiny", "--layers", "1", "--workloads", "E1b",
                            "--new-tokens", "3", "--impls", impls, "--out", str(out), "--no-plot"])
    assert code == 0
    doc = json.loads(out.read_text())
    assert {"device", "commit", "date", "versions", "command", "results"} <= set(doc)
    assert doc["device"] == "cpu" and doc["versions"]["transformers"] and doc["errors"] == []
    rows = {r["impl"]: r for r in doc["results"]}
    assert list(rows) == impls.split(",")
    for r in rows.values():
        assert r["workload"] == "E1b-L1-new3" and r["tok_s"] > 0 and r["ttft_ms"] > 0 and r["peak_GB"] is None
        assert (r["batch"], r["prompt"], r["new_tokens"]) == (1, 512, 3)
    # fp32 reference arithmetic on the CPU is not at work here (bf16), but hf-static and sdpa agree,
    # and ikport's dense cache reads what sdpa reads
    assert rows["hf-static"]["match_hf-sdpa"] == 3
    assert rows["ikport"]["decode_ms_per_step"] > 0 and "match_hf-sdpa" in rows["ikport"]
    assert doc["model"]["w4a16_quantize_s"] is not None


def test_merge_keeps_the_rows_a_run_does_not_redo(tmp_path):
    out = tmp_path / "e2e.json"
    common = ["e2e", "--device", "cpu", "--tiny", "--layers", "1", "--workloads", "E1b", "--new-tokens", "2",
              "--out", str(out), "--no-plot"]
    assert bench_main.main([*common, "--impls", "hf-sdpa,ikport"]) == 0
    first = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert bench_main.main([*common, "--impls", "ikport", "--merge"]) == 0
    doc = json.loads(out.read_text())
    assert [r["impl"] for r in doc["results"]] == ["hf-sdpa", "ikport"]
    assert doc["results"][0] == first["hf-sdpa"] and len(doc["merged"]) == 1


def test_largest_batch_doubles_then_bisects(monkeypatch):
    tried = []

    def fits(model, kv_format, batch, context, device):
        tried.append(batch)
        return batch <= 37
    monkeypatch.setattr(e2e, "fits", fits)
    assert e2e.largest_batch(None, "dense", 1024, torch.device("cpu")) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and len(tried) <= 13
    monkeypatch.setattr(e2e, "fits", lambda *a: False)
    assert e2e.largest_batch(None, "dense", 1024, torch.device("cpu")) == 0


def test_fits_runs_a_decode_step_over_full_caches_on_the_cpu():
    model = e2e.build_model(e2e.tiny_config(2, max_positions=256), torch.float32, torch.device("cpu"))
    model.set_attn_implementation("ikport")
    assert e2e.fits(model, "dense", 2, 128, torch.device("cpu"))
