#!/usr/bin/env bash
# The session's device call, from the repository root on the device machine:
#   bash tools/device_run.sh tests    the attention, prefill and KV-cache GPU suites (pytest -m gpu)
#   bash tools/device_run.sh rest     the rest of the GPU suite
#   bash tools/device_run.sh hostab   the eager host path against the tree in .ab/base (A B B A)
#   bash tools/device_run.sh prefill  the prefill probe (tilings, journey steps) and benchmark
#   bash tools/device_run.sh kv       the compressed-KV benchmark (KV_QUICK=1: the locked workloads)
#   bash tools/device_run.sh bench    nox -s bench-cuda's decode and w4a16 benchmarks
#   bash tools/device_run.sh w4a16    the w4a16 benchmark alone (W4_ONLY=W1,W2: shapes; W4_S seconds)
#   bash tools/device_run.sh e2e      the e2e benchmark, quick (E2E_ARGS, default E1 and E1b with the
#                                     32k capacity search; E2E_S seconds)
#   bash tools/device_run.sh ab       a benchmark area (AB_AREA: prefill, the default, or w4a16) of the tree
#                                     in .ab/prev, then of this one, on the same warm GPU (AB_ONLY: its
#                                     workloads or shapes; AB_ARGS: more flags; AB_S seconds each)
#   bash tools/device_run.sh acc1     the real model's accuracy, first of two calls (the GGUF is 94 MiB, past
#                                     one call's 64 MiB): carry .ab/model/part-00, kept in /tmp/acc
#   bash tools/device_run.sh acc2     then, on the same warm machine, carry .ab/model/part-01, .ab/model/sha256,
#                                     .ab/model/GPL-3 and .ab/whl (gguf's wheel): tools/hf_accuracy.py on the
#                                     GPU (ACC_ARGS; ACC_S seconds). (.ab/model: `split -n 2 -d` of the wheel's GGUF)
#   bash tools/device_run.sh all      all six, in that order (more than one 10-minute call: run them apart)
# Files go to $OUT (the device tool brings them back, 8 at most); COMMIT=<sha> names the commit the
# benchmark files record (the device's copy may carry no git metadata).
# The device has torch, cuda-bindings and NVRTC but no install of ikport: the package imports from
# the tree through PYTHONPATH and three links.
set -u
export PYTHONUNBUFFERED=1
ln -sfn ../backends ikport/backends; ln -sfn ../portability ikport/portability; ln -sfn ../kernels_src ikport/kernels_src
export PYTHONPATH=$PWD IKPORT_CACHE_DIR=$PWD/.ab/cache-new
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr 'H' 'h')
clean() { tr '\000' ' ' | grep -v '^ *$'; }
what=${1:-all}

XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 4"
SUITES=${SUITES:-"tests/test_attention_gpu.py tests/test_prefill_gpu.py tests/test_kvcache_gpu.py"}
# pytest writes straight to the file (a pipe's buffer is lost when a timeout kills the run), cleaned after
if [ "$what" = tests ] || [ "$what" = all ]; then
  log="$OUT/tests-gpu-${GPU}.log"
  timeout ${TESTS_S:-360} python -m pytest -m gpu -q -p no:cacheprovider -rs $XDIST --durations=10 $SUITES > "$log.raw" 2>&1
  clean < "$log.raw" > "$log" && rm -f "$log.raw"
  tail -n 40 "$log"
fi
if [ "$what" = rest ] || [ "$what" = all ]; then
  log="$OUT/tests-gpu-rest-${GPU}.log"
  ignores=$(for s in $SUITES; do printf -- '--ignore=%s ' "$s"; done)
  timeout ${TESTS_S:-360} python -m pytest -m gpu -q -p no:cacheprovider -rs $XDIST --durations=10 tests $ignores > "$log.raw" 2>&1
  clean < "$log.raw" > "$log" && rm -f "$log.raw"
  tail -n 40 "$log"
fi
if [ "$what" = hostab ] || [ "$what" = all ]; then
  timeout ${HOSTAB_S:-300} python tools/host_ab.py "$OUT/structure-host-ab-${GPU}.json" base=.ab/base new=. 2>&1 | clean | tail -n 30
fi
if [ "$what" = prefill ] || [ "$what" = all ]; then
  [ "${PROBE_S:-240}" -gt 0 ] && timeout ${PROBE_S:-240} python tools/prefill_probe.py "$OUT/prefill-probe-${GPU}.json" ${PROBE_ARGS:-} 2>&1 | clean | tail -n 5
  timeout ${PREFILL_S:-420} python -m ikport.bench prefill --out "$OUT/prefill-${GPU}.json" ${COMMIT:+--commit $COMMIT} \
    ${PREFILL_ONLY:+--only $PREFILL_ONLY} 2>&1 | clean > "$OUT/bench-prefill-${GPU}.log"
  tail -n 30 "$OUT/bench-prefill-${GPU}.log"
