# Regions on persistent memory (tests/dax_host.rs), sourced after blk-cases.sh and
# pmem-cases.sh. The test guest has two emulated NVDIMMs (label-less QEMU nvdimms: raw
# namespaces namespace0.0 and namespace1.0), made into what a host with persistent memory
# has, as `ndctl create-namespace -m fsdax` and `-m devdax` would: ext4 mounted -o dax on
# an fsdax namespace, and a device-DAX device. daxd serves a disk on each under
# `--seccomp trap`; daxd-cut-client writes, discards and FLUSHes through it, then, after
# daxd was stopped and started again, reads every block back and checks it against what
# daxd acknowledged.

# nvdimm_to_devdax N: namespace N.0 as the device-DAX device /dev/daxN.0, in 2 MiB pages,
# its memmap on the device.
nvdimm_to_devdax() {
    n=$1
    echo "namespace$n.0" > /sys/bus/nd/drivers/nd_pmem/unbind || return 1
    cat /proc/sys/kernel/random/uuid > "/sys/bus/nd/devices/dax$n.0/uuid" || return 1
    echo pmem > "/sys/bus/nd/devices/dax$n.0/mode" || return 1
    echo 2097152 > "/sys/bus/nd/devices/dax$n.0/align" || return 1
    echo "namespace$n.0" > "/sys/bus/nd/devices/dax$n.0/namespace" || return 1
    echo "dax$n.0" > /sys/bus/nd/drivers/dax_pmem/bind || return 1
    i=0
    while [ ! -c "/dev/dax$n.0" ] && [ "$i" -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -c "/dev/dax$n.0" ]
}

# dax_inspect NAME WHEN: daxd's inspection as one line, RESULT inspect_NAME_WHEN.
dax_inspect() {
    echo "RESULT inspect_$1_$2 $(host "$daxd" inspect --control-socket /mnt/control.sock --json | tr -d '\n')"
}

# dax_serve DAXD CLIENT SEED NAME DAXD_OPTION...: daxd serving the region DAXD_OPTIONs
# name, with --seccomp trap; 400 requests of the client (a FLUSH after every 8th, about
# one in 10 a discard), daxd's inspection before and after them; daxd stopped with
# SIGTERM and started again, and every block read back and checked.
dax_serve() {
    daxd=$1 client=$2 seed=$3 name=$4
    shift 4
    start_dax_daxd "$@" || return
    dax_inspect "$name" before
    host "$client" --socket /mnt/blk.sock --seed "$seed" --flush-every 8 --discard-every 10 \
        --ops 400 > "/host/mnt/client-$name.out" 2>&1
    echo "RESULT client_exit_$name $?"
    sed "s/^/CLIENT $name: /" "/host/mnt/client-$name.out"
    dax_inspect "$name" after
    kill -TERM "$backend_pid"
    wait "$backend_pid"
    echo "RESULT daxd_exit_$name $?"
    start_dax_daxd "$@" || return
    host "$client" --socket /mnt/blk.sock --seed "$seed" --discard-every 10 \
        --check "/mnt/client-$name.out" > /tmp/check.out 2>&1
    echo "RESULT check_exit_$name $?"
    echo "RESULT checked_$name $(sed -n 's/^CHECKED //p' /tmp/check.out)"
    awk '/^CHECK-FINDING / && n++ < 20 { sub(/^CHECK-FINDING /, "FINDING: "); print }
        /^daxd-cut-client: / { print "CLIENT ERROR: " $0 }' /tmp/check.out
    kill -TERM "$backend_pid"
    wait "$backend_pid"
    echo "RESULT daxd_exit_again_$name $?"
    sed "s/^/BACKEND $name: /" /tmp/backend.log
    : > /tmp/backend.log
}

