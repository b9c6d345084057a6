#!/usr/bin/env bash
# One device call for v11 (decode.md, "v11: the matrix units"): the A/B of the matrix-unit kernel
# against the vector kernel through decode-ab.py's "mma" knob (each case's plan as the library
# makes it; repeats in mirrored order), then the decode GPU tests (split-mma beside split-vector). About 8 minutes. Last, the lazy O rescale's A/B. Writes five files to $OUT, named for the GPU (h100, h200).
# Run from the repository root on the device: bash docs/results/decode-v11-device.sh
set -u
export PYTHONUNBUFFERED=1
ln -sfn ../backends ikport/backends; ln -sfn ../portability ikport/portability; ln -sfn ../kernels_src ikport/kernels_src
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
clean() { tr '\000' ' ' | grep -v '^ *$'; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr 'H' 'h')
timeout 230 python docs/results/decode-ab.py "$OUT/decode-ab-mma-${GPU}.json" lib=lib -- \
  D1:f,mma0 D1:f,mma1 D1:f,mma1#2 D1:f,mma0#2 D1:f,mma1,st4 D1:f,mma1,st3 D1:f,mma1,t256,st3 \
  D3:f,mma0 D3:f,mma1 D2:f,mma0 D2:f,mma1 B16-L512:f,mma0 B16-L512:f,mma1 B64-L512:f,mma0 B64-L512:f,mma1 \
  D1-paged16:f,mma0 D1-paged16:f,mma1 D1-bf16:f,mma0 D1-bf16:f,mma1 D1-d64:f,mma0 D1-d64:f,mma1 \
  D1-d256:f,mma0 D1-d256:f,mma1 2>&1 | clean > "$OUT/decode-ab-mma-${GPU}.log"
grep -E "^(D|B)[0-9]" "$OUT/decode-ab-mma-${GPU}.log" | cut -c1-160
tail -n 5 "$OUT/decode-ab-mma-${GPU}.log"
timeout 220 python -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gpu.py 2>&1 | clean | tail -n 40 > "$OUT/tests-mma-${GPU}.log"
tail -n 40 "$OUT/tests-mma-${GPU}.log"
# the O rescale only when a row's max moved (the "lazy" splice), A B B A on the matrix-unit kernel
timeout 90 python docs/results/decode-ab.py "$OUT/decode-ab-lazy-${GPU}.json" lib=lib lazy=lib+lazy lazy2=lib+lazy lib2=lib -- \
  D1:f,mma1 D3:f,mma1 B16-L512:f,mma1 2>&1 | clean > "$OUT/decode-ab-lazy-${GPU}.log"
grep -E "^(D|B)[0-9]" "$OUT/decode-ab-lazy-${GPU}.log" | cut -c1-120
