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

/// Asserts, naming `what` daxd just went through, that daxd is still running (else quotes
/// its log) and serves the next frontend.
fn assert_still_serving(what: &str, daxd: &mut Backend, log: &std::path::Path) {
    assert!(
        daxd.is_running(),
        "{what}: daxd died: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    assert!(
        serves_a_frontend(daxd),
        "{what}: the next frontend was not served"
    );
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
        assert_still_serving(what, &mut daxd, &log);
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

/// Writes raw bytes on a fresh connection and reads until daxd answers or closes (a
/// malformed message must not leave it waiting for more forever, nor crash it).
fn send_raw(socket: &std::path::Path, bytes: &[u8]) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // daxd may close before it has read everything: a broken pipe is an answer too.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
}

/// Sends the memory table and a ring of `size` entries (from `base`, if given), then its
/// kick, enables and kicks it, whatever the frontend negotiated before; refusals ignored.
fn start_ring(
    f: &mut vhost::vhost_user::Frontend,
    mem: &GuestMem,
    ring: &vhost::VringConfigData,
    size: u16,
    base: Option<u16>,
) {
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;
    let _ = f.set_mem_table(&[mem.table()]);
    let _ = f.set_vring_num(0, size);
    if let Some(base) = base {
        let _ = f.set_vring_base(0, base);
    }
    let _ = f.set_vring_addr(0, ring);
    let kick = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let _ = f.set_vring_kick(0, &kick);
    let _ = f.set_vring_enable(0, true);
    let _ = kick.write(1);
    std::thread::sleep(Duration::from_millis(100));
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, size: u32) -> Vec<u8> {
    [request, 0x1, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Malformed memory tables, messages out of order, truncated messages and wrong payload
/// sizes, many connections at once. After each daxd is running, its log has grown by a
/// bounded number of lines, the region holds exactly what it held, and the next frontend is
/// served.
#[test]
fn malformed_and_out_of_order_messages_leave_daxd_serving() {
    use vhost::vhost_user::Frontend;
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::EventFd;

    let dir = test_dir("daxd-hostile-");
    let d = dir.path();
    let region = d.join("region.img");
    let (mut daxd, log) = start(d);
    // Known bytes to find again at the end (written in place: daxd has the file mapped).
    let contents = crate::support::pattern(77, 1 << 20);
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new()
            .write(true)
            .open(&region)
            .unwrap(),
        &contents,
        0,
    )
    .unwrap();
    let mem = GuestMem::new();
    let pipe = std::os::unix::net::UnixStream::pair().unwrap().0;
    let ring = VringConfigData {
        queue_max_size: QUEUE_SIZE,
        queue_size: QUEUE_SIZE,
        flags: 0,
        desc_table_addr: 0,
        used_ring_addr: 0x2000,
        avail_ring_addr: 0x1000,
        log_addr: None,
    };
    let with = |change: fn(&mut VhostUserMemoryRegionInfo)| {
        let mut table = mem.table();
        change(&mut table);
        table
    };
    type Attack<'a> = Box<dyn Fn(&mut Frontend) + 'a>;
    let attacks: Vec<(&str, Attack)> = vec![
        (
            "two memory regions over the same guest addresses",
            Box::new(|f| {
                let _ = f.set_mem_table(&[mem.table(), mem.table()]);
            }),
        ),
        (
            "a memory region of 0 bytes",
            Box::new(|f| {
                let _ = f.set_mem_table(&[with(|t| t.memory_size = 0)]);
            }),
        ),
        (
            "a memory region of 2^62 bytes",
            Box::new(|f| {
                let _ = f.set_mem_table(&[with(|t| t.memory_size = 1 << 62)]);
            }),
        ),
        (
            "a memory region whose offset is past its file",
            Box::new(|f| {
                let _ = f.set_mem_table(&[with(|t| t.mmap_offset = 1 << 40)]);
            }),
        ),
        (
            "a memory region backed by a socket",
            Box::new(|f| {
                let mut table = mem.table();
                table.mmap_handle = pipe.as_raw_fd();
                let _ = f.set_mem_table(&[table]);
            }),
        ),
        (
            "a ring before any memory table, then its kick",
            Box::new(|f| {
                let _ = f.set_vring_num(0, QUEUE_SIZE);
                let _ = f.set_vring_addr(0, &ring);
                let _ = f.set_vring_kick(0, &EventFd::new(0).unwrap());
            }),
        ),
        (
            "a queue size that is not a power of two, then the ring started",
            Box::new(|f| start_ring(f, &mem, &ring, 12, None)),
        ),
        (
            "SET_VRING_BASE past the ring, then the ring started",
            Box::new(|f| start_ring(f, &mem, &ring, QUEUE_SIZE, Some(60_000))),
        ),
    ];
    let lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let survived = |what: &str, daxd: &mut Backend, before: usize| {
        assert_still_serving(what, daxd, &log);
        let grown = lines() - before;
        assert!(grown <= 20, "{what}: {grown} log lines");
    };
    use std::os::fd::AsRawFd;
    for (what, attack) in &attacks {
        let before = lines();
        let mut frontend = handshake(&daxd.socket);
        attack(&mut frontend);
        drop(frontend);
        survived(what, &mut daxd, before);
    }
    // A ring started before any feature was negotiated (no SET_FEATURES, no protocol
    // features), its kick written.
    let before = lines();
    {
        let mut f = Frontend::connect(&daxd.socket, 1).unwrap();
        let _ = f.set_owner();
        start_ring(&mut f, &mem, &ring, QUEUE_SIZE, None);
    }
    survived("a ring started before features", &mut daxd, before);
    // The same on the wire, below what the vhost crate would send.
    let raw: [(&str, Vec<u8>); 5] = [
        ("a header cut short", header(1, 0)[..5].to_vec()),
        ("a payload shorter than its header says", {
            let mut m = header(2, 8);
            m.extend_from_slice(&[1, 2, 3]);
            m
        }),
        ("a payload size beyond any message", header(5, 0x10_0000)),
        ("an unknown request", header(9999, 0)),
        ("a memory table of one region without its descriptor", {
            let mut m = header(5, 8 + 32);
            m.extend_from_slice(&1u32.to_le_bytes());
            m.extend_from_slice(&0u32.to_le_bytes());
            for v in [0u64, 4 << 20, 0x7f00_0000_0000, 0] {
                m.extend_from_slice(&v.to_le_bytes());
            }
            m
        }),
    ];
    for (what, bytes) in &raw {
        let before = lines();
        send_raw(&daxd.socket, bytes);
        survived(what, &mut daxd, before);
    }
    // Many connections at once: each waits its turn, none of them takes daxd down.
    let before = lines();
    let crowd: Vec<_> = (0..50)
        .map(|_| std::os::unix::net::UnixStream::connect(&daxd.socket).unwrap())
        .collect();
    drop(crowd);
    survived("50 connections at once", &mut daxd, before + 2 * 50);
    assert!(daxd.terminate().success());
    // The region holds what it held: every request above was refused before any byte of it
    // was touched.
    assert!(
        std::fs::read(&region).unwrap() == contents,
        "the region changed"
    );
}

/// Descriptor chains a guest can write: one whose `next` loops back to its head, one whose
/// data buffer lies outside guest memory. Each is completed (released without data, or
/// with an error status) rather than followed forever or copied into, the region keeps its
/// bytes, and the queue goes on serving the next request.
#[test]
fn looping_and_out_of_memory_chains_are_completed_without_touching_the_region() {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress};

    let dir = test_dir("daxd-hostile-");
    let (daxd, _log) = start(dir.path());
    let region = dir.path().join("region.img");
    let before = std::fs::read(&region).unwrap();
    let mem = GuestMem::new();
    let mut inflight = None;
    let c = Connection::start(&daxd.socket, &mem, &mut inflight, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    let desc = |index: u64, d: Descriptor| mem.mem.write_obj(d, GuestAddress(index * 16)).unwrap();

    // Head 0: a write request whose header's `next` is itself.
    mem.put_write(0, 0, &[0xaa; 512]);
    desc(0, Descriptor::new(0x10000, 16, next, 0));
    // Head 4: a write whose data descriptor points far outside guest memory.
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    mem.mem.write_slice(&hdr, GuestAddress(0x50000)).unwrap();
    mem.mem.write_obj(0xffu8, GuestAddress(0x50100)).unwrap();
    desc(4, Descriptor::new(0x50000, 16, next, 5));
    desc(5, Descriptor::new(0x7fff_0000_0000, 512, next, 6));
    desc(6, Descriptor::new(0x50100, 1, write, 0));
    mem.make_available(&[0, 4]);
    c.kick();
    c.wait_used(&mem, 2);
    let status: u8 = mem.mem.read_obj(GuestAddress(0x50100)).unwrap();
    assert_ne!(
        u32::from(status),
        VIRTIO_BLK_S_OK,
        "the out-of-memory write succeeded"
    );
    // Nothing of either request reached the region.
    assert!(
        std::fs::read(&region).unwrap() == before,
        "the region changed"
    );
    // The queue still serves: a good read on the same connection.
    mem.put_read(8, 0, 512);
    mem.make_available(&[8]);
    c.kick();
    c.wait_used(&mem, 3);
    assert_eq!(mem.status(8), 0);
    drop(c);
    assert!(daxd.terminate().success());
}
