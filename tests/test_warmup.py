"""`python -m ikport warmup` (ikport/warmup.py): the kernel set, cold and warm passes, the cache
entries it leaves, the progress bar, the summary and the CLI. CPU tests compile a few kernels for
sm_90 with the real NVRTC; the GPU test warms the whole default set and checks that a call then
compiles and loads nothing."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from ikport import kernels, manifest, warmup
from ikport.plan import decode as P
from ikport.plan import prefill as prefill_plan
from ikport.__main__ import main as ikport_main
from ikport.backends.cache import DiskCache
from ikport.backends.target import Target

FEW = dict(head_dims=[64], name_filter="rows=1,")
# fp16 + bf16 x (contiguous, paged, contiguous at 128 threads, one block per SM contiguous and
# paged; sm_90: + the clustered versions of contiguous and both one block per SM for 2, 4 and 8 splits)
N_FEW = 2 * (5 + 3 * len(P.WARMUP_CLUSTERS))
# What the compiling tests build (the same path per kernel, so a few): fp16 + bf16 x (paged, paged
# one block per SM, and sm_90's clustered versions of the latter for 2, 4 and 8 splits)
SOME = dict(head_dims=[64], name_filter="rows=1,paged=true")
N_SOME = 2 * (2 + len(P.WARMUP_CLUSTERS))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IKPORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("IKPORT_NO_DISK_CACHE", raising=False)
    kernels._compiled.clear()
    yield DiskCache(tmp_path / "cache")
    kernels._compiled.clear()


@pytest.fixture
def nvrtc():
    pytest.importorskip("cuda.bindings", reason="pip install 'ikport[cuda]'")


MMA_ROWS = [r for r in P.ROW_TILES if P.use_mma(r)]  # row tiles on the matrix units
VECTOR_ROWS = [r for r in P.ROW_TILES if not P.use_mma(r)]
SM80, SM90, GFX942 = Target("sm_80"), Target("sm_90"), Target("gfx942")  # async; + clusters; neither


def decode_set(target: Target, **kw) -> list:
    return [s for s in warmup.kernel_set(target, **kw) if s.family == "attention_decode"]


def test_default_set_has_the_prefill_kernels():
    for target in (SM80, SM90, GFX942):
        prefill = [s for s in warmup.kernel_set(target) if s.family == "attention_prefill"]
        assert prefill == prefill_plan.default_kernels(target)


def test_default_set_is_what_the_planner_launches():
    specs = decode_set(SM80)
    uris = {s.uri for s in specs}
    # vector row tiles: contiguous, paged, contiguous at 128 threads, contiguous one block per SM,
    # paged one block per SM (up to 4 rows); matrix-unit row tiles: contiguous, paged; + the merge
    paged_one = [r for r in VECTOR_ROWS if r <= P.ONE_PER_SM_PAGED_MAX_ROWS]
    assert len(specs) == len(uris) == 2 * 3 * (len(VECTOR_ROWS) * 4 + len(paged_one) + 2 * len(MMA_ROWS) + 1)
    # Every (group, query tokens) the planner can see maps to a kernel in the set (head dim 128).
    for group in range(1, 9):
        for q_len in range(1, 5):
            rows = P.rows(group * q_len)[0]
            if P.use_mma(rows):
                t = P.mma_tiles(group, q_len, head_dim=128, warp_size=32, max_smem=227 * 1024, c_is_a=True)
                for paged in (False, True):
                    s = manifest.spec("attention_decode", "split_mma", dtype="bf16", head_dim=128, rows=rows,
                                      paged=paged, threads=t.threads, stages=t.stages)
                    assert s.uri in uris
                continue
            for paged, one_per_sm, block in ((False, False, 256), (True, False, 256),
                                             (False, False, P.SMALL_BLOCK_THREADS), (False, True, 256),
                                             (True, True, 256)):
                if paged and one_per_sm and rows > P.ONE_PER_SM_PAGED_MAX_ROWS:
                    continue
                t = P.vector_tiles(group, q_len, one_per_sm=one_per_sm, threads=block, paged=paged)
                s = manifest.spec("attention_decode", "split", dtype="bf16", head_dim=128, rows=t.rows,
                                  paged=paged, threads=t.threads, unroll=t.unroll, stages=t.stages)
                assert s.uri in uris


def test_targets_with_clusters_add_the_clustered_kernels():
    plain, clustered = decode_set(SM80), decode_set(SM90)
    extra = [s for s in clustered if s.kernel in ("split_cluster", "split_mma_cluster")]
    # dtypes x head dims x cluster sizes x (vector row tiles x (contiguous, contiguous one block
    # per SM) + paged one block per SM at up to 4 rows + matrix-unit row tiles x (contiguous, paged))
    paged_one = [r for r in VECTOR_ROWS if r <= P.ONE_PER_SM_PAGED_MAX_ROWS]
    assert len(extra) == len(clustered) - len(plain) == 2 * 3 * 3 * (
        len(VECTOR_ROWS) * 2 + len(paged_one) + 2 * len(MMA_ROWS))
    assert {dict(s.params)["cluster"] for s in extra} == set(P.WARMUP_CLUSTERS)
    # the vector kernel's paged clusters: only its 512-thread one-block-per-SM kernels
    paged = [s for s in extra if dict(s.params)["paged"] and s.kernel == "split_cluster"]
    assert paged and all(dict(s.params)["threads"] == P.ONE_PER_SM_PAGED_THREADS for s in paged)
    # each is the clustered twin of a kernel of the plain set
    twins = {(s.kernel.replace("_cluster", ""), tuple((k, v) for k, v in s.params if k != "cluster")) for s in extra}
    assert twins <= {(s.kernel, s.params) for s in plain}


def test_targets_without_async_copies_skip_the_one_block_per_sm_ring():
    amd = decode_set(GFX942)
    assert len(amd) == 2 * 3 * (len(VECTOR_ROWS) * 3 + len(MMA_ROWS) * 2 + 1)
    one_per_sm_ring = [s for s in amd if dict(s.params).get("stages") == P.ONE_PER_SM_STAGES]
    assert not one_per_sm_ring
    assert any(dict(s.params).get("stages") == P.ONE_PER_SM_STAGES for s in warmup.kernel_set(SM80))
    assert not any(dict(s.params).get("threads") == P.ONE_PER_SM_PAGED_THREADS for s in amd)


def test_all_adds_every_manifest_instantiation():
    every = set(warmup.kernel_set(SM80, all_kernels=True))
    assert set(manifest.default_instantiations()) <= every
    assert set(warmup.kernel_set(SM80)) <= every
    extra = {s.uri for s in warmup.kernel_set(SM80, all_kernels=True, head_dims=[80])}
    assert "attention_decode.naive[dtype=fp16,head_dim=80]" in extra
    assert "attention_decode.combine[dtype=bf16,head_dim=80]" in extra


def test_filter_and_head_dims():
    specs = warmup.kernel_set(SM90, **FEW)
    assert len(specs) == N_FEW
    assert all("head_dim=64" in s.uri and "rows=1," in s.uri for s in specs)
    assert len(warmup.kernel_set(SM90, **SOME)) == N_SOME


def test_cold_then_cached_then_forced(cache, nvrtc):
    r = warmup.warmup(target="sm_90", **SOME)
    assert r.target == "sm_90" and not r.failed
    if not torch.cuda.is_available():
        assert r.device is None  # compiled only; on an sm_90 GPU the kernels are loaded too
    assert [x.status for x in r.rows] == ["compiled"] * N_SOME
    assert all(x.compile_s > 0 for x in r.rows) and r.cold_s > 0
    assert r.warm_s is not None and all(x.warm_s is not None for x in r.rows)
    # One valid entry per kernel, at the key compile_spec uses.
    from ikport.dispatch import get_backend

    be = get_backend("cuda")
    for s in warmup.kernel_set(SM90, **SOME):
        assert cache.get(warmup.entry_key(s, be, Target("sm_90"))) is not None
    assert len(list(cache.root.glob("*/*.bin"))) == N_SOME
    kernels._compiled.clear()
    again = warmup.warmup(target="sm_90", **SOME)
    assert [x.status for x in again.rows] == ["cached"] * N_SOME
    again = warmup.warmup(target="sm_90", warm_pass=False, **SOME)
    assert [x.status for x in again.rows] == ["memory"] * N_SOME and again.warm_s is None
    forced = warmup.warmup(target="sm_90", force=True, **SOME)
    assert [x.status for x in forced.rows] == ["compiled"] * N_SOME
    assert len(list(cache.root.glob("*/*.bin"))) == N_SOME


def test_summary(cache, nvrtc):
    r = warmup.warmup(target="sm_90", **SOME)
    text = r.summary(verbose=True)
    assert f"{N_SOME} kernels for sm_90" in text and f"{N_SOME} compiled" in text
    assert f"cache dir: {cache.root} ({N_SOME} entries" in text
    assert "cold compile of one kernel < 5 s: " in text
    assert "warm start of all kernels < 1 s: " in text
    assert text.count("attention_decode.split[") >= 4
    d = r.as_dict()
    assert d["summary"]["compiled"] == N_SOME
    assert d["summary"]["max_compile_s"] == max(r.compile_times())
    json.dumps(d)


@pytest.mark.parametrize("compile_s, warm_s, cold_goal, warm_goal", [
    ((0.5, 4.99), 0.999, "ok (max 4.99 s)", "ok (0.999 s)"),
    ((5.0, 0.5), 1.0, "MISSED (max 5.00 s)", "MISSED (1.000 s)"),  # the goals are strict bounds
    ((7.25,), 1.039, "MISSED (max 7.25 s)", "MISSED (1.039 s)"),
])
def test_summary_says_whether_the_goals_were_met(compile_s, warm_s, cold_goal, warm_goal):
    """From the times in the report, whatever this host's speed: the slowest compile against
    GOAL_COLD_PER_KERNEL_S, the warm pass against GOAL_WARM_TOTAL_S."""
    assert (warmup.GOAL_COLD_PER_KERNEL_S, warmup.GOAL_WARM_TOTAL_S) == (5.0, 1.0)
    rows = [warmup.KernelRow(f"k{i}", "compiled", compile_s=t, warm_s=0.01)
            for i, t in enumerate(compile_s)]
    rows.append(warmup.KernelRow("cached-one", "cached", compile_s=9.0))  # a read, not a compile
    r = warmup.WarmupReport("sm_90", "cuda", None, None, rows, cold_s=sum(compile_s), warm_s=warm_s)
    text = r.summary()
    assert f"cold compile of one kernel < 5 s: {cold_goal}" in text
    assert f"warm start of all kernels < 1 s: {warm_goal}" in text
    assert r.as_dict()["summary"]["max_compile_s"] == max(compile_s)
    # no warm pass, no compile: no goal to judge
    r = warmup.WarmupReport("sm_90", "cuda", None, None, [rows[-1]], cold_s=9.0)
    assert "goals:" not in r.summary()


def test_failed_kernel_is_a_row_not_an_exception(cache, monkeypatch):
    real = kernels.compile_spec

    def flaky(s, backend, target):
        if "bf16" in s.uri:
            raise RuntimeError("NVRTC compile failed: boom\nsecond line")
        return real(s, backend, target)

    pytest.importorskip("cuda.bindings")
    monkeypatch.setattr(kernels, "compile_spec", flaky)
    r = warmup.warmup(target="sm_90", warm_pass=False, **SOME)
    assert [x.status for x in r.rows].count("failed") == N_SOME // 2
    assert all(x.error == "RuntimeError: NVRTC compile failed: boom" for x in r.failed)
    assert "FAILED attention_decode.split[dtype=bf16" in r.summary()


def test_disk_cache_off(cache, nvrtc, monkeypatch):
    monkeypatch.setenv("IKPORT_NO_DISK_CACHE", "1")
    r = warmup.warmup(target="sm_90", head_dims=[64], name_filter="fp16,head_dim=64,rows=1,paged=true,threads=256")
    assert len(r.rows) == 1 and r.cache_dir is None and r.warm_s is None
    assert "nothing persists" in r.summary()
    assert not cache.root.exists()


def test_progress_bar_tty_and_lines(monkeypatch):
    """A bar on a terminal (one line of the terminal's width, rewritten), a line per kernel
    elsewhere; both with the time elapsed and the time left at the rate so far (a stand-in clock:
    30 s a kernel)."""
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("COLUMNS", "81")
    now = [100.0]
    tty = Tty()
    bar = warmup.Progress(4, tty, width=8, clock=lambda: now[0])
    now[0] += 60
    bar.update(2, "attention_decode.split[x]", "compiled", 0.5)
    now[0] += 65
    bar.update(4, "attention_decode.split[" + "y" * 50 + "]", "compiled", 0.5)
    first, second = tty.getvalue().split("\r")[1:]
    assert first == f"{'[####----] 2/4 1:00 elapsed, ~1:00 left  attention_decode.split[x]':<80}"
    assert second == ("[########] 4/4 2:05 elapsed, ~0:00 left  attention_decode.split["
                      + "y" * 16 + "\n")  # cut at 80 columns
    log = io.StringIO()
    now[0] = 0.0
    bar = warmup.Progress(12, log, clock=lambda: now[0])
    now[0] = 10.0
    bar.update(1, "attention_decode.split[x]", "compiled", 0.5)
    assert log.getvalue() == ("[ 1/12] compiled   0.50 s  attention_decode.split[x]  "
                              "(0:10 elapsed, ~1:50 left)\n")
    warmup.Progress(1, None).update(1, "k", "compiled", 0.5)  # no stream: nothing, no error


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ikport", "warmup", *args], capture_output=True,
                          text=True, env=env)


def test_cli_json_and_text(cache, nvrtc):
    done = _cli("--target", "sm_90", "--head-dims", "64", "--filter", SOME["name_filter"], "--json")
    assert done.returncode == 0, done.stderr
    d = json.loads(done.stdout)
    assert d["summary"]["kernels"] == N_SOME and d["summary"]["failed"] == 0
    assert d["target"] == "sm_90"
    assert d["cache_dir"] == str(cache.root)
    done = _cli("--target", "sm_90", "--head-dims", "64", "--filter", SOME["name_filter"])
    assert done.returncode == 0, done.stderr
    assert f"0 compiled, {N_SOME} from the disk cache" in done.stdout
    assert f"warm: {N_SOME} kernels" in done.stdout
    assert done.stderr.count("cached") == N_SOME  # progress lines (stderr is not a terminal here)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_gpu_or_target_says_what_to_do(cache, capsys):
    assert ikport_main(["warmup"]) == 2
    err = capsys.readouterr().err
    assert "no GPU is visible" in err and "--target" in err


def test_cli_unknown_target(cache, capsys):
    assert ikport_main(["warmup", "--target", "sm_12"]) == 2
    assert "unknown target 'sm_12'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
def test_warmup_on_the_gpu_loads_every_kernel_a_call_uses(cache):
    """The whole default set: compiled, loaded, warmed again from the cache, then a call uses the
    loaded kernel. (How long that takes against the goals is the report's to say: `python -m
    ikport warmup --json`, not an assertion on this host's speed.)"""
    import ikport
    from ikport.dispatch import backend_for

    r = warmup.warmup()
    print(r.summary())
    n = len(warmup.kernel_set(Target(r.target)))
    assert r.device is not None and not r.failed and len(r.rows) == n
    assert all(x.status == "compiled" and x.load_s > 0 for x in r.rows)
    assert r.warm_s is not None and all(x.warm_s is not None for x in r.rows)
    be = backend_for(torch.device("cuda"))
    loaded = len(kernels._loaded)
    q = torch.randn(2, 32, 1, 128, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.float16)
    ikport.attention(q, k, k)
    assert len(kernels._loaded) == loaded, "the call compiled or loaded a kernel warmup should have"
    assert be.name in {key[0] for key in kernels._loaded}


# ---- logging (ikport/log.py): IKPORT_LOG ---------------------------------------------------------
LOG_PROBE = ("import logging, sys; {pre}import ikport; lg = logging.getLogger('ikport'); "
             "print(lg.level, sorted(type(h).__name__ for h in lg.handlers))")


def _probe(env_log, pre=""):
    env = {k: v for k, v in os.environ.items() if k != "IKPORT_LOG"}
    if env_log is not None:
        env["IKPORT_LOG"] = env_log
    return subprocess.run([sys.executable, "-c", LOG_PROBE.format(pre=pre)], capture_output=True,
                          text=True, env=env)


def test_log_unset_adds_only_a_null_handler():
    done = _probe(None)
    assert done.stdout.split(None, 1) == ["0", "['NullHandler']\n"]


def test_log_debug_adds_a_stderr_handler_unless_the_app_configured_logging():
    done = _probe("debug")
    assert done.stdout.split(None, 1) == ["10", "['NullHandler', 'StreamHandler']\n"]
    done = _probe("info", pre="logging.basicConfig(); ")
    assert done.stdout.split(None, 1) == ["20", "['NullHandler']\n"]  # the app's handler prints


def test_log_bad_value_warns():
    done = _probe("loud")
    assert "IKPORT_LOG='loud' is not a logging level" in done.stderr
    assert done.stdout.split(None, 1)[0] == "0"


def test_log_debug_shows_compile_commands(cache, nvrtc):
    done = _cli("--target", "sm_90", "--head-dims", "64", "--filter", "bf16,head_dim=64,rows=1,paged=true,threads=256",
                env_extra={"IKPORT_LOG": "debug"})
    assert done.returncode == 0, done.stderr
    assert "ikport DEBUG" in done.stderr and "compile attention_decode.split[dtype=bf16" in done.stderr
    assert "--gpu-architecture=sm_90" in done.stderr and "name=attn_decode_split<ik::bf16_t, 64, 1" in done.stderr
    assert "ikport INFO" in done.stderr and "compiled attention_decode.split" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nox -s test-cuda)")
def test_log_debug_shows_the_chosen_decode_config(caplog):
    import ikport

    q = torch.randn(3, 24, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(3, 6, 777, 64, device="cuda", dtype=torch.float16)
    with caplog.at_level("DEBUG", logger="ikport"):
        ikport.attention(q, k, k)
        ikport.attention(q, k, k)  # the second call reuses the plan: one line
    plans = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan ")]
    assert len(plans) == 1, plans
    assert "B=3 Hq=24 Hkv=6 Tq=1 D=64 capacity=777" in plans[0] and "splits=" in plans[0]


def test_matrix_unit_row_tiles_take_the_mma_kernels_once_default(monkeypatch):
    """With the matrix units the default from 4 query rows (plan.decode.MMA_MIN_ROWS), those row
    tiles warm attn_decode_split_mma (contiguous and paged, the planner's tiles for the target)
    and, with clusters, its clustered versions; the vector kernels keep the smaller tiles."""
    monkeypatch.setattr(P, "MMA_MIN_ROWS", 4)
    specs = warmup.kernel_set(GFX942, head_dims=[128])
    mma = [s for s in specs if s.kernel == "split_mma"]
    t = P.mma_tiles(4, 1, head_dim=128, warp_size=64, max_smem=64 * 1024, c_is_a=False)
    assert {(dict(s.params)["rows"], dict(s.params)["paged"]) for s in mma} == {
        (4, False), (4, True), (8, False), (8, True)}
    assert all((dict(s.params)["threads"], dict(s.params)["stages"]) == (t.threads, t.stages) for s in mma)
    assert {dict(s.params)["rows"] for s in specs if s.kernel == "split"} == {1, 2}
    clustered = warmup.kernel_set(SM90, head_dims=[128])
    mma90 = [s for s in clustered if s.kernel == "split_mma"]
    assert len([s for s in clustered if s.kernel == "split_mma_cluster"]) == len(mma90) * len(P.WARMUP_CLUSTERS)
