#!/usr/bin/env bash
# Export a random-weight SD1.5-sized pipeline (UNet 3.4 GB fp32, so the >2 GB external-data path is
# exercised) and record wall time and peak RSS of each step in benchmarks/export_sd15.txt.
# Needs ~6 GB RAM and ~12 GB disk under $WORK (default /tmp); run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SDRT=${SDRT:-.venv/bin/sdrt}
WORK=${WORK:-/tmp}
MODEL="$WORK/m" ENGINE="$WORK/e" OUT=benchmarks/export_sd15.txt
trap 'rm -rf "$MODEL" "$ENGINE"' EXIT
rm -rf "$MODEL" "$ENGINE"

run() {  # run LABEL CMD...: time + peak RSS via GNU time, the command's own output kept
    local log; log=$(mktemp)
    /usr/bin/time -v -o "$log.time" "${@:2}" >"$log" 2>&1 || { cat "$log" "$log.time"; exit 1; }
    {
        echo "== $1: ${*:2}"
        grep -E "Elapsed \(wall clock\)|Maximum resident set size|User time|System time" "$log.time"
        [ "$1" = export ] && cat "$log"
        echo
    } >>"$OUT"
    rm -f "$log" "$log.time"
}

{
    echo "# sdrt export benchmark, SD1.5-sized random weights ($(date -u +%Y-%m-%dT%H:%MZ))"
    echo "# $(uname -m), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB RAM; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo
} >"$OUT"
run make-model "$SDRT" make-model "$MODEL" --arch sd15
run export "$SDRT" -v export --model "$MODEL" --out "$ENGINE" --json
{
    echo "== ENGINE_DIR files"
    (cd "$ENGINE" && ls -l --block-size=M -- *.onnx* manifest.json)
} >>"$OUT"
cat "$OUT"
