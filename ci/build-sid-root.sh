#!/usr/bin/env bash
# Builds a Debian sid root holding QEMU >= 11.1, which implements vhost-user shared memory
# (VHOST_USER_PROTOCOL_F_SHMEM, vhost-user-test-device-pci). QEMU 11.1 needs sid's glibc,
# so the pmem suite runs it chrooted into this root; the guest's 9p share is then this
# root, so it also carries the tools the guest runs (e2fsprogs, util-linux). Fetched from
# the mirror apt already uses (ci/debian-mirror.sh) and cached under .cache/sid-root;
# rebuilt when missing, incomplete, or its QEMU is older than 11.1.
# Prints the root's path.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/.cache/sid-root

qemu_ok() {
    [ -x "$dir/usr/sbin/mkfs.ext4" ] && [ -x "$dir/usr/sbin/blkdiscard" ] &&
        [ -x "$dir/usr/bin/qemu-system-x86_64" ] &&
        chroot "$dir" qemu-system-x86_64 --version 2>/dev/null |
        grep -qE 'version (11\.([1-9]|[1-9][0-9])|1[2-9]\.|[2-9][0-9]\.)'
}

if ! qemu_ok; then
    rm -rf "$dir.tmp"
    mirror=$("$root/ci/debian-mirror.sh")
    mmdebstrap --quiet --variant=apt --aptopt='Acquire::Check-Valid-Until "false"' \
        --include=qemu-system-x86,e2fsprogs,util-linux sid "$dir.tmp" "$mirror" >&2
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    qemu_ok || { echo "the sid root's QEMU is older than 11.1" >&2; exit 1; }
fi
echo "$dir"
