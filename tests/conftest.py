import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session compiles into its own cache dir unless the caller chose one."""
    if "IKPORT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("IKPORT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ikport-cache"))


def gpu_available() -> bool:
    return torch.cuda.is_available()


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