# start_dax_daxd DAXD_OPTION...: daxd ($daxd) on /mnt/blk.sock with --seccomp trap and a
# control socket, chrooted into /host.
start_dax_daxd() {
    rm -f /host/mnt/blk.sock /host/mnt/control.sock
    chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$daxd" "$@" \
        --socket-path /mnt/blk.sock --control-socket /mnt/control.sock --seccomp trap \
        2>> /tmp/backend.log &
    # shellcheck disable=SC2034 # read by dax_serve
    backend_pid=$!
    wait_backend_socket || return 1
    wait_backend_socket /host/mnt/control.sock
}

# dax_fsdax DAXD CLIENT SEED: ext4 mounted -o dax on the fsdax namespace of nvdimm 0, the
# region file on it served with --direct (MAP_SYNC).
case_dax_fsdax() {
    nvdimm_to_fsdax || { fail "cannot switch namespace0.0 to fsdax"; return; }
    expect_eq "/sys/block/pmem0/queue/dax" "$(cat /sys/block/pmem0/queue/dax)" 1
    host mke2fs -q -F -t ext4 -b 4096 /dev/pmem0 || { fail "mke2fs failed"; return; }
    mount -t ext4 -o dax /dev/pmem0 /host/mnt || { fail "mount -o dax failed"; return; }
    grep -q "^/dev/pmem0 /host/mnt ext4 .*dax=always" /proc/mounts \
        || fail "not mounted with dax=always: $(grep pmem0 /proc/mounts)"
    # Written once, so that its blocks are allocated and requests store through the
    # mapping (into a hole they would go through pwrite(2)).
    dd if=/dev/zero of=/host/mnt/region.img bs=1M count=64 2> /dev/null || fail "dd failed"
    dax_serve "$1" "$2" "$3" fsdax --region /mnt/region.img --size 64M --direct
    umount /host/mnt || fail "umount failed"
}

# dax_devdax DAXD CLIENT SEED: the device-DAX device of nvdimm 1 as the region.
case_dax_devdax() {
    nvdimm_to_devdax 1 || { fail "cannot switch namespace1.0 to devdax"; return; }
    echo "RESULT devdax_size $(cat /sys/bus/dax/devices/dax1.0/size)"
    echo "RESULT devdax_align $(cat /sys/bus/dax/devices/dax1.0/align)"
    mount -t tmpfs tmpfs /host/mnt
    dax_serve "$1" "$2" "$3" devdax --region /dev/dax1.0
    umount /host/mnt
}

# dax_flush_cost BENCH DAXD: what a FLUSH costs on ext4 -o dax (fsdax on nvdimm 0):
# daxd-bench's QD1 write+FLUSH and QD8 with a FLUSH every 16, with daxd writing cache
# lines back (--flush-path auto), then with daxd calling fdatasync (--flush-path
# fdatasync), each against qemu-storage-daemon (pwrite and fdatasync) on the same file
# system in the same run. By hand (tests/dax_host.rs, soak_dax_flush_cost): under TCG the
# absolute figures are the emulator's.
case_dax_flush_cost() {
    bench=$1 daxd=$2
    nvdimm_to_fsdax || { fail "cannot switch namespace0.0 to fsdax"; return; }
    host mke2fs -q -F -t ext4 -b 4096 /dev/pmem0 || { fail "mke2fs failed"; return; }
    mount -t ext4 -o dax /dev/pmem0 /host/mnt || { fail "mount -o dax failed"; return; }
    for how in auto fdatasync; do
        host "$bench" --daxd "$daxd" --dir "/mnt/bench-$how" --size-mib 64 --seconds 3 \
            --rounds 3 --config defaults --state prefilled \
            --workloads flushwrite-4k-qd1-every1,flushwrite-4k-qd8-every16 \
            "--daxd-arg=--flush-path=$how" > "/tmp/bench-$how.out" 2>&1 \
            || fail "daxd-bench with --flush-path $how failed"
        sed "s/^/BENCH $how: /" "/tmp/bench-$how.out"
        rm -rf "/host/mnt/bench-$how"
    done
    umount /host/mnt
}
