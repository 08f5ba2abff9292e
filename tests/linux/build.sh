#!/usr/bin/env bash
# Ferry's Linux test kernel and initramfs, built from Debian's
# linux-source-6.1 with this directory's config fragment and patches (see
# docs/testing.md for why each exists).
#
#   tests/linux/build.sh          build (or reuse) and print the directory
#
# The kernels are cached by a hash of what makes them (the config
# fragments, the patches and the linux-source package version) under
# ${FERRY_LINUX_CACHE:-~/.cache/ferry/linux}: a later run with the same
# recipe reuses them at once. The initramfs (seconds to make) is made on
# every run. Everything lands in target/linux of the repository, where
# tests/linux.rs looks.
#
# Outputs: vmlinux (PVH, one CPU), bzImage (the same kernel, Linux boot
# protocol), vmlinux-smp (the same recipe with CONFIG_SMP=y, 4 CPUs at
# most), initramfs.cpio (klibc's shell and tools, busybox, the test init).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
jobs=${FERRY_LINUX_JOBS:-2}

packages="linux-source-6.1 bc bison flex libelf-dev cpio klibc-utils busybox-static xz-utils lz4 make gcc"
missing=""
for p in $packages; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "linux: installing$missing" >&2
    apt-get update -q >&2 && apt-get install -y -q $missing >&2
fi

version=$(dpkg-query -W -f='${Version}' linux-source-6.1)
recipe=$( (echo "linux-source-6.1 $version"; cd "$here" && sha256sum config config-smp patches/*.patch) \
    | sha256sum | cut -c1-16)
cache=${FERRY_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ferry/linux}
out="$cache/$recipe"
target="$repo/target/linux"

# The initramfs, from a file list (the kernel's own gen_init_cpio), and the
# kernels, into target/linux.
finish() {
    local klibc list
    klibc=$(ls /usr/lib/klibc-*.so)
    list=$(mktemp)
    {
        for d in bin dev proc sys tmp lib; do echo "dir /$d 0755 0 0"; done
        echo "nod /dev/console 0600 0 0 c 5 1"
        echo "file /init $here/init 0755 0 0"
        echo "file /lib/$(basename "$klibc") $klibc 0755 0 0"
        for b in /usr/lib/klibc/bin/*; do echo "file /bin/$(basename "$b") $b 0755 0 0"; done
        echo "file /bin/busybox /bin/busybox 0755 0 0"
        for a in ip arping sha256sum od head tail wc grep seq sed tr; do
            [ -e "/usr/lib/klibc/bin/$a" ] || echo "slink /bin/$a busybox 0777 0 0"
        done
    } > "$list"
    rm -rf "$target"
    mkdir -p "$target"
    "$out/gen_init_cpio" "$list" > "$target/initramfs.cpio"
    rm -f "$list"
    for f in vmlinux vmlinux-smp bzImage; do ln -s "$out/$f" "$target/$f"; done
    echo "$target"
}

if [ -f "$out/done" ]; then
    echo "linux: reusing the kernels of recipe $recipe ($(cat "$out/done"))" >&2
    finish
    exit 0
fi

start=$(date +%s)
work="$out.build"
rm -rf "$work"
mkdir -p "$work"
echo "linux: building recipe $recipe in $work" >&2
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
src="$work/linux-source-6.1"
for p in "$here"/patches/*.patch; do
    patch -d "$src" -p1 --quiet < "$p"
done

# One build directory per variant, from the same patched source.
configure() { # dir extra-fragment...
    local dir=$1
    shift
    mkdir -p "$dir"
    make -C "$src" O="$dir" tinyconfig >/dev/null
    "$src/scripts/kconfig/merge_config.sh" -m -O "$dir" "$dir/.config" "$here/config" "$@" >/dev/null
    make -C "$src" O="$dir" olddefconfig >/dev/null
    # Every line of the fragments must have taken (a later fragment's line
    # overrides an earlier one's for the same option).
    local later
    later=$(cat "$@" /dev/null | sed -n 's/^\(CONFIG_[A-Z0-9_]*\)=.*/\1/p')
    for frag in "$here/config" "$@"; do
        while read -r line; do
            key=${line%%=*}
            if [ "$frag" = "$here/config" ] && printf '%s\n' $later | grep -qx "$key"; then
                continue
            fi
            case "$line" in
            CONFIG_*=n)
                if grep -q "^$key=" "$dir/.config"; then echo "linux: $key stayed on" >&2; exit 1; fi ;;
            CONFIG_*)
                if ! grep -qx "$line" "$dir/.config"; then echo "linux: $line did not take" >&2; exit 1; fi ;;
            esac
        done < "$frag"
    done
}

configure "$work/up"
make -C "$src" O="$work/up" -j"$jobs" vmlinux bzImage >"$work/up.log" 2>&1 || { tail -20 "$work/up.log" >&2; exit 1; }
configure "$work/smp" "$here/config-smp"
make -C "$src" O="$work/smp" -j"$jobs" vmlinux >"$work/smp.log" 2>&1 || { tail -20 "$work/smp.log" >&2; exit 1; }

make -C "$src" O="$work/up" usr/gen_init_cpio >/dev/null
mkdir -p "$out.tmp"
cp "$work/up/usr/gen_init_cpio" "$out.tmp/gen_init_cpio"
cp "$work/up/vmlinux" "$out.tmp/vmlinux"
cp "$work/up/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$work/smp/vmlinux" "$out.tmp/vmlinux-smp"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
echo "linux-source-6.1 $version, built in $(( $(date +%s) - start )) s" > "$out/done"
echo "linux: built in $(( $(date +%s) - start )) s" >&2
finish
