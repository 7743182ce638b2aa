#!/usr/bin/env bash
# Checks the AArch64 NEON GEMM kernels (src/onebit/kernels/csrc/arm.c) under emulation: builds
# tests/c/parity.c with the kernel sources for AArch64 (static), runs it with qemu-aarch64 on a
# CPU with dotprod (-cpu max: the sdot path), on one without (-cpu cortex-a53: the smlal path),
# and on -cpu max with ONEBIT_NEON_DOTPROD=0 (the override); then builds and runs the same
# harness natively as a check of the harness itself (x86 variants vs the reference).
# Needs: gcc, aarch64-linux-gnu-gcc, qemu-aarch64 (Debian/Ubuntu:
#   apt-get install -y gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user).
# Exits nonzero on any failure. Usage: scripts/check_arm.sh [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."

CSRC=src/onebit/kernels/csrc
SRCS=(dispatch.c threads.c ref.c x86.c lut.c arm.c pack.c)
CFLAGS=(-O3 -std=c11 -ffp-contract=off -fno-fast-math -pthread)

missing=()
for tool in gcc aarch64-linux-gnu-gcc qemu-aarch64; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "check_arm.sh: FAILED: missing ${missing[*]}." >&2
    echo "  Install (Debian/Ubuntu): apt-get install -y gcc gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user" >&2
    exit 2
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/onebit_check_arm.XXXXXX")
trap 'rm -rf "$build"' EXIT
srcs=()
for f in "${SRCS[@]}"; do srcs+=("$CSRC/$f"); done

step() { echo "== $*"; }

step "build: parity natively (gcc, in the background)"
gcc "${CFLAGS[@]}" -Wall -I"$CSRC" tests/c/parity.c "${srcs[@]}" -lm -o "$build/parity_native" \
    >"$build/native.log" 2>&1 &
native_pid=$!

step "build: arm.c for AArch64 with -Wall -Wextra -Werror"
aarch64-linux-gnu-gcc "${CFLAGS[@]}" -Wall -Wextra -Werror -c "$CSRC/arm.c" -o "$build/arm.o"
if ! aarch64-linux-gnu-objdump -d "$build/arm.o" | grep -c sdot >/dev/null; then
    echo "check_arm.sh: FAILED: arm.c was built without its sdot path (compiler too old?)" >&2
    exit 1
fi

step "build: parity for AArch64 (aarch64-linux-gnu-gcc -O3 -std=c11 -static -pthread)"
objs=("$build/arm.o")
for f in "${SRCS[@]}" ; do
    [[ $f == arm.c ]] && continue
    aarch64-linux-gnu-gcc "${CFLAGS[@]}" -c "$CSRC/$f" -o "$build/${f%.c}.o"
    objs+=("$build/${f%.c}.o")
done
aarch64-linux-gnu-gcc "${CFLAGS[@]}" -static -Wall -I"$CSRC" tests/c/parity.c "${objs[@]}" -lm \
    -o "$build/parity_arm"

if ! wait "$native_pid"; then
    cat "$build/native.log" >&2
    echo "check_arm.sh: FAILED: native build of the harness" >&2
    exit 1
fi
cat "$build/native.log"

status=0
run() { # name, command...
    local name=$1
    shift
    step "run: $name"
    if "$@"; then
        echo "-- $name: OK"
    else
        echo "-- $name: FAILED" >&2
        status=1
    fi
}
run "qemu-aarch64 -cpu max (sdot)" \
    env -u ONEBIT_NEON_DOTPROD -u ONEBIT_KERNELS qemu-aarch64 -cpu max "$build/parity_arm" --expect-neon dot "$@"
run "qemu-aarch64 -cpu cortex-a53 (no dotprod: smlal)" \
    env -u ONEBIT_NEON_DOTPROD -u ONEBIT_KERNELS qemu-aarch64 -cpu cortex-a53 "$build/parity_arm" --expect-neon base "$@"
run "qemu-aarch64 -cpu max, ONEBIT_NEON_DOTPROD=0 (smlal)" \
    env -u ONEBIT_KERNELS ONEBIT_NEON_DOTPROD=0 qemu-aarch64 -cpu max "$build/parity_arm" --expect-neon base "$@"
run "native ($(uname -m))" env -u ONEBIT_KERNELS "$build/parity_native" "$@"

if ((status)); then
    echo "check_arm.sh: FAILED" >&2
    exit 1
fi
echo "check_arm.sh: all parity runs passed"
