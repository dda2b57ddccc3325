# Guest-side test cases for a virtio-blk disk at /dev/vda, sourced by the scripts that
# tests/guest_blk.rs writes. Each case prints "CASE <name> BEGIN", then "CASE <name> PASS"
# or one "CASE <name> FAIL: <why>" line per failed check; "RESULT <key> <value>" lines
# carry values the host checks. Paths given to cases are host paths (the host's root is
# mounted read-only at /host; host tools run chrooted into it).

host() {
    chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

fail() {
    echo "CASE $CASE FAIL: $*"
    CASE_FAILED=1
}

# start_backend BACKEND DAXD_OPTIONS QSD_EXPORT_OPTIONS: starts BACKEND (daxd's path, or
# qemu-storage-daemon) chrooted into /host on /mnt/region.img with its socket at
# /mnt/blk.sock and its log in /tmp/backend.log, and waits for the socket. Not through the
# host function: backend_pid must be the backend itself, for the signals cases send it.
start_backend() {
    rm -f /host/mnt/blk.sock
    if [ "$1" = qemu-storage-daemon ]; then
        chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin qemu-storage-daemon \
            --blockdev driver=file,node-name=f,filename=/mnt/region.img,discard=unmap \
            --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/mnt/blk.sock,$3 \
            2>> /tmp/backend.log &
    else
        # DAXD_OPTIONS split into words on purpose.
        chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$1" \
            --region /mnt/region.img --socket-path /mnt/blk.sock $2 2>> /tmp/backend.log &
    fi
    # shellcheck disable=SC2034 # read by the cases in cut-cases.sh, sourced with this
    backend_pid=$!
    wait_backend_socket
}

# shellcheck disable=SC2120 # SOCKET is optional; most callers mean the default
# wait_backend_socket [SOCKET]: waits until the backend just started as backend_pid
# listens on SOCKET (default /host/mnt/blk.sock).
wait_backend_socket() {
    i=0
    while [ ! -S "${1:-/host/mnt/blk.sock}" ]; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then
            tail -5 /tmp/backend.log
            fail "the backend did not start"
            return 1
        fi
        sleep 0.1
    done
}

run_case() {
    CASE=$1
    shift
    CASE_FAILED=0
    echo "CASE $CASE BEGIN"
    # A case whose function no sourced file defines must not pass by doing nothing.
    if type "$1" > /dev/null 2>&1; then
        "$@"
    else
        fail "no function $1 (is its *-cases.sh sourced?)"
    fi
    [ "$CASE_FAILED" = 0 ] && echo "CASE $CASE PASS"
}

expect_eq() {
    [ "$2" = "$3" ] || fail "$1: expected '$3', got '$2'"
}

sha_of_stdin() {
    sha256sum | cut -d' ' -f1
}

# Reads LEN bytes at byte OFFSET of /dev/vda with O_DIRECT and prints their sha256.
read_sha() {
    host dd if=/dev/vda bs=4096 skip=$(($1 / 4096)) count=$(($2 / 4096)) iflag=direct status=none | sha_of_stdin
}

# identity SECTORS QUEUES SERIAL RO: what the guest sees matches the configuration.
case_identity() {
    expect_eq "size in sectors" "$(cat /sys/block/vda/size)" "$1"
    expect_eq "hardware queues" "$(ls /sys/block/vda/mq | wc -l)" "$2"
    expect_eq "serial" "$(cat /sys/block/vda/serial)" "$3"
    expect_eq "read-only flag" "$(cat /sys/block/vda/ro)" "$4"
    echo "RESULT write_cache $(cat /sys/block/vda/queue/write_cache | tr ' ' _)"
}

# expect_payload_at WHAT PAYLOAD OFFSET...: /dev/vda holds PAYLOAD at each byte OFFSET
# (read with O_DIRECT, so not from the guest's page cache).
expect_payload_at() {
    what=$1 payload=$2
    shift 2
    want=$(sha_of_stdin < "/host$payload")
    len=$(stat -c %s "/host$payload")
    for off in "$@"; do
        expect_eq "$what at $off" "$(read_sha "$off" "$len")" "$want"
    done
}

# direct_io PAYLOAD OFFSET...: O_DIRECT writes of PAYLOAD at each byte OFFSET read back
# the same.
case_direct_io() {
    payload=$1
    shift
    for off in "$@"; do
        host dd if="$payload" of=/dev/vda bs=4096 seek=$((off / 4096)) oflag=direct conv=notrunc status=none \
            || fail "O_DIRECT write at $off failed"
    done
    expect_payload_at "O_DIRECT read-back" "$payload" "$@"
}

# persisted PAYLOAD OFFSET...: data written by an earlier boot is still there.
case_persisted() {
    expect_payload_at "data from the previous boot" "$@"
}

# discard PAYLOAD OFFSET LEN: after writing data and discarding it, the range reads zero.
case_discard() {
    payload=$1 off=$2 len=$3
    host dd if="$payload" of=/dev/vda bs=4096 seek=$((off / 4096)) oflag=direct conv=notrunc status=none \
        || fail "write before discard failed"
    host blkdiscard -o "$off" -l "$len" /dev/vda || fail "blkdiscard failed"
    nonzero=$(host dd if=/dev/vda bs=4096 skip=$((off / 4096)) count=$((len / 4096)) iflag=direct status=none \
        | tr -d '\000' | wc -c)
    expect_eq "non-zero bytes in the discarded range" "$nonzero" 0
}

# Interrupts per virtqueue of the disk: "<queue> <count>" lines, from the MSI-X vectors
# named virtioN-req.Q in /proc/interrupts (summed over CPUs). With a device name
# (virtioN), only that device's: a guest with a second virtio disk.
# shellcheck disable=SC2120 # the device is optional; most callers mean any
queue_interrupts() {
    grep -E "${1:-virtio[0-9]+}-req\.[0-9]+" /proc/interrupts | while read -r line; do
        name=$(echo "$line" | grep -oE 'req\.[0-9]+')
        sum=0
        for field in $(echo "$line" | cut -d: -f2); do
            case $field in
                *[!0-9]*) break ;;
                *) sum=$((sum + field)) ;;
            esac
        done
        echo "$name $sum"
    done
}

