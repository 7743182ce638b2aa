#!/usr/bin/env bash
# The main job on the built-in default model: run the packed BitNet b1.58 model that ships in the
# package (trained on ../shared/data/gutenberg) on the CPU engine — no torch, no download — and
# print the text, the speed and the memory next to what the fp16 model would need.
# The first run installs only what the engine needs (numpy, tokenizers, safetensors, jinja2) and
# compiles the C kernels; scripts/setup.sh (run by scripts/test.sh) adds torch and the test tools.
# (Training one yourself: bash scripts/setup.sh, then .venv/bin/onebit train --config demo.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "demo: $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
# Reinstall only when the package metadata or the C sources changed since the last install (by
# this script's engine install or by scripts/setup.sh's full one).
stamp=""
for s in .venv/.onebit-setup .venv/.onebit-engine; do
  if [ -f "$s" ] && [ -z "$(find pyproject.toml setup.py src/onebit/kernels/csrc -newer "$s" | head -1)" ]; then
    stamp=$s
  fi
done
if [ -z "$stamp" ]; then
  say "installing onebit's engine: numpy, tokenizers, safetensors, jinja2 (no torch), then compiling"
  say "the C kernels with gcc (about a minute; the package index is the only network use)"
  t0=$SECONDS
  set +e  # pip's own lines, shortened to what it is doing; the whole log stays in .venv
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar off -e . 2>&1 \
    | tee .venv/onebit-install.log | grep --line-buffered -E "^(Collecting|Building|Successfully)" \
    | sed -u 's/^/  pip: /' >&2
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    grep -v "is ignored" .venv/onebit-install.log | tail -20 >&2
    say "'pip install -e .' failed (exit $rc); the whole log: .venv/onebit-install.log"
    exit 1
  fi
  touch .venv/.onebit-engine
  say "installed in $((SECONDS - t0)) s"
fi
say "running the built-in model (2.4M parameters, 2.2 MB packed) on the C engine"
.venv/bin/onebit generate "It was a dark and stormy night" --max-new-tokens 120 --temperature 0.8 \
  --top-k 40 --seed 0 "$@"
