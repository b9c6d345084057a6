"""Which backend runs a tensor: CPU -> the PyTorch reference; GPU -> the CUDA or HIP backend,
chosen by torch's build (torch.version.hip / torch.version.cuda) unless IKPORT_BACKEND forces one.
A GPU tensor never falls back to the reference: a missing vendor package is an error.
"""

from __future__ import annotations

import functools

import torch

from . import knobs
from .backends.base import Backend


def backend_name_for(device: torch.device) -> str | None:
    """"cuda", "hip", or None for the CPU reference path."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":  # torch reports ROCm GPUs as "cuda" too
        raise ValueError(f"ikport runs on CPU, CUDA and ROCm tensors, not on {device.type!r}")
    forced = knobs.forced_backend()
    if forced:
        return forced
    return "hip" if getattr(torch.version, "hip", None) else "cuda"


@functools.lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    if name == "cuda":
        from .backends.cuda import CudaBackend

        return CudaBackend()
    if name == "hip":
        from .backends.hip import HipBackend

        return HipBackend()
    raise ValueError(f"unknown backend {name!r}")


def backend_for(device: torch.device) -> Backend | None:
    name = backend_name_for(device)
    return None if name is None else get_backend(name)
