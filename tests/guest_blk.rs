//! Real guests: Linux 6.12 under QEMU 10.0 (TCG) against daxd's blk device, and the same
//! cases against qemu-storage-daemon's vhost-user-blk export to prove the cases check the
//! right thing. Needs QEMU and the test guest: ci/test.sh installs and builds both, then
//! runs these with `--ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use crate::support::guest::{boot, host_tool, Vm};
use crate::support::{file_bytes, next_data, pattern, Backend, FsKind, SmallFs};

const MIB: u64 = 1 << 20;
const REGION_SIZE: u64 = 256 * MIB;
const QUEUES: u16 = 2;
const SERIAL: &str = "daxd-guest-suite";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Offsets of the O_DIRECT payload: clear of fio's 0..64 MiB and of the discard range,
/// including the disk's last 64 KiB.
const DIRECT_OFFSETS: [u64; 3] = [64 * MIB, 100 * MIB + 8192, REGION_SIZE - 65536];
const DISCARD_OFFSET: u64 = 150 * MIB;
const DISCARD_LEN: u64 = MIB;
/// Boot 4's sparse region, four times the size of its host file system, and a hole in it.
const FULL_REGION_SIZE: u64 = 16 * MIB;
const FULL_HOLE: u64 = 8 * MIB;

/// Two TCG guests at once would only slow each other down on a 2-core machine.
static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    Daxd,
    QemuStorageDaemon,
}

