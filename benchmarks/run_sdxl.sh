#!/usr/bin/env bash
# sdrt against diffusers on a random-weight SDXL-shaped model (issue 11, point 7): fp32, 512x512 (half the
# native side, as the sd15 table runs at 256), guidance 5, the model's default scheduler, one system in memory
# at a time: `sdrt bench --one-resident` starts a fresh process per system and round and closes it before the
# next one starts (each needs ~14 GB in fp32; both at once do not fit a 24 GB box). Writes
# benchmarks/sdxl_512.json and the `sdxl` section of benchmarks/RESULTS.md.
# Needs ~16 GB free RAM, ~45 GB disk under $WORK (model 14 GB, export 14 GB, its CPU-native graphs 14 GB) and an
# otherwise idle machine; the model and the export (tens of minutes on 2 cores) are reused when already there.
set -euo pipefail
cd "$(dirname "$0")/.."
SDRT=${SDRT:-.venv/bin/sdrt}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/bench}
RUNS=${RUNS:-3} WARMUP=${WARMUP:-1} STEPS=${STEPS:-2} SIZE=${SIZE:-512}
MODEL="$WORK/sdxl" ENGINE="$WORK/sdxl-e" JSON=benchmarks/sdxl_${SIZE}.json
mkdir -p "$WORK"

[ -f "$MODEL/model_index.json" ] || "$SDRT" make-model "$MODEL" --arch sdxl --force
[ -f "$ENGINE/manifest.json" ] || "$SDRT" export --model "$MODEL" --out "$ENGINE" --min-size "$SIZE" \
    --opt-size "$SIZE" --max-size $((SIZE + 256)) --max-batch 1 --force

echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg); $(free -g | awk '/Mem:/{print $7}') GB available"
"$SDRT" bench --engines "$ENGINE" --compare diffusers --model "$MODEL" --width "$SIZE" --height "$SIZE" \
    --steps "$STEPS" --guidance 5 --runs "$RUNS" --warmup "$WARMUP" --one-resident --json "$JSON" "$@"
"$PY" benchmarks/render_results.py "$JSON" --section sdxl \
    --title "SDXL-shaped (random weights, fp32): sdrt beside diffusers, one system resident at a time"
echo "wrote $JSON and the sdxl section of benchmarks/RESULTS.md"
