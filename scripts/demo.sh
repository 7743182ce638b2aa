#!/usr/bin/env bash
# The main job on the built-in default: train a small BitNet b1.58 model on the Gutenberg corpus
# (../shared/data/gutenberg) and sample from it. Re-running starts a fresh run in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf runs/demo
.venv/bin/onebit train --config demo "$@"
.venv/bin/onebit generate --model runs/demo "It was a dark and stormy night" --max-new-tokens 80 --temperature 0.8 --top-k 40 --seed 0
