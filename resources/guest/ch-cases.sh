# cloud-hypervisor inside the test guest (tests/cloud_hypervisor.rs), sourced after
# blk-cases.sh. The test guest runs under TCG with `-cpu max`, which emulates AMD SVM with
# nested paging: kvm_amd loads and cloud-hypervisor runs KVM guests in it. The backend
# serves their disk from a tmpfs of the test guest (a shared mapping of a file on the 9p
# share would not be coherent). The inner guest's steps are in resources/guest/inner-init.

# load_kvm: loads kvm_amd, which runs guests here on the nested SVM that QEMU's TCG
# emulates for `-cpu max`.
load_kvm() {
    while read -r module; do
        insmod "/lib/modules/$module" || { fail "insmod $module"; return 1; }
    done < /lib/modules/load-order-kvm
    [ -c /dev/kvm ] || { fail "no /dev/kvm after loading kvm_amd"; return 1; }
    echo "RESULT kvm_amd_nested $(cat /sys/module/kvm_amd/parameters/nested)"
}

# ch_backend BACKEND [--read-only]: starts BACKEND (daxd's path, or qemu-storage-daemon)
# on /mnt/region.img (64 MiB) with 2 queues, socket /mnt/blk.sock.
ch_backend() {
    writable=on
    [ "$2" = --read-only ] && writable=off
    start_backend "$1" "--size 64M --num-queues 2 --serial ch-inner $2" \
        "writable=$writable,num-queues=2"
}

# ch_backend_as_vhost_user_block BACKEND: starts daxd through
# resources/cloud-hypervisor/vhost_user_block, with the options cloud-hypervisor's
# integration tests give their backend (prepare_vubd); qemu-storage-daemon as ch_backend
# does.
ch_backend_as_vhost_user_block() {
    if [ "$1" = qemu-storage-daemon ]; then
        ch_backend "$1"
        return
    fi
    rm -f /host/mnt/blk.sock
    chroot /host /usr/bin/env PATH=/usr/sbin:/usr/bin:/sbin:/bin DAXD="$1" "$vubd" \
        --block-backend path=/mnt/region.img,socket=/mnt/blk.sock,num_queues=2,readonly=false,direct=false \
        2>> /tmp/backend.log &
    backend_pid=$!
    wait_backend_socket
}

# ch_stop_backend NAME: SIGTERM, and its exit status as RESULT backend_exit_NAME.
ch_stop_backend() {
    kill -TERM "$backend_pid"
    wait "$backend_pid"
    echo "RESULT backend_exit_$1 $?"
}

# The inner guest's timer ticks periodically (the local APIC in periodic mode, no
# dynamic ticks, no high-resolution timers) rather than in one-shot mode: KVM under
# QEMU's TCG emulation of SVM now and then loses a timer interrupt of the inner guest,
# and in one-shot mode nothing arms the next one, so that CPU never takes a timer
# interrupt again (the inner kernel reports "rcu_preempt kthread timer wakeup didn't
# happen ... Possible timer handling issue on cpu=0" with nothing in flight on its disk:
# seen once in 53 boots of the restart loop, and once in a CI run's restart step). A
# periodic timer is armed again by KVM itself, so a lost interrupt costs one tick.
inner_timer_args="lapic=notscdeadline highres=off nohz=off"

# ch_boot STEP [OPTION...]: boots the inner guest for STEP (its init's daxd.inner=) with
# the backend's disk as /dev/vda, the tools disk as /dev/vdb and cloud-hypervisor OPTIONs
# besides; its console goes to /tmp/ch-STEP.out, then to ours as "INNER STEP: ..." lines.
ch_boot() {
    step=$1
    shift
    host timeout 180 "$ch" --kernel "$kernel" --initramfs "$initramfs" \
        --cmdline "console=ttyS0 quiet $inner_timer_args daxd.inner=$step" --cpus boot=2 \
        --memory size=256M,shared=on --serial tty --console off \
        --disk vhost_user=true,socket=/mnt/blk.sock,num_queues=2,queue_size=128 "path=$tools,readonly=on" \
        "$@" > "/tmp/ch-$step.out" 2>&1
    echo "RESULT ch_exit_$step $?"
    sed "s/^/INNER $step: /" "/tmp/ch-$step.out"
}

# sha256 of 64 KiB of the region at KIB.
region_sha() {
    dd if=/host/mnt/region.img bs=64k skip=$(($1 / 64)) count="${2:-1}" 2>/dev/null \
        | sha256sum | cut -d' ' -f1
}

# ch_setup: kvm_amd loaded, tmpfs for the region (64 MiB, /host/mnt/region.img), the
# sockets and cloud-hypervisor's shared memory.
ch_setup() {
    load_kvm || return 1
    mount -t tmpfs -o size=256M tmpfs /host/mnt
    mount -t tmpfs tmpfs /host/run
    mkdir -p /host/dev/shm
    mount -t tmpfs tmpfs /host/dev/shm
    truncate -s 64M /host/mnt/region.img
}

# ch_wait_restart_ready: waits (up to 60 s) until the inner guest's restart step writes.
ch_wait_restart_ready() {
    i=0
    while ! grep -q INNER-RESTART-READY /tmp/ch-restart.out 2> /dev/null && [ "$i" -lt 600 ]; do
        sleep 0.1
        i=$((i + 1))
    done
}

