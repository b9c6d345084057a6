"""The examples run (CPU: ikport's reference path) and report what they claim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("kv_format,page_size", [("kivi4", 0), ("int8", 16), ("dense", 0)])
def test_kv_cache_example(kv_format, page_size):
    res = subprocess.run([sys.executable, str(EXAMPLES / "kv_cache.py"), "--device", "cpu", "--kv-format", kv_format,
                          "--page-size", str(page_size), "--batch", "2", "--prompt", "200", "--chunk", "150",
                          "--new", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert sum("|out - exact|" in line for line in lines) == 4  # two prompt chunks, the first and last step
    assert "lengths [202, 202]" in lines[-1]
