#!/usr/bin/env bash
# The kernels called straight from C, no Python: GEMV back to back on weights rotated through
# 40 copies (cold) or one copy (hot), 1 and 2 threads, plus the read-bandwidth probe; GEMM m=128;
# and the vector-port probe (ports.c: are the two vCPUs two cores, and how fast is vpmaddubsw).
# Usage: bash bench/c/run.sh   (builds into a temp dir with the package's flags + -DUNCHECKED)
set -euo pipefail
cd "$(dirname "$0")"
S=../../src/onebit/kernels/csrc
out=$(mktemp -d)
gcc -O3 -std=c11 -ffp-contract=off -DUNCHECKED -I$S gemv.c $S/*.c -lm -lpthread -o "$out/gemv"
gcc -O3 -std=c11 -ffp-contract=off -I$S gemm.c $S/*.c -lm -lpthread -o "$out/gemm"
gcc -O2 -std=c11 ports.c -lpthread -o "$out/ports"
"$out/gemv"
"$out/gemm"
"$out/ports"
rm -rf "$out"