# cloud_hypervisor BACKEND CLOUD_HYPERVISOR KERNEL INITRAMFS TOOLS VHOST_USER_BLOCK: the
# inner guest's steps against BACKEND (daxd's path or qemu-storage-daemon): O_DIRECT
# patterns and a discard, a second boot on the same backend, fio verify over both queues
# (daxd started as cloud-hypervisor's vhost_user_block, VHOST_USER_BLOCK), the backend
# killed and restarted under a running guest, an ext4 file system checked by e2fsck, a
# read-only disk; and, with daxd, a pmem window of the region that cloud-hypervisor maps
# for the guest's DAX next to daxd's disk. TOOLS is the inner guest's tools disk.
case_cloud_hypervisor() {
    backend=$1 ch=$2 kernel=$3 initramfs=$4 tools=$5 vubd=$6
    ch_setup || return
    ch_backend "$backend" || return

    ch_boot write
    last=$((64 * 1024 - 64))
    for kib in 0 3072 "$last"; do
        echo "RESULT region_$kib $(region_sha "$kib")"
    done
    echo "RESULT region_discarded $(region_sha 8192 16)"
    echo "RESULT zero_1m $(dd if=/dev/zero bs=64k count=16 2>/dev/null | sha256sum | cut -d' ' -f1)"

    ch_boot again
    ch_stop_backend again
    ch_backend_as_vhost_user_block "$backend" || return
    ch_boot fio
    ch_stop_backend fio
    ch_backend "$backend" || return

    # Killed (SIGKILL) and started again once the guest is writing: cloud-hypervisor
    # reconnects to the socket by itself.
    ch_boot restart > /tmp/ch-restart.console &
    ch_pid=$!
    ch_wait_restart_ready
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
    [ "$backend" = qemu-storage-daemon ] || ch_pmem
    tail -5 /tmp/backend.log | sed 's/^/BACKEND: /'
}

# ch_restart_loop BACKEND CLOUD_HYPERVISOR KERNEL INITRAMFS TOOLS RUNS: RUNS inner boots of
# the restart step, each with the backend SIGKILLed and started again twice while the
# inner guest writes and reads back (2 s apart), daxd logging at debug level. One line
# per run (RESULT loop_N ch_exit blocks bad); a run that does not end (cloud-hypervisor
# stopped by its 180 s timeout: exit 124) or reads back a bad block prints the inner
# guest's console and the backend's log.
case_ch_restart_loop() {
    backend=$1 ch=$2 kernel=$3 initramfs=$4 tools=$5 runs=$6
    ch_setup || return
    export RUST_LOG=debug
    ch_backend "$backend" || return
    run=1
    while [ "$run" -le "$runs" ]; do
        : > /tmp/backend.log
        ch_boot restart > /tmp/ch-restart.console &
        ch_pid=$!
        ch_wait_restart_ready
        for k in 1 2; do
            sleep 2
            echo "LOOP $run: kill $k after $(grep -c INNER-PROGRESS /tmp/ch-restart.out) progress lines"
            kill -KILL "$backend_pid"
            wait "$backend_pid" 2> /dev/null
            sleep 0.5
            ch_backend "$backend" || return
        done
        wait "$ch_pid"
        # The inner guest's console lines end in CR LF.
        tr -d '\r' < /tmp/ch-restart.console > /tmp/ch-restart.lines
        ch_exit=$(sed -n 's/^RESULT ch_exit_restart //p' /tmp/ch-restart.lines)
        blocks=$(sed -n 's/^INNER restart: INNER-RESULT restart_blocks //p' /tmp/ch-restart.lines)
        bad=$(sed -n 's/^INNER restart: INNER-RESULT restart_bad //p' /tmp/ch-restart.lines)
        echo "RESULT loop_$run ${ch_exit:-none} ${blocks:-none} ${bad:-none}"
        if [ "$ch_exit" != 0 ] || [ "$blocks" != 400 ] || [ "$bad" != 0 ]; then
            sed "s/^/LOOP $run: /" /tmp/ch-restart.console
            sed "s/^/LOOP $run BACKEND: /" /tmp/backend.log
        fi
        run=$((run + 1))
    done
    ch_stop_backend loop
}

# A region laid out as a 32 MiB pmem window at offset 0 and a 64 MiB disk after it.
# cloud-hypervisor's --pmem maps a file from its first byte (it has no offset option) and
# serves virtio-pmem itself; it does not put that mapping in a vhost-user backend's memory
# table, so daxd cannot see or guard it, and the windows must not overlap.
ch_pmem() {
    rm -f /host/mnt/region.img
    start_backend "$backend" "--size 96M --num-queues 2 --serial ch-inner \
        --window name=pm0,offset=0,size=32M,serve=pmem --window name=disk,offset=32M,size=64M,serve=blk" || return
    ch_boot pmem --pmem file=/mnt/region.img,size=32M
    echo "RESULT pmem_region_file $(host debugfs -R "cat /dax-file" /mnt/region.img 2>/dev/null | sha256sum | cut -d' ' -f1)"
    echo "RESULT pmem_region_disk_0 $(region_sha 32768)"
    ch_stop_backend pmem
}
