# cloud-hypervisor inside the test guest (tests/cloud_hypervisor.rs), sourced after
# blk-cases.sh. The test guest runs under TCG with `-cpu max`, which emulates AMD SVM with
# nested paging: kvm_amd loads and cloud-hypervisor runs a KVM guest in it. daxd serves
# that guest's disk from a tmpfs of the test guest (a shared mapping of a file on the 9p
# share would not be coherent).

# cloud_hypervisor DAXD CLOUD_HYPERVISOR KERNEL INITRAMFS: boots KERNEL with INITRAMFS
# (whose init is resources/guest/inner-init) under cloud-hypervisor on daxd's disk (2
# queues, 64 MiB, serial ch-inner), then reports the guest's console, the blocks it
# wrote as the region file holds them, and daxd's exit status after SIGTERM.
case_cloud_hypervisor() {
    daxd=$1 ch=$2 kernel=$3 initramfs=$4
    while read -r module; do
        insmod "/lib/modules/$module" || { fail "insmod $module"; return; }
    done < /lib/modules/load-order-kvm
    [ -c /dev/kvm ] || { fail "no /dev/kvm after loading kvm_amd"; return; }
    echo "RESULT kvm_amd_nested $(cat /sys/module/kvm_amd/parameters/nested)"
    mount -t tmpfs -o size=256M tmpfs /host/mnt
    mount -t tmpfs tmpfs /host/run
    mkdir -p /host/dev/shm
    mount -t tmpfs tmpfs /host/dev/shm
    chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin "$daxd" \
        --region /mnt/region.img --size 64M --socket-path /mnt/blk.sock --num-queues 2 \
        --serial ch-inner 2> /tmp/daxd.log &
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
    host timeout 180 "$ch" --kernel "$kernel" --initramfs "$initramfs" \
        --cmdline "console=ttyS0 quiet" --cpus boot=2 --memory size=256M,shared=on \
        --serial tty --console off \
        --disk vhost_user=true,socket=/mnt/blk.sock,num_queues=2 > /tmp/ch.out 2>&1
    echo "RESULT ch_exit $?"
    sed 's/^/INNER: /' /tmp/ch.out
    last=$((64 * 256 - 1))
    for block in 0 256 "$last"; do
        echo "RESULT block_$block $(dd if=/host/mnt/region.img bs=4096 skip="$block" count=1 2>/dev/null | head -n 1 | tr ' ' _)"
    done
    kill -TERM "$daxd_pid"
    wait "$daxd_pid"
    echo "RESULT daxd_exit $?"
    sed 's/^/DAXD: /' /tmp/daxd.log | tail -5
}
