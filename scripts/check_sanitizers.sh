#!/usr/bin/env bash
# Runs the C kernels under AddressSanitizer + UndefinedBehaviorSanitizer (gcc):
#   1. builds a sanitized copy of the kernel library (every source setup.py builds, its flags
#      -std=c11 -ffp-contract=off -fno-fast-math, with -O1 -g -fno-omit-frame-pointer
#      -fsanitize=address,undefined -fno-sanitize-recover=undefined) into build/sanitizers/ --
#      never the package's own .so;
#   2. builds the C parity harness (tests/c/parity.c) against the same objects and runs it: every
#      variant this CPU runs against the reference, 1 and 3 threads, corrupt bytes;
#   3. runs the kernel and engine tests with Python loading that library (ONEBIT_KERNELS_LIB, read
#      by src/onebit/kernels/__init__.py) and the sanitizer runtimes preloaded. The tests force
#      every variant this CPU runs themselves (kernels.use(...)).
# Any sanitizer report fails the run: a report halts its process (halt_on_error=1,
# -fno-sanitize-recover=undefined); ASan reports are also written to build/sanitizers/reports/
# (which catches those of processes a test starts, whose stderr the test captures), and the
# harness' and pytest's output (pytest with --capture=sys, so a report that kills it is not
# swallowed) is scanned for reports. Leak checking is off: the interpreter and torch "leak" by
# design at exit. ASan cannot see loads inside inline asm: x86.c reads the bytes its asm GEMM step
# loads with an instrumented memcpy first in this build (__SANITIZE_ADDRESS__).
# Deliberately left out of the flags: Python's -fwrapv (sysconfig CFLAGS, which setup.py's build
# inherits): it makes signed overflow defined, so UBSan could not report it; the kernels must not
# rely on it.
#
# Needs: gcc with libasan/libubsan (Debian/Ubuntu: apt-get install -y gcc; the runtimes come with
# libgcc-<ver>-dev), and .venv (bash scripts/setup.sh).
# Usage: scripts/check_sanitizers.sh [pytest args]: options (e.g. -x -k "gemm or attention") apply
#   to the default files tests/test_kernels.py test_engine.py test_kv.py test_kv_engine.py
#   test_sparse.py test_packing.py; naming test files (tests/...) runs those instead.
# Exits nonzero on any failure or sanitizer report (2 if a tool is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

CSRC=src/onebit/kernels/csrc
OUT=build/sanitizers
CFLAGS=(-std=c11 -ffp-contract=off -fno-fast-math -O1 -g -fno-omit-frame-pointer
        -fsanitize=address,undefined -fno-sanitize-recover=undefined -fPIC -pthread)
TESTS=(tests/test_kernels.py tests/test_engine.py tests/test_kv.py tests/test_kv_engine.py
       tests/test_sparse.py tests/test_packing.py)
PY=.venv/bin/python

die() {
    echo "check_sanitizers.sh: FAILED: $*" >&2
    exit 1
}
step() { echo "== $*"; }

