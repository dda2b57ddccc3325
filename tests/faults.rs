//! Fault rules as a tester uses them: set at start (`--fault`) and at run time (`daxd
//! fault add|list|clear`, `daxd mark`) on the control socket, seen by a real vhost-user
//! client (the `blkio` crate), checked against the region file and the rules' hit counts.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::{
    daxd_command, daxd_fault as fault, daxd_inspect, fault_rules, file_bytes, inspection_json,
    pattern, refused_start, Backend, Client,
};

const EIO: i32 = -5;
const ENOTSUP: i32 = -95;
const SECTOR: u64 = 512;

/// daxd on a new 64 MiB region with a control socket and `extra` options.
fn daxd_with_control(dir: &Path, extra: &[&str]) -> (Backend, std::path::PathBuf) {
    let control = dir.join("control.sock");
    let mut args = vec![
        "--size",
        "64M",
        "--control-socket",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daxd = Backend::start_daxd(dir, &dir.join("region.img"), &args);
    (daxd, control)
}

/// The rules' hits as `daxd fault list --json` reports them, by rule number.
fn hits(control: &Path) -> Vec<(u64, u64)> {
    fault_rules(control)
        .into_iter()
        .map(|rule| (rule.id, rule.hits))
        .collect()
}

#[test]
fn fail_drop_and_corrupt_rules_do_what_they_say_and_count_their_hits() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region.img");
    let (daxd, control) = daxd_with_control(
        dir.path(),
        &["--fault", "op=read,sectors=2048..2056,action=fail"],
    );
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let q = client.q();
    q.write(0, &pattern(1, 8192)).unwrap();
    q.write(2048 * SECTOR, &pattern(2, 8192)).unwrap();

    // The rule from the command line: the read touching its sectors fails, others work.
    assert_eq!(q.read(2040 * SECTOR, 8192), Err(EIO), "overlapping read");
    assert_eq!(q.read(0, 8192).unwrap(), pattern(1, 8192));
    assert_eq!(q.read(2064 * SECTOR, 512).unwrap(), vec![0; 512]);
    assert_eq!(hits(&control), [(1, 1)]);
    assert!(fault(&control, &["list"]).contains("op=read,sectors=2048..2056,action=fail"));
    fault(&control, &["clear", "1"]);
    assert_eq!(q.read(2048 * SECTOR, 8192).unwrap(), pattern(2, 8192));

    // A lost write: acknowledged, not stored.
    let out = fault(
        &control,
        &["add", "op=write,sectors=4096..4104,action=drop"],
    );
    assert!(out.starts_with("rule 2: "), "{out}");
    q.write(4096 * SECTOR, &pattern(3, 4096)).unwrap();
    q.flush().unwrap();
    assert_eq!(file_bytes(&region, 4096 * SECTOR, 4096), vec![0; 4096]);
    assert_eq!(q.read(4096 * SECTOR, 4096).unwrap(), vec![0; 4096]);

    // A FLUSH that fails, the second one only, and an unsupported discard.
    fault(&control, &["add", "op=flush,when=nth:2,action=fail"]);
    fault(&control, &["add", "op=discard,action=fail:unsupp"]);
    q.flush().unwrap();
    assert_eq!(q.flush(), Err(EIO));
    q.flush().unwrap();
    assert_eq!(q.discard(0, 4096), Err(ENOTSUP));
    assert_eq!(
        q.read(0, 4096).unwrap(),
        pattern(1, 4096),
        "the discard did nothing"
    );

    // Corruption: byte 3 of sector 100 as a read returns it (the file keeps it), byte 0
    // of sector 200 as a write stores it.
    q.write(100 * SECTOR, &pattern(4, 512)).unwrap();
    q.write(200 * SECTOR, &pattern(5, 512)).unwrap();
    fault(
        &control,
        &["add", "op=read,sectors=100..101,action=corrupt:3:0x0f"],
    );
    fault(
        &control,
        &["add", "op=write,sectors=200..201,action=corrupt"],
    );
    let mut expected = pattern(4, 512);
    expected[3] ^= 0x0f;
    assert_eq!(
        q.read(96 * SECTOR, 4096).unwrap()[4 * 512..5 * 512],
        expected
    );
    assert_eq!(file_bytes(&region, 100 * SECTOR, 512), pattern(4, 512));
    q.write(200 * SECTOR, &pattern(6, 512)).unwrap();
    let mut stored = pattern(6, 512);
    stored[0] ^= 0xff;
    assert_eq!(file_bytes(&region, 200 * SECTOR, 512), stored);

    // Each rule's hits are what the client did to it; inspect shows them too.
    assert_eq!(hits(&control), [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]);
    let inspection = inspection_json(&control);
    assert_eq!(inspection["faults"].as_array().unwrap().len(), 5);
    assert!(daxd_inspect(&control, &["--prometheus"])
        .lines()
        .any(|l| l == "daxd_fault_hits_total{rule=\"3\"} 1"));
    assert!(daxd_inspect(&control, &[]).contains("op=flush,when=nth:2,action=fail"));
    assert_eq!(fault(&control, &["clear", "--all"]), "5 rule(s) cleared\n");
    q.write(4096 * SECTOR, &pattern(3, 4096)).unwrap();
    assert_eq!(q.read(4096 * SECTOR, 4096).unwrap(), pattern(3, 4096));
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn bad_blocks_fail_reads_until_they_are_written_as_dm_dust_does() {
    let dir = tempfile::tempdir().unwrap();
    let (daxd, control) = daxd_with_control(dir.path(), &[]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let q = client.q();
    q.write(296 * SECTOR, &pattern(1, 8192)).unwrap();
    fault(&control, &["add", "sectors=300..308,action=bad-blocks"]);
    assert_eq!(q.read(296 * SECTOR, 4096), Err(EIO));
    assert_eq!(q.read(307 * SECTOR, 512), Err(EIO));
    assert_eq!(
        q.read(296 * SECTOR, 2048).unwrap(),
        pattern(1, 2048),
        "before the bad ones"
    );
    // Writing sectors 300..304 heals them; 304..308 stay bad.
    q.write(300 * SECTOR, &pattern(2, 2048)).unwrap();
    assert_eq!(q.read(300 * SECTOR, 2048).unwrap(), pattern(2, 2048));
    assert_eq!(q.read(300 * SECTOR, 4096), Err(EIO));
    let list = fault(&control, &["list"]);
    assert!(list.contains("(4 sectors still bad)"), "{list}");
    q.write_zeroes(304 * SECTOR, 2048, false).unwrap();
    assert_eq!(q.read(296 * SECTOR, 8192).unwrap()[4096..6144], [0; 2048]);
    assert_eq!(hits(&control), [(1, 3)]);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn a_delayed_request_does_not_hold_up_its_queue_and_a_held_one_waits_for_clear() {
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region.img");
    let (daxd, control) = daxd_with_control(dir.path(), &[]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    fault(&control, &["add", "op=read,sectors=0..8,action=delay:1s"]);
    // Two reads on one queue: the delayed one first. The other completes long before it
    // (the bound leaves room for a loaded machine).
    let (first, took) = client.q().two_reads(0, 8192, 4096);
    assert_eq!(
        first, 1,
        "the read that was not delayed completes first ({took:?})"
    );
    assert!(took[0] >= Duration::from_secs(1), "{took:?}");
    assert!(took[1] < Duration::from_millis(500), "{took:?}");
    fault(&control, &["clear", "--all"]);

    // A held write completes when its rule goes, and was stored meanwhile.
    fault(&control, &["add", "op=write,action=hold"]);
    let Client {
        blkio, mut queues, ..
    } = client;
    let mut q = queues.remove(0);
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        q.write(65536, &pattern(7, 4096)).unwrap();
        (start.elapsed(), q)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!writer.is_finished(), "a held write completed");
    assert_eq!(file_bytes(&region, 65536, 4096), pattern(7, 4096));
    fault(&control, &["clear", "--all"]);
    let (took, q) = writer.join().unwrap();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    drop(q);
    drop(blkio);
    assert!(daxd.terminate().success());
}

#[test]
fn rules_wait_for_their_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (daxd, control) = daxd_with_control(
        dir.path(),
        &["--fault", "op=write,after=trap-door,action=fail"],
    );
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    client.q().write(0, &pattern(1, 512)).unwrap();
    let (ok, out, err) = daxd_command(&[
        "mark",
        "--control-socket",
        control.to_str().unwrap(),
        "trap-door",
    ]);
    assert!(ok && out == "mark trap-door set\n", "{out}{err}");
    assert_eq!(client.q().write(0, &pattern(1, 512)), Err(EIO));
    assert_eq!(hits(&control), [(1, 1)]);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn bad_rules_are_refused_with_a_reason_and_daxd_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // At start: refused before anything is served.
    let socket = dir.path().join("refused.sock");
    let region = dir.path().join("r.img");
    let refused_rule = |rule: &str| {
        refused_start(&[
            "--region",
            region.to_str().unwrap(),
            "--size",
            "4M",
            "--socket-path",
            socket.to_str().unwrap(),
            "--fault",
            rule,
        ])
    };
    let err = refused_rule("op=read,action=drop");
    assert!(err.contains("action drop does not apply to read"), "{err}");
    let err = refused_rule("device=pm0,action=fail");
    assert!(
        err.contains("daxd serves no such device here (devices: disk)"),
        "{err}"
    );

    // At run time: the command says why; the rules and the disk are as they were.
    let (daxd, control) = daxd_with_control(dir.path(), &[]);
    let c = control.to_str().unwrap();
    let refused_add = |rule: &str| {
        let (ok, _, err) = daxd_command(&["fault", "add", "--control-socket", c, rule]);
        assert!(!ok, "daxd fault add {rule} succeeded");
        err
    };
    let err = refused_add("when=nth:0,action=fail");
    assert!(err.contains("nth must be at least 1"), "{err}");
    let err = refused_add("device=pm0,action=fail");
    assert!(err.contains("no such device"), "{err}");
    let (ok, _, err) = daxd_command(&["fault", "clear", "--control-socket", c, "7"]);
    assert!(!ok && err.contains("no rule 7"), "{err}");
    let (ok, _, err) = daxd_command(&["mark", "--control-socket", c, "a/b"]);
    assert!(!ok && err.contains("is not a mark name"), "{err}");
    assert_eq!(fault(&control, &["list"]), "no fault rules\n");
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    client.q().write(0, &pattern(1, 512)).unwrap();
    drop(client);
    assert!(daxd.terminate().success());
}

/// The control socket, which can corrupt the guest's data, is its owner's alone (or what
/// --control-socket-mode says), and nothing sent on the vhost-user socket reaches it.
#[test]
fn only_the_control_socket_sets_rules_and_it_is_owner_only() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (daxd, control) = daxd_with_control(dir.path(), &[]);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // A frontend (or a guest behind it) that sends a control request on the vhost-user
    // socket is disconnected; no rule appears.
    let mut frontend = std::os::unix::net::UnixStream::connect(&daxd.socket).unwrap();
    frontend
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = b"{\"fault_add\":{\"rule\":{\"action\":\"drop\"}}}\n";
    let _ = frontend.write_all(request);
    // Closed by daxd: an end of file, or a reset when the request was still unread.
    let mut answer = Vec::new();
    match frontend.read_to_end(&mut answer) {
        Ok(_) => assert!(answer.is_empty(), "daxd answered {answer:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(fault(&control, &["list"]), "no fault rules\n");
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    client.q().write(0, &pattern(1, 512)).unwrap();
    client.q().flush().unwrap();
    drop(client);
    assert!(daxd.terminate().success());

    let dir = tempfile::tempdir().unwrap();
    let (daxd, control) = daxd_with_control(dir.path(), &["--control-socket-mode", "660"]);
    let mode = std::fs::metadata(&control).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    assert!(daxd.terminate().success());
}

/// A held request is completed when its queue stops (`GET_VRING_BASE`, as QEMU sends
/// before a migration or when the VM stops), not later: the ring's state the frontend
/// reads is final, and nothing is written into guest memory afterwards.
#[test]
fn a_stopping_queue_completes_what_a_rule_holds() {
    use crate::support::frontend::{Connection, GuestMem, USED_RING};
    use vhost::VhostBackend;
    let dir = tempfile::tempdir().unwrap();
    let region = dir.path().join("region.img");
    let (daxd, _control) = daxd_with_control(dir.path(), &["--fault", "op=write,action=hold"]);
    let mem = GuestMem::new();
    let c = Connection::start(&daxd.socket, &mem, &mut None, 0);
    mem.put_write(0, 16, &pattern(4, 4096));
    mem.make_available(&[0]);
    c.kick();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mem.used_idx(), 0, "a held write was completed");
    assert_eq!(file_bytes(&region, 16 * SECTOR, 4096), pattern(4, 4096));
    let base = c.frontend.get_vring_base(0).unwrap() as u16;
    assert_eq!(base, 1);
    assert_eq!(
        mem.used_idx(),
        1,
        "GET_VRING_BASE was answered before the held write was completed"
    );
    assert_eq!(mem.status(0), 0);
    let ring = mem.bytes(USED_RING, 256);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        mem.bytes(USED_RING, 256),
        ring,
        "the used ring changed after the stop"
    );
    drop(c);
    assert!(daxd.terminate().success());
}
