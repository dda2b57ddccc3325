//! A backend killed or restarted under load costs the guest nothing. A QEMU 10 guest with
//! a 2-queue vhost-user-blk disk (`reconnect-ms`) runs fio with crc32c verification on an
//! ext4 file system on the disk (per queue one job with an fdatasync every 8 writes, one
//! without), while the runner kills daxd with SIGKILL (and now and then SIGTERM) at
//! pseudo-random moments and starts a new daxd process on the same socket and region. QEMU
//! keeps the in-flight tracking area across the restarts; each new daxd serves first what
//! its predecessor had taken from the rings and not completed. Pass: fio reports no verify
//! or I/O error, the guest kernel logs no I/O error, timeout or ring error, and e2fsck
//! finds the file system clean in the guest and on the host.
//!
//! The `soak_` tests (by hand) make 100 restarts, and put qemu-storage-daemon, which has
//! no in-flight tracking, through the same run.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::frontend::{Connection, GuestMem};
use crate::support::guest::{boot, boot_for_a_verdict, boot_until, host_tool, Vm};
use crate::support::{test_dir, Backend};

const REGION_SIZE: u64 = 256 << 20;
const QUEUES: u16 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Daxd,
    QemuStorageDaemon,
}

/// Starts the backend on `dir/blk.sock`, its log in `dir/backend-<n>.log`.
fn start(peer: Peer, dir: &Path, region: &Path, n: usize) -> Backend {
    let socket = dir.join("blk.sock");
    let log = File::create(dir.join(format!("backend-{n}.log"))).unwrap();
    let mut command = match peer {
        Peer::Daxd => {
            let mut c = Command::new(env!("CARGO_BIN_EXE_daxd"));
            c.arg("--region")
                .arg(region)
                .arg("--socket-path")
                .arg(&socket)
                .arg("--num-queues")
                .arg(QUEUES.to_string())
                .env("RUST_LOG", "info");
            c
        }
        Peer::QemuStorageDaemon => {
            // It does not replace a socket file left by a killed predecessor.
            std::fs::remove_file(&socket).ok();
            let mut c = Command::new("qemu-storage-daemon");
            c.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f,filename={}",
                    region.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
                    socket.display()
                ));
            c
        }
    };
    command.stdin(Stdio::null()).stderr(log);
    Backend::spawn(command, socket, true)
}

