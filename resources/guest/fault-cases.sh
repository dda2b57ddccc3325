# Guest-side cases for daxd's fault rules (tests/guest_faults.rs), sourced after
# blk-cases.sh and pmem-cases.sh (host, fail, run_case, expect_eq, sha_of_stdin,
# wait_host). At each `wait_host STEP` the host sets or clears rules on daxd's control
# socket; RESULT lines tell it what to aim at.

# Reads LEN bytes at SECTOR of /dev/vda with O_DIRECT (one request); fails if the read does.
direct_read() {
    host dd if=/dev/vda bs=512 skip="$1" count=$(($2 / 512)) iflag=direct status=none 2> /tmp/dd.err \
        | sha_of_stdin > /tmp/dd.sha
    ! grep -q . /tmp/dd.err
}

# bad_blocks SECTOR: the host makes sectors SECTOR..SECTOR+8 bad (step bad-blocks): a read
# of them fails with an I/O error, a read next to them works; a write of the first four
# heals them (dm-dust), the other four stay bad.
case_bad_blocks() {
    s=$1
    host dd if=/dev/urandom of=/dev/vda bs=512 seek=$((s - 8)) count=24 oflag=direct conv=notrunc status=none
    wait_host bad-blocks || return
    direct_read "$s" 4096 && fail "a read of the bad sectors succeeded"
    grep -q "Input/output error" /tmp/dd.err || fail "the read failed with '$(cat /tmp/dd.err)'"
    direct_read $((s - 8)) 4096 || fail "a read before the bad sectors failed: $(cat /tmp/dd.err)"
    host dd if=/dev/zero of=/dev/vda bs=512 seek="$s" count=4 oflag=direct conv=notrunc status=none \
        || fail "writing bad sectors failed"
    direct_read "$s" 2048 || fail "written sectors are still bad: $(cat /tmp/dd.err)"
    direct_read $((s + 4)) 2048 && fail "sectors never written were healed"
    true
}

