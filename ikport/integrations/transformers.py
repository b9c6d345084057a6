"""Hugging Face transformers on ikport: an "ikport" attention implementation, a Cache over
`ikport.KVCache`, and a lean greedy `generate` whose decode step is a CUDA graph.

    import ikport.integrations.transformers as ikhf        # registers attn_implementation="ikport"
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, attn_implementation="ikport")
    cache = ikhf.IkportCache(model, max_cache_len=2048, kv_format="int8")
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256, do_sample=False)   # unchanged HF
    res = ikhf.generate(model, ids, max_new_tokens=256)   # prefill, then a CUDA-graph decode step per batch bucket
    res.sequences, res.timings

What runs where:
  - A prompt call (the cache was empty, or no cache) attends over the prompt's own K/V through
    `ikport.attention(causal=True)`: the prefill kernel past 128 query tokens, the decode kernels below.
  - A later call (decode, or a chunk after a prefix) with an `IkportCache` attends through
    `KVCache.attend` over the cache itself (dense: the storage as it is; int8: codes and scales read by
    the kernel's INT8 loader): K/V are never copied or dequantized into a full-size tensor. With
    another Cache (HF's DynamicCache), over the K/V tensors that Cache hands back.
  - Padding (a 2-D `attention_mask` with zeros) is read at the prompt call: right padding becomes
    per-sequence lengths (`q_lens`, `kv_lens`); left padding is moved to the right for the kernel
    (the outputs moved back) and an IkportCache stores the prompt left-aligned, pads dropped, each
    sequence at its own length (`KVCache.lens`). Later calls take the lengths from the cache and do
    not read the mask (no host synchronization); they assume it extends the prompt's with ones, as
    `generate()` does. With any other Cache every call with a mask reads it (one synchronization per
    forward), and padding past the prompt raises (the kernels mask by length, that cache keeps pads).
  - Not supported, raising NotImplementedError that names the feature: sliding-window attention,
    logit soft-capping, attention sinks, masks other than causal + padding (packed sequences, custom
    4-D masks, mask overlays), dropout while training, transformers' StaticCache (use IkportCache).

No call on the decode path synchronizes with the host, so `generate`'s step can be captured in a
CUDA graph. Importing this module imports transformers; `import ikport` does not.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import causal_mask_function

from ..attention import attention as _ikport_attention
from ..kvcache import KVCache

ATTN_IMPLEMENTATION = "ikport"
# Batch sizes a Generator captures a decode graph for: a batch runs in the smallest bucket that holds
# it (the spare rows repeat the first sequence), so a few graphs serve every batch size.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MAX_EOS = 8  # eos ids a Generator's static buffer holds


# ---- the attention and mask functions ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Padding:
    """What a prompt's 2-D attention mask says: side "none", "left" or "right"; lens int32 [B] (valid
    tokens of each sequence) and pad int64 [B] (left: pad tokens ahead of them), on the mask's device."""

    side: str
    lens: torch.Tensor | None = None
    pad: torch.Tensor | None = None


def _padding(mask: torch.Tensor) -> _Padding:
    """Reads a [B, T] attention mask once (one host synchronization) and remembers the answer on the
    mask tensor itself: every layer of one forward gets the same mask object from the mask function."""
    memo = getattr(mask, "_ikport_padding", None)
    if memo is not None:
        return memo
    if mask.dim() != 2:
        raise NotImplementedError(f"attn_implementation='ikport': a {mask.dim()}-D attention mask (a custom mask); "
                                  "ikport takes causal attention with a 2-D padding mask")
    m = mask.to(torch.int8)
    flags = torch.stack([m.bool().all(), (m[:, 1:] >= m[:, :-1]).all(), (m[:, 1:] <= m[:, :-1]).all()])
    full, left, right = flags.tolist()
    if full:
        found = _Padding("none")
    elif right:  # also batches whose short rows are empty: lengths suffice
        found = _Padding("right", lens=m.sum(-1, dtype=torch.int32))
    elif left:
        lens = m.sum(-1, dtype=torch.int32)
        found = _Padding("left", lens=lens, pad=mask.shape[1] - lens.to(torch.int64))
    else:
        raise NotImplementedError("attn_implementation='ikport': the attention_mask has zeros between ones (or left "
                                  "and right padding in one batch); ikport masks by length: pad on one side")
    mask._ikport_padding = found
    return found


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] with its rows (dim 2) picked per sequence by index [B, T]."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _left_aligned(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Left-padded rows of x [B, H, T, D] moved to the front (row t <- row t + pad[b]; the tail repeats
    the last row and lies past the sequence's length)."""
    t = torch.arange(x.shape[2], device=x.device)
    return _gather_rows(x, (t + pad[:, None]).clamp_(max=x.shape[2] - 1))


