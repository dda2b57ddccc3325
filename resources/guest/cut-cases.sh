# Power-cut runs (tests/powercut.rs), sourced after blk-cases.sh. daxd and
# daxd-cut-client run here with the region on the guest's own ext4 disk /dev/vda (a host
# image with a write-back cache); the runner kills QEMU while they run: whatever the guest
# had not written to that disk is lost, as in a power failure. The client's lines on the
# console are what daxd promised.

# cut_disk: mounts the disk that holds the region, and leaves writing it back to daxd's
# own flushes: no periodic writeback, no writeback for lack of memory.
cut_disk() {
    mount -t ext4 /dev/vda /host/mnt || { fail "mount of the cut disk failed"; return 1; }
    echo 0 > /proc/sys/vm/dirty_writeback_centisecs
    echo 8640000 > /proc/sys/vm/dirty_expire_centisecs
    echo 80 > /proc/sys/vm/dirty_background_ratio
    echo 90 > /proc/sys/vm/dirty_ratio
}

# powercut DAXD CLIENT SEED FIRST_SEQ MODE DISCARD_EVERY: MODE is flush (a FLUSH every 8
# requests), sync (daxd --sync: every request write-through, no FLUSH) or term (300
# requests without FLUSH, then SIGTERM to daxd, which must make them durable before it
# exits); about one request in DISCARD_EVERY is a discard (0: none).
case_powercut() {
    daxd=$1 client=$2 seed=$3 first=$4 mode=$5 discards=$6
    cut_disk || return
    sync_arg=
    writethrough=off
    if [ "$mode" = sync ]; then
        # qemu-storage-daemon, the peer, writes through for sync too.
        sync_arg=--sync
        writethrough=on
    fi
    # The same promise when writes take the pwrite(2) path.
    [ "$mode" = flush-pwrite ] && sync_arg=--write-path=pwrite
    start_backend "$daxd" "$sync_arg" "writable=on,writethrough=$writethrough" || return
    case $mode in
        flush | flush-pwrite)
            host "$client" --socket /mnt/blk.sock --seed "$seed" --first-seq "$first" --flush-every 8 \
                --discard-every "$discards"
            ;;
        sync)
            host "$client" --socket /mnt/blk.sock --seed "$seed" --first-seq "$first" --flush-every 0 \
                --discard-every "$discards"
            ;;
        term)
            host "$client" --socket /mnt/blk.sock --seed "$seed" --first-seq "$first" --flush-every 0 \
                --discard-every "$discards" --ops 300
            # shellcheck disable=SC2154 # set by start_backend in blk-cases.sh
            kill -TERM "$backend_pid"
            wait "$backend_pid"
            echo "DAXD-EXIT $?"
            echo "CUT-NOW"
            sleep 3600
            ;;
    esac
    fail "the client ended before the cut: $(tail -3 /tmp/backend.log)"
}

# powercut_pmem DAXD SID_ROOT DIR SEED FIRST_SEQ: daxd serves the whole region as a pmem
# window (and as a disk, which daxd needs and nothing uses here) over vhost-user shared
# memory to QEMU 11.1 (chrooted into SID_ROOT, under KVM on this guest's nested SVM),
# whose guest (DIR/vmlinuz, DIR/inner-initramfs.img with
# resources/guest/inner-init, tools disk DIR/tools.img) runs daxd-cut-client on
# /dev/pmem0: its stores reach the region through daxd's mapping, and each fsync is a
# virtio-pmem FLUSH that daxd serves. The runner cuts the power while it runs.
case_powercut_pmem() {
    daxd=$1 sid=/host$2 dir=/host$3 seed=$4 first=$5
    cut_disk || return
    load_kvm || return
    rm -f /host/mnt/pmem.sock
    start_backend "$daxd" "--window name=pm0,size=16M,serve=both --pmem-socket-path /mnt/pmem.sock" \
        || return
    wait_backend_socket /host/mnt/pmem.sock || return
    mount --rbind /dev "$sid/dev"
    mount -t proc proc "$sid/proc"
    mount --bind /host/mnt "$sid/mnt"
    mount --bind "$dir" "$sid/srv"
    chroot "$sid" qemu-system-x86_64 -accel kvm -cpu host -smp 1 -m 256M \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -display none -serial stdio -monitor none -no-reboot \
        -kernel /srv/vmlinuz -initrd /srv/inner-initramfs.img \
        -append "console=ttyS0 quiet daxd.inner=pmem-cut daxd.tools=vda daxd.seed=$seed daxd.first=$first" \
        -drive file=/srv/tools.img,if=virtio,format=raw,readonly=on \
        -chardev socket,id=pm,path=/mnt/pmem.sock \
        -device vhost-user-test-device-pci,chardev=pm,virtio-id=27,num_vqs=1,config_size=16 \
        < /dev/null
    fail "the pmem guest ended before the cut: $(tail -3 /tmp/backend.log)"
}
