# Guest-side persistent-memory cases, sourced after blk-cases.sh (which provides host,
# fail, run_case, expect_eq, sha_of_stdin). WAIT_DIR is the host directory the runner
# watches: `wait_host STEP` prints "WAIT STEP", the runner does its host-side checks and
# creates $WAIT_DIR/STEP, which the guest sees through the 9p share.

wait_host() {
    echo "WAIT $1"
    i=0
    while [ ! -e "/host$WAIT_DIR/$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 1200 ]; then
            fail "the host never answered step $1"
            return 1
        fi
        sleep 0.1
    done
}

# Turns the raw label-less namespace of a QEMU nvdimm into fsdax, as
# `ndctl create-namespace -m fsdax` does: a pfn device with its memmap on the device.
nvdimm_to_fsdax() {
    echo namespace0.0 > /sys/bus/nd/drivers/nd_pmem/unbind || return 1
    cat /proc/sys/kernel/random/uuid > /sys/bus/nd/devices/pfn0.0/uuid || return 1
    echo pmem > /sys/bus/nd/devices/pfn0.0/mode || return 1
    echo 2097152 > /sys/bus/nd/devices/pfn0.0/align || return 1
    echo namespace0.0 > /sys/bus/nd/devices/pfn0.0/namespace || return 1
    echo pfn0.0 > /sys/bus/nd/drivers/nd_pmem/bind || return 1
}

# pmem_device KIND: /dev/pmem0 is there and DAX capable. Prints where the data area starts
# in the window (non-zero for an fsdax nvdimm, whose memmap comes first).
case_pmem_device() {
    kind=$1
    data_offset=0
    if [ "$kind" = nvdimm ]; then
        nvdimm_to_fsdax || fail "cannot switch the nvdimm namespace to fsdax"
        ns_start=$(cat /sys/bus/nd/devices/namespace0.0/resource)
        data_start=$(cat /sys/bus/nd/devices/pfn0.0/resource)
        data_offset=$((data_start - ns_start))
    fi
    [ -b /dev/pmem0 ] || { fail "no /dev/pmem0"; return; }
    expect_eq "/sys/block/pmem0/queue/dax" "$(cat /sys/block/pmem0/queue/dax)" 1
    echo "RESULT pmem_bytes $(($(cat /sys/block/pmem0/size) * 512))"
    echo "RESULT data_offset $data_offset"
}

# host_marker DEVICE_OFFSET MARKER: the host writes MARKER into the region file at this
# offset of the device while the guest runs; the guest reads it through its mapping.
case_host_marker() {
    off=$1 marker=$2
    wait_host host-marker || return
    got=$(dd if=/dev/pmem0 bs=4096 skip=$((off / 4096)) count=1 iflag=direct 2>/dev/null | head -c ${#marker})
    expect_eq "bytes the host wrote into the window" "$got" "$marker"
}

# pmem_fs DISK_OFFSET MARKER FILE...: ext4 with DAX on /dev/pmem0, files with known
# checksums, a marker written through the mapping (no sync) for the host to find, a
# refused discard of the mapped window from the blk disk, then sync (the host checks the
# flush), umount, fsck.
case_pmem_fs() {
    disk_offset=$1 marker=$2
    shift 2
    host mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/pmem0 \
        || fail "mkfs.ext4 failed"
    mount -o dax /dev/pmem0 /mnt || { fail "mount -o dax failed"; return; }
    grep -q "^/dev/pmem0 /mnt ext4 .*dax=always" /proc/mounts \
        || fail "not mounted with dax=always: $(grep pmem0 /proc/mounts)"
    for f in "$@"; do
        name=$(basename "$f")
        cp "/host$f" "/mnt/$name" || fail "copy of $name failed"
        expect_eq "checksum of /$name" "$(sha_of_stdin < "/mnt/$name")" "$(sha_of_stdin < "/host$f")"
    done
    echo "$marker" > /mnt/marker
    wait_host mounted || return

    # Quiesce the file system first: a journal commit (every 5 s) or the lazy inode-table
    # initialisation landing between the two reads below would change the bytes (this
    # made the case fail once in CI, the discard refused as it should be).
    sync
    before=$(dd if=/dev/pmem0 bs=65536 count=64 iflag=direct 2>/dev/null | sha_of_stdin)
    if host blkdiscard -o "$disk_offset" -l 4194304 /dev/vda; then
        fail "the disk discarded bytes the guest has mapped"
    fi
    expect_eq "window bytes after the refused discard" \
        "$(dd if=/dev/pmem0 bs=65536 count=64 iflag=direct 2>/dev/null | sha_of_stdin)" "$before"

    sync
    wait_host synced || return
    umount /mnt || fail "umount failed"
    host e2fsck -fn /dev/pmem0 > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn found problems"; }
}
