//! A frontend (or a guest writing its rings) that is out of step with the protocol gets a
//! refusal and a bounded number of log lines, never a daxd that spins, floods its log or
//! cannot be stopped.

use std::fs::File;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::frontend::{handshake, Connection, GuestMem, QUEUE_SIZE};
use crate::support::{test_dir, Backend};

fn start(dir: &std::path::Path) -> (Backend, std::path::PathBuf) {
    let region = dir.join("region.img");
    File::create(&region).unwrap().set_len(1 << 20).unwrap();
    let socket = dir.join("blk.sock");
    let log = dir.join("daxd.log");
    let mut command = Command::new(env!("CARGO_BIN_EXE_daxd"));
    command
        .arg("--region")
        .arg(&region)
        .arg("--socket-path")
        .arg(&socket)
        .stdin(Stdio::null())
        .stderr(File::create(&log).unwrap());
    (Backend::spawn(command, socket, true), log)
}

/// A well-behaved frontend connects to `daxd` and gets a 512-byte read served.
fn serves_a_frontend(daxd: &Backend) -> bool {
    let good = GuestMem::new();
    let mut inflight = None;
    let c = Connection::start(&daxd.socket, &good, &mut inflight, 0);
    good.put_read(0, 0, 512);
    good.make_available(&[0]);
    c.kick();
    c.wait_used(&good, 1);
    good.status(0) == 0
}

/// An available index further ahead than the ring holds (what a frontend that resumes a
/// ring at the wrong index shows, as QEMU does after a backend without in-flight tracking
/// died): before, daxd's worker spun on it, logging a line per spin (900,000 lines in a
/// few seconds) and never stopping on SIGTERM.
#[test]
fn an_impossible_available_index_is_refused_without_spinning() {
    let dir = test_dir("daxd-hostile-");
    let d = dir.path();
    let (daxd, log) = start(d);
    let mem = GuestMem::new();
    let mut inflight = None;
    let c = Connection::start(&daxd.socket, &mem, &mut inflight, 0);
    mem.put_write(0, 0, &[0x11; 512]);
    mem.make_available(&[0]);
    c.kick();
    c.wait_used(&mem, 1);

    // Claim 100 more chains on a ring of 16, and kick now and then.
    let bogus = mem.avail_idx().wrapping_add(100);
    mem.set_avail_idx(bogus);
    let before = daxd.cpu_ticks();
    for _ in 0..10 {
        c.kick();
        std::thread::sleep(Duration::from_millis(100));
    }
    let used = daxd.cpu_ticks() - before;
    // 100 ticks per second: a spinning worker uses about 100 in this second.
    assert!(
        used < 30,
        "daxd used {used} clock ticks in 1 s of a bogus ring"
    );
    assert_eq!(
        mem.used_idx(),
        1,
        "nothing is served from a ring in that state"
    );
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines < 200, "daxd logged {lines} lines");

    // Back in step, the queue works again.
    mem.set_avail_idx(1);
    mem.put_write(2, 8, &[0x22; 512]);
    mem.make_available(&[2]);
    c.kick();
    c.wait_used(&mem, 2);
    assert_eq!(mem.status(2), 0);
    drop(c);
    assert!(daxd.terminate().success());
}