fi
if [ "$what" = ab ]; then
  # a kernel change against the tree before it (.ab/prev holds `git archive` of it plus the three
  # links; .ab/prev.commit its commit): the same benchmark rows, one process each, back to back
  area=${AB_AREA:-prefill}
  if [ "$area" = w4a16 ]; then
    ab_only=${AB_ONLY:-W1,W2,W3}; ab_args=${AB_ARGS:---quick}
  else
    ab_only=${AB_ONLY:-P1,P2,sweep-B4-L4096-D128-bf16,sweep-B4-L4096-D64-fp16,chunk-B4-T512-L8704,chunk-B4-T512-L8704-paged16}
    ab_args=${AB_ARGS:-}
  fi
  for side in prev new; do
    tree=$([ $side = new ] && echo "$PWD" || echo "$PWD/.ab/prev")
    commit=$([ $side = new ] && echo "${COMMIT:-}" || cat .ab/prev.commit 2>/dev/null)
    (cd "$tree" && PYTHONPATH="$tree" IKPORT_CACHE_DIR="$PWD/.ab/cache-$side" timeout ${AB_S:-200} \
      python -m ikport.bench "$area" --only "$ab_only" $ab_args --out "$OUT/$area-ab-$side-${GPU}.json" \
      ${commit:+--commit $commit} --no-plot 2>&1 | clean > "$OUT/bench-$area-ab-$side-${GPU}.log")
    tail -n 12 "$OUT/bench-$area-ab-$side-${GPU}.log"
  done
fi
if [ "$what" = acc1 ]; then
  mkdir -p /tmp/acc && cp .ab/model/part-00 /tmp/acc/ && ls -la /tmp/acc
fi
if [ "$what" = acc2 ]; then
  cp .ab/model/part-01 /tmp/acc/ && cat /tmp/acc/part-00 /tmp/acc/part-01 > /tmp/acc/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .ab/model/sha256)  /tmp/acc/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 1
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .ab/whl/*.whl || exit 1
  PYTHONPATH=$PWD:/tmp/site timeout ${ACC_S:-500} python tools/hf_accuracy.py --device cuda --model-dir /tmp/acc \
    --text .ab/model/GPL-3 ${ACC_ARGS:---dtypes fp16,bf16 --windows 4 --window 1024} \
    --out "$OUT/e2e-accuracy-${GPU}.json" 2>&1 | clean > "$OUT/accuracy-${GPU}.log"
  tail -n 30 "$OUT/accuracy-${GPU}.log"
fi
if [ "$what" = kv ] || [ "$what" = all ]; then
  timeout ${KV_S:-300} python -m ikport.bench kvcache ${KV_QUICK:+--quick} --out "$OUT/kvcache-${GPU}.json" \
    ${COMMIT:+--commit $COMMIT} 2>&1 | clean > "$OUT/bench-kvcache-${GPU}.log"
  tail -n 30 "$OUT/bench-kvcache-${GPU}.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 420 python -m ikport.bench decode --out "$OUT/decode-${GPU}.json" ${COMMIT:+--commit $COMMIT} 2>&1 | clean > "$OUT/bench-decode-${GPU}.log"
  tail -n 30 "$OUT/bench-decode-${GPU}.log"
  timeout 300 python -m ikport.bench w4a16 --out "$OUT/w4a16-${GPU}.json" ${COMMIT:+--commit $COMMIT} 2>&1 | clean > "$OUT/bench-w4a16-${GPU}.log"
  tail -n 20 "$OUT/bench-w4a16-${GPU}.log"
fi
if [ "$what" = w4a16 ]; then
  timeout ${W4_S:-300} python -m ikport.bench w4a16 ${W4_ONLY:+--only $W4_ONLY} --out "$OUT/w4a16-${GPU}.json" \
    ${COMMIT:+--commit $COMMIT} --no-plot 2>&1 | clean > "$OUT/bench-w4a16-${GPU}.log"
  tail -n 40 "$OUT/bench-w4a16-${GPU}.log"
fi
if [ "$what" = e2e ]; then
  timeout ${E2E_S:-300} python -m ikport.bench e2e ${E2E_ARGS:---quick --workloads E1,E1b --capacity 32768} \
    --out "$OUT/e2e-${GPU}.json" ${COMMIT:+--commit $COMMIT} --no-plot 2>&1 | clean > "$OUT/bench-e2e-${GPU}.log"
  tail -n 30 "$OUT/bench-e2e-${GPU}.log"
fi
ls -la "$OUT"