# fio MIB JOBS: random 4 KiB O_DIRECT writes verified with crc32c, JOBS jobs of MIB MiB
# each, one per CPU; every queue of the disk must have completed requests (its interrupt
# count grew).
case_fio() {
    mib=$1 jobs=$2
    queue_interrupts > /tmp/irq.before
    if ! host fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=16 \
        --rw=randwrite --bs=4k --size="${mib}M" --offset_increment="${mib}M" --numjobs="$jobs" \
        --verify=crc32c --verify_fatal=1 --cpus_allowed="0-$((jobs - 1))" --cpus_allowed_policy=split \
        --group_reporting > /tmp/fio.out 2>&1; then
        cat /tmp/fio.out
        fail "fio verify failed"
    fi
    grep -E "WRITE:|READ:" /tmp/fio.out
    queue_interrupts > /tmp/irq.after
    [ -s /tmp/irq.after ] || fail "no per-queue interrupts of the disk in /proc/interrupts"
    while read -r queue after; do
        before=$(grep "^$queue " /tmp/irq.before | cut -d' ' -f2)
        echo "RESULT interrupts_$queue $((after - ${before:-0}))"
        [ "$after" -gt "${before:-0}" ] || fail "queue $queue completed no request during fio"
    done < /tmp/irq.after
}

# ext4 FILE...: mkfs.ext4, mount, copy the host FILEs in, check them, sync, umount, fsck.
case_ext4() {
    host mkfs.ext4 -q -F -E nodiscard /dev/vda || fail "mkfs.ext4 failed"
    mount -t ext4 /dev/vda /mnt || { fail "mount failed"; return; }
    for f in "$@"; do
        name=$(basename "$f")
        cp "/host$f" "/mnt/$name" || fail "copy of $name failed"
        got=$(sha_of_stdin < "/mnt/$name")
        expect_eq "checksum of /$name" "$got" "$(sha_of_stdin < "/host$f")"
        echo "RESULT sha256:$name $got"
    done
    sync
    umount /mnt || fail "umount failed"
    host e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn found problems"; }
}

# full_host PAYLOAD HOLE: the region is sparse and its host file system fills up (host
# step "filled"): an O_DIRECT write into the hole at byte HOLE fails with an I/O error,
# while data written before is still read back; once the host frees space (step
# "freed"), the same write succeeds. The disk never hangs.
case_full_host() {
    payload=$1 hole=$2
    host dd if="$payload" of=/dev/vda bs=4096 oflag=direct conv=notrunc status=none \
        || fail "write before the host file system filled up failed"
    wait_host filled || return
    if host dd if="$payload" of=/dev/vda bs=4096 count=1 seek=$((hole / 4096)) oflag=direct conv=notrunc \
        status=none 2> /tmp/dd.err; then
        fail "a write into a hole of a full host file system succeeded"
    fi
    grep -q "Input/output error" /tmp/dd.err || fail "the write failed with '$(cat /tmp/dd.err)', not an I/O error"
    expect_payload_at "data written before the host filled up" "$payload" 0
    wait_host freed || return
    host dd if="$payload" of=/dev/vda bs=4096 seek=$((hole / 4096)) oflag=direct conv=notrunc status=none \
        || fail "the write failed after the host freed space"
    expect_payload_at "data written after space came back" "$payload" "$hole"
}

