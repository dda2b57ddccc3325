# cloud-hypervisor inside the test guest (tests/cloud_hypervisor.rs), sourced after
# blk-cases.sh. The test guest runs under TCG with `-cpu max`, which emulates AMD SVM with
# nested paging: kvm_amd loads and cloud-hypervisor runs KVM guests in it. The backend
# serves their disk from a tmpfs of the test guest (a shared mapping of a file on the 9p
# share would not be coherent). The inner guest's steps are in resources/guest/inner-init.

# ch_backend BACKEND [--read-only]: starts BACKEND (daxd's path, or qemu-storage-daemon)
# on /mnt/region.img (64 MiB) with 2 queues, socket /mnt/blk.sock.
ch_backend() {
    writable=on
    [ "$2" = --read-only ] && writable=off
    start_backend "$1" "--size 64M --num-queues 2 --serial ch-inner $2" \
        "writable=$writable,num-queues=2"
}

# ch_stop_backend NAME: SIGTERM, and its exit status as RESULT backend_exit_NAME.
ch_stop_backend() {
    kill -TERM "$backend_pid"
    wait "$backend_pid"
    echo "RESULT backend_exit_$1 $?"
}

# ch_boot STEP: boots the inner guest for STEP (its init's daxd.inner=); its console goes
# to /tmp/ch-STEP.out, then to ours as "INNER STEP: ..." lines.
ch_boot() {
    host timeout 180 "$ch" --kernel "$kernel" --initramfs "$initramfs" \
        --cmdline "console=ttyS0 quiet daxd.inner=$1" --cpus boot=2 \
        --memory size=256M,shared=on --serial tty --console off \
        --disk vhost_user=true,socket=/mnt/blk.sock,num_queues=2 > "/tmp/ch-$1.out" 2>&1
    echo "RESULT ch_exit_$1 $?"
    sed "s/^/INNER $1: /" "/tmp/ch-$1.out"
}

# sha256 of 64 KiB of the region at KIB.
region_sha() {
    dd if=/host/mnt/region.img bs=64k skip=$(($1 / 64)) count="${2:-1}" 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}

# cloud_hypervisor BACKEND CLOUD_HYPERVISOR KERNEL INITRAMFS: the inner guest's steps
# against BACKEND (daxd's path or qemu-storage-daemon): O_DIRECT patterns and a discard,
# a second boot on the same backend, the backend killed and restarted under a running
# guest, a file system checked by e2fsck, and a read-only disk.
case_cloud_hypervisor() {
    backend=$1 ch=$2 kernel=$3 initramfs=$4
    while read -r module; do
        insmod "/lib/modules/$module" || { fail "insmod $module"; return; }
    done < /lib/modules/load-order-kvm
    [ -c /dev/kvm ] || { fail "no /dev/kvm after loading kvm_amd"; return; }
    echo "RESULT kvm_amd_nested $(cat /sys/module/kvm_amd/parameters/nested)"
    mount -t tmpfs -o size=256M tmpfs /host/mnt
    mount -t tmpfs tmpfs /host/run
    mkdir -p /host/dev/shm
    mount -t tmpfs tmpfs /host/dev/shm
    truncate -s 64M /host/mnt/region.img
    ch_backend "$backend" || return

    ch_boot write
    last=$((64 * 1024 - 64))
    for kib in 0 3072 "$last"; do
        echo "RESULT region_$kib $(region_sha "$kib")"
    done
    echo "RESULT region_discarded $(region_sha 8192 16)"
    echo "RESULT zero_1m $(dd if=/dev/zero bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"

    ch_boot again

    # Killed (SIGKILL) and started again once the guest is writing: cloud-hypervisor
    # reconnects to the socket by itself.
    ch_boot restart > /tmp/ch-restart.console &
    ch_pid=$!
    i=0
    while ! grep -q INNER-RESTART-READY /tmp/ch-restart.out 2> /dev/null && [ "$i" -lt 600 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    sleep 2
    echo "RESULT killed_after $(grep -c INNER-PROGRESS /tmp/ch-restart.out)"
    kill -KILL "$backend_pid"
    wait "$backend_pid" 2> /dev/null
    sleep 1
    ch_backend "$backend" || return
    echo "RESULT restarted 1"
    wait "$ch_pid"
    cat /tmp/ch-restart.console

    ch_boot fs
    ch_stop_backend fs
    host e2fsck -fn /mnt/region.img > /tmp/e2fsck.out 2>&1
    echo "RESULT e2fsck_exit $?"
    for n in 1 2 3; do
        echo "RESULT fs_file$n $(host debugfs -R "cat /file$n" /mnt/region.img 2>/dev/null | sha256sum | cut -d' ' -f1)"
    done

    ch_backend "$backend" --read-only || return
    ch_boot read-only
    echo "RESULT region_0_now $(region_sha 0)"
    ch_stop_backend read-only
    tail -5 /tmp/backend.log | sed 's/^/BACKEND: /'
}
