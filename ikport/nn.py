"""`W4A16Linear`: an nn.Linear replacement holding an INT4 weight, and `quantize_model`.

    layer = W4A16Linear.from_linear(linear, group_size=128)       # INT4 (quantize_weight's method)
    layer = W4A16Linear.from_gptq(qweight, qzeros, scales, g_idx)  # a GPTQ checkpoint
    layer = W4A16Linear.from_awq(qweight, qzeros, scales)          # an AutoAWQ GEMM checkpoint
    model = quantize_model(model, group_size=128)                  # every nn.Linear but lm_head
    model = quantize_model(model, method="rtn")                    # round to nearest (default "mse")

Buffers (all in the state dict): qweight int32 [N, packed_k(K) // 8] (packed for `layout`, K
rounded up to 128: ikport.int4), scales [ceil(K / G), N] (the activation dtype, float16 or
bfloat16), zeros (None when symmetric), perm (None unless GPTQ act-order); bias is a frozen
nn.Parameter in the activation dtype, or None. The extra state (`get_extra_state`) records
in_features, out_features, group_size and layout.

Layouts follow the device, at move time: `.to(device)` / `.cuda()` / `.cpu()` (nn.Module._apply)
repack qweight when `layout_for_device(new device)` differs from `layout`, so forward never
repacks. Loading a state dict saved under another layout (read from its extra state) repacks the
incoming qweight into this module's layout; one saved with a different group size, or with or
without zeros / perm, reshapes this module's buffers to match. (A state dict without the extra
state, e.g. stored in safetensors, is taken to be in this module's layout.)
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from . import formats, w4a16
from .int4 import (
    DEFAULT_METHOD,
    K_MULTIPLE,
    METHODS,
    N_MULTIPLE,
    SCALE_DTYPES,
    Int4Weight,
    check_shape,
    layout_for_device,
    layout_info,
    num_groups,
    pack_int4,
    packed_k,
    quantize_weight,
    resolve_group_size,
    unpack_int4,
)

__all__ = ["W4A16Linear", "quantize_model"]

log = logging.getLogger("ikport")
_EXTRA_STATE_VERSION = 1


class W4A16Linear(nn.Module):
    """y = x @ W^T + b with W stored as INT4 codes and group scales (ikport.int4.Int4Weight).

    The constructor builds an empty layer (codes 0, scales 1) to load a state dict into; the
    `from_*` class methods build a filled one. forward runs `ikport.w4a16.w4a16_matmul` over x
    flattened to 2-D (GPU: the W4A16 kernel; CPU: its reference), then adds the bias.
    """

    in_features: int
    out_features: int
    group_size: int
    layout: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    perm: torch.Tensor | None
    bias: nn.Parameter | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int | None = 128,
        *,
        symmetric: bool = True,
        act_order: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        layout: str | None = None,
    ) -> None:
        super().__init__()
        check_shape(out_features, in_features, "W4A16Linear")
        if dtype not in SCALE_DTYPES:
            raise TypeError(f"W4A16Linear: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = resolve_group_size(group_size, in_features)
        self.layout = layout_for_device(device) if layout is None else layout
        layout_info(self.layout)
        n, k = out_features, in_features
        groups = num_groups(k, self.group_size)
        self.register_buffer("qweight", torch.zeros(n, packed_k(k) // 8, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(groups, n, dtype=dtype, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.full((groups, n), 8, dtype=dtype, device=device))
        self.register_buffer("perm", torch.arange(k, device=device) if act_order else None)
        self.bias = (nn.Parameter(torch.zeros(n, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        # weight_int4's cache: (qweight, scales, zeros, perm, (group_size, layout, K, N), the Int4Weight)
        self._cached: tuple[Any, ...] | None = None
        _ = self.weight_int4  # validates group_size and the rest now, not at the first forward

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_int4(cls, weight: Int4Weight, bias: torch.Tensor | None = None) -> W4A16Linear:
        """A layer holding `weight` (its tensors, not copies); bias (optional [N]) is cast to the
        weight's dtype and device."""
        if not isinstance(weight, Int4Weight):
            raise TypeError(f"weight must be an Int4Weight, got {type(weight).__name__}")
        layer = cls(weight.in_features, weight.out_features, bias=False, group_size=weight.group_size,
                    dtype=weight.dtype, device="meta", layout=weight.layout)
        layer.qweight, layer.scales = weight.qweight, weight.scales
        layer.zeros, layer.perm = weight.zeros, weight.perm
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.out_features,):
                raise ValueError(f"bias must be a tensor of shape [{weight.out_features}], got "
                                 f"{getattr(bias, 'shape', type(bias).__name__)}")
            b = bias.detach().to(weight.device, weight.dtype).contiguous()
            layer.bias = nn.Parameter(b, requires_grad=False)
        layer._cached = None
        _ = layer.weight_int4
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = 128,
                    symmetric: bool = True, *, method: str | None = None) -> W4A16Linear:
        """Quantize an nn.Linear on its device with `ikport.int4.quantize_weight` (`method`: "rtn",
        "mse", or None for its default). A float32 Linear gets float16 scales and bias."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        w = quantize_weight(linear.weight.detach(), group_size, symmetric, method=method)
        return cls.from_int4(w, linear.bias)

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  **kwargs: Any) -> W4A16Linear:
        """From one GPTQ layer's tensors (`ikport.formats.from_gptq`; kwargs go there: bits,
        layout, checkpoint_format)."""
        return cls.from_int4(formats.from_gptq(qweight, qzeros, scales, g_idx, **kwargs), bias)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, **kwargs: Any) -> W4A16Linear:
        """From one AutoAWQ GEMM layer's tensors (`ikport.formats.from_awq`; kwargs: layout)."""
        return cls.from_int4(formats.from_awq(qweight, qzeros, scales, **kwargs), bias)

    # ---- the weight ---------------------------------------------------------------------------

    @property
    def weight_int4(self) -> Int4Weight:
        """The layer's weight as an `Int4Weight` sharing the buffers (cached until a buffer object,
        the group size or the layout changes)."""
        # forward asks on every call: the buffers are read from _buffers, not through
        # nn.Module.__getattr__ (~0.5 us each), and compared by identity
        b, c = self._buffers, self._cached
        if (c is not None and c[0] is b.get("qweight") and c[1] is b.get("scales") and c[2] is b.get("zeros")
                and c[3] is b.get("perm")
                and c[4] == (self.group_size, self.layout, self.in_features, self.out_features)):
            return c[5]
        w = Int4Weight(self.qweight, self.scales, self.zeros, self.group_size, self.in_features,
                       self.out_features, self.layout, self.perm)
        self._cached = (self.qweight, self.scales, self.zeros, self.perm,
                        (self.group_size, self.layout, self.in_features, self.out_features), w)
        return w

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of `scales`)."""
        return self.scales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (the layer's dtype) -> [..., N] through `ikport.w4a16.w4a16_matmul`."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"W4A16Linear: x has {x.shape[-1]} features in its last dim, the "
                             f"layer expects in_features={self.in_features}")
        out = w4a16.w4a16_matmul(x, self.weight_int4)  # any leading dims: no reshape either side
        bias = self.bias
        if bias is None:
            return out
        # in place where the dtypes agree (they do unless bias was recast by hand): one allocation less
        return out.add_(bias) if out.dtype == bias.dtype else out + bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"symmetric={self.zeros is None}, act_order={self.perm is not None}, "
                f"layout={self.layout!r}, dtype={self.scales.dtype}")

    # ---- device moves: repack for the new device's layout -------------------------------------

    def _repack(self, layout: str) -> None:
        if layout == self.layout:
            return
        codes = unpack_int4(self.qweight, self.layout, self.out_features, self.in_features)
        self.qweight = pack_int4(codes, layout)
        self.layout = layout

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> W4A16Linear:
        old = {name: t.dtype for name, t in (("scales", self.scales), ("zeros", self.zeros),
                                             ("bias", self.bias)) if t is not None}
        self._cached = None  # drop the old tensors now: a move must not keep the source copies alive
        super()._apply(fn, recurse)
        if self.scales.dtype not in SCALE_DTYPES:
            bad = self.scales.dtype
            self.scales = self.scales.to(old["scales"])  # stay a valid layer
            if self.zeros is not None:
                self.zeros = self.zeros.to(old["zeros"])
            if self.bias is not None:
                self.bias.data = self.bias.data.to(old["bias"])
            raise TypeError(f"W4A16Linear runs in float16 or bfloat16; it cannot be cast to {bad} "
                            f"(kept {old['scales']})")
        dev = self.qweight.device
        if dev.type in ("cpu", "cuda"):
            self._repack(layout_for_device(dev))
        return self

    # ---- state dict ---------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """in_features, out_features, group_size and layout: the state dict's meaning."""
        return {"version": _EXTRA_STATE_VERSION, "in_features": self.in_features,
                "out_features": self.out_features, "group_size": self.group_size,
                "layout": self.layout}

    def set_extra_state(self, state: Any) -> None:
        """Adopt the saved group size (the layout stays this module's: `_load_from_state_dict`
        has already repacked the incoming codes)."""
        if not isinstance(state, dict):
            raise TypeError(f"W4A16Linear: unexpected extra state {state!r}")
        self._check_features(state)
        self.group_size = int(state.get("group_size", self.group_size))
        self._cached = None

    def _check_features(self, state: dict[str, Any]) -> None:
        for name in ("in_features", "out_features"):
            if name in state and int(state[name]) != getattr(self, name):
                raise ValueError(f"W4A16Linear: the state dict has {name}={state[name]}, this "
                                 f"layer has {getattr(self, name)}")

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            try:
                self._check_features(extra)
                layout_info(extra.get("layout", self.layout))
            except ValueError as e:
                error_msgs.append(str(e))
                return
            saved_layout = extra.get("layout", self.layout)
            n, k = self.out_features, self.in_features
            qw = state_dict.get(prefix + "qweight")
            if (saved_layout != self.layout and isinstance(qw, torch.Tensor)
                    and qw.dtype == torch.int32 and tuple(qw.shape) == (n, packed_k(k) // 8)):
                state_dict[prefix + "qweight"] = pack_int4(unpack_int4(qw, saved_layout, n, k),
                                                           self.layout)
            # Optional buffers and the group size follow the checkpoint.
            dev = self.qweight.device
            for name, dtype in (("scales", self.scales.dtype), ("zeros", self.scales.dtype),
                                ("perm", torch.int64)):
                incoming = state_dict.get(prefix + name)
                mine = getattr(self, name)
                if isinstance(incoming, torch.Tensor):
                    if mine is None or mine.shape != incoming.shape:
                        self._buffers[name] = torch.empty(incoming.shape, dtype=dtype, device=dev)
                elif name != "scales" and mine is not None:
                    self._buffers[name] = None
            if "group_size" in extra:
                self.group_size = int(extra["group_size"])
            self._cached = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._cached = None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or p in name for p in patterns)


_WARN_NAMES = 5  # layers named in quantize_model's warning (the "ikport" logger lists them all)


def _unsupported_reason(linear: nn.Linear) -> str:
    reasons = []
    if linear.out_features % N_MULTIPLE:
        reasons.append(f"out_features {linear.out_features} is not a multiple of {N_MULTIPLE}")
    if linear.in_features % K_MULTIPLE:
        reasons.append(f"in_features {linear.in_features} is not a multiple of {K_MULTIPLE}")
    return " and ".join(reasons)


def quantize_model(
    model: nn.Module,
    group_size: int | None = 128,
    symmetric: bool = True,
    exclude: str | Iterable[str] = ("lm_head",),
    *,
    method: str | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` by `W4A16Linear.from_linear(...)`.

    exclude: patterns matched against each Linear's qualified name (as in model.named_modules());
    a Linear is kept in floating point when a pattern matches it as an fnmatch pattern
    ("*.mlp.down_proj") or occurs in it as a substring ("lm_head" keeps "model.lm_head").
    Linears whose shape the INT4 layouts cannot hold (out_features not a multiple of 16, or
    in_features not a multiple of 32) are kept too: one UserWarning gives their number and the
    first few names with the reason, and one warning on the "ikport" logger names them all; so are
    the projections inside an nn.MultiheadAttention, which reads their .weight directly. Biases are
    kept. Every other in_features is quantized: a K that is not a multiple of 128 (SmolLM2's 576)
    is stored padded to one (ikport.int4), and a group size that does not divide K leaves a shorter
    last group (576 at group 128: four groups of 128 and one of 64). Returns `model`
    (or the new layer when `model` itself is an nn.Linear).
    method: how each weight's scales and zero points are chosen, `ikport.int4.quantize_weight`'s
    "rtn" (round to nearest) or "mse" (least squared weight error, no calibration data); None: its
    default. A bad value raises ValueError before any layer is replaced.
    """
    if method is not None and (not isinstance(method, str) or method not in METHODS):
        raise ValueError(f"method must be one of {METHODS} (or None: {DEFAULT_METHOD!r}), got {method!r}")
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if isinstance(model, nn.Linear):
        return model if _matches("", patterns) else W4A16Linear.from_linear(model, group_size, symmetric,
                                                                           method=method)
    targets: list[tuple[str, nn.Module, str, nn.Linear]] = []
    odd: list[str] = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, (W4A16Linear, nn.MultiheadAttention)):
            continue
        for child_name, child in parent.named_children():
            if not isinstance(child, nn.Linear):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if _matches(name, patterns):
                continue
            if child.out_features % N_MULTIPLE or child.in_features % K_MULTIPLE:
                odd.append((name, child))
                continue
            targets.append((name, parent, child_name, child))
    done: dict[int, W4A16Linear] = {}  # a Linear shared by two parents is quantized once
    for _, parent, child_name, child in targets:
        if id(child) not in done:
            done[id(child)] = W4A16Linear.from_linear(child, group_size, symmetric, method=method)
        setattr(parent, child_name, done[id(child)])
    if odd:
        log.warning("quantize_model: kept %d Linear layer(s) in floating point, their shape is not "
                    "out_features %% %d == 0 and in_features %% %d == 0: %s",
                    len(odd), N_MULTIPLE, K_MULTIPLE,
                    ", ".join(f"{name} ({m.out_features}x{m.in_features})" for name, m in odd))
        # The logger is silent by default (NullHandler): say it where every user sees it too.
        shown = "; ".join(f"{name}: {_unsupported_reason(m)}" for name, m in odd[:_WARN_NAMES])
        more = (f"; and {len(odd) - _WARN_NAMES} more (IKPORT_LOG=warning lists them all)"
                if len(odd) > _WARN_NAMES else "")
        warnings.warn(f"quantize_model kept {len(odd)} nn.Linear layer(s) in floating point, their "
                      f"shape does not fit the INT4 layouts: {shown}{more}", UserWarning,
                      stacklevel=2)
    return model
