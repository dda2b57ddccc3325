# Guest side of the live-migration suite (tests/migration.rs). The guest starts on one
# QEMU and finishes on another: what it prints before the migration is in the source's
# console log, the rest in the destination's. Runs from /tmp: the 9p share of the host
# (/host) blocks migration while it is mounted, so the case unmounts it first; from then
# on host programs come from the tools disk (serial daxd-tools), as in inner-init.

# tool NAME ARGS...: the host's NAME from the tools disk, with its own libraries.
tool() {
    name=$1
    shift
    /tools/ld.so --library-path /tools/lib "/tools/bin/$name" "$@"
}

# The disk whose serial is $1, as vdX.
disk_with_serial() {
    for d in /sys/block/vd*; do
        [ "$(cat "$d/serial" 2> /dev/null)" = "$1" ] && basename "$d"
    done
}

# The host's word in the last MiB of the disk (MiB 511), outside the file system: read with
# O_DIRECT, so from the backend every time (a whole MiB, so that busybox's buffer is
# page-aligned). The 9p share cannot carry it once unmounted.
# wait_mailbox WORD: waits until the host has written WORD into the mailbox.
wait_mailbox() {
    while [ "$(dd if=/dev/vda bs=1M skip=511 count=1 iflag=direct 2> /dev/null \
        | head -c ${#1})" != "$1" ]; do
        sleep 0.05
    done
}

# migrate FILES_MIB FIO_MIB: ext4 (448 MiB) on the backend's disk /dev/vda with four files
# of FILES_MIB MiB of random data, their sha256 noted and the page cache dropped. Then
# "MIGRATE-NOW" (the host starts migrating the VM), and meanwhile fio writes FIO_MIB MiB
# per job (one job per CPU, so both queues) with crc32c verify headers, reading back and
# checking every 256 blocks it wrote as it goes and the rest at the end. When the host
# writes READ into the mailbox (most of guest memory has been copied once, and the
# migration cannot end yet), the four files are read into the page cache: pages that only
# the backend's writes into guest memory changed, so the destination has them right only
# if the backend logged those writes. "READ-DONE", then the host lets the migration end.
# After fio and on the destination, the files' sha256 (from that page cache) must be what
# they were. With PMEM=1, /dev/pmem0 (an NVDIMM: a window of the region that QEMU maps from
# the region file) gets ext4 mounted with DAX and a file before the migration, one while the
# migration is held, and one on the destination ("RESULT pmem_after SHA256"). Once
# checked, "CHECKS-DONE", and the guest waits for DONE in the mailbox (the host looks at
# daxd's registry meanwhile).
case_migrate() {
    files_mib=$1 fio_mib=$2 pmem=$3
    tools=$(disk_with_serial daxd-tools)
    [ "$tools" != vda ] || { fail "/dev/vda is the tools disk, not the backend's"; return; }
    mkdir -p /tools
    mount -t ext4 -o ro "/dev/$tools" /tools || { fail "no tools disk"; return; }
    host mkfs.ext4 -q -F -E nodiscard /dev/vda 448M || { fail "mkfs.ext4 failed"; return; }
    mount -t ext4 /dev/vda /mnt || { fail "mount failed"; return; }
    for i in 1 2 3 4; do
        dd if=/dev/urandom of=/mnt/file$i bs=1M count="$files_mib" 2> /dev/null
    done
    sync
    sha256sum /mnt/file* > /tmp/sums
    if [ "$pmem" = 1 ]; then
        nvdimm_to_fsdax || { fail "cannot switch the nvdimm namespace to fsdax"; return; }
        ns_start=$(cat /sys/bus/nd/devices/namespace0.0/resource)
        data_start=$(cat /sys/bus/nd/devices/pfn0.0/resource)
        echo "RESULT pmem_data_offset $((data_start - ns_start))"
        host mkfs.ext4 -q -F -b 4096 /dev/pmem0 || { fail "mkfs.ext4 of /dev/pmem0 failed"; return; }
        mkdir -p /pmem
        mount -t ext4 -o dax=always /dev/pmem0 /pmem || { fail "mount -o dax=always failed"; return; }
        grep -q "^/dev/pmem0 /pmem ext4 .*dax" /proc/mounts || fail "/pmem is not mounted with DAX"
        dd if=/dev/urandom of=/pmem/before bs=1M count=8 2> /dev/null
        sync
    fi
    umount /host/sys /host/proc /host/dev /host \
        || { fail "cannot unmount the 9p share, which blocks migration"; return; }
    echo 3 > /proc/sys/vm/drop_caches
    device=$(basename "$(readlink /sys/block/vda/device)")
    queue_interrupts "$device" > /tmp/irq.before
    echo "MIGRATE-NOW"
    tool fio --name=migrate --directory=/mnt --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size="${fio_mib}M" --numjobs=2 --verify=crc32c \
        --verify_backlog=256 --verify_fatal=1 --cpus_allowed=0-1 --cpus_allowed_policy=split \
        --group_reporting > /tmp/fio.out 2>&1 &
    fio_pid=$!
    wait_mailbox READ
    cat /mnt/file* > /dev/null
    if [ "$pmem" = 1 ]; then
        dd if=/dev/urandom of=/pmem/during bs=1M count=8 2> /dev/null
        sync
        sha256sum /pmem/before /pmem/during > /tmp/pmem.sums
    fi
    echo "READ-DONE"
    wait "$fio_pid"
    fio_rc=$?
    echo "FIO-DONE rc=$fio_rc"
    grep -E "WRITE:|READ:|verify|err=" /tmp/fio.out
    [ "$fio_rc" = 0 ] || { cat /tmp/fio.out; fail "fio verify failed (exit $fio_rc)"; }
    sha256sum -c /tmp/sums > /tmp/sums.out 2>&1 \
        || { cat /tmp/sums.out; fail "files read during the migration differ from what was written"; }
    queue_interrupts "$device" > /tmp/irq.after
    while read -r queue after; do
        before=$(grep "^$queue " /tmp/irq.before | cut -d' ' -f2)
        echo "RESULT interrupts_$queue $((after - ${before:-0}))"
        [ "$after" -gt "${before:-0}" ] || fail "queue $queue completed no request during fio"
    done < /tmp/irq.after
    if [ "$pmem" = 1 ]; then
        sha256sum -c /tmp/pmem.sums > /tmp/pmem.out 2>&1 \
            || { cat /tmp/pmem.out; fail "pmem files differ on the destination"; }
        dd if=/dev/urandom of=/pmem/after bs=1M count=4 2> /dev/null
        sync
        echo "RESULT pmem_after $(sha256sum < /pmem/after | cut -d' ' -f1)"
    fi
    echo "CHECKS-DONE"
    wait_mailbox DONE
    umount /mnt || fail "umount failed"
    if [ "$pmem" = 1 ]; then
        umount /pmem || fail "umount /pmem failed"
    fi
}
