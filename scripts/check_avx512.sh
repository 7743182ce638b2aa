#!/usr/bin/env bash
# Checks the AVX-512 VNNI GEMM kernels (src/onebit/kernels/csrc/x86.c, variants "avx512vnni" and
# "avx512vnni_zmm") under
# emulation, since the development machine has no AVX-512: builds tests/c/parity.c with the kernel
# sources as a static x86-64 binary (-O3, no -march), makes it the /init of an initramfs, boots a
# Debian Linux kernel on it in the Bochs full-system emulator with an Intel Tiger Lake CPU model
# (AVX-512 F/BW/VL/VNNI/VBMI), and reads the harness's verdict from the emulated serial port. The
# harness must see CPU detection pick avx512vnni_zmm and must check both against the reference.
# Emulated, so it says nothing about speed.
#
# Needs: gcc, bochs (with bochsbios, vgabios), xorriso, isolinux + syslinux-common, cpio, gzip,
#   Debian/Ubuntu: apt-get install -y gcc bochs bochsbios vgabios xorriso isolinux syslinux-common cpio
# and a Debian x86-64 kernel: $ONEBIT_BOCHS_KERNEL (a vmlinuz), else one cached under
# ${XDG_CACHE_HOME:-~/.cache}/onebit/bochs/, else the package linux-image-cloud-amd64 depends on,
# fetched with `apt-get download` into that cache (tested with Debian 12's 6.1 cloud kernel).
# Exits nonzero on any failure or after $ONEBIT_BOCHS_TIMEOUT seconds (default 900).
# Usage: scripts/check_avx512.sh [parity options, e.g. --seed N]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

CSRC=src/onebit/kernels/csrc
SRCS=(dispatch.c threads.c ref.c x86.c lut.c arm.c pack.c)
CFLAGS=(-O3 -std=c11 -ffp-contract=off -fno-fast-math -pthread)
CPU_MODEL=tigerlake
TIMEOUT=${ONEBIT_BOCHS_TIMEOUT:-900}
ISOLINUX_BIN=/usr/lib/ISOLINUX/isolinux.bin
LDLINUX_C32=/usr/lib/syslinux/modules/bios/ldlinux.c32
BIOS=/usr/share/bochs/BIOS-bochs-latest
VGABIOS=/usr/share/bochs/VGABIOS-lgpl-latest

die() {
    echo "check_avx512.sh: FAILED: $*" >&2
    exit 1
}

missing=()
for tool in gcc bochs-bin xorriso cpio gzip timeout; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
for f in "$ISOLINUX_BIN" "$LDLINUX_C32" "$BIOS" "$VGABIOS"; do
    [[ -f $f ]] || missing+=("$f")