def _left_padded(out: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The inverse of _left_aligned for an output: row t <- row t - pad[b]; pad rows are zeros."""
    t = torch.arange(out.shape[2], device=out.device)
    moved = _gather_rows(out, (t - pad[:, None]).clamp_(min=0))
    return moved.masked_fill((t < pad[:, None])[:, None, :, None], 0)


def _prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, padding: _Padding | None,
                      scale: float | None, causal: bool) -> torch.Tensor:
    """Attention of a whole prompt over its own K/V [B, Hkv, T, D], padded or not."""
    if padding is None or padding.side == "none":
        return _ikport_attention(q, k, v, causal=causal, scale=scale)
    lens = padding.lens
    if padding.side == "right":
        return _ikport_attention(q, k, v, causal=causal, scale=scale, q_lens=lens, kv_lens=lens)
    pad = padding.pad
    out = _ikport_attention(_left_aligned(q, pad), _left_aligned(k, pad), _left_aligned(v, pad), causal=causal,
                            scale=scale, q_lens=lens, kv_lens=lens)
    return _left_padded(out, pad)


def _refuse_unsupported(module: torch.nn.Module, dropout: float, kwargs: dict[str, Any]) -> None:
    name = type(module).__name__
    config = getattr(module, "config", None)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    if window is not None:
        raise NotImplementedError(f"attn_implementation='ikport': {name} uses sliding-window attention "
                                  f"(sliding_window={window}); ikport's kernels attend over the whole cache")
    softcap = kwargs.get("softcap", getattr(config, "attn_logit_softcapping", None))
    if softcap is not None:
        raise NotImplementedError(f"attn_implementation='ikport': {name} soft-caps attention logits "
                                  f"(softcap={softcap})")
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise NotImplementedError(f"attn_implementation='ikport': {name} uses attention sinks")
    if dropout and module.training:
        raise NotImplementedError(f"attn_implementation='ikport': attention dropout ({dropout}) while training; "
                                  "ikport's kernels are for inference (call model.eval())")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface ("ikport"): query [B, Hq, Tq, D], key/value [B, Hkv, L, D] as
    the attention module hands them over (after its cache's update), attention_mask what
    `padding_mask` made (None or the 2-D padding mask). Returns ([B, Tq, Hq, D], None): no weights."""
    _refuse_unsupported(module, dropout, kwargs)
    layer = getattr(key, "_ikport_layer", None)
    if layer is not None:  # an IkportCache layer handed over its storage
        out = layer.attend(query, attention_mask, scaling)
    else:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
        padding = _padding(attention_mask) if attention_mask is not None else None
        if padding is not None and padding.side != "none" and key.shape[2] != query.shape[2]:
            raise NotImplementedError(
                "attn_implementation='ikport': padding (an attention_mask with zeros) over a cache other than "
                "IkportCache: ikport's kernels mask a sequence by its length, and this cache keeps the pads; "
                "pass past_key_values=ikport.integrations.transformers.IkportCache(model, max_cache_len=...)")
        out = _prompt_attention(query, key, value, padding, scaling, causal)
    return out.transpose(1, 2).contiguous(), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
                 mask_function: Any = causal_mask_function, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask interface ("ikport"): no dense 4-D mask. Hands the 2-D padding mask (the
    last kv_length columns, a new view per forward, where `_padding` memoizes) or None to the attention
    function; refuses what lengths cannot express."""
    if mask_function is not causal_mask_function:
        raise NotImplementedError(f"attn_implementation='ikport': the model asks for a mask other than causal "
                                  f"+ padding ({getattr(mask_function, '__name__', mask_function)}: sliding window, "
                                  "packed sequences, bidirectional or an overlay)")
    # A cache whose K/V run past the tokens seen (transformers' StaticCache: its whole preallocated
    # length, its offset a tensor once filled) cannot be masked by length without the cache's lengths.
    if isinstance(q_offset, torch.Tensor) or kv_length != q_offset + q_length:
        raise NotImplementedError("attn_implementation='ikport' with transformers' StaticCache: its K/V tensors are "
                                  "the whole preallocated length, which ikport cannot mask without the cache's "
                                  "lengths; use ikport.integrations.transformers.IkportCache (also static)")
    if attention_mask is None:
        return None
    return attention_mask[:, -kv_length:]


def register(name: str = ATTN_IMPLEMENTATION) -> None:
    """Register the attention and mask functions with transformers under `name` (done on import)."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)


register()


# ---- the Cache ----------------------------------------------------------------------------------------------------
class IkportLayer(CacheLayerMixin):
    """One decoder layer's cache: an `ikport.KVCache` (preallocated, static addresses).

    `update` appends on the device and hands back the KVCache storage (`keys`/`values`: dense K/V or
    int8 codes, the whole preallocated length) tagged with this layer, so the "ikport" attention
    function attends through `KVCache.attend` with the cache's own lengths. Only the "ikport"
    attention implementation can read what `update` returns.
    """

    is_compileable = False  # eager custom calls; a CUDA graph of the step (generate) is the fast path
    is_sliding = False

    def __init__(self, max_cache_len: int, kv_format: str = "dense", page_size: int = 0) -> None:
        super().__init__()
        self.max_cache_len, self.kv_format, self.page_size = max_cache_len, kv_format, page_size
        self.kv: KVCache | None = None
        # Tokens written so far, pads included (HF's sequence length, its position counter), on the
        # host: the mask sizes and the prompt test need it without reading the device.
        self.seen = 0
        self._prompt: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.kv = KVCache(batch, kv_heads, self.max_cache_len, head_dim, dtype=key_states.dtype,
                          kv_format=self.kv_format, page_size=self.page_size, device=key_states.device)
        self.keys, self.values = self.kv.k, self.kv.v
        self.keys._ikport_layer = self  # how the attention function finds the cache behind the tensors
        self.dtype, self.device, self.batch_size = key_states.dtype, key_states.device, batch
        self._zeros = torch.zeros(batch, dtype=torch.int32, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        if self.seen + n > self.max_cache_len:
            raise ValueError(f"IkportCache: {self.seen} + {n} tokens pass max_cache_len={self.max_cache_len}")
        if key_states.dtype != self.kv.dtype:
            raise TypeError(f"IkportCache: keys are {key_states.dtype}, the cache holds {self.kv.dtype}")
        prompt = self.seen == 0
        # The prompt goes to row 0 whatever lens holds; later tokens to each sequence's own length.
        self.kv.append(key_states, value_states, self._zeros if prompt else None)
        # The prompt attends over its own K/V (exact for every format; its padding is not known here).
        self._prompt = (key_states, value_states) if prompt else None
        self.seen += n
        return self.keys, self.values

    def attend(self, query: torch.Tensor, attention_mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        """Attention of `query` [B, Hq, Tq, D] for the tokens the last `update` appended."""
        prompt, self._prompt = self._prompt, None  # drop the reference: a prompt's K/V can be gigabytes
        if attention_mask is not None and attention_mask.dim() != 2:  # shapes only: no synchronization
            raise NotImplementedError(f"attn_implementation='ikport': a {attention_mask.dim()}-D attention mask "
                                      "(a custom mask); ikport takes causal attention with a 2-D padding mask")
        if prompt is not None:
            k, v = prompt
            padding = _padding(attention_mask) if attention_mask is not None else None
            if padding is not None and padding.side != "none":
                if attention_mask.shape[1] != k.shape[2]:
                    raise ValueError(f"IkportCache: the prompt's attention_mask covers {attention_mask.shape[1]} "
                                     f"tokens, the prompt has {k.shape[2]}")
                if padding.side == "left":  # store it left-aligned: rows [0, len) of each sequence
                    self.kv.append(_left_aligned(k, padding.pad), _left_aligned(v, padding.pad), self._zeros)
                self.kv.lens.copy_(padding.lens)
            return _prompt_attention(query, k, v, padding, scale, True)
        return self.kv.attend(query, causal=True, scale=scale)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:  # transformers < 5.16 names it so
        return self.max_cache_len

    def reset(self) -> None:
        """Empty the cache (lengths to 0; the storage is overwritten as tokens come, not cleared)."""
        if self.kv is not None:
            self.kv.lens.zero_()
        self.seen, self._prompt = 0, None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: sequence b takes sequence beam_idx[b]'s cache, copied in place (the
        addresses stay: a captured graph remains valid)."""
        if self.kv is None:
            return
        if self.kv.paged:
            raise NotImplementedError("IkportCache: reorder_cache (beam search) on a paged cache")
        idx = beam_idx.to(self.kv.device)
        for t in (self.kv.k, self.kv.v, self.kv.k_scale, self.kv.v_scale, self.kv.lens):
            if t is not None:
                t.copy_(t.index_select(0, idx))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("IkportCache: crop (assisted generation) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("IkportCache: batch_repeat_interleave; size the cache for the expanded batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("IkportCache: batch_select_indices is not supported")

    def offload(self) -> None:
        raise NotImplementedError("IkportCache: offloading is not supported")

    def prefetch(self) -> None:
        raise NotImplementedError("IkportCache: offloading is not supported")


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_model_features(config: Any) -> None:
    """What an IkportCache (and the attention function) cannot do, named before any tensor exists."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        odd = sorted({t for t in layer_types if t != "full_attention"})
        raise NotImplementedError(f"IkportCache: the model has {odd} layers (config.layer_types); ikport serves "
                                  "full attention only (no sliding window, no linear attention)")
    if not layer_types and getattr(config, "sliding_window", None) is not None and \
            getattr(config, "use_sliding_window", True):
        raise NotImplementedError(f"IkportCache: the model uses sliding-window attention "
                                  f"(config.sliding_window={config.sliding_window})")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError("IkportCache: the model soft-caps attention logits (config.attn_logit_softcapping)")


class IkportCache(Cache):
    """A transformers `Cache` over one `ikport.KVCache` per decoder layer: preallocated (static),
    appended on the device, attended in place by the "ikport" attention implementation.

    Args:
        model_or_config: the model (preferred: its dtype, device and attention implementation are
            read from it) or its config.
        max_cache_len: tokens a sequence may hold (prompt, pads included, plus new tokens).
        kv_format: an `ikport.kvquant.KV_FORMATS` entry: "dense" (the model's dtype) or "int8".
        page_size: 0 (contiguous) or a power of two (paged storage, `KVCache(page_size=...)`).
        batch_size, dtype, device: allocate now (dtype and device default to the model's); without
            batch_size the layers allocate at their first update, sized by it.

    Use it with `attn_implementation="ikport"` (update raises otherwise: no other implementation can
    read the storage it returns). One cache serves one generation: `reset()` it (or make a new one)
    before the next `generate()`, which would otherwise continue from what it holds.
    """

    def __init__(self, model_or_config: Any, max_cache_len: int, *, kv_format: str = "dense", page_size: int = 0,
                 batch_size: int | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        config = _text_config(model_or_config)
        _check_model_features(config)
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"IkportCache: max_cache_len must be a positive int, got {max_cache_len!r}")
        layers = [IkportLayer(max_cache_len, kv_format, page_size) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.model_config = config
        # (no self.max_cache_len: transformers 5.17's Cache has it as a read-only property over the layers)
        self.kv_format, self.page_size = kv_format, page_size
        if isinstance(model_or_config, torch.nn.Module):
            dtype = dtype if dtype is not None else model_or_config.dtype
            device = device if device is not None else model_or_config.device
        if batch_size is not None:
            if dtype is None or device is None:
                raise ValueError("IkportCache: batch_size given without a model: pass dtype and device too")
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            fake = torch.empty((batch_size, kv_heads, 0, head_dim), dtype=dtype, device=device)
            for layer in self.layers:
                layer.lazy_initialization(fake, fake)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        implementation = getattr(self.model_config, "_attn_implementation", None)
        if implementation != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"IkportCache needs attn_implementation={ATTN_IMPLEMENTATION!r}, the model runs "
                               f"{implementation!r}: call model.set_attn_implementation({ATTN_IMPLEMENTATION!r})")
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    @property
    def kv_caches(self) -> list[KVCache | None]:
        """Each layer's ikport.KVCache (None before its first update)."""
        return [layer.kv for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Device bytes of every layer's K/V storage."""
        return sum(kv.nbytes for kv in self.kv_caches if kv is not None)

    def _set_seen(self, n: int) -> None:
        """Set every layer's host-side token count (the Generator: graph replays do not run Python)."""
        for layer in self.layers:
            layer.seen = n


# ---- the lean generate --------------------------------------------------------------------------------------------
@dataclass
class GenerateOutput:
    """sequences: [B, T + new] (the prompts, then the new tokens: `model.generate()`'s layout);
    timings: seconds and rates of the phases (see `Generator.generate`)."""

    sequences: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Slot:
    """One batch bucket: its cache and the static buffers its decode graph reads and writes."""

    cache: IkportCache
    ids: torch.Tensor       # [bucket, 1] int64: the token each step feeds (the graph's input and output)
    finished: torch.Tensor  # [bucket] bool: the sequence has emitted an eos id
    eos: torch.Tensor       # [_MAX_EOS] int64: eos ids, -1 where unused
    pad: torch.Tensor       # [] int64: what a finished sequence emits
    graph: Any = None       # torch.cuda.CUDAGraph of one decode step


def _forward_keywords(model: torch.nn.Module) -> tuple[str, bool]:
    """(the forward's cache argument name, whether it takes logits_to_keep): transformers renamed
    past_key_values to cache after 5.17."""
    params = inspect.signature(model.forward).parameters
    name = "past_key_values" if "past_key_values" in params else "cache"
    return name, "logits_to_keep" in params


def _require_ikport_attention(model: torch.nn.Module) -> None:
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != ATTN_IMPLEMENTATION:
        raise ValueError(f"ikport generate needs the model on attn_implementation={ATTN_IMPLEMENTATION!r}, it runs "
                         f"{implementation!r}: call model.set_attn_implementation({ATTN_IMPLEMENTATION!r})")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Greedy decoding of a transformers causal LM on ikport, reusable across calls: per batch bucket
    an IkportCache of `max_len` tokens and, on CUDA, the decode step captured once as a CUDA graph
    (so keep the Generator to keep its graphs).

    The step reads everything from device buffers: the token ids (`ids`, written by the previous
    step), the positions (the cache's per-sequence lengths, so padded batches stay right), the eos
    state; replaying it needs no host work beyond the replay call. On the CPU (or cuda_graphs=False)
    the same step runs eagerly.

    Args:
        model: on attn_implementation="ikport" (raises otherwise), in eval mode.
        max_len: tokens a sequence may reach (prompt + new).
        kv_format, page_size: the caches' (IkportCache).
        cuda_graphs: capture the decode step (default: on CUDA devices).
        buckets: batch sizes to capture for, ascending; a larger batch runs at its own size.
    """

    def __init__(self, model: torch.nn.Module, *, max_len: int, kv_format: str = "dense", page_size: int = 0,
                 cuda_graphs: bool | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS) -> None:
        _require_ikport_attention(model)
        _check_model_features(_text_config(model))
        self.model, self.max_len, self.kv_format, self.page_size = model, max_len, kv_format, page_size
        self.device = model.device
        self.cuda_graphs = (self.device.type == "cuda") if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"Generator: cuda_graphs=True needs a CUDA model, this one is on {self.device}")
        self.buckets = tuple(sorted(buckets))
        self._cache_kw, self._keep_kw = _forward_keywords(model)
        self._slots: dict[int, _Slot] = {}

    def bucket(self, batch: int) -> int:
        """The batch size a batch of `batch` sequences runs at."""
        return next((b for b in self.buckets if b >= batch), batch)

    def _forward(self, slot: _Slot, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs[self._cache_kw] = slot.cache
        if self._keep_kw:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=ids, use_cache=True, **kwargs).logits
        return logits[:, -1].argmax(-1)

    def _emit(self, slot: _Slot, next_ids: torch.Tensor) -> None:
        """next_ids -> the ids buffer, a finished sequence emitting pad (generate()'s rule)."""
        next_ids = torch.where(slot.finished, slot.pad, next_ids)
        slot.finished |= (next_ids[:, None] == slot.eos).any(1)
        slot.ids.copy_(next_ids.view(-1, 1))

    def _step(self, slot: _Slot) -> None:
        """One decode step: the token in slot.ids at each sequence's length -> the next token."""
        positions = slot.cache.layers[0].kv.lens.view(-1, 1).to(torch.int64)
        self._emit(slot, self._forward(slot, slot.ids, position_ids=positions))

    def _slot(self, bucket: int) -> tuple[_Slot, float]:
        """The bucket's slot, made (and its step captured) on first use; seconds spent capturing."""
        slot = self._slots.get(bucket)
        if slot is not None:
            return slot, 0.0
        dev = self.device
        cache = IkportCache(self.model, self.max_len, kv_format=self.kv_format, page_size=self.page_size,
                            batch_size=bucket)
        slot = _Slot(cache=cache, ids=torch.zeros(bucket, 1, dtype=torch.int64, device=dev),
                     finished=torch.zeros(bucket, dtype=torch.bool, device=dev),
                     eos=torch.full((_MAX_EOS,), -1, dtype=torch.int64, device=dev),
                     pad=torch.zeros((), dtype=torch.int64, device=dev))
        self._slots[bucket] = slot
        if not self.cuda_graphs:
            return slot, 0.0
        t0 = time.perf_counter()
        # The step must see a non-empty cache (a decode, not a prompt): one token per sequence. What
        # the warm-up steps write is garbage that reset() forgets before the prompt.
        cache._set_seen(1)
        for kv in cache.kv_caches:
            kv.lens.fill_(1)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm up off the capture: kernels compile, cuBLAS sets up
            for _ in range(2):
                self._step(slot)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(slot)
        slot.graph = graph
        torch.cuda.synchronize(dev)
        return slot, time.perf_counter() - t0

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None) -> GenerateOutput:
        """Greedy decoding: the same tokens as `model.generate(input_ids, do_sample=False, ...)` with no
        logits processors (no repetition penalty, ...).

        Args:
            input_ids: [B, T] int64 prompts on the model's device.
            max_new_tokens: >= 1.
            attention_mask: [B, T], zeros on the left (generate()'s padding) or right; None: no padding.
            eos_token_id: stop ids (up to 8); a sequence that emitted one emits pad_token_id after it, and
                the output ends where every sequence has finished (as generate()). None: never stop.
            pad_token_id: default the first eos id.

        Returns:
            GenerateOutput: sequences [B, T + n] (n <= max_new_tokens) and timings: `prefill_s` (the
            prompt to the first new token, synchronized: time to first token), `decode_s` (the other
            steps), `capture_s` (making this bucket's cache and graph; 0 once made), `total_s`
            (prefill + decode), `tok_s` (B * n / total_s), `decode_tok_s` (B * (n - 1) / decode_s),
            `batch`, `bucket`, `new_tokens`.
        """
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"generate: input_ids must be int64 [B, T], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(f"generate: input_ids are on {input_ids.device}, the model on {self.device}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        batch, prompt_len = input_ids.shape
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(f"generate: {prompt_len} prompt + {max_new_tokens} new tokens pass max_len={self.max_len}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, prompt_len):
            raise ValueError(f"generate: attention_mask must be [{batch}, {prompt_len}], got "
                             f"{tuple(attention_mask.shape)}")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if len(eos) > _MAX_EOS:
            raise ValueError(f"generate: at most {_MAX_EOS} eos ids, got {len(eos)}")
        pad_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        _require_ikport_attention(self.model)

        bucket = self.bucket(batch)
        slot, capture_s = self._slot(bucket)
        spare = bucket - batch  # spare rows repeat the first sequence: real work, results dropped
        ids = torch.cat([input_ids, input_ids[:1].expand(spare, -1)]) if spare else input_ids
        mask = attention_mask
        if mask is not None and spare:
            mask = torch.cat([mask, mask[:1].expand(spare, -1)])
        slot.eos.fill_(-1)
        if eos:
            slot.eos[:len(eos)].copy_(torch.tensor(eos, dtype=torch.int64))
        slot.pad.fill_(pad_id)
        slot.finished.zero_()
        slot.cache.reset()

        dev = self.device
        _synchronize(dev)
        t0 = time.perf_counter()
        if mask is None:
            positions = torch.arange(prompt_len, device=dev).expand(bucket, -1)
        else:  # generate()'s positions for padded prompts: each sequence counts its own tokens from 0
            positions = (mask.to(torch.int64).cumsum(-1) - 1).clamp_(min=0)
        self._emit(slot, self._forward(slot, ids, attention_mask=mask, position_ids=positions))
        tokens = torch.empty(bucket, max_new_tokens, dtype=torch.int64, device=dev)
        tokens[:, 0] = slot.ids[:, 0]
        _synchronize(dev)
        t1 = time.perf_counter()
        for i in range(1, max_new_tokens):
            if slot.graph is not None:
                slot.graph.replay()
            else:
                self._step(slot)
            tokens[:, i] = slot.ids[:, 0]
        _synchronize(dev)
        t2 = time.perf_counter()
        slot.cache._set_seen(prompt_len + max_new_tokens - 1)  # the replays ran no Python

        tokens = tokens[:batch]
        n = max_new_tokens
        if eos:  # end where every sequence has finished (generate() stops there)
            hit = torch.isin(tokens, slot.eos)
            first = torch.where(hit.any(1), hit.to(torch.int8).argmax(1), n - 1)
            n = int(first.max()) + 1
            tokens = tokens[:, :n]
        prefill_s, decode_s = t1 - t0, t2 - t1
        timings = {"prefill_s": prefill_s, "decode_s": decode_s, "capture_s": capture_s,
                   "total_s": prefill_s + decode_s, "tok_s": batch * n / (prefill_s + decode_s),
                   "decode_tok_s": batch * (max_new_tokens - 1) / decode_s if max_new_tokens > 1 else math.nan,
                   "batch": batch, "bucket": bucket, "new_tokens": n}
        return GenerateOutput(torch.cat([input_ids, tokens], dim=1), timings)


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: torch.Tensor | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, kv_format: str = "dense", page_size: int = 0,
             cuda_graphs: bool | None = None, max_len: int | None = None) -> GenerateOutput:
    """One greedy generation with a fresh `Generator` (see it and `Generator.generate` for the
    arguments): prefill, then the decode step as a CUDA graph on CUDA. Its capture is paid on every
    call (timings["capture_s"]); keep a Generator for repeated calls."""
    if input_ids.dim() != 2:
        raise ValueError(f"generate: input_ids must be [B, T], got {tuple(input_ids.shape)}")
    need = input_ids.shape[1] + max_new_tokens
    gen = Generator(model, max_len=max_len or need, kv_format=kv_format, page_size=page_size,
                    cuda_graphs=cuda_graphs, buckets=(input_ids.shape[0],))
    return gen.generate(input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id)
