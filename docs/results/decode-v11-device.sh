#!/usr/bin/env bash
# One device call for v11 (decode.md, "v11: the matrix units"), about 4.5 minutes, most important
# first: (1) the matrix-unit kernel against the vector kernel through decode-ab.py's "mma" knob
# (each case's plan as the library makes it; D1 in A B B A order); (2) the decode GPU tests of
# the matrix-unit variant; (3) the first v11 text (each copy's source recomputed from (b, hk, t))
# against the library's (the tile cursor) and the lazy O rescale, A B B A at D1.
# Writes five files to $OUT, named for the GPU (h100, h200).
# Run from the repository root on the device: bash docs/results/decode-v11-device.sh [short]
# (short: D1, D3 and B=16 at L=512 only, then the tests; about 2.5 minutes)
set -u
export PYTHONUNBUFFERED=1
ln -sfn ../backends ikport/backends; ln -sfn ../portability ikport/portability; ln -sfn ../kernels_src ikport/kernels_src
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
clean() { tr '\000' ' ' | grep -v '^ *$'; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr 'H' 'h')
CASES="D1:f,mma0 D1:f,mma1 D1:f,mma1#2 D1:f,mma0#2 D3:f,mma0 D3:f,mma1 B16-L512:f,mma0 B16-L512:f,mma1"
[ "${1:-}" = short ] || CASES="$CASES B64-L512:f,mma0 B64-L512:f,mma1 D1-paged16:f,mma0 D1-paged16:f,mma1 D1-bf16:f,mma0 D1-bf16:f,mma1 D2:f,mma0 D2:f,mma1"
timeout 130 python docs/results/decode-ab.py "$OUT/decode-ab-mma-${GPU}.json" lib=lib -- $CASES 2>&1 | clean > "$OUT/decode-ab-mma-${GPU}.log"
grep -E "^(D|B)[0-9]" "$OUT/decode-ab-mma-${GPU}.log" | cut -c1-150
timeout 80 python -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gpu.py -k "split-mma" 2>&1 | clean | tail -n 30 > "$OUT/tests-mma-${GPU}.log"
tail -n 12 "$OUT/tests-mma-${GPU}.log"
[ "${1:-}" = short ] && exit 0
timeout 45 python docs/results/decode-ab.py "$OUT/decode-ab-hoist-${GPU}.json" v11a=docs/results/decode-v11a.cuh lib=lib \
  lazy=lib+lazy lib2=lib v11a2=docs/results/decode-v11a.cuh -- D1:f,mma1 B16-L512:f,mma1 2>&1 | clean > "$OUT/decode-ab-hoist-${GPU}.log"
grep -E "^(D|B)[0-9]" "$OUT/decode-ab-hoist-${GPU}.log" | cut -c1-120