/// A memory table whose region claims more bytes than its file holds, and a buffer in the
/// missing part: daxd used to map it and die of SIGBUS at the first access there. Now the
/// table is refused (an error reply), and daxd serves the next frontend.
#[test]
fn a_memory_table_larger_than_its_file_is_refused() {
    use vhost::VhostBackend;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    let dir = test_dir("daxd-hostile-");
    let d = dir.path();
    let (mut daxd, log) = start(d);
    let mem = GuestMem::new();
    mem.truncate(1 << 20); // the table still claims 4 MiB
    let frontend = handshake(&daxd.socket);
    let refused = frontend.set_mem_table(&[mem.table()]);
    if refused.is_ok() {
        // Accepted: make daxd read a buffer at 2 MiB, past the end of the file.
        let mut inflight = None;
        let c = Connection::finish(frontend, &mem, &mut inflight, 0);
        mem.put_write(0, 0, &[0x33; 512]);
        mem.mem
            .write_obj(
                Descriptor::new(0x20_0000, 512, VRING_DESC_F_NEXT as u16, 2),
                GuestAddress(16),
            )
            .unwrap();
        mem.make_available(&[0]);
        c.kick();
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        daxd.is_running(),
        "daxd died: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(refused.is_err(), "the memory table was accepted");

    assert!(serves_a_frontend(&daxd));
    assert!(daxd.terminate().success());
}

/// Messages out of range in each way the protocol allows: queue numbers past the device's
/// queues, queue sizes of 0 and above the maximum, ring addresses outside the memory table,
/// inflight areas that are not the device's shape, config reads past the config space.
/// Each is refused (an error reply or a closed connection), and after each daxd is still
/// running and serves the next frontend.
#[test]
fn out_of_range_messages_are_refused_and_daxd_serves_on() {
    use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserInflight};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VringConfigData};
    use vmm_sys_util::eventfd::EventFd;

    let dir = test_dir("daxd-hostile-");
    let d = dir.path();
    let (mut daxd, log) = start(d);
    let mem = GuestMem::new();
    type Attack = fn(&mut Frontend) -> bool;
    let attacks: [(&str, Attack); 8] = [
        ("SET_VRING_NUM of queue 9", |f| {
            f.set_vring_num(9, 16).is_err()
        }),
        ("SET_VRING_NUM 0", |f| f.set_vring_num(0, 0).is_err()),
        ("SET_VRING_NUM 65535", |f| {
            f.set_vring_num(0, 65535).is_err()
        }),
        ("SET_VRING_BASE of queue 9", |f| {
            f.set_vring_base(9, 0).is_err()
        }),
        ("SET_VRING_ADDR outside the memory table", |f| {
            f.set_vring_num(0, QUEUE_SIZE).unwrap();
            let bogus = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: 0x7fff_0000_0000,
                used_ring_addr: 0x7fff_0000_2000,
                avail_ring_addr: 0x7fff_0000_1000,
                log_addr: None,
            };
            f.set_vring_addr(0, &bogus).is_err()
        }),
        ("SET_VRING_KICK of queue 9", |f| {
            f.set_vring_kick(9, &EventFd::new(0).unwrap()).is_err()
        }),
        ("GET_INFLIGHT_FD for 1000 queues", |f| {
            f.get_inflight_fd(&VhostUserInflight::new(0, 0, 1000, QUEUE_SIZE))
                .is_err()
        }),
        ("GET_CONFIG past the config space", |f| {
            let buf = [0u8; 64];
            f.get_config(4096, 64, VhostUserConfigFlags::WRITABLE, &buf)
                .map_or(true, |(_, payload)| payload.iter().all(|&b| b == 0))
        }),
    ];
    for (what, attack) in attacks {
        let mut frontend = handshake(&daxd.socket);
        frontend.set_mem_table(&[mem.table()]).unwrap();
        assert!(attack(&mut frontend), "{what}: accepted");
        drop(frontend);
        assert!(
            daxd.is_running(),
            "{what}: daxd died: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            serves_a_frontend(&daxd),
            "{what}: the next frontend was not served"
        );
    }
    assert!(daxd.terminate().success());
}

/// Connections come and go (a frontend reconnecting in a loop, or a hostile one) without
/// daxd keeping anything of them: its open file descriptors are the same after 100
/// connections as before. vhost-user-backend 0.24 leaked one eventfd per queue worker per
/// connection (fixed in vendor/vhost-user-backend), which ran daxd out of descriptors.
#[test]
fn connections_leave_no_file_descriptors_behind() {
    let dir = test_dir("daxd-hostile-");
    let (daxd, _log) = start(dir.path());
    let open_fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", daxd.pid()))
            .unwrap()
            .count()
    };
    let mem = GuestMem::new();
    // One full connection first, so that whatever daxd keeps for good exists.
    drop(Connection::start(&daxd.socket, &mem, &mut None, 0));
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds();
    for _ in 0..100 {
        let frontend = handshake(&daxd.socket);
        drop(frontend);
    }
    let mut inflight = None;
    drop(Connection::start(&daxd.socket, &mem, &mut inflight, 0));
    // The last connection ends asynchronously.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open_fds() != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        open_fds(),
        before,
        "file descriptors left by 101 connections"
    );
    assert!(daxd.terminate().success());
}
