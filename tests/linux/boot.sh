#!/usr/bin/env bash
# Boot Ferry's Linux test kernel to its shell on this terminal:
#
#   tests/linux/boot.sh [FERRY RUN OPTIONS...]     e.g. --disk path=d.img --rng
#
# Builds the kernel first if needed (tests/linux/build.sh, cached), and
# gives it the command line these instruction-emulating KVMs need (see
# docs/linux.md). Type `poweroff -f` to end it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
ferry=target/debug/ferry
[ -x "$ferry" ] || cargo build -j2 --workspace
linux=$(bash tests/linux/build.sh)
tsc=$("$ferry" plugins --manifest | sed -n 's/.*"tsc_khz": \([0-9][0-9]*\).*/\1/p' | head -n 1)
cmdline="console=ttyS0 panic=-1 noxsave nofsgsbase clearcpuid=smap,smep,popcnt,erms,fsrm,rep_good tsc=reliable"
[ -n "$tsc" ] && cmdline="$cmdline tsc_early_khz=$tsc"
exec "$ferry" run --kernel "$linux/vmlinux" --initramfs "$linux/initramfs.cpio" --cmdline "$cmdline" "$@"
