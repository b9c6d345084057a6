"""The built wheel carries what the JIT needs: kernel sources, shim headers and the manifest are
found from the installed package, run from an unrelated directory (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_compiles_kernels_from_another_directory(tmp_path):
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("ikport-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "IKPORT_CACHE_DIR": str(tmp_path / "cache")}
    probe = ("import ikport, json, sys; from ikport.backends import source; "
             "print(json.dumps([ikport.__file__, str(source.KERNELS_DIR)]))")
    where = json.loads(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                                      check=True, capture_output=True, text=True).stdout)
    assert all(p.startswith(str(site)) for p in where), where
    out = subprocess.run([sys.executable, "-m", "ikport", "compile", "--target", "sm_90", "--json",
                          "--filter", "mma_tile"], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True).stdout
    assert [r["status"] for r in json.loads(out)] == ["ok"] * 4
    # a family file in a sub-directory whose includes sit beside it (kernels_src/attention/)
    out = subprocess.run([sys.executable, "-m", "ikport", "compile", "--target", "sm_90", "--json",
                          "--filter", "attention_decode.combine[dtype=fp16,head_dim=64]"], cwd=tmp_path, env=env,
                         check=True, capture_output=True, text=True).stdout
    assert [r["status"] for r in json.loads(out)] == ["ok"]
