#!/usr/bin/env bash
# Builds the test guest from Debian packages: a Debian 6.12 kernel (generic flavour: it
# has the 9p modules the guest uses to run host tools) and an initramfs of busybox-static,
# the modules the suites load, and resources/guest/init. Nothing is installed on the host.
#
# The result is cached under .cache/guest/<key>, where the key covers every input; it is
# rebuilt only when one changes. Prints the directory holding vmlinuz and initramfs.img.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=$root/.cache/guest
mkdir -p "$cache/debs"
apt_opts=(-o Acquire::Check-Valid-Until=false)

# Newest 6.12 backports kernel the archive offers (bookworm-backports, see install-deps.sh).
kernel_pkg=$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64$' \
    | awk '{print $1}' | sort -V | tail -n 1)
[ -n "$kernel_pkg" ] || { echo "no linux-image-6.12.*+deb12-amd64 package: run ci/install-deps.sh" >&2; exit 1; }
kver=${kernel_pkg#linux-image-}
busybox_ver=$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')

modules=(virtio_blk crc32c_generic ext4 9pnet_virtio 9p libnvdimm nd_btt nd_pmem nd_virtio virtio_pmem nfit dax_pmem device_dax)
# Loaded only by the cloud-hypervisor case (resources/guest/ch-cases.sh): KVM on the
# emulated SVM of `-cpu max`.
kvm_modules=(kvm_amd)

key=$( { echo "$kernel_pkg $busybox_ver ${modules[*]} ${kvm_modules[*]}"; cat "$0" "$root/resources/guest/init"; } \
    | sha256sum | cut -c1-16)
out=$cache/$key
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.img" ]; then
    ln -sfn "$key" "$cache/current"
    echo "$out"
    exit 0
fi

work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
    cd "$cache/debs"
    for pkg in "$kernel_pkg" busybox-static; do
        ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get "${apt_opts[@]}" download "$pkg" >&2
    done
)
dpkg-deb -x "$(ls "$cache/debs/${kernel_pkg}"_*.deb | head -n 1)" "$work/kernel"
dpkg-deb -x "$(ls "$cache/debs"/busybox-static_*.deb | head -n 1)" "$work/busybox"
depmod -b "$work/kernel" "$kver"

initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,host,mnt,tmp,lib/modules}
cp "$work/busybox/bin/busybox" "$initrd/bin/busybox"
cp "$root/resources/guest/init" "$initrd/init"
chmod +x "$initrd/init"

# Modules in dependency order, decompressed so busybox's insmod can load them; LIST names
# the order file.
add_modules() {
    list=$1
    shift
    : > "$initrd/lib/modules/$list"
    for m in "$@"; do
        modprobe -d "$work/kernel" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko" .xz)
        xz -dc "$ko" > "$initrd/lib/modules/$name"
        echo "$name" >> "$initrd/lib/modules/$list"
    done
}
add_modules load-order "${modules[@]}"
add_modules load-order-kvm "${kvm_modules[@]}"

mkdir -p "$out"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
(cd "$initrd" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out/initramfs.img"
echo "$kernel_pkg" > "$out/kernel-package"
ln -sfn "$key" "$cache/current"
echo "$out"
