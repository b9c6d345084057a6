"""The built wheel carries what the JIT needs: kernel sources, shim headers and the manifest are
found from the installed package, run from an unrelated directory; wheel and sdist carry the
license (CPU)."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True)
    return next(dist.glob("ikport-*.whl"))


def test_wheel_and_sdist_carry_the_license(wheel, tmp_path):
    """LICENSE (the Apache License 2.0 text, as pyproject's `license` says) is in both."""
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    with zipfile.ZipFile(wheel) as z:
        info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        assert z.read(f"{info}/licenses/LICENSE").decode() == text
        meta = z.read(f"{info}/METADATA").decode().splitlines()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    sdist = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    subprocess.run([sys.executable, "-c", sdist, str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    with tarfile.open(next(tmp_path.glob("ikport-*.tar.gz"))) as t:
        root = t.getnames()[0].split("/")[0]
        assert t.extractfile(f"{root}/LICENSE").read().decode() == text


def test_wheel_compiles_kernels_from_another_directory(wheel, tmp_path):
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")
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
