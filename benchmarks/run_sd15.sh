#!/usr/bin/env bash
# sdrt against diffusers on a random-weight SD1.5-shaped model: fp32, 256x256, 20 steps, guidance 7.5,
# alternating runs in one invocation. Writes benchmarks/sd15_256.json and renders benchmarks/RESULTS.md.
# Needs ~16 GB free RAM, ~12 GB disk under $WORK and an otherwise idle machine; the model and the
# export (several minutes) are reused when already there. SDRT_ORT_CACHE= (empty) measures sdrt
# without its optimized-graph cache; extra arguments go to `sdrt bench` (e.g. --sweep --plot F.png).
set -euo pipefail
cd "$(dirname "$0")/.."
SDRT=${SDRT:-.venv/bin/sdrt}
PY=${PY:-.venv/bin/python}
WORK=${WORK:-/tmp/bench}
RUNS=${RUNS:-3} WARMUP=${WARMUP:-1}
MODEL="$WORK/sd15" ENGINE="$WORK/sd15-e" JSON=benchmarks/sd15_256.json
mkdir -p "$WORK"

[ -f "$MODEL/model_index.json" ] || "$SDRT" make-model "$MODEL" --arch sd15 --force
[ -f "$ENGINE/manifest.json" ] || "$SDRT" export --model "$MODEL" --out "$ENGINE" --min-size 256 --max-size 512 \
    --max-batch 4 --force
# ONNX Runtime's own graphs with fused attention (the ort-cpu backend picks them up); a no-op when up to date
"$SDRT" build-engines --model "$MODEL" --out "$ENGINE" --backend ort-cpu

# sdrt's optimized-graph cache (sdrt/backends/ort.py, opt-in): filled once here, so the cold start
# measured below is a fresh process with a warm cache (session creation without graph optimization).
export SDRT_ORT_CACHE=${SDRT_ORT_CACHE-$WORK/ort-cache}
[ -z "$SDRT_ORT_CACHE" ] || "$SDRT" txt2img --engines "$ENGINE" --prompt warm --steps 1 --width 256 --height 256 --seed 0 --out "$WORK/warm.png"

echo "load before the run: $(cut -d' ' -f1-3 /proc/loadavg); $(free -g | awk '/Mem:/{print $7}') GB available"
"$SDRT" bench --engines "$ENGINE" --compare-diffusers "$MODEL" --width 256 --height 256 --steps 20 \
    --guidance 7.5 --runs "$RUNS" --warmup "$WARMUP" --json "$JSON" "$@"
"$PY" benchmarks/render_results.py "$JSON" --out benchmarks/RESULTS.md
echo "wrote $JSON and benchmarks/RESULTS.md"