# queue_of_cpu CPU: the disk's hardware queue that serves CPU.
queue_of_cpu() {
    for q in /sys/block/vda/mq/*; do
        if tr ',' '\n' < "$q/cpu_list" | grep -qx "$1"; then
            basename "$q"
            return
        fi
    done
}

# p50_us JOB < JSON: the median completion latency of fio job JOB, in microseconds, and
# the number of reads it made. (The JSON on standard input: the chrooted python3 sees the
# host's /tmp, not the guest's.)
p50_us() {
    host python3 -c 'import json,sys
jobs = json.load(sys.stdin)["jobs"]
job = next(j for j in jobs if j["jobname"] == sys.argv[1])
print(int(job["read"]["clat_ns"]["percentile"]["50.000000"] / 1000), job["read"]["total_ios"])' "$1"
}

# latency_pair NAME: 4 KiB O_DIRECT random reads at queue depth 1 from one job on CPU 0
# and one on CPU 1 at once, 3 s; prints their median latencies as RESULT NAME_cpu0/cpu1,
# and how many reads the first made.
latency_pair() {
    host fio --filename=/dev/vda --direct=1 --ioengine=psync --rw=randread --bs=4k \
        --size=64M --runtime=3 --time_based --output-format=json \
        --name=cpu0 --cpus_allowed=0 --name=cpu1 --cpus_allowed=1 > /tmp/fio.json 2> /tmp/fio.err \
        || { cat /tmp/fio.err; fail "fio failed"; return 1; }
    cpu0=$(p50_us cpu0 < /tmp/fio.json)
    cpu1=$(p50_us cpu1 < /tmp/fio.json)
    [ -n "$cpu0" ] && [ -n "$cpu1" ] || { fail "no latencies in fio's output"; return 1; }
    echo "RESULT $1_cpu0 ${cpu0% *}"
    echo "RESULT $1_cpu0_ios ${cpu0#* }"
    echo "RESULT $1_cpu1 ${cpu1% *}"
}

# delay: the host delays every request of the queue that serves CPU 0 by 20 ms (step
# delay); fio's median latency on CPU 0 grows by at least that, CPU 1's does not.
case_delay() {
    echo "RESULT queue_of_cpu0 $(queue_of_cpu 0)"
    echo "RESULT queue_of_cpu1 $(queue_of_cpu 1)"
    latency_pair before || return
    wait_host delay || return
    latency_pair delayed || return
    wait_host delay-cleared || return
}

# fs_files: ext4 (4 KiB blocks) on the disk, mounted at /host/mnt with errors=remount-ro,
# holding the files victim and other (256 KiB each), written out.
fs_files() {
    host mkfs.ext4 -q -F -b 4096 -E nodiscard /dev/vda || { fail "mkfs.ext4 failed"; return 1; }
    mount -t ext4 -o errors=remount-ro /dev/vda /host/mnt || { fail "mount failed"; return 1; }
    host dd if=/dev/urandom of=/mnt/victim bs=64k count=4 status=none
    host dd if=/dev/urandom of=/mnt/other bs=64k count=4 status=none
    sync
}

# The first extent of FILE as disk sectors START..END (end exclusive).
file_sectors() {
    host filefrag -v "$1" | awk '$1 == "0:" { sub(/\.\./, "", $4); sub(/:/, "", $5); print $4 * 8 ".." ($5 + 1) * 8 }'
}

# read_error: a read-error rule on the sectors of one file (step read-rule) makes the
# guest's reads of it fail with EIO, while another file reads fine; once cleared (step
# read-cleared) it reads back as written.
case_read_error() {
    fs_files || return
    want=$(sha_of_stdin < /host/mnt/victim)
    other=$(sha_of_stdin < /host/mnt/other)
    echo "RESULT victim_sectors $(file_sectors /mnt/victim)"
    echo 3 > /proc/sys/vm/drop_caches
    wait_host read-rule || return
    # One O_DIRECT request (the count the host checks), then a buffered read of the whole
    # file as programs do.
    if host dd if=/mnt/victim of=/dev/null bs=4k count=1 iflag=direct status=none 2> /tmp/dd.err; then
        fail "an O_DIRECT read of the file succeeded"
    fi
    grep -q "Input/output error" /tmp/dd.err || fail "the O_DIRECT read failed with '$(cat /tmp/dd.err)'"
    wait_host read-counted || return
    if cat /host/mnt/victim > /dev/null 2> /tmp/cat.err; then
        fail "a buffered read of the file succeeded"
    fi
    grep -q "Input/output error" /tmp/cat.err || fail "cat failed with '$(cat /tmp/cat.err)'"
    expect_eq "the other file" "$(sha_of_stdin < /host/mnt/other)" "$other"
    wait_host read-cleared || return
    echo 3 > /proc/sys/vm/drop_caches
    expect_eq "the file after the rule went" "$(sha_of_stdin < /host/mnt/victim)" "$want"
    umount /host/mnt || fail "umount failed"
}

# flush_error: a rule that fails every FLUSH (step flush-rule) makes fsync fail with EIO;
# cleared (step flush-cleared), fsync works again.
case_flush_error() {
    fs_files || return
    wait_host flush-rule || return
    if host dd if=/dev/urandom of=/mnt/synced bs=4k count=4 conv=fsync status=none 2> /tmp/dd.err; then
        fail "fsync succeeded although every FLUSH fails"
    fi
    # EIO from the failed FLUSH, or EROFS if ext4 had already aborted its journal for it.
    grep -qE "Input/output error|Read-only file system" /tmp/dd.err || fail "dd failed with '$(cat /tmp/dd.err)'"
    echo "RESULT fsync_error $(tr ' ' _ < /tmp/dd.err | cut -c1-80)"
    wait_host flush-cleared || return
    umount /host/mnt
    # The failed FLUSH may have aborted the journal: start from a fresh file system.
    fs_files || return
    host dd if=/dev/urandom of=/mnt/synced bs=4k count=4 conv=fsync status=none \
        || fail "fsync failed after the rule went"
    umount /host/mnt || fail "umount failed"
}

# write_error: a rule that fails every write (step write-rule) makes ext4 give up: the
# kernel logs that it aborts the journal, a later write is refused, and the kernel logs
# that the file system went read-only. (Linux 6.12 no longer shows "ro" in /proc/mounts
# for it.) The read-only switch happens when ext4 next starts a transaction and finds the
# journal aborted: the refused write is that transaction, so it comes first (waiting for a
# background thread to do it made this case fail once).
case_write_error() {
    fs_files || return
    dmesg -c > /dev/null
    wait_host write-rule || return
    host dd if=/dev/urandom of=/mnt/new bs=64k count=16 status=none
    sync
    wait_log "Aborting journal" || fail "the kernel did not log a journal abort"
    if host touch /mnt/after 2> /tmp/touch.err; then
        fail "a write to the file system succeeded after its journal was aborted"
    fi
    # EROFS, or EIO where the aborted journal refuses the transaction first.
    grep -qE "Read-only file system|Input/output error" /tmp/touch.err \
        || fail "touch failed with '$(cat /tmp/touch.err)'"
    wait_log "Remounting filesystem read-only" || fail "the kernel did not go read-only"
    dmesg | grep -m 5 -E "Aborting journal|aborted journal|read-only"
    wait_host write-cleared || return
    umount /host/mnt
    true
}

# wait_log TEXT: waits up to 20 s for the kernel log to hold TEXT.
wait_log() {
    i=0
    while ! dmesg | grep -q "$1"; do
        i=$((i + 1))
        [ "$i" -gt 200 ] && return 1
        sleep 0.1
    done
}

# pmem_flush_error: ext4 with DAX on /dev/pmem0 (virtio-pmem whose FLUSH daxd serves);
# a rule that fails the window's FLUSHes (step pmem-flush-rule) makes fsync of a DAX file
# fail with EIO; cleared (step pmem-flush-cleared), fsync works.
case_pmem_flush_error() {
    [ -b /dev/pmem0 ] || { fail "no /dev/pmem0"; return; }
    host mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/pmem0 \
        || { fail "mkfs.ext4 failed"; return; }
    mount -o dax /dev/pmem0 /host/mnt || { fail "mount -o dax failed"; return; }
    grep -q "^/dev/pmem0 /host/mnt ext4 .*dax=always" /proc/mounts \
        || fail "not mounted with dax=always: $(grep pmem0 /proc/mounts)"
    host dd if=/dev/urandom of=/mnt/before bs=4k count=4 conv=fsync status=none \
        || fail "fsync failed before any rule"
    wait_host pmem-flush-rule || return
    if host dd if=/dev/urandom of=/mnt/synced bs=4k count=4 conv=fsync status=none 2> /tmp/dd.err; then
        fail "fsync of a DAX file succeeded although the window's FLUSH fails"
    fi
    grep -qE "Input/output error|Read-only file system" /tmp/dd.err || fail "dd failed with '$(cat /tmp/dd.err)'"
    echo "RESULT pmem_fsync_error $(tr ' ' _ < /tmp/dd.err | cut -c1-80)"
    wait_host pmem-flush-cleared || return
    umount /host/mnt
}
