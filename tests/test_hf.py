"""ikport inside Hugging Face transformers, on the CPU (ikport's reference path): the "ikport"
attention and mask functions against transformers' sdpa, the IkportCache through `generate()`
(fp32: the same tokens as vanilla, logits within fp32 rounding; int8: close), padding, the lean
`generate`, and the errors. A tiny random Llama built from its config: no downloads, seconds.
Skipped where transformers is not installed (`pip install -e .[transformers]`)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
ikhf = pytest.importorskip("ikport.integrations.transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

VOCAB, PROMPT, NEW = 256, 20, 10
# the forward's name for the cache: past_key_values (5.17), cache (later 5.x)
CACHE_KW = "past_key_values" if "past_key_values" in inspect.signature(LlamaForCausalLM.forward).parameters else "cache"


def tiny_config(**changes) -> LlamaConfig:
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    kw.update(changes)
    return LlamaConfig(**kw)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0, **changes) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**changes)).eval().to(dtype)
    model.generation_config.eos_token_id = None  # every run makes its max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_model()


def prompts(batch: int = 2, length: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, implementation: str, fn):
    """fn() with the model on `implementation`, restored afterwards."""
    before = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.set_attn_implementation(before)


def greedy(model, ids, implementation, new=NEW, **kwargs):
    def go():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values's new name past 5.17
            out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True, **kwargs)
        return out.sequences, torch.stack(out.logits, 1)
    return run(model, implementation, go)


# ---- the attention function ------------------------------------------------------------------------------------
@pytest.mark.parametrize("tq,length", [(9, 9), (1, 30), (3, 30), (130, 130)])
def test_attention_function_matches_sdpa(model, tq, length):
    """Prompt (Tq = L, causal; 130 > 128 query tokens: the prefill path), decode and a few tokens over
    a longer past (bottom-right causal), GQA 4/2, a non-default scale."""
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(tq)
    q = torch.randn(2, 4, tq, 16, generator=g)
    k, v = (torch.randn(2, 2, length, 16, generator=g) for _ in range(2))
    mask = None
    if tq != length:  # sdpa wants an explicit bottom-right mask here; ikport aligns causal that way itself
        mask = torch.ones(tq, length, dtype=torch.bool).tril(length - tq)[None, None].expand(2, 1, -1, -1)
    for scale in (None, 0.37):
        ours, weights = ikhf.attention_forward(attn, q, k, v, None, scaling=scale)
        theirs, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=scale, is_causal=mask is None)
        assert weights is None and ours.shape == theirs.shape == (2, tq, 4, 16)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


def test_forward_logits_match_sdpa(model):
    ids = prompts(3, 40)
    ref = run(model, "sdpa", lambda: model(ids, use_cache=False).logits)
    ours = run(model, "ikport", lambda: model(ids, use_cache=False).logits)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_prompt_matches_each_sequence_alone(model, side):
    """A padded batch through the ikport path: each sequence's logits (at its real tokens) equal that
    sequence run alone, as with sdpa."""
    lens = [12, 7, 12, 1]
    ids = prompts(4, 12, seed=3)
    mask = torch.zeros(4, 12, dtype=torch.int64)
    for b, n in enumerate(lens):
        if side == "left":
            mask[b, 12 - n:] = 1
        else:
            mask[b, :n] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = run(model, "ikport", lambda: model(ids, attention_mask=mask, position_ids=positions,
                                              use_cache=False).logits)
    for b, n in enumerate(lens):
        real = slice(12 - n, 12) if side == "left" else slice(0, n)
        alone = run(model, "sdpa", lambda: model(ids[b:b + 1, real], use_cache=False).logits)
        torch.testing.assert_close(ours[b:b + 1, real], alone, atol=1e-5, rtol=1e-5)


# ---- the Cache through generate() -----------------------------------------------------------------------------
def test_generate_with_the_cache_equals_vanilla(model):
    ids = prompts()
    want, want_logits = greedy(model, ids, "sdpa")
    eager, _ = greedy(model, ids, "eager")
    cache = ikhf.IkportCache(model, max_cache_len=64)
    got, got_logits = greedy(model, ids, "ikport", past_key_values=cache)
    assert torch.equal(got, want) and torch.equal(eager, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == PROMPT + NEW - 1  # the last token is not fed back
    assert [int(n) for n in cache.layers[1].kv.lens] == [PROMPT + NEW - 1] * 2
    # reset: the same cache again gives the same tokens
    cache.reset()
    again, _ = greedy(model, ids, "ikport", past_key_values=cache)
    assert torch.equal(again, want)


def test_generate_with_the_ikport_attention_and_a_dynamic_cache(model):
    """No IkportCache: generate() makes a DynamicCache and the decode kernels read its tensors."""
    ids = prompts(seed=5)
    want, want_logits = greedy(model, ids, "sdpa")
    got, got_logits = greedy(model, ids, "ikport")
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)


def test_generate_left_padded_batch(model):
    ids = prompts(3, 16, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :15] = 0
    ids = ids.masked_fill(mask == 0, 0)
    want, want_logits = greedy(model, ids, "sdpa", attention_mask=mask)
    cache = ikhf.IkportCache(model, max_cache_len=40)
    got, got_logits = greedy(model, ids, "ikport", attention_mask=mask, past_key_values=cache)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    # stored left-aligned, pads dropped: each sequence at its own length
    assert cache.layers[0].kv.lens.tolist() == [16 + NEW - 1, 11 + NEW - 1, 1 + NEW - 1]


def test_paged_cache_generates_the_same(model):
    ids = prompts(seed=9)
    want, _ = greedy(model, ids, "sdpa")
    got, _ = greedy(model, ids, "ikport", past_key_values=ikhf.IkportCache(model, max_cache_len=48, page_size=16))
    assert torch.equal(got, want)


def test_int8_cache_is_close():
    """bf16 model: the int8 cache's logits beside vanilla sdpa's (teacher-forced on vanilla's tokens,
    so a differing token does not compound), and the dense bf16 cache's as the yardstick."""
    model = tiny_model(torch.bfloat16, seed=2)
    ids = prompts(2, 24, seed=11)
    want, want_logits = greedy(model, ids, "sdpa", new=12)

    def forced(kv_format):
        cache = ikhf.IkportCache(model, max_cache_len=48, kv_format=kv_format)
        logits = [model(ids, **{CACHE_KW: cache}, use_cache=True).logits[:, -1]]
        for t in range(11):
            logits.append(model(want[:, 24 + t:25 + t], **{CACHE_KW: cache}, use_cache=True).logits[:, -1])
        return torch.stack(logits, 1).float()

    dense = run(model, "ikport", lambda: forced("dense"))
    int8 = run(model, "ikport", lambda: forced("int8"))
    scale = want_logits.float().abs().max().item()
    dense_err = (dense - want_logits.float()).abs().max().item()
    int8_err = (int8 - want_logits.float()).abs().max().item()
    # the prompt step attends over the unquantized prompt: as close as dense
    assert (int8[:, 0] - want_logits[:, 0].float()).abs().max().item() <= max(2 * dense_err, 0.02 * scale)
    assert dense_err <= 0.02 * scale, (dense_err, scale)
    assert int8_err <= 0.05 * scale, (int8_err, scale)
    assert (int8.argmax(-1) == want_logits.argmax(-1)).float().mean() >= 0.9


