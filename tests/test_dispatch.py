"""Backend choice (CPU)."""

import pytest
import torch

from ikport import dispatch


def test_cpu_goes_to_reference():
    assert dispatch.backend_name_for(torch.device("cpu")) is None


def test_gpu_backend_follows_torch_build(monkeypatch):
    monkeypatch.delenv("IKPORT_BACKEND", raising=False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert dispatch.backend_name_for(torch.device("cuda", 0)) == "cuda"
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert dispatch.backend_name_for(torch.device("cuda", 0)) == "hip"


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("IKPORT_BACKEND", "hip")
    assert dispatch.backend_name_for(torch.device("cuda", 0)) == "hip"
    monkeypatch.setenv("IKPORT_BACKEND", "metal")
    with pytest.raises(ValueError, match="IKPORT_BACKEND"):
        dispatch.backend_name_for(torch.device("cuda", 0))


def test_missing_vendor_package_is_an_error_not_a_fallback(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *a, **kw):
        if name.startswith("cuda"):
            raise ImportError("no cuda-python here")
        return real_import(name, *a, **kw)

    from ikport.backends import base, cuda

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(base.BackendUnavailable, match="pip install"):
        cuda.CudaBackend()
