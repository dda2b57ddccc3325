#!/usr/bin/env bash
# QEMU's own vhost-user-blk qtest cases (tests/qtest/vhost-user-blk-test.c: basic, indirect,
# idx, nxvirtq, hotplug, multiqueue) against daxd. Debian's QEMU has no qtest accelerator,
# so QEMU 10.0.2 (the version ci/install-deps.sh installs) is built from Debian's source
# tarball (fetched from the mirror apt already uses), x86_64 only, with vhost-user and
# little else: the emulator and the qos-test binary, cached under .cache/qemu-qtest/
# (cold: a few minutes on 2 cores; warm: seconds).
# The test's qemu-storage-daemon is replaced by
# resources/qtest/daxd-as-qemu-storage-daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
version=10.0.2
cache=$root/.cache/qemu-qtest
src=$cache/qemu-$version
build=$src/build

if [ ! -x "$build/tests/qtest/qos-test" ] || [ ! -x "$build/qemu-system-x86_64" ]; then
    mkdir -p "$cache"
    tarball=$cache/qemu_$version+ds.orig.tar.xz
    if [ ! -f "$tarball" ]; then
        mirror=$(ci/debian-mirror.sh)
        curl -fsSL -o "$tarball.part" "$mirror/pool/main/q/qemu/qemu_$version+ds.orig.tar.xz"
        mv "$tarball.part" "$tarball"
    fi
    rm -rf "$src"
    tar -xJf "$tarball" -C "$cache"
    # Debian's source drops the firmware blobs; the build lists them but the tests need
    # none: empty stand-ins, and no installation of them.
    (
        cd "$src/pc-bios"
        for f in edk2-aarch64-code.fd edk2-arm-code.fd edk2-arm-vars.fd edk2-riscv-code.fd \
            edk2-riscv-vars.fd edk2-i386-code.fd edk2-i386-secure-code.fd edk2-i386-vars.fd \
            edk2-x86_64-code.fd edk2-x86_64-secure-code.fd edk2-loongarch64-code.fd \
            edk2-loongarch64-vars.fd; do
            [ -e "$f.bz2" ] || printf '' | bzip2 > "$f.bz2"
        done
        sed -n "/^blobs = \[/,/^\]/p" meson.build | grep -o "'[^']*'" | tr -d "'" |
            while read -r blob; do [ -e "$blob" ] || : > "$blob"; done
        sed -i 's/^  install_data(blobs, install_dir: qemu_datadir)/  # (no blobs)/' meson.build
    )
    # The vhost-user-blk test is built only with QEMU's tools and its own vhost-user-blk
    # server, neither of which it needs when another backend stands in.
    sed -i 's/^if have_tools and have_vhost_user_blk_server$/if have_vhost_user/' \
        "$src/tests/qtest/meson.build"
    mkdir -p "$build"
    (cd "$build" && ../configure --python=/usr/bin/python3 --target-list=x86_64-softmmu --without-default-features \
        --enable-vhost-user --disable-docs --disable-tools --disable-user --disable-werror --disable-fdt \
        --disable-download > configure.log 2>&1) || { tail -20 "$build/configure.log"; exit 1; }
    ninja -C "$build" qemu-system-x86_64 tests/qtest/qos-test > "$build/ninja.log" 2>&1 ||
        { tail -30 "$build/ninja.log"; exit 1; }
    # Firmware (the PC BIOS the test machine boots) from the installed QEMU packages, where
    # the emulator looks for it when it runs from its build tree.
    for f in /usr/share/seabios/* /usr/share/qemu/* /usr/lib/ipxe/qemu/*; do
        [ -f "$f" ] && ln -sf "$f" "$build/qemu-bundle/usr/local/share/qemu/"
    done
fi

cargo build --release -p daxd
export QTEST_QEMU_BINARY=$build/qemu-system-x86_64
export QTEST_QEMU_STORAGE_DAEMON_BINARY=$root/resources/qtest/daxd-as-qemu-storage-daemon
export DAXD=$root/target/release/daxd
mapfile -t cases < <("$build/tests/qtest/qos-test" -l | grep '/vhost-user-blk')
if ((${#cases[@]} == 0)); then
    echo "qos-test lists no vhost-user-blk case" >&2
    exit 1
fi
args=()
for case in "${cases[@]}"; do args+=(-p "$case"); done
"$build/tests/qtest/qos-test" --tap "${args[@]}"