def test_reorder_cache_moves_sequences(model):
    ids = prompts(2, 8, seed=13)
    cache = ikhf.IkportCache(model, max_cache_len=16)
    run(model, "ikport", lambda: model(ids, **{CACHE_KW: cache}, use_cache=True))
    kv = cache.layers[0].kv
    k0, k1 = kv.k[0].clone(), kv.k[1].clone()
    cache.reorder_cache(torch.tensor([1, 1]))
    assert torch.equal(kv.k[0], k1) and torch.equal(kv.k[1], k1) and not torch.equal(k0, k1)


# ---- the lean generate ----------------------------------------------------------------------------------------
def test_lean_generate_equals_generate(model):
    ids = prompts(3, seed=15)
    want, _ = greedy(model, ids, "sdpa")
    res = run(model, "ikport", lambda: ikhf.generate(model, ids, NEW))
    assert torch.equal(res.sequences, want)
    t = res.timings
    assert t["new_tokens"] == NEW and t["batch"] == 3 and t["capture_s"] == 0.0
    assert t["total_s"] == pytest.approx(t["prefill_s"] + t["decode_s"]) and t["tok_s"] > 0


def test_generator_buckets_padding_and_eos(model):
    """One Generator across calls: batches of 3 and 1 in buckets 4 (a spare row) and 1, a left-padded
    batch, and eos: finished sequences emit pad and the output ends where all have finished."""
    ids = prompts(3, seed=17)
    want, _ = greedy(model, ids, "sdpa")
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    padded = ids.masked_fill(mask == 0, 0)
    want_padded, _ = greedy(model, padded, "sdpa", attention_mask=mask)
    eos = [int(want[0, PROMPT + 3]), int(want[2, PROMPT + 5])]  # sequence 1 may never finish
    want_eos, _ = greedy(model, ids, "sdpa", eos_token_id=eos, pad_token_id=1)
    assert (want_eos == 1).any(), "the eos ids must stop a sequence early for this test"

    def calls():
        gen = ikhf.Generator(model, max_len=48, buckets=(1, 4))
        assert gen.bucket(3) == 4 and gen.bucket(1) == 1 and gen.bucket(9) == 9
        return (gen.generate(ids, NEW).sequences, gen.generate(ids[1:2], NEW).sequences,
                gen.generate(padded, NEW, attention_mask=mask).sequences,
                gen.generate(ids, NEW, eos_token_id=eos, pad_token_id=1).sequences)

    got, one, got_padded, got_eos = run(model, "ikport", calls)
    assert torch.equal(got, want) and torch.equal(one, want[1:2])
    assert torch.equal(got_padded, want_padded)
    assert torch.equal(got_eos, want_eos)


