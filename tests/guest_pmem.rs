//! Persistent memory next to daxd's disk on the same region, in one guest, both ways the
//! guest can get it: mapped by QEMU 10.0 from the region file (virtio-pmem-pci, nvdimm),
//! and served by daxd itself as vhost-user virtio-pmem mapped into shared memory (QEMU
//! 11.1 from a Debian sid root). Each: DAX file system, markers both ways through the
//! mapping, `daxd inspect` while mounted, a discard of the mapped window refused, the
//! guest's sync reaching daxd's flush (where daxd serves pmem), descriptors gone after
//! poweroff. The QEMU options come from `daxd print-qemu-args`. Run by ci/test.sh with
//! `--ignored`.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use daxd_registry::{Snapshot, Target};

use crate::support::guest::{
    boot, host_tool, nvdimm_alternative, print_qemu_args, printed_line, results, sid_qemu, Vm,
};
use crate::support::{file_bytes, inspect, pattern, Backend};

const MIB: u64 = 1 << 20;
const WINDOW_OFFSET: u64 = 256 * MIB;
const WINDOW_SIZE: u64 = 128 * MIB;
/// Where in the pmem device the host writes its marker.
const HOST_MARKER_AT: u64 = 32 * MIB;
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

static ONE_GUEST_AT_A_TIME: Mutex<()> = Mutex::new(());

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// QEMU 10.0 maps the window from the file as a virtio-pmem-pci device.
    VirtioPmem,
    /// QEMU 10.0 maps the window from the file as an NVDIMM.
    Nvdimm,
    /// QEMU 11.1: daxd serves virtio-pmem and maps the window into shared memory.
    SharedMemory,
}

fn daxd_args(region: &Path, control: &Path, pmem_socket: Option<&Path>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--region",
        region.to_str().unwrap(),
        "--size",
        "512M",
        "--num-queues",
        "2",
        "--window",
        "name=disk,size=512M,serve=blk",
        "--window",
        "name=pm0,offset=256M,size=128M,serve=pmem",
        "--allow-overlap",
    ]
    .map(String::from)
    .to_vec();
    if let Some(socket) = pmem_socket {
        args.extend(["--pmem-socket-path".into(), socket.to_str().unwrap().into()]);
    }
    args.extend(["--control-socket".into(), control.to_str().unwrap().into()]);
    args
}