impl Peer {
    fn start(self, dir: &Path, region: &Path, read_only: bool) -> Backend {
        match self {
            Peer::Daxd => {
                let mut args = vec!["--num-queues", "2", "--serial", SERIAL];
                if read_only {
                    args.push("--read-only");
                }
                Backend::start_daxd(dir, region, &args)
            }
            Peer::QemuStorageDaemon => {
                let socket = dir.join("qsd.sock");
                let mut command = Command::new("qemu-storage-daemon");
                command
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=file,node-name=f,filename={},discard=unmap{}",
                        region.display(),
                        if read_only { ",read-only=on" } else { "" }
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable={},num-queues={QUEUES}",
                        socket.display(),
                        if read_only { "off" } else { "on" }
                    ));
                Backend::spawn(command, socket, true)
            }
        }
    }

    /// What GET_ID returns: daxd's is configured; qemu-storage-daemon's export has a fixed
    /// one.
    fn serial(self) -> &'static str {
        match self {
            Peer::Daxd => SERIAL,
            Peer::QemuStorageDaemon => "vhost_user_blk",
        }
    }

    /// The cache mode the guest sees: daxd (without --sync) offers FLUSH, so a write-back
    /// cache; qemu-storage-daemon's export, with its defaults, a write-through one.
    fn write_cache(self) -> &'static str {
        match self {
            Peer::Daxd => "write_back",
            Peer::QemuStorageDaemon => "write_through",
        }
    }
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn suite(peer: Peer) {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = crate::support::test_dir("daxd-guest-");
    let d = dir.path();
    let region = d.join("region.img");
    std::fs::File::create(&region)
        .unwrap()
        .set_len(REGION_SIZE)
        .unwrap();
    let payload = write_file(d, "payload.bin", &pattern(1, 65536));
    let discard_payload = write_file(d, "discard.bin", &pattern(2, DISCARD_LEN as usize));
    let file_a = write_file(d, "file-a", &pattern(3, 300 << 10));
    let file_b = write_file(d, "file-b", &pattern(4, (1 << 20) + 123));
    let sectors = REGION_SIZE / 512;
    let offsets = DIRECT_OFFSETS.map(|o| o.to_string()).join(" ");

    // Boot 1: what the guest sees, fio on every queue, O_DIRECT data, discard.
    let backend = peer.start(d, &region, false);
    let first = boot(
        d,
        "boot1",
        &Vm::blk(&backend.socket, QUEUES),
        &format!(
            "run_case identity case_identity {sectors} {QUEUES} {serial} 0\n\
             run_case fio case_fio 32 {QUEUES}\n\
             run_case direct_io case_direct_io {payload} {offsets}\n\
             run_case discard case_discard {discard} {DISCARD_OFFSET} {DISCARD_LEN}\n",
            serial = peer.serial(),
            payload = payload.display(),
            discard = discard_payload.display(),
        ),
        BOOT_TIMEOUT,
        &mut |_, _| {},
    );
    let mut findings = String::new();
    for offset in DIRECT_OFFSETS {
        if file_bytes(&region, offset, 65536) != pattern(1, 65536) {
            findings += &format!("payload missing at region offset {offset}; ");
        }
    }
    let discarded = file_bytes(&region, DISCARD_OFFSET, DISCARD_LEN as usize);
    if discarded.iter().any(|&b| b != 0) {
        findings += "discarded range is not zero in the region file; ";
    }
    let hole_end = next_data(&region, DISCARD_OFFSET);
    if hole_end < DISCARD_OFFSET + DISCARD_LEN {
        findings += &format!("discarded range is not deallocated (data at {hole_end}); ");
    }
    first.assert_passed(&["identity", "fio", "direct_io", "discard"], &findings);
    assert!(findings.is_empty(), "host checks after boot 1: {findings}");
    assert_eq!(first.result("write_cache"), Some(peer.write_cache()));

    // Boot 2: QEMU connects again to the same backend process.
    let second = boot(
        d,
        "boot2",
        &Vm::blk(&backend.socket, QUEUES),
        &format!(
            "run_case persisted case_persisted {payload} {offsets}\n\
             run_case ext4 case_ext4 {a} {b}\n",
            payload = payload.display(),
            a = file_a.display(),
            b = file_b.display(),
        ),
        BOOT_TIMEOUT,
        &mut |_, _| {},
    );
    let region_arg = region.to_str().unwrap();
    let (fsck_ok, fsck_out, fsck_err) = host_tool("e2fsck", &["-fn", region_arg]);
    let mut findings = String::new();
    if !fsck_ok {
        findings += &format!(
            "host e2fsck -fn failed: {}{fsck_err}; ",
            String::from_utf8_lossy(&fsck_out)
        );
    }
    for (name, path) in [("file-a", &file_a), ("file-b", &file_b)] {
        let (ok, content, err) = host_tool("debugfs", &["-R", &format!("cat /{name}"), region_arg]);
        if !ok || content != std::fs::read(path).unwrap() {
            findings += &format!(
                "debugfs reads a different /{name} ({} bytes; {err}); ",
                content.len()
            );
        }
    }
    second.assert_passed(&["persisted", "ext4"], &findings);
    assert!(findings.is_empty(), "host checks after boot 2: {findings}");
    let status = backend.terminate();
    if peer == Peer::Daxd {
        assert!(status.success(), "daxd exit status {status}");
    }

    // Boot 3: a read-only backend on the same file.
    let before = std::fs::read(&region).unwrap();
    let backend = peer.start(d, &region, true);
    let third = boot(
        d,
        "boot3",
        &Vm::blk(&backend.socket, QUEUES),
        &format!(
            "run_case identity_ro case_identity {sectors} {QUEUES} {serial} 1\n\
             run_case read_only case_read_only {offset} 65536\n",
            serial = peer.serial(),
            offset = DIRECT_OFFSETS[0],
        ),
        BOOT_TIMEOUT,
        &mut |_, _| {},
    );
    let status = backend.terminate();
    assert!(
        status.success(),
        "the backend's read-only run ended with {status}"
    );
    let unchanged = std::fs::read(&region).unwrap() == before;
    third.assert_passed(
        &["identity_ro", "read_only"],
        if unchanged {
            "region file unchanged"
        } else {
            "region file CHANGED"
        },
    );
    assert!(unchanged, "the read-only boot changed the region file");

    // Boot 4: a sparse region on a host file system that fills up while the guest writes.
    let small = SmallFs::mount(d, FsKind::Ext4, 4 * MIB);
    let sparse = small.path.join("sparse.img");
    std::fs::File::create(&sparse)
        .unwrap()
        .set_len(FULL_REGION_SIZE)
        .unwrap();
    let backend = peer.start(d, &sparse, false);
    let mut filler = None;
    let fourth = boot(
        d,
        "boot4",
        &Vm::blk(&backend.socket, QUEUES),
        &format!(
            "run_case full_host case_full_host {payload} {FULL_HOLE}\n",
            payload = payload.display(),
        ),
        BOOT_TIMEOUT,
        &mut |step, _| match step {
            "filled" => filler = Some(small.fill()),
            "freed" => {
                if let Some(filler) = filler.take() {
                    std::fs::remove_file(filler).unwrap();
                }
            }
            _ => {}
        },
    );
    let status = backend.terminate();
    let findings = if file_bytes(&sparse, FULL_HOLE, 65536) == pattern(1, 65536) {
        String::new()
    } else {
        "the write after space came back is not in the region file".to_owned()
    };
    fourth.assert_passed(&["full_host"], &findings);
    assert!(findings.is_empty(), "host checks after boot 4: {findings}");
    assert!(
        status.success(),
        "the backend did not stay up through a full host file system: {status}"
    );
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn guest_suite_against_daxd() {
    suite(Peer::Daxd);
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn guest_suite_against_qemu_storage_daemon() {
    suite(Peer::QemuStorageDaemon);
}