done
if ((${#missing[@]})); then
    echo "check_avx512.sh: FAILED: missing ${missing[*]}." >&2
    echo "  Install (Debian/Ubuntu): apt-get install -y gcc bochs bochsbios vgabios xorriso isolinux syslinux-common cpio" >&2
    exit 2
fi
models=$(bochs-bin -help cpu 2>&1 || true)
if ! grep -qx "$CPU_MODEL" <<<"$models"; then
    die "this bochs has no '$CPU_MODEL' CPU model (bochs >= 2.7 needed; bochs-bin -help cpu lists them)"
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/onebit_check_avx512.XXXXXX")
trap 'rm -rf "$build"' EXIT
step() { echo "== $*"; }

# ---- the kernel ---------------------------------------------------------------------------------
kernel=${ONEBIT_BOCHS_KERNEL:-}
if [[ -z $kernel ]]; then
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/onebit/bochs
    kernel=$(ls "$cache"/vmlinuz-* 2>/dev/null | sort | tail -n 1 || true)
    if [[ -z $kernel ]]; then
        command -v apt-get >/dev/null || die "no kernel: set ONEBIT_BOCHS_KERNEL=/path/to/vmlinuz (x86-64, Debian config)"
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        [[ -n $pkg ]] || die "apt-cache knows no linux-image-cloud-amd64; set ONEBIT_BOCHS_KERNEL=/path/to/vmlinuz"
        step "fetch: $pkg (apt-get download, cached in $cache)"
        (cd "$build" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg"
        dpkg-deb -x "$build"/"$pkg"_*.deb "$build/kpkg"
        mkdir -p "$cache"
        src=$(ls "$build"/kpkg/boot/vmlinuz-* | head -n 1)
        cp "$src" "$cache/.tmp.$$" && mv "$cache/.tmp.$$" "$cache/$(basename "$src")" # never half-written
        kernel=$cache/$(basename "$src")
        rm -rf "$build/kpkg" "$build"/*.deb
    fi
fi
[[ -f $kernel ]] || die "kernel $kernel not found"
echo "kernel: $kernel"

# ---- the harness as /init -----------------------------------------------------------------------
# init: console on the serial port, run the parity harness, report its exit status, power off.
cat >"$build/init.c" <<'EOF'
#define _GNU_SOURCE
#include <cpuid.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

int onebit_parity_main(int argc, char **argv);

int main(int argc, char **argv) {
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int fd = open("/dev/ttyS0", O_RDWR | O_NOCTTY);
    if (fd >= 0) {
        dup2(fd, 0);
        dup2(fd, 1);
        dup2(fd, 2);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsetenv("ONEBIT_KERNELS");
    unsigned r[12] = {0}, a, b, c, d;
    for (unsigned i = 0; i < 3; i++) __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
    char brand[49] = {0};
    memcpy(brand, r, 48);
    __cpuid_count(7, 0, a, b, c, d);
    unsigned xlo = 0, xhi = 0;
    __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
    __builtin_cpu_init();
    printf("ONEBIT_AVX512_CHECK: cpu '%s' cpuid7.ebx=%08x ecx=%08x xcr0=%#x avx512f=%d bw=%d vl=%d vnni=%d vbmi=%d\n",
           brand, b, c, xlo, !!__builtin_cpu_supports("avx512f"), !!__builtin_cpu_supports("avx512bw"),
           !!__builtin_cpu_supports("avx512vl"), !!__builtin_cpu_supports("avx512vnni"),
           !!__builtin_cpu_supports("avx512vbmi"));
    int rc = onebit_parity_main(argc, argv);
    fflush(stdout);
    fflush(stderr);
    printf("ONEBIT_AVX512_CHECK: parity exit %d\n", rc);
    fflush(stdout);
    tcdrain(1);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
EOF

step "build: parity + init, static x86-64 (gcc -O3 -static, no -march)"
objs=()
for f in "${SRCS[@]}"; do
    gcc "${CFLAGS[@]}" -Wall -c "$CSRC/$f" -o "$build/${f%.c}.o"
    objs+=("$build/${f%.c}.o")
done
gcc "${CFLAGS[@]}" -Wall -I"$CSRC" -Dmain=onebit_parity_main -c tests/c/parity.c -o "$build/parity.o"
gcc "${CFLAGS[@]}" -Wall -c "$build/init.c" -o "$build/init.o"
gcc -static -pthread "$build/init.o" "$build/parity.o" "${objs[@]}" -lm -o "$build/init"
objdump -d "$build/x86.o" >"$build/x86.dis"
if ! grep -q vpdpbusd "$build/x86.dis"; then
    die "x86.o has no vpdpbusd: the avx512vnni kernels were not compiled (compiler too old?)"
fi

# ---- initramfs + ISO ----------------------------------------------------------------------------
# Kernel parameters, each for a reason:
#   clearcpuid: features whose Bochs 2.7 emulation the kernel trips over: 321 xsavec, 323 xsaves
#     (Bochs reports the uncompacted size for XSAVEC/XSAVES, the kernel then disables XSAVE and
#     with it AVX), 515 pku, 516 ospke (Bochs's CPUID leaf 0xD.9 for PKRU is empty, same effect),
#     124 aperfmperf (MSRs not implemented), 580 fsrm (Bochs clears fast strings, so ERMS is
#     off while FSRM stays on, a combination on which Linux 6.1's memmove corrupts memory);
#   nosmp, mitigations=off, quiet: a faster boot.
# The parity arguments follow "--" and reach /init as argv.
parity_args=(--variants reference,avx512vnni,avx512vnni_zmm --expect-auto avx512vnni_zmm "$@")
mkdir -p "$build/root" "$build/iso/isolinux"
cp "$build/init" "$build/root/init"
(cd "$build/root" && find . | cpio -o -H newc --quiet | gzip -1 >"$build/iso/initrd.gz")
cp "$kernel" "$build/iso/vmlinuz"
cp "$ISOLINUX_BIN" "$LDLINUX_C32" "$build/iso/isolinux/"
cat >"$build/iso/isolinux/isolinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  APPEND initrd=/initrd.gz console=ttyS0 quiet nosmp mitigations=off clearcpuid=321,323,515,516,124,580 -- ${parity_args[*]}
EOF
xorriso -as mkisofs -quiet -o "$build/boot.iso" -b isolinux/isolinux.bin -c isolinux/boot.cat \
    -no-emul-boot -boot-load-size 4 -boot-info-table "$build/iso" >"$build/xorriso.log" 2>&1 \
    || { cat "$build/xorriso.log" >&2; die "xorriso"; }

# ---- boot it ------------------------------------------------------------------------------------
# Headless: the rfb display (no client awaited), sound off (Bochs 2.7's ALSA probe aborts without a
# sound card), the built-in debugger fed "c" (continue) and then end of input, so it never waits.
cat >"$build/bochsrc" <<EOF
megs: 256
romimage: file=$BIOS
vgaromimage: file=$VGABIOS
cpu: model=$CPU_MODEL, count=1, ips=100000000, reset_on_triple_fault=0
ata0-master: type=cdrom, path=$build/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$build/serial.log
display_library: rfb, options="timeout=0"
mouse: enabled=0
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
clock: sync=none, time0=local
log: $build/bochs.log
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
magic_break: enabled=0
EOF
printf 'c\n' >"$build/debugger.rc"
step "run: bochs -cpu $CPU_MODEL, Linux $(basename "$kernel"), /init = parity ${parity_args[*]} (timeout ${TIMEOUT}s)"
set +e
timeout "$TIMEOUT" bochs-bin -q -f "$build/bochsrc" -rc "$build/debugger.rc" </dev/null >"$build/bochs.out" 2>&1
brc=$?
set -e
elapsed=$(($(date +%s) - start))

sed -n 's/^.*\(ONEBIT_AVX512_CHECK: .*\)$/\1/p; /^parity:/p; /^MISMATCH/p; /^FAIL/p' "$build/serial.log" 2>/dev/null | tr -d '\r'
fail() {
    echo "-- serial log (tail):" >&2
    tail -n 40 "$build/serial.log" 2>/dev/null | tr -d '\r' >&2 || true
    echo "-- bochs (tail):" >&2
    grep -v "RDMSR\|WRMSR" "$build/bochs.log" 2>/dev/null | tail -n 15 >&2 || true
    die "$* (after ${elapsed}s)"
}
((brc == 124)) && fail "timed out after ${TIMEOUT}s"
grep -q "ONEBIT_AVX512_CHECK: parity exit 0" "$build/serial.log" || fail "no passing verdict from the harness on the serial port"
grep -q "^parity: OK, [0-9]* checks passed" "$build/serial.log" || fail "no 'parity: OK' line"
for v in avx512vnni avx512vnni_zmm; do
    grep -q "^parity: $v  *i2  *[1-9][0-9]* checks, t1_6  *[1-9][0-9]* checks" "$build/serial.log" \
        || fail "$v was not checked"
done
echo "check_avx512.sh: PASS: avx512vnni and avx512vnni_zmm match the reference under bochs ($CPU_MODEL), ${elapsed}s"
