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
    rm -f /host/mnt/blk.sock
    sync_arg=
    [ "$mode" = sync ] && sync_arg=--sync
    # Not through the host function: $! must be the backend itself, for the SIGTERM below.
    if [ "$daxd" = qemu-storage-daemon ]; then
        # The peer: QEMU's own export of the same file, write-through for sync.
        writethrough=off
        [ "$mode" = sync ] && writethrough=on
        chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin qemu-storage-daemon \
            --blockdev driver=file,node-name=f,filename=/mnt/region.img,discard=unmap \
            --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/mnt/blk.sock,writable=on,writethrough=$writethrough \
            2> /tmp/daxd.log &
    else
        chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            "$daxd" --region /mnt/region.img --socket-path /mnt/blk.sock $sync_arg 2> /tmp/daxd.log &
    fi
    daxd_pid=$!
    i=0
    while [ ! -S /host/mnt/blk.sock ]; do
        i=$((i + 1))
        if [ "$i" -gt 300 ]; then
            cat /tmp/daxd.log
            fail "daxd did not start"
            return
        fi
        sleep 0.1
    done
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
            kill -TERM "$daxd_pid"
            wait "$daxd_pid"
            echo "DAXD-EXIT $?"
            echo "CUT-NOW"
            sleep 3600
            ;;
    esac
    fail "the client ended before the cut: $(tail -3 /tmp/daxd.log)"
}