/// xorshift, for kill moments that differ between kills but repeat between runs.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// `restarts` kills of `peer` under the guest's load (every fifth a SIGTERM), fio running
/// for `seconds`; prints the requests each new daxd found in flight.
fn restarts_under_load(peer: Peer, restarts: usize, seconds: u32) {
    let dir = test_dir("daxd-restart-");
    let d = dir.path();
    let region = d.join("region.img");
    File::create(&region).unwrap().set_len(REGION_SIZE).unwrap();
    let mut backend = Some(start(peer, d, &region, 0));
    let socket = d.join("blk.sock");
    let mut vm = Vm::blk(&socket, QUEUES);
    vm.reconnect_ms = Some(100);

    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut made = 0;
    let mut terms = 0;
    let mut next_at: Option<Instant> = None;
    let boot = boot_until(
        d,
        "restart",
        &vm,
        &format!("run_case restart case_restart {seconds}\n"),
        Duration::from_secs(u64::from(seconds) + 300),
        &mut |_, _| {},
        &mut |console| {
            let running =
                console.contains("RESTART-LOAD-START") && !console.contains("RESTART-LOAD-END");
            if !running || made >= restarts {
                return false;
            }
            let at = *next_at.get_or_insert_with(|| {
                Instant::now() + Duration::from_millis(300 + next(&mut rng) % 1200)
            });
            if Instant::now() < at {
                return false;
            }
            let old = backend.take().unwrap();
            if made % 5 == 4 {
                let status = old.terminate();
                assert!(
                    status.success(),
                    "restart {made}: the backend did not exit cleanly after SIGTERM: {status}"
                );
                terms += 1;
            } else {
                drop(old); // SIGKILL
            }
            // Down for a moment, as a crashed backend's supervisor would take.
            std::thread::sleep(Duration::from_millis(next(&mut rng) % 300));
            made += 1;
            backend = Some(start(peer, d, &region, made));
            next_at = None;
            false
        },
    );
    let last = backend.take().unwrap();
    let status = last.terminate();

    let mut in_flight = Vec::new();
    for n in 0..=made {
        let log = std::fs::read_to_string(d.join(format!("backend-{n}.log"))).unwrap_or_default();
        let found: usize = log
            .lines()
            .filter_map(|l| l.split("queue ").nth(1))
            .filter_map(|l| l.split(": ").nth(1))
            .filter_map(|l| l.strip_suffix(" requests were in flight when the previous backend stopped; serving them first"))
            .filter_map(|n| n.parse::<usize>().ok())
            .sum();
        in_flight.push(found);
    }
    eprintln!(
        "{peer:?}: {made} restarts ({terms} after SIGTERM) during fio; requests found in flight per restart: {:?}",
        &in_flight[1..]
    );
    boot.assert_passed(&["restart"], "");
    assert!(
        status.success(),
        "the last backend did not exit cleanly: {status}"
    );
    assert!(
        made >= restarts,
        "only {made} of {restarts} restarts happened while fio ran"
    );
    let (ok, out, err) = host_tool("e2fsck", &["-fn", region.to_str().unwrap()]);
    assert!(
        ok,
        "e2fsck on the host: {}{err}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn a_guest_does_not_notice_daxd_killed_and_restarted() {
    restarts_under_load(Peer::Daxd, 20, 50);
}

#[test]
#[ignore = "by hand: a soak of 100 restarts"]
fn soak_a_guest_does_not_notice_100_daxd_restarts() {
    restarts_under_load(Peer::Daxd, 100, 200);
}

#[test]
#[ignore = "by hand, for comparison with the peer"]
fn soak_restarts_of_qemu_storage_daemon() {
    restarts_under_load(Peer::QemuStorageDaemon, 20, 50);
}

/// The state a backend leaves when it dies with requests taken, and one published but not
/// yet cleared, is recovered by the next daxd process exactly: what was in flight
/// completes once, oldest first, with its data; what was published is not done again; new
/// requests follow. The frontend plays QEMU (it keeps the in-flight area and sends the
/// used index as the ring base) and writes the dead backend's marks itself.
#[test]
fn requests_in_flight_at_a_crash_complete_once_after_the_restart() {
    let dir = test_dir("daxd-inflight-");
    let d = dir.path();
    let region = d.join("region.img");
    File::create(&region).unwrap().set_len(1 << 20).unwrap();
    let socket = d.join("blk.sock");
    let mem = GuestMem::new();
    let mut inflight = None;

    let first = start(Peer::Daxd, d, &region, 0);
    let c = Connection::start(&socket, &mem, &mut inflight, 0);
    mem.put_write(0, 0, &[0xaa; 512]);
    mem.make_available(&[0]);
    c.kick();
    c.wait_used(&mem, 1);
    assert_eq!(mem.status(0), 0);
    mem.put_write(13, 40, &[0xbb; 512]);
    mem.make_available(&[13]);
    c.kick();
    c.wait_used(&mem, 2);
    assert_eq!(mem.status(13), 0);
    // What daxd itself recorded: each request counted when taken (the second one is
    // number 1), cleared once its used entry was published, the last publication noted.
    let area = inflight.as_ref().unwrap();
    let entry = |head: u64| 16 + 16 * head;
    assert_eq!(u16::from_le_bytes(area.read(8)), 1, "version");
    assert_eq!(u16::from_le_bytes(area.read(12)), 13, "last_batch_head");
    assert_eq!(u16::from_le_bytes(area.read(14)), 2, "used_idx");
    assert_eq!(area.read::<1>(entry(0)), [0], "head 0 still in flight");
    assert_eq!(area.read::<1>(entry(13)), [0], "head 13 still in flight");
    assert_eq!(u64::from_le_bytes(area.read(entry(13) + 8)), 1, "counter");
    drop(c);
    drop(first); // SIGKILL

    // What the dead backend left: it had taken the write C (head 6) and then a FLUSH
    // (head 3), and published the write D (head 9) but died before clearing D's mark;
    // none of them reached the region (D's write is "lost" on purpose, so that doing it
    // again would show).
    mem.put_write(6, 16, &[0xcc; 512]);
    mem.put_flush(3);
    mem.put_write(9, 24, &[0xdd; 512]);
    mem.make_available(&[6, 3, 9]);
    mem.push_used(9, 1);
    for (head, counter) in [(6u64, 10u64), (3, 11), (9, 12)] {
        area.write(entry(head) + 8, &counter.to_le_bytes());
        area.write(entry(head), &[1]);
    }
    area.write(12, &9u16.to_le_bytes()); // last_batch_head
    area.write(14, &2u16.to_le_bytes()); // used_idx before D's publication

    let second = start(Peer::Daxd, d, &region, 1);
    let c = Connection::start(&socket, &mem, &mut inflight, mem.used_idx());
    c.wait_used(&mem, 5);
    assert_eq!(
        mem.used(3, 5),
        [(6, 1), (3, 1)],
        "the requests in flight, oldest first, each once"
    );
    assert_eq!((mem.status(6), mem.status(3)), (0, 0));
    // A new request after them is taken from the ring where the old backend stopped.
    mem.put_read(12, 16, 512);
    mem.make_available(&[12]);
    c.kick();
    c.wait_used(&mem, 6);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(mem.used_idx(), 6, "nothing completed twice");
    assert_eq!(mem.used(5, 6), [(12, 513)]);
    assert_eq!(mem.read_data(12, 512), [0xcc; 512]);
    drop(c);
    assert!(second.terminate().success());
    let bytes = std::fs::read(&region).unwrap();
    let sector = |s: usize| &bytes[s * 512..(s + 1) * 512];
    assert_eq!(sector(0), [0xaa; 512]);
    assert_eq!(sector(40), [0xbb; 512]);
    assert_eq!(sector(16), [0xcc; 512]);
    assert_eq!(
        sector(24),
        [0u8; 512],
        "the published write D was done again"
    );
}

/// Which runs without a verdict are run again: a test guest whose QEMU ended by itself
/// (it reset itself, or vanished) is; one that hung until the runner's timeout is a
/// failure and is not. "QEMU" here is a shell that exits at once or sleeps past the
/// timeout.
#[test]
#[ignore = "needs the test guest image (ci/build-guest.sh); run by ci/test.sh"]
fn a_test_guest_that_hangs_fails_and_only_one_that_reset_or_halted_is_run_again() {
    let dir = test_dir("daxd-verdict-");
    let d = dir.path();
    let fake = |script: &str| {
        let mut vm = Vm::diskless();
        vm.qemu = vec!["sh".into(), "-c".into(), script.into(), "fake-qemu".into()];
        vm
    };
    let run = |vm: &Vm, name: &str| {
        boot(
            d,
            name,
            vm,
            "true\n",
            Duration::from_secs(2),
            &mut |_, _| {},
        )
    };
    let reset = fake("exit 0");
    let (boot, attempt) = boot_for_a_verdict(|n| run(&reset, &format!("reset-{n}")));
    assert!(!boot.timed_out && boot.gave_no_verdict());
    assert_eq!(attempt, 1, "a test guest that reset itself is run again");

    // The fakes name their one thread as QEMU names a vCPU thread.
    let vcpu = "printf 'CPU 0/TCG' > /proc/$$/comm";
    // Printing nothing while its CPU still wakes (a guest waiting on a hung backend): a
    // hang, as is one that spins.
    for (name, script) in [
        ("hung", format!("{vcpu}; while :; do sleep 1; done")),
        ("spinning", format!("{vcpu}; while :; do :; done")),
    ] {
        let hung = fake(&script);
        let (boot, attempt) = boot_for_a_verdict(|n| run(&hung, &format!("{name}-{n}")));
        assert!(
            boot.timed_out && !boot.halted && !boot.gave_no_verdict(),
            "{name}"
        );
        assert_eq!(attempt, 0, "a test guest that {name} is not run again");
        assert!(
            boot.console.contains("[runner] QEMU killed after"),
            "{}",
            boot.console
        );
    }

    // A vCPU that neither runs nor is woken any more: halted for good.
    let fifo = d.join("never-written");
    let halted = fake(&format!(
        "{vcpu}; mkfifo {fifo}; read -r _ < {fifo}",
        fifo = fifo.display()
    ));
    let (boot, attempt) = boot_for_a_verdict(|n| {
        std::fs::remove_file(&fifo).ok();
        run(&halted, &format!("halted-{n}"))
    });
    assert!(boot.timed_out && boot.halted && boot.gave_no_verdict());
    assert_eq!(attempt, 1, "a test guest whose vCPU stopped is run again");
    assert!(
        boot.console.contains("halted with no interrupt"),
        "{}",
        boot.console
    );
}