fn suite(kind: Kind) {
    let _one = ONE_GUEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = crate::support::test_dir("daxd-pmem-");
    let d = dir.path();
    let region = d.join("region.img");
    let control = d.join("control.sock");
    let pmem_socket = d.join("pmem.sock");
    let args = daxd_args(
        &region,
        &control,
        (kind == Kind::SharedMemory).then_some(pmem_socket.as_path()),
    );
    // start_daxd adds --region and --socket-path itself.
    let serve_args: Vec<&str> = args[2..].iter().map(String::as_str).collect();
    let backend = Backend::start_daxd(d, &region, &serve_args);

    // The QEMU options for the window, as daxd prints them.
    let mut print_args = args[..args.len() - 2].to_vec();
    print_args.extend([
        "--socket-path".to_owned(),
        backend.socket.display().to_string(),
    ]);
    let printed = print_qemu_args(&print_args);
    let line = |prefix: &str| printed_line(&printed, prefix);
    let memory_line = line("-m ");
    let memory = memory_line.split_whitespace().nth(1).unwrap().to_owned();
    let pmem_line = match kind {
        Kind::SharedMemory => line("-chardev socket,id=daxd-pmem-"),
        _ => line("-object memory-backend-file"),
    };
    let mut extra: Vec<String> = pmem_line.split_whitespace().map(String::from).collect();
    let machine = match kind {
        Kind::VirtioPmem | Kind::SharedMemory => "q35".to_owned(),
        Kind::Nvdimm => {
            let nvdimm = nvdimm_alternative(&printed);
            let at = extra
                .iter()
                .position(|a| a.starts_with("virtio-pmem-pci"))
                .unwrap();
            extra[at] = nvdimm;
            "q35,nvdimm=on".to_owned()
        }
    };
    let vm = Vm {
        machine,
        memory,
        extra,
        qemu: match kind {
            Kind::SharedMemory => sid_qemu(d),
            _ => vec!["qemu-system-x86_64".into()],
        },
        ..Vm::blk(&backend.socket, 2)
    };

    let payload = d.join("payload.bin");
    std::fs::write(&payload, pattern(11, 65536)).unwrap();
    let file_a = d.join("file-a");
    std::fs::write(&file_a, pattern(12, 200 << 10)).unwrap();
    let file_b = d.join("file-b");
    std::fs::write(&file_b, pattern(13, (3 << 20) + 7)).unwrap();
    let nonce = std::process::id();
    let guest_marker = format!("daxd-guest-marker-{nonce:08x}-through-the-mapping");
    let host_marker = format!("daxd-host-marker-{nonce:08x}-into-the-window");
    let kind_arg = match kind {
        Kind::VirtioPmem | Kind::SharedMemory => "virtio",
        Kind::Nvdimm => "nvdimm",
    };
    let script = format!(
        "run_case pmem_device case_pmem_device {kind_arg}\n\
         run_case blk_alongside case_direct_io {payload} 0 4194304\n\
         run_case host_marker case_host_marker {HOST_MARKER_AT} {host_marker}\n\
         run_case pmem_fs case_pmem_fs {WINDOW_OFFSET} {guest_marker} {a} {b}\n",
        payload = payload.display(),
        a = file_a.display(),
        b = file_b.display(),
    );

    let findings = RefCell::new(Vec::<String>::new());
    let mapped_while_mounted = RefCell::new(None::<Snapshot>);
    let after_sync = RefCell::new(None::<Snapshot>);
    let mut host = |step: &str, console: &str| {
        let data_offset: u64 = results(console)
            .get("data_offset")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match step {
            "host-marker" => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&region)
                    .unwrap();
                file.write_at(
                    host_marker.as_bytes(),
                    WINDOW_OFFSET + data_offset + HOST_MARKER_AT,
                )
                .unwrap();
            }
            "mounted" => {
                let window = file_bytes(&region, WINDOW_OFFSET, WINDOW_SIZE as usize);
                if !window
                    .windows(guest_marker.len())
                    .any(|w| w == guest_marker.as_bytes())
                {
                    findings
                        .borrow_mut()
                        .push("the guest's marker (written without sync) is not in the window of the region file".into());
                }
                *mapped_while_mounted.borrow_mut() = Some(inspect(&control));
            }
            "synced" => *after_sync.borrow_mut() = Some(inspect(&control)),
            other => findings
                .borrow_mut()
                .push(format!("unexpected step {other}")),
        }
    };
    let booted = boot(d, "pmem", &vm, &script, BOOT_TIMEOUT, &mut host);
    let findings = findings.into_inner();
    booted.assert_passed(
        &["pmem_device", "blk_alongside", "host_marker", "pmem_fs"],
        &findings.join("; "),
    );
    assert!(findings.is_empty(), "host checks: {findings:?}");

    // While mounted, every page of the window had one descriptor. With QEMU 10.0 one
    // mapping covers it (the memory-backend-file in the disk's memory table). With shared
    // memory there are two aliases of the same pages: daxd's own SHMEM_MAP, and the BAR
    // that QEMU 11.1 also puts in the disk's memory table; they share the descriptors.
    let inspected = mapped_while_mounted
        .into_inner()
        .expect("inspected while mounted");
    let registry = &inspected;
    let window_frames = WINDOW_SIZE / 4096;
    let first_frame = WINDOW_OFFSET / 4096;
    assert_eq!(registry.descriptors, window_frames, "{registry:?}");
    // Descriptors come in chunks of 2 MiB of region; the window is 2 MiB aligned, so
    // that is 16 bytes per page.
    assert_eq!(registry.descriptor_bytes, window_frames * 16);
    let aliases = if kind == Kind::SharedMemory { 2 } else { 1 };
    assert_eq!(registry.mappings.len(), aliases, "{registry:?}");
    for m in &registry.mappings {
        assert_eq!(m.frames.start, first_frame, "{m:?}");
        assert_eq!(m.frames.end, first_frame + window_frames, "{m:?}");
    }
    if kind == Kind::SharedMemory {
        assert!(
            registry
                .mappings
                .iter()
                .any(|m| matches!(m.target, Target::SharedMemory { shmid: 0, .. })),
            "no shared-memory mapping: {registry:?}"
        );
    }
    let mapped: u64 = registry.sections.iter().map(|s| s.mapped).sum();
    assert_eq!(mapped, window_frames);
    assert!(
        registry
            .sections
            .iter()
            .all(|s| usize::from(s.max_map_count) == aliases),
        "{registry:?}"
    );
    // Where daxd serves virtio-pmem, the guest's sync of the DAX file system is a FLUSH
    // request that completed a flush epoch in daxd.
    if kind == Kind::SharedMemory {
        let synced = after_sync.into_inner().expect("inspected after sync");
        let before = registry.last_flushed;
        let after = synced.last_flushed;
        assert!(
            after > before,
            "no flush reached daxd: last_flushed {before} -> {after}"
        );
    }

    // After poweroff (QEMU exits, the connection ends) no descriptor is left.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = inspect(&control);
        if after.descriptors == 0 {
            assert!(after.mappings.is_empty(), "{after:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors left after poweroff: {after:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The host finds the guest's file system where the window's data area starts.
    let data_offset: u64 = booted.result("data_offset").unwrap().parse().unwrap();
    let fs_image = d.join("window-fs.img");
    std::fs::write(
        &fs_image,
        file_bytes(
            &region,
            WINDOW_OFFSET + data_offset,
            (WINDOW_SIZE - data_offset) as usize,
        ),
    )
    .unwrap();
    let image = fs_image.to_str().unwrap();
    let (fsck_ok, fsck_out, _) = host_tool("e2fsck", &["-fn", image]);
    assert!(
        fsck_ok,
        "host e2fsck of the window: {}",
        String::from_utf8_lossy(&fsck_out)
    );
    for (name, path) in [("file-a", &file_a), ("file-b", &file_b)] {
        let (ok, content, _) = host_tool("debugfs", &["-R", &format!("cat /{name}"), image]);
        assert!(
            ok && content == std::fs::read(path).unwrap(),
            "/{name} differs on the host"
        );
    }
    // The disk's writes landed outside the window, at their offsets.
    for offset in [0, 4 * MIB] {
        assert_eq!(file_bytes(&region, offset, 65536), pattern(11, 65536));
    }
    let status = backend.terminate();
    assert!(status.success(), "daxd exit status {status}");
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn virtio_pmem_mapped_by_qemu_from_the_region() {
    suite(Kind::VirtioPmem);
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn nvdimm_mapped_by_qemu_from_the_region() {
    suite(Kind::Nvdimm);
}

#[test]
#[ignore = "needs QEMU 11.1 (ci/build-sid-root.sh) and the test guest; run by ci/test.sh"]
fn virtio_pmem_served_by_daxd_in_shared_memory() {
    suite(Kind::SharedMemory);
}
