#!/usr/bin/env bash
# Installs what the test suites need on a fresh Debian bookworm machine (as root):
# qemu-storage-daemon (peer backend), QEMU 10.0 from bookworm-backports (real guests),
# fio, e2fsprogs and util-linux (host-side checks and, over 9p, guest-side tools), xfsprogs
# (the write-back suite mounts a small XFS),
# the shellcheck linter (ci/test.sh runs it on every shell script), the
# tools ci/build-guest.sh uses, mmdebstrap for ci/build-sid-root.sh (QEMU 11.1), and what
# ci/qtest.sh needs to build QEMU's qtests, and libvirt. Idempotent: installs nothing when
# all is present.
set -euo pipefail
cd "$(dirname "$0")/.."

backports=/etc/apt/sources.list.d/daxd-bookworm-backports.sources
apt_opts=(-o Acquire::Check-Valid-Until=false -o Dpkg::Use-Pty=0)

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null &&
        qemu-system-x86_64 --version | grep -qE 'version (10|[1-9][1-9])\.'
}

need=()
for tool in cc:gcc qemu-storage-daemon:qemu-utils fio:fio e2fsck:e2fsprogs debugfs:e2fsprogs \
    blkdiscard:util-linux depmod:kmod cpio:cpio xz:xz-utils mmdebstrap:mmdebstrap \
    curl:curl bzip2:bzip2 pkg-config:pkg-config ninja:ninja-build flex:flex bison:bison \
    shellcheck:shellcheck mkfs.xfs:xfsprogs; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
qemu_ok || need+=(qemu-system-x86)
# ci/qtest.sh builds QEMU's qtest binaries with Debian's python3 (meson >= 1.5 and pycotap
# come from bookworm-backports).
pkg-config --exists glib-2.0 2>/dev/null || need+=(libglib2.0-dev)
for module in mesonbuild:meson pycotap:python3-pycotap; do
    /usr/bin/python3 -c "import ${module%%:*}" 2>/dev/null || need+=("${module#*:}")
done

# Kernels for the test guest and QEMU 10.0 come from bookworm-backports, on the mirror the
# machine's apt sources already use.
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(ci/debian-mirror.sh)
    echo "ci/install-deps.sh: adding bookworm-backports from $mirror ($backports)" >&2
    cat > "$backports" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
fi
export DEBIAN_FRONTEND=noninteractive
if ((${#need[@]})) || ! apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' | grep -q .; then
    apt-get "${apt_opts[@]}" update -qq
fi
if ((${#need[@]})); then
    apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends -t bookworm-backports "${need[@]}"
fi
# libvirt 11.3 (tests/libvirt.rs) pairs with QEMU 10.0; named package by package, since
# -t bookworm-backports would also upgrade systemd and udev.
if ! command -v libvirtd >/dev/null || ! command -v virsh >/dev/null; then
    apt-get "${apt_opts[@]}" update -qq
    apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        libvirt-daemon/bookworm-backports libvirt-daemon-driver-qemu/bookworm-backports \
        libvirt-clients/bookworm-backports
fi

# The lint gates in ci/test.sh need clippy and rustfmt next to the toolchain, and the
# aarch64 type-check its standard library.
for component in clippy rustfmt; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        rustup component add "$component"
    fi
done
targets=$(rustup target list --installed)
if [[ $targets != *aarch64-unknown-linux-gnu* ]]; then
    rustup target add aarch64-unknown-linux-gnu
fi
