# Guest-side workload for crash states (tests/guest_crash.rs), sourced after blk-cases.sh
# and pmem-cases.sh (host, fail, wait_host). ext4 on the disk while daxd records; at each
# `wait_host fsynced-N` the host sets mark fsynced-N, from which on every crash state must
# hold file keep-N whole.

# keep_content N: what keep-N holds (the host writes the same to compare).
keep_content() {
    awk -v n="$1" 'BEGIN { for (i = 0; i < 600; i++) printf "keep %d line %04d\n", n, i }'
}

# crash_rounds ROUNDS: on the file system at /host/mnt, each round creates, appends to,
# renames and removes files in four directories, then writes keep-N, fsyncs it and has
# the host set mark fsynced-N.
crash_rounds() {
    n=1
    while [ "$n" -le "$1" ]; do
        d=/host/mnt/d$((n % 4))
        mkdir -p "$d"
        for i in 1 2 3 4 5; do
            echo "round $n file $i" > "$d/tmp-$n-$i"
        done
        dd if=/dev/urandom of=/host/mnt/log bs=4096 count=2 oflag=append conv=notrunc status=none
        mkdir -p "/host/mnt/d$(((n + 1) % 4))"
        mv "$d/tmp-$n-1" "/host/mnt/d$(((n + 1) % 4))/moved-$n"
        rm -f "$d/tmp-$n-2"
        keep_content "$n" > "/host/mnt/keep-$n"
        host sync "/mnt/keep-$n" || fail "fsync of keep-$n failed"
        wait_host "fsynced-$n" || return 1
        n=$((n + 1))
    done
}

# crash_workload ROUNDS: ext4 on /dev/vda; each round creates, appends to, renames and
# removes files in four directories, then writes keep-N, fsyncs it and has the host set
# mark fsynced-N. Prints the sectors of the first block group's inode table (where the
# files' inodes are) before the first round, at step fs-made.
case_crash_workload() {
    host mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/vda \
        || { fail "mkfs.ext4 failed"; return 1; }
    table=$(host dumpe2fs /dev/vda 2> /dev/null | sed -n 's/.*Inode table at \([0-9]*\)-\([0-9]*\).*/\1 \2/p' | sed -n 1p)
    set -- "$1" $table
    echo "RESULT inode_table_sectors $(($2 * 8))..$((($3 + 1) * 8))"
    wait_host fs-made || return 1
    mount -t ext4 /dev/vda /host/mnt || { fail "mount failed"; return 1; }
    crash_rounds "$1" || return 1
    umount /host/mnt || fail "umount failed"
}

# dax_crash_workload ROUNDS: the same rounds on ext4 mounted with DAX on /dev/pmem0
# (virtio-pmem whose FLUSH daxd serves): the guest's stores reach the window through its
# own mapping, and each fsync is a virtio-pmem FLUSH.
case_dax_crash_workload() {
    [ -b /dev/pmem0 ] || { fail "no /dev/pmem0"; return 1; }
    host mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/pmem0 \
        || { fail "mkfs.ext4 failed"; return 1; }
    wait_host fs-made || return 1
    mount -o dax /dev/pmem0 /host/mnt || { fail "mount -o dax failed"; return 1; }
    grep -q "^/dev/pmem0 /host/mnt ext4 .*dax=always" /proc/mounts \
        || fail "not mounted with dax=always: $(grep pmem0 /proc/mounts)"
    crash_rounds "$1" || return 1
    umount /host/mnt || fail "umount failed"
}
