#!/usr/bin/env bash
# (Ran in session 11 against 5c3d155; the copy-engine path it switches on was removed after.)
# One device call for v10 (decode.md, "v10: the copy engine, prepared"): the stream-only question,
# the A/B of the copy-engine ring against the cp.async ring, then, with the ring switched to the
# copy engine in this copy of the tree only, the decode GPU tests and compute-sanitizer on the
# paths it changes; also memcheck/initcheck on the default paged early copy (4305f28's clamped
# page ids, never sanitized). About 6-8 minutes on an H100. Writes six files to $OUT.
# Run from the repository root on the device: bash docs/results/decode-v10-device.sh
set -u
export PYTHONUNBUFFERED=1
# the package from this tree (as earlier sessions ran it there: ikport.backends & co. by links)
ln -sfn ../backends ikport/backends; ln -sfn ../portability ikport/portability; ln -sfn ../kernels_src ikport/kernels_src
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
clean() { tr '\000' ' ' | grep -v '^ *$'; }

python docs/results/stream-bulk.py "$OUT/stream-bulk-h100.json" 2>&1 | clean > "$OUT/stream-bulk-h100.log"
grep -E "readpass|grid= *(64|128|132)" "$OUT/stream-bulk-h100.log"

python docs/results/decode-ab.py "$OUT/decode-ab-bulk-h100.json" cp=lib bulk=lib+bulk bulk2=lib+bulk cp2=lib -- \
  D1:f D3:f D2:f D1-paged16:f D2-paged16:f D1-paged1:f D1-paged256:f D1-d96:f D1-d64:f \
  B16-L512:f B64-L512:f B4-L512:f B1-L512:f D1 D1-paged16 2>&1 | clean > "$OUT/decode-ab-bulk-h100.log"
tail -n 40 "$OUT/decode-ab-bulk-h100.log"

SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
T=tests/test_attention_gpu.py
SUBSET="$T::test_cache_rows_past_kv_len_never_leak $T::test_paged_launch_rule_matches_reference $T::test_cluster_merge_matches_reference"
{
  echo "== default tree: memcheck and initcheck on the paged early copy (clamped page ids)"
  $SAN --tool memcheck --padding 256 --report-api-errors no python -m pytest -q -m gpu -p no:cacheprovider \
    "$T::test_cache_rows_past_kv_len_never_leak" "$T::test_paged_launch_rule_matches_reference" 2>&1 | tail -n 3
  $SAN --tool initcheck --report-api-errors no python -m pytest -q -m gpu -p no:cacheprovider \
    "$T::test_cache_rows_past_kv_len_never_leak" 2>&1 | tail -n 3
  sed -i 's/^#define IK_DECODE_BULK_COPY 0$/#define IK_DECODE_BULK_COPY 1/' kernels_src/attention_decode.cuh
  grep -n "^#define IK_DECODE_BULK_COPY" kernels_src/attention_decode.cuh
  echo "== copy-engine ring: memcheck, racecheck, synccheck"
  for tool in "memcheck --padding 256 --report-api-errors no" "racecheck --kernel-name kns=attn_decode" \
              "synccheck --kernel-name kns=attn_decode"; do
    echo "\$ compute-sanitizer --tool $tool (leak, paged rule, cluster merge)"
    $SAN --tool $tool python -m pytest -q -m gpu -p no:cacheprovider $SUBSET 2>&1 | tail -n 3
  done
} 2>&1 | clean > "$OUT/decode-sanitize-v10-h100.log"
cat "$OUT/decode-sanitize-v10-h100.log"

echo "== copy-engine ring: the decode GPU tests" > "$OUT/tests-bulk-h100.log"
timeout 400 python -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gpu.py 2>&1 | clean | tail -n 25 >> "$OUT/tests-bulk-h100.log"
sed -i 's/^#define IK_DECODE_BULK_COPY 1$/#define IK_DECODE_BULK_COPY 0/' kernels_src/attention_decode.cuh
tail -n 5 "$OUT/tests-bulk-h100.log"
