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

# dax_serve DAXD CLIENT SEED FIRST_SEQ NAME DAXD_OPTION...: daxd serving the region
# DAXD_OPTIONs name, with --seccomp trap; 400 requests of the client, numbered from
# FIRST_SEQ (so that a later run's blocks differ from an earlier one's) (a FLUSH after every 8th, about
# one in 10 a discard), daxd's inspection before and after them; daxd stopped with
# SIGTERM and started again, and every block read back and checked.
dax_serve() {
    daxd=$1 client=$2 seed=$3 first=$4 name=$5
    shift 5
    start_dax_daxd "$@" || return
    dax_inspect "$name" before
    host "$client" --socket /mnt/blk.sock --seed "$seed" --first-seq "$first" --flush-every 8 \
        --discard-every 10 --ops 400 > "/host/mnt/client-$name.out" 2>&1
    echo "RESULT client_exit_$name $?"
    sed "s/^/CLIENT $name: /" "/host/mnt/client-$name.out"
    dax_inspect "$name" after
    kill -TERM "$backend_pid"
    wait "$backend_pid"
    echo "RESULT daxd_exit_$name $?"
    start_dax_daxd "$@" || return
    host "$client" --socket /mnt/blk.sock --seed "$seed" --first-seq "$first" --discard-every 10 \
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
    dax_serve "$1" "$2" "$3" 1 fsdax --region /mnt/region.img --size 64M --direct
    # The kernel's path on the same file: every FLUSH an fdatasync, and nothing that looks
    # at a page cache the file does not have (cachestat oopses on a DAX file in 6.12). The
    # same blocks as before, in later versions.
    dax_serve "$1" "$2" "$3" 100001 fsdax_kernel --region /mnt/region.img --size 64M \
        --direct --flush-path fdatasync
    umount /host/mnt || fail "umount failed"
}