command -v gcc >/dev/null 2>&1 || { echo "check_sanitizers.sh: FAILED: gcc not on PATH (apt-get install -y gcc)" >&2; exit 2; }
libasan=$(gcc -print-file-name=libasan.so)
libubsan=$(gcc -print-file-name=libubsan.so)
for lib in "$libasan" "$libubsan"; do
    # gcc prints the bare name when it has no such runtime
    if [[ $lib != /* || ! -e $lib ]]; then
        echo "check_sanitizers.sh: FAILED: gcc has no sanitizer runtime ($lib); install libasan/libubsan" \
             "(Debian/Ubuntu: apt-get install -y gcc, which pulls libgcc-<ver>-dev)" >&2
        exit 2
    fi
done
[[ -x $PY ]] || { echo "check_sanitizers.sh: FAILED: no $PY; run bash scripts/setup.sh first" >&2; exit 2; }

# The sources setup.py builds (a source added there is picked up here).
mapfile -t SRCS < <("$PY" - <<'EOF'
import ast, pathlib
tree = ast.parse(pathlib.Path("setup.py").read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.Tuple) and node.elts and all(
            isinstance(e, ast.Constant) and str(e.value).endswith(".c") for e in node.elts):
        print("\n".join(e.value for e in node.elts))
        break
EOF
)
((${#SRCS[@]})) || die "could not read the C source list from setup.py"

# ---- 1. the sanitized library and harness ------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT/obj" "$OUT/reports"
step "build: ${#SRCS[@]} kernel sources with ${CFLAGS[*]} -> $OUT/"
pids=()
for f in "${SRCS[@]}"; do
    gcc "${CFLAGS[@]}" -Wall -c "$CSRC/$f" -o "$OUT/obj/${f%.c}.o" 2>"$OUT/obj/${f%.c}.log" &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=1
    cat "$OUT/obj/${SRCS[$i]%.c}.log" >&2
done
((failed == 0)) || die "compiling the kernel sources"
objs=("$OUT"/obj/*.o)
gcc "${CFLAGS[@]}" -shared "${objs[@]}" -lm -o "$OUT/_onebit_kernels.so.tmp"
mv "$OUT/_onebit_kernels.so.tmp" "$OUT/_onebit_kernels.so"
gcc "${CFLAGS[@]}" -Wall -I"$CSRC" tests/c/parity.c "${objs[@]}" -lm -o "$OUT/parity"

# ASan writes its reports to files (also those of processes a test starts, whose stderr the test
# captures); UBSan, linked with ASan, ignores log_path and writes to stderr, which is logged and
# scanned. pytest runs with --capture=sys, so a report that kills pytest itself is not swallowed.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:log_path=$PWD/$OUT/reports/asan:log_exe_name=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

reports() { # log file: prints every report found so far; true if there is none
    local found=0 f
    for f in "$OUT"/reports/*; do
        [[ -e $f ]] || continue
        found=1
        echo "---- sanitizer report $f" >&2
        cat "$f" >&2
    done
    if grep -qE "runtime error:|ERROR: AddressSanitizer|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$1"; then
        found=1
        echo "---- sanitizer report(s) in $1:" >&2
        grep -E -A3 "runtime error:|ERROR: AddressSanitizer|SUMMARY: " "$1" >&2
    fi
    return "$found"
}

status=0
# ---- 2. the C parity harness --------------------------------------------------------------------
step "run: parity harness (every variant this CPU runs vs the reference)"
if env -u ONEBIT_KERNELS "$OUT/parity" 2>&1 | tee "$OUT/parity.log"; then
    echo "-- parity: OK"
else
    echo "-- parity: FAILED" >&2
    status=1
fi
reports "$OUT/parity.log" || status=1

# ---- 3. the kernel and engine tests -------------------------------------------------------------
run_py() {
    env -u ONEBIT_KERNELS LD_PRELOAD="$libasan:$libubsan${LD_PRELOAD:+:$LD_PRELOAD}" \
        ONEBIT_KERNELS_LIB="$PWD/$OUT/_onebit_kernels.so" "$PY" "$@"
}
step "check: Python loads the sanitized library"
run_py - <<'EOF' 2>&1 | tee "$OUT/check.log" || { reports "$OUT/check.log"; die "Python did not load $OUT/_onebit_kernels.so (see above)"; }
import ctypes, os
from onebit import kernels as K
want = os.environ["ONEBIT_KERNELS_LIB"]
assert str(K._find_library()) == want, (K._find_library(), want)
K.isa()  # loads it
maps = open("/proc/self/maps").read()
assert want in maps and "libasan" in maps, "sanitized library or libasan not mapped"
print("loaded", want, "| variants this CPU runs:", ", ".join(K.available_isas()))
EOF
args=("${TESTS[@]}" "$@")
for a in "$@"; do # a test path among the arguments replaces the default files; options add to them
    if [[ $a == tests/* || $a == */tests/* ]]; then args=("$@"); break; fi
done
step "run: pytest ${args[*]} (sanitized kernels)"
if run_py -m pytest -q -p no:cacheprovider --capture=sys "${args[@]}" 2>&1 | tee "$OUT/pytest.log"; then
    echo "-- pytest: OK"
else
    echo "-- pytest: FAILED (exit status ${PIPESTATUS[0]})" >&2
    status=1
fi
reports "$OUT/pytest.log" || status=1

if ((status)); then
    echo "check_sanitizers.sh: FAILED" >&2
    exit 1
fi
echo "check_sanitizers.sh: no sanitizer reports; all checks passed"
