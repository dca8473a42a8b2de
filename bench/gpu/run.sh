#!/usr/bin/env bash
# The GPU device check: install a bundle made by shared/gpu/pack.sh, then run each section of
# bench/gpu/device_check.py in its own process with a timeout; one JSON record per figure.
#
#   bench/gpu/run.sh BUNDLE_DIR [SECTION ...]      (default: every section)
#
# Run from the repository root on the CUDA machine. The repository's python/ is put in front
# of the installed kvpool wheel (its compiled modules are copied next to it), so the check runs
# the working tree's Python code. Environment: INSTALL_SH (default BUNDLE_DIR/install.sh, else
# ../shared/gpu/install.sh), SITE (default /tmp/kvpool-site), SECTION_TIMEOUT (default 150 s;
# TIMEOUT_<section> for one section),
# OUT (a folder for results.jsonl and the log; default build/gpu-check), QUICK=1 (tiny sizes).
set -uo pipefail
BUNDLE=${1:?usage: bench/gpu/run.sh BUNDLE_DIR [SECTION ...]}
shift
SECTIONS=("$@")
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(env gather quant scatter8 store_ways ttft decode workload arrival persist resize)
SITE=${SITE:-/tmp/kvpool-site}
OUT=${OUT:-build/gpu-check}
SECTION_TIMEOUT=${SECTION_TIMEOUT:-150}
INSTALL_SH=${INSTALL_SH:-$BUNDLE/install.sh}
[ -f "$INSTALL_SH" ] || INSTALL_SH=../shared/gpu/install.sh
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ ! -f "$SITE/env.sh" ]; then
  bash "$INSTALL_SH" "$BUNDLE" "$SITE" >"$OUT/install.log" 2>&1 || {
    tail -20 "$OUT/install.log"
    echo '{"section": "install", "error": "install.sh failed"}'
    exit 1
  }
fi
# shellcheck disable=SC1091
. "$SITE/env.sh"
cp "$SITE"/kvpool/_*.so python/kvpool/ 2>/dev/null
export PYTHONPATH="$PWD/python:$PYTHONPATH"
PY=${PYTHON:-python3}
"$PY" -c 'import kvpool, mlx.core as mx; print("kvpool from", kvpool.__file__, "on", mx.default_device())'

ARGS=()
[ "${QUICK:-0}" = 1 ] && ARGS=(--quick)
failed=0
for s in "${SECTIONS[@]}"; do
  start=$SECONDS
  limit_var="TIMEOUT_$s"
  timeout -k 10 "${!limit_var:-$SECTION_TIMEOUT}" "$PY" bench/gpu/device_check.py "$s" "${ARGS[@]}" \
    2>>"$OUT/stderr.log" | tee -a "$OUT/results.jsonl"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    failed=$((failed + 1))
    echo "{\"section\": \"$s\", \"error\": \"exit $rc\", \"wall_s\": $((SECONDS - start))}" |
      tee -a "$OUT/results.jsonl"
    tail -5 "$OUT/stderr.log"
  fi
done
echo "{\"sections\": ${#SECTIONS[@]}, \"failed\": $failed}"
