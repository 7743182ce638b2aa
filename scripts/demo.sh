#!/usr/bin/env bash
# The main job on the built-in default model: run the packed BitNet b1.58 model that ships in the
# package (trained on ../shared/data/gutenberg) on the CPU engine — no torch, no download — and
# print the text, the speed and the memory next to what the fp16 model would need.
# (Training one yourself: .venv/bin/onebit train --config demo, then onebit export.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/onebit generate "It was a dark and stormy night" --max-new-tokens 120 --temperature 0.8 \
  --top-k 40 --seed 0 "$@"