# ---- errors ---------------------------------------------------------------------------------------------------
def test_the_cache_needs_the_ikport_attention(model):
    cache = ikhf.IkportCache(model, max_cache_len=32)
    with pytest.raises(RuntimeError, match="attn_implementation='ikport'"):
        run(model, "sdpa", lambda: model(prompts(), **{CACHE_KW: cache}, use_cache=True))
    with pytest.raises(ValueError, match="set_attn_implementation"):
        run(model, "sdpa", lambda: ikhf.generate(model, prompts(), 2))


def test_cache_overflow_and_dtype(model):
    cache = ikhf.IkportCache(model, max_cache_len=PROMPT)
    with pytest.raises(ValueError, match="max_cache_len=20"):
        run(model, "ikport", lambda: model(prompts(2, PROMPT + 1), **{CACHE_KW: cache}, use_cache=True))
    with pytest.raises(TypeError, match="float32 too for a dense CPU cache"):
        ikhf.IkportCache(model, max_cache_len=8, kv_format="int8", batch_size=1)
    with pytest.raises(ValueError, match="max_len=25"):
        run(model, "ikport", lambda: ikhf.generate(model, prompts(), 6, max_len=25))


def test_padding_with_another_cache_raises_at_decode(model):
    ids = prompts(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(NotImplementedError, match="cache other than IkportCache"):
        greedy(model, ids, "ikport", attention_mask=mask)


def test_masks_ikport_cannot_express(model):
    ids = prompts(2, 8)
    holes = torch.ones_like(ids)
    holes[0, 3] = 0
    with pytest.raises(NotImplementedError, match="zeros between ones"):
        run(model, "ikport", lambda: model(ids, attention_mask=holes, use_cache=False))
    four_d = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    with pytest.raises(NotImplementedError, match="4-D attention mask"):
        run(model, "ikport", lambda: model(ids, attention_mask=four_d, use_cache=False))
    cache = ikhf.IkportCache(model, max_cache_len=16)
    run(model, "ikport", lambda: model(ids, **{CACHE_KW: cache}, use_cache=True))
    with pytest.raises(NotImplementedError, match="4-D attention mask"):  # a decode step, not read otherwise
        run(model, "ikport", lambda: model(ids[:, :1], attention_mask=torch.ones(2, 1, 1, 9, dtype=torch.bool),
                                           **{CACHE_KW: cache}, use_cache=True))
    static = transformers.StaticCache(config=model.config, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="StaticCache"):
        run(model, "ikport", lambda: model(ids, **{CACHE_KW: static}, use_cache=True))


def test_model_features_ikport_refuses():
    with pytest.raises(NotImplementedError, match="sliding"):
        ikhf.IkportCache(transformers.MistralConfig(num_hidden_layers=2, sliding_window=64), max_cache_len=8)
    with pytest.raises(NotImplementedError, match="attn_logit_softcapping"):
        ikhf.IkportCache(tiny_config(attn_logit_softcapping=30.0), max_cache_len=8)
    attn = tiny_model().model.layers[0].self_attn
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 2, 2, 16)
    with pytest.raises(NotImplementedError, match="sliding-window"):
        ikhf.attention_forward(attn, q, k, k, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="soft-caps"):
        ikhf.attention_forward(attn, q, k, k, None, softcap=30.0)
    attn.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        ikhf.attention_forward(attn, q, k, k, None, dropout=0.1)


def test_unsupported_cache_operations(model):
    cache = ikhf.IkportCache(model, max_cache_len=8, batch_size=1)
    with pytest.raises(NotImplementedError, match="crop"):
        cache.crop(-1)
    with pytest.raises(NotImplementedError, match="paged"):
        ikhf.IkportCache(model, max_cache_len=16, page_size=8, batch_size=1).reorder_cache(torch.tensor([0]))
    assert isinstance(cache, transformers.Cache) and not isinstance(cache, DynamicCache)
    assert cache.nbytes == 2 * 2 * (1 * 2 * 8 * 16 * 4) and not cache.is_compileable


def test_import_ikport_does_not_import_transformers():
    code = "import sys, ikport; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kv_format", ["int8", "kivi4"])
def test_a_second_prompt_chunk_over_a_quantized_cache(kv_format):
    """A prompt in two chunks, the second (140 tokens, the prefill kernel's range) over the quantized
    first: logits close to one whole prompt through vanilla sdpa (the second chunk reads the
    quantized prefix; the first attends over its own unquantized K/V)."""
    model = tiny_model(torch.bfloat16, seed=4, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    ids = prompts(2, 200, seed=17)
    want = run(model, "sdpa", lambda: model(ids).logits[:, -1].float())

    def chunked():
        cache = ikhf.IkportCache(model, max_cache_len=256, kv_format=kv_format)
        model(ids[:, :60], **{CACHE_KW: cache}, use_cache=True)
        return model(ids[:, 60:], **{CACHE_KW: cache}, use_cache=True).logits[:, -1].float()

    got = run(model, "ikport", chunked)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.05 * scale