# read_only OFFSET LEN: writes fail and the data at OFFSET does not change.
case_read_only() {
    off=$1 len=$2
    before=$(read_sha "$off" "$len")
    if host dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$((off / 4096)) oflag=direct conv=notrunc status=none 2>/dev/null; then
        fail "a write to the read-only disk succeeded"
    fi
    expect_eq "data after the refused write" "$(read_sha "$off" "$len")" "$before"
}

# restart SECONDS: the backend is killed and restarted while this runs (tests/restart.rs).
# An ext4 file system on the disk; in it fio writes with crc32c verification for SECONDS,
# on each CPU (so each queue) one job with an fdatasync (a FLUSH) every 8 writes next to one
# without, so that FLUSHes are in flight together with writes on the same queue. Passes
# when fio finds no verify or I/O error, the kernel logged no I/O error, timeout or ring
# error, the disk kept its serial, and e2fsck finds the file system clean.
case_restart() {
    secs=$1
    host mkfs.ext4 -q -F -E nodiscard /dev/vda || { fail "mkfs.ext4 failed"; return; }
    mount -t ext4 /dev/vda /host/mnt || { fail "mount failed"; return; }
    dmesg -c > /dev/null
    serial=$(cat /sys/block/vda/serial)
    echo "RESTART-LOAD-START"
    if ! host fio --directory=/mnt --ioengine=libaio --direct=1 --bs=4k --iodepth=8 \
        --rw=randwrite --size=16M --time_based --runtime="$secs" \
        --verify=crc32c --verify_backlog=32 --verify_fatal=1 --group_reporting \
        --name=flushing0 --fdatasync=8 --cpus_allowed=0 \
        --name=plain0 --cpus_allowed=0 \
        --name=flushing1 --fdatasync=8 --cpus_allowed=1 \
        --name=plain1 --cpus_allowed=1 > /tmp/fio.out 2>&1; then
        cat /tmp/fio.out
        fail "fio failed"
    fi
    echo "RESTART-LOAD-END"
    grep -E "WRITE:|READ:|err=" /tmp/fio.out
    # The restarted backends served the same disk: QEMU asks the new one for its config.
    expect_eq "serial after the restarts" "$(cat /sys/block/vda/serial)" "$serial"
    umount /host/mnt || fail "umount failed"
    if ! host e2fsck -fn /dev/vda > /tmp/fsck.out 2>&1; then
        cat /tmp/fsck.out
        fail "e2fsck found errors"
    fi
    dmesg > /tmp/dmesg.out
    if grep -iE "I/O error|timed? ?out|is not a head|blk_update_request|buffer I/O" /tmp/dmesg.out; then
        fail "the guest kernel logged disk errors"
    fi
    echo "RESULT kernel_log_lines $(wc -l < /tmp/dmesg.out)"
}

# resize_online NEW_SECTORS FILE_MIB: ext4 made on the disk and mounted; the host grows
# the disk (daxd resize, step "resize"); the guest must see the new capacity without a
# reboot, grow the mounted file system (resize2fs, online) and hold a file of FILE_MIB,
# more than the old disk; then everything is unmounted for the host to check.
case_resize_online() {
    new=$1 mib=$2
    host mkfs.ext4 -q -F -E nodiscard /dev/vda || { fail "mkfs.ext4 failed"; return; }
    mount -t ext4 /dev/vda /host/mnt || { fail "mount failed"; return; }
    echo "RESULT sectors_before $(cat /sys/block/vda/size)"
    wait_host resize || return
    i=0
    while [ "$(cat /sys/block/vda/size)" != "$new" ] && [ "$i" -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    echo "RESULT sectors_after $(cat /sys/block/vda/size)"
    if ! host resize2fs /dev/vda > /tmp/resize2fs.out 2>&1; then
        cat /tmp/resize2fs.out
        fail "online resize2fs failed"
    fi
    echo "RESULT fs_kib $(df -k /host/mnt | tail -1 | awk '{print $2}')"
    dd if=/dev/urandom of=/host/mnt/big bs=1M count="$mib" 2> /dev/null || fail "the file did not fit"
    sync
    echo "RESULT big_sha $(sha_of_stdin < /host/mnt/big)"
    umount /host/mnt || fail "umount failed"
}