# dax_devdax DAXD CLIENT SEED: the device-DAX device of nvdimm 1 as the region.
case_dax_devdax() {
    nvdimm_to_devdax 1 || { fail "cannot switch namespace1.0 to devdax"; return; }
    echo "RESULT devdax_size $(cat /sys/bus/dax/devices/dax1.0/size)"
    echo "RESULT devdax_align $(cat /sys/bus/dax/devices/dax1.0/align)"
    mount -t tmpfs tmpfs /host/mnt
    dax_serve "$1" "$2" "$3" 1 devdax --region /dev/dax1.0
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

# dax_nested DAXD SID_ROOT DIR KIND: a region on this guest's persistent memory with a
# 64 MiB disk and a 32 MiB pmem window, served to a guest of QEMU 11.1 (chrooted into
# SID_ROOT, under KVM on this guest's nested SVM), whose guest (DIR/vmlinuz,
# DIR/inner-initramfs.img with resources/guest/inner-init, tools disk DIR/tools.img)
# mounts ext4 with DAX on the window and runs fio with verify on the disk (step
# dax-write); daxd is stopped and started again, and a second guest reads both back
# (step dax-read). KIND fsdax: a region file on ext4 -o dax (nvdimm 0, as case_dax_fsdax
# left it), daxd serving the window as virtio-pmem over vhost-user shared memory. KIND
# devdax: the device-DAX device of nvdimm 1, the window mapped by QEMU as an NVDIMM with
# the options `daxd print-qemu-args` gives (align=, pmem=on): QEMU 11.1 maps shared memory
# in 4 KiB pages, which a device-DAX device refuses.
case_dax_nested() {
    daxd=$1 sid=/host$2 dir=/host$3 kind=$4
    [ -c /dev/kvm ] || load_kvm || return
    if [ "$kind" = fsdax ]; then
        mount -t ext4 -o dax /dev/pmem0 /host/mnt || { fail "mount -o dax failed"; return; }
        region="--region /mnt/nested.img --size 96M --direct"
        pmem="--pmem-socket-path /mnt/pmem.sock"
    else
        [ -c /dev/dax1.0 ] || nvdimm_to_devdax 1 || { fail "cannot switch namespace1.0 to devdax"; return; }
        mount -t tmpfs tmpfs /host/mnt
        region="--region /dev/dax1.0"
        pmem=
    fi
    windows="--window name=disk,size=64M,serve=blk --window name=pm0,offset=64M,size=32M,serve=pmem"
    mount --rbind /dev "$sid/dev"
    mount -t proc proc "$sid/proc"
    # QEMU reads a device-DAX device's size from sysfs (it cannot seek to its end).
    mount -t sysfs sysfs "$sid/sys"
    mount --bind /host/mnt "$sid/mnt"
    mount --bind "$dir" "$sid/srv"
    for step in dax-write dax-read; do
        rm -f /host/mnt/pmem.sock
        # shellcheck disable=SC2086 # options split into words on purpose
        start_dax_daxd $region $windows $pmem || return
        if [ "$kind" = fsdax ]; then
            wait_backend_socket /host/mnt/pmem.sock || return
            machine=q35 memory=256M nvdimm=0
            set -- -chardev socket,id=pm,path=/mnt/pmem.sock \
                -device vhost-user-test-device-pci,chardev=pm,virtio-id=27,num_vqs=1,config_size=16
        else
            # shellcheck disable=SC2086
            window=$(host "$daxd" print-qemu-args $region $windows --socket-path /mnt/blk.sock \
                --guest-ram 256M | grep "^-object memory-backend-file,id=pm0")
            echo "RESULT nested_window_options $window"
            machine=q35,nvdimm=on memory=256M,slots=2,maxmem=1G nvdimm=1
            # shellcheck disable=SC2086
            set -- $window
        fi
        # A nested guest that resets itself (QEMU ends with status 0 without its last
        # line: KVM under QEMU's TCG emulation of SVM triple-faults a guest now and then)
        # is run once more, its console kept as INNER-LOST lines with QEMU's reset log.
        attempt=1
        while :; do
            # shellcheck disable=SC2154 # inner_timer_args: ch-cases.sh, sourced before this
            chroot "$sid" timeout 300 qemu-system-x86_64 -machine "$machine" -accel kvm \
                -cpu host -smp 1 -m "$memory" \
                -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
                -display none -serial stdio -monitor none -no-reboot \
                -d cpu_reset,guest_errors -D "/mnt/qemu-$step.log" \
                -kernel /srv/vmlinuz -initrd /srv/inner-initramfs.img \
                -append "console=ttyS0 quiet $inner_timer_args daxd.inner=$step daxd.nvdimm=$nvdimm" \
                -chardev socket,id=blk,path=/mnt/blk.sock \
                -device vhost-user-blk-pci,chardev=blk,num-queues=1 \
                -drive file=/srv/tools.img,if=none,id=tools,format=raw,readonly=on \
                -device virtio-blk-pci,drive=tools "$@" \
                < /dev/null > "/tmp/nested-$step.out" 2>&1
            status=$?
            if [ "$status" != 0 ] || [ "$attempt" = 2 ] \
                || grep -q "INNER-RESULT done $step" "/tmp/nested-$step.out"; then
                break
            fi
            echo "RESULT nested_rerun_${kind}_$step the guest ended without finishing"
            tr -d '\r' < "/tmp/nested-$step.out" | sed "s/^/INNER-LOST $kind $step: /"
            grep -c "CPU Reset" "/host/mnt/qemu-$step.log" | sed "s/^/INNER-LOST $kind $step: CPU resets logged: /"
            attempt=2
        done
        echo "RESULT nested_exit_${kind}_$step $status"
        tr -d '\r' < "/tmp/nested-$step.out" | sed "s/^/INNER $kind $step: /"
        dax_inspect "nested_$kind" "$step"
        kill -TERM "$backend_pid"
        wait "$backend_pid"
        echo "RESULT daxd_exit_nested_${kind}_$step $?"
        sed "s/^/BACKEND nested $kind $step: /" /tmp/backend.log
        : > /tmp/backend.log
    done
    umount "$sid/srv" "$sid/mnt" "$sid/sys" "$sid/proc"
    umount -l "$sid/dev"
    umount /host/mnt
}
