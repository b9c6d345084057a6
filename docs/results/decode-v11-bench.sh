#!/usr/bin/env bash
# The second v11 device call, after decode-v11-device.sh decided the default: the decode
# benchmark (what `nox -s bench-cuda -- decode` runs) at the committed tree, then the whole GPU
# test suite. Writes decode-<gpu>.json/.png, bench and test logs to $OUT. About 9 minutes.
# Run from the repository root on the device: bash docs/results/decode-v11-bench.sh COMMIT
set -u
export PYTHONUNBUFFERED=1
ln -sfn ../backends ikport/backends; ln -sfn ../portability ikport/portability; ln -sfn ../kernels_src ikport/kernels_src
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
clean() { tr '\000' ' ' | grep -v '^ *$'; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -o 'H[0-9]*' | head -1 | tr 'H' 'h')
timeout 330 python -m ikport.bench decode --commit "$1" --out "$OUT/decode-${GPU}.json" 2>&1 | clean > "$OUT/bench-decode-${GPU}.log"
tail -n 30 "$OUT/bench-decode-${GPU}.log"
timeout 220 python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | clean | tail -n 30 > "$OUT/tests-gpu-${GPU}.log"
tail -n 30 "$OUT/tests-gpu-${GPU}.log"
