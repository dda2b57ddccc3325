# Power-cut runs (tests/powercut.rs), sourced after blk-cases.sh. daxd and
# daxd-cut-client run here with the region on the guest's own ext4 disk /dev/vda (a host
# image with a write-back cache); the runner kills QEMU while they run: whatever the guest
# had not written to that disk is lost, as in a power failure. The client's lines on the
# console are what daxd promised.

# powercut DAXD CLIENT SEED FIRST_SEQ MODE DISCARD_EVERY: MODE is flush (a FLUSH every 8
# requests), sync (daxd --sync: every request write-through, no FLUSH) or term (300
# requests without FLUSH, then SIGTERM to daxd, which must make them durable before it
# exits); about one request in DISCARD_EVERY is a discard (0: none).
case_powercut() {
    daxd=$1 client=$2 seed=$3 first=$4 mode=$5 discards=$6
    mount -t ext4 /dev/vda /host/mnt || { fail "mount of the cut disk failed"; return; }
    # Nothing but daxd's own flushes may write the region back: no periodic writeback,
    # no writeback for lack of memory.
    echo 0 > /proc/sys/vm/dirty_writeback_centisecs
    echo 8640000 > /proc/sys/vm/dirty_expire_centisecs
    echo 80 > /proc/sys/vm/dirty_background_ratio
    echo 90 > /proc/sys/vm/dirty_ratio
    sync_arg=
    writethrough=off
    if [ "$mode" = sync ]; then
        # qemu-storage-daemon, the peer, writes through for sync too.
        sync_arg=--sync
        writethrough=on
    fi
    start_backend "$daxd" "$sync_arg" "writable=on,writethrough=$writethrough" || return
    case $mode in
        flush)
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
            kill -TERM "$backend_pid"
            wait "$backend_pid"
            echo "DAXD-EXIT $?"
            echo "CUT-NOW"
            sleep 3600
            ;;
    esac
    fail "the client ended before the cut: $(tail -3 /tmp/backend.log)"
}
