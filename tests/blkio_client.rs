//! daxd's blk device driven by a real vhost-user client: libblkio's pure-Rust
//! `virtio-blk-vhost-user` driver, against the real daxd binary.

use std::os::unix::fs::MetadataExt;
use std::process::Command;
use std::sync::{Arc, Barrier};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::support::{
    file_bytes, next_data, pattern, refused_start, Backend, Client, FsKind, SmallFs, QUEUE_BUF,
};

const MIB: u64 = 1 << 20;
const EIO: i32 = -5;

fn new_region(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("region.img")
}

#[test]
fn capacity_is_the_region_size() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "48M"]);
    let client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert_eq!(client.capacity, 48 * MIB);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn random_reads_and_writes_match_a_model_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let size = 32 * MIB;
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "32M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = SmallRng::seed_from_u64(0xda7d);
    let q = client.q();
    for op in 0..600u64 {
        let sectors = rng.random_range(1..=512u64); // 512 B ..= 256 KiB
        let len = (sectors * 512) as usize;
        let offset = rng.random_range(0..=(size / 512 - sectors)) * 512;
        if rng.random_bool(0.5) {
            let data = pattern(op, len);
            q.write(offset, &data).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        } else {
            let got = q.read(offset, len).unwrap();
            assert!(
                got == model[offset as usize..offset as usize + len],
                "op {op}: read of {len} bytes at {offset} differs from what was written"
            );
        }
    }
    q.flush().unwrap();
    // The host sees the same bytes at the same offsets of the region file.
    let file = std::fs::read(&region).unwrap();
    assert_eq!(file.len(), model.len());
    if let Some(at) = file.iter().zip(&model).position(|(a, b)| a != b) {
        panic!("region file differs from the model at byte {at}");
    }
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn writes_land_at_their_offsets_in_the_file_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "8M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let q = client.q();
    let cases = [
        (0u64, 512usize),
        (4096, 4096),
        (MIB + 512, 3 * 512),
        (8 * MIB - 65536, 65536),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        q.write(offset, &pattern(100 + i as u64, len)).unwrap();
    }
    q.flush().unwrap();
    for (i, &(offset, len)) in cases.iter().enumerate() {
        assert_eq!(
            file_bytes(&region, offset, len),
            pattern(100 + i as u64, len),
            "file bytes at {offset}"
        );
    }
    // Neighbours of a write are untouched.
    assert_eq!(file_bytes(&region, 512, 512), vec![0; 512]);
    assert_eq!(file_bytes(&region, MIB, 512), vec![0; 512]);
    assert_eq!(file_bytes(&region, MIB + 2048, 512), vec![0; 512]);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn write_zeroes_and_discard_zero_and_deallocate_their_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "16M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let q = client.q();
    for mib in 0..8u64 {
        q.write(mib * MIB, &pattern(mib, MIB as usize)).unwrap();
    }
    q.flush().unwrap();
    let blocks_before = std::fs::metadata(&region).unwrap().blocks();

    q.discard(MIB, 2 * MIB).unwrap();
    q.write_zeroes(4 * MIB, MIB, true).unwrap();
    q.write_zeroes(6 * MIB + 4096, 8192, false).unwrap();
    q.flush().unwrap();

    for (offset, len) in [(MIB, 2 * MIB), (4 * MIB, MIB), (6 * MIB + 4096, 8192)] {
        assert!(q
            .read(offset, MIB.min(len) as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0));
        assert!(
            file_bytes(&region, offset, len as usize)
                .iter()
                .all(|&b| b == 0),
            "file range {offset}+{len} not zero"
        );
    }
    // Data around the zeroed ranges survives.
    assert_eq!(q.read(0, MIB as usize).unwrap(), pattern(0, MIB as usize));
    assert_eq!(
        q.read(3 * MIB, MIB as usize).unwrap(),
        pattern(3, MIB as usize)
    );
    assert_eq!(
        q.read(6 * MIB, 4096).unwrap(),
        pattern(6, MIB as usize)[..4096].to_vec()
    );
    assert_eq!(
        q.read(6 * MIB + 12288, 4096).unwrap(),
        pattern(6, MIB as usize)[12288..16384].to_vec()
    );
    // Discard and write-zeroes with unmap deallocated their ranges: they are holes in
    // the file now, and the file uses less space.
    assert_eq!(
        next_data(&region, MIB),
        3 * MIB,
        "discarded range is not a hole"
    );
    assert_eq!(
        next_data(&region, 4 * MIB),
        5 * MIB,
        "unmapped zeroes are not a hole"
    );
    assert!(std::fs::metadata(&region).unwrap().blocks() < blocks_before);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn requests_past_the_end_fail() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "4M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let end = client.capacity;
    let q = client.q();
    assert_eq!(q.read(end, 512), Err(EIO));
    assert_eq!(q.read(end - 512, 1024), Err(EIO));
    assert_eq!(q.write(end, &[1; 512]), Err(EIO));
    assert_eq!(q.write(end - 4096, &[1; 8192]), Err(EIO));
    assert_eq!(q.discard(end - 4096, 8192), Err(EIO));
    assert_eq!(q.write_zeroes(end, 4096, false), Err(EIO));
    // The last sector is inside.
    q.write(end - 512, &[7; 512]).unwrap();
    assert_eq!(q.read(end - 512, 512).unwrap(), vec![7; 512]);
    q.flush().unwrap();
    assert_eq!(file_bytes(&region, end - 4096, 3584), vec![0; 3584]);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn read_only_device_is_reported_and_never_changes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    std::fs::write(&region, pattern(9, 4 * MIB as usize)).unwrap();
    let daxd = Backend::start_daxd(dir.path(), &region, &["--read-only"]);
    // A client that wants to write is told the device is read-only (VIRTIO_BLK_F_RO).
    let err = Client::connect(&daxd.socket, 1, false)
        .err()
        .expect("RO not reported");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut client = Client::connect(&daxd.socket, 1, true).unwrap();
    let q = client.q();
    assert_eq!(
        q.read(MIB, 4096).unwrap(),
        pattern(9, 4 * MIB as usize)[MIB as usize..][..4096]
    );
    assert!(q.write(0, &[0; 512]).is_err());
    q.flush().unwrap();
    drop(client);
    assert!(daxd.terminate().success());
    assert_eq!(
        std::fs::read(&region).unwrap(),
        pattern(9, 4 * MIB as usize)
    );
}

#[test]
fn queues_serve_concurrent_threads() {
    const QUEUES: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "24M", "--num-queues", "3"]);
    let client = Client::connect(&daxd.socket, QUEUES, false).unwrap();
    let Client { blkio, queues, .. } = client;
    let start = Arc::new(Barrier::new(QUEUES));
    let workers: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let start = start.clone();
            std::thread::spawn(move || {
                // Each thread owns an 8 MiB slice of the disk and rewrites it in rounds.
                let base = i as u64 * 8 * MIB;
                start.wait();
                for round in 0..4u64 {
                    for chunk in 0..8u64 {
                        let seed = (i as u64) << 32 | round << 8 | chunk;
                        q.write(base + chunk * MIB, &pattern(seed, QUEUE_BUF))
                            .unwrap();
                    }
                    for chunk in 0..8u64 {
                        let seed = (i as u64) << 32 | round << 8 | chunk;
                        assert_eq!(
                            q.read(base + chunk * MIB, QUEUE_BUF).unwrap(),
                            pattern(seed, QUEUE_BUF),
                            "queue {i} round {round} chunk {chunk}"
                        );
                    }
                }
                q.flush().unwrap();
                q
            })
        })
        .collect();
    let queues: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for i in 0..QUEUES as u64 {
        for chunk in 0..8u64 {
            let seed = i << 32 | 3 << 8 | chunk;
            assert_eq!(
                file_bytes(&region, i * 8 * MIB + chunk * MIB, QUEUE_BUF),
                pattern(seed, QUEUE_BUF)
            );
        }
    }
    drop(queues);
    drop(blkio);
    assert!(daxd.terminate().success());
}

#[test]
fn a_reconnecting_client_finds_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "8M", "--num-queues", "2"]);
    let mut first = Client::connect(&daxd.socket, 2, false).unwrap();
    first.q().write(3 * MIB, &pattern(77, 65536)).unwrap();
    drop(first); // disconnect without a flush
    for attempt in 0..3 {
        let mut next = Client::connect(&daxd.socket, 1, false)
            .unwrap_or_else(|e| panic!("connection {attempt} after a disconnect: {}", e.message()));
        assert_eq!(next.q().read(3 * MIB, 65536).unwrap(), pattern(77, 65536));
        next.q().write(0, &pattern(attempt, 4096)).unwrap();
    }
    assert!(daxd.terminate().success());
    assert_eq!(file_bytes(&region, 0, 4096), pattern(2, 4096));
}

#[test]
fn sigterm_flushes_removes_the_socket_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "4M"]);
    let socket = daxd.socket.clone();
    let mut client = Client::connect(&socket, 1, false).unwrap();
    client.q().write(4096, &pattern(5, 8192)).unwrap();
    // Terminated while a client is still connected.
    let status = daxd.terminate();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket left behind");
    assert_eq!(file_bytes(&region, 4096, 8192), pattern(5, 8192));
}

#[test]
fn serves_an_inherited_listening_socket() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let socket = dir.path().join("inherited.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let mut command = Command::new(env!("CARGO_BIN_EXE_daxd"));
    command.args([
        "--region",
        region.to_str().unwrap(),
        "--size",
        "4M",
        "--fd",
        "3",
    ]);
    crate::support::pass_as_fd_3(&mut command, fd);
    let daxd = Backend::spawn(command, socket.clone(), false);
    drop(listener); // daxd holds the only copy now
    let mut client = Client::connect(&socket, 1, false).unwrap();
    client.q().write(0, &pattern(1, 4096)).unwrap();
    assert_eq!(client.q().read(0, 4096).unwrap(), pattern(1, 4096));
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn bad_start_up_configurations_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    std::fs::write(&region, vec![0u8; 8192]).unwrap();
    let sock = dir.path().join("s.sock");
    let sock = sock.to_str().unwrap();
    let r = region.to_str().unwrap();

    let err = refused_start(&["--region", r, "--size", "1M", "--socket-path", sock]);
    assert!(err.contains("--resize"), "{err}");
    assert_eq!(
        std::fs::metadata(&region).unwrap().len(),
        8192,
        "file was resized"
    );

    let missing = dir.path().join("missing.img");
    let err = refused_start(&["--region", missing.to_str().unwrap(), "--socket-path", sock]);
    assert!(err.contains("--size"), "{err}");

    let err = refused_start(&[
        "--region",
        r,
        "--socket-path",
        sock,
        "--serial",
        "this-serial-is-too-long",
    ]);
    assert!(err.contains("20 bytes"), "{err}");

    let err = refused_start(&["--region", r, "--fd", "0"]);
    assert!(err.contains("not a listening UNIX socket"), "{err}");

    let err = refused_start(&["--region", r, "--socket-path", sock, "--direct"]);
    assert!(
        err.contains("DAX") && err.contains("drop --direct"),
        "{err}"
    );

    // Overlapping windows name the option that allows them, and a layout that cannot be
    // served leaves the file as it was.
    let err = refused_start(&[
        "--region",
        r,
        "--size",
        "8M",
        "--resize",
        "--socket-path",
        sock,
        "--window",
        "name=d,size=8M,serve=blk",
        "--window",
        "name=p,offset=2M,size=2M,serve=pmem",
    ]);
    assert!(err.contains("--allow-overlap"), "{err}");
    assert_eq!(
        std::fs::metadata(&region).unwrap().len(),
        8192,
        "file was resized"
    );

    let (status, out) = {
        let out = Command::new(env!("CARGO_BIN_EXE_daxd"))
            .arg("--print-capabilities")
            .output()
            .unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(status.success());
    assert!(out.contains(r#""type":"block""#), "{out}");
}

#[test]
fn sync_mode_is_write_through_and_default_is_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    // Default: a write-back cache, the client must send FLUSH for durability.
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "4M"]);
    let client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert!(client.blkio.get_bool("flush-needed").unwrap());
    drop(client);
    assert!(daxd.terminate().success());
    // --sync: write-through, no FLUSH offered; writes still land at their offsets.
    let daxd = Backend::start_daxd(dir.path(), &region, &["--sync"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert!(!client.blkio.get_bool("flush-needed").unwrap());
    client.q().write(8192, &pattern(3, 4096)).unwrap();
    client.q().write_zeroes(MIB, 65536, true).unwrap();
    assert_eq!(file_bytes(&region, 8192, 4096), pattern(3, 4096));
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn a_region_has_one_writer_or_many_readers() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let sub = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        path
    };
    let refused = |extra: &[&str]| {
        let socket = dir.path().join("refused.sock");
        let mut args = vec![
            "--region",
            region.to_str().unwrap(),
            "--socket-path",
            socket.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = refused_start(&args);
        assert!(!socket.exists(), "a refused daxd left a socket");
        err
    };

    let writer = Backend::start_daxd(&sub("w1"), &region, &["--size", "4M"]);
    let mut client = Client::connect(&writer.socket, 1, false).unwrap();
    client.q().write(0, &pattern(9, 4096)).unwrap();
    let err = refused(&[]);
    assert!(
        err.contains("in use")
            && err.contains("an exclusive (writable) lock")
            && err.contains("--no-lock"),
        "{err}"
    );
    let err = refused(&["--read-only"]);
    assert!(err.contains("an exclusive (writable) lock"), "{err}");
    // The refused starts changed nothing and the writer still serves.
    assert_eq!(client.q().read(0, 4096).unwrap(), pattern(9, 4096));

    // Someone who knows better may turn locking off.
    let unlocked = Backend::start_daxd(&sub("nolock"), &region, &["--no-lock"]);
    drop(unlocked);

    // A writer that dies leaves no stale lock behind (SIGKILL, no clean exit).
    drop(client);
    drop(writer);
    let reader1 = Backend::start_daxd(&sub("r1"), &region, &["--read-only"]);
    let reader2 = Backend::start_daxd(&sub("r2"), &region, &["--read-only"]);
    let err = refused(&[]);
    assert!(err.contains("a shared (read-only) lock"), "{err}");
    let mut client = Client::connect(&reader2.socket, 1, true).unwrap();
    assert_eq!(client.q().read(0, 4096).unwrap(), pattern(9, 4096));
    drop(client);
    assert!(reader1.terminate().success());
    assert!(reader2.terminate().success());
    let writer = Backend::start_daxd(&sub("w2"), &region, &[]);
    assert!(writer.terminate().success());
}

/// The guest writes into holes of a sparse region whose host file system is full: each
/// such write fails with an I/O error, and daxd goes on serving everything else.
fn full_host_file_system(kind: FsKind) {
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(dir.path(), kind, 4 << 20);
    // A sparse region larger than its file system.
    let region = fs.path.join("region.img");
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "16M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    client.q().write(0, &pattern(1, 65536)).unwrap();
    client.q().flush().unwrap();

    let filler = fs.fill();
    // Into a hole: there is no block to store it in.
    assert!(
        client.q().write(8 << 20, &pattern(2, 4096)).is_err(),
        "write into a hole of a full file system"
    );
    assert!(
        client.q().write_zeroes(12 << 20, 65536, false).is_err(),
        "write-zeroes without unmap into a hole of a full file system"
    );
    // Still serving, earlier data intact, the failed write left nothing.
    assert_eq!(client.q().read(0, 65536).unwrap(), pattern(1, 65536));
    assert_eq!(client.q().read(10 << 20, 4096).unwrap(), vec![0; 4096]);
    client.q().write(4096, &pattern(3, 4096)).unwrap();
    assert_eq!(client.q().read(4096, 4096).unwrap(), pattern(3, 4096));

    // A pmem window must have all its blocks before a guest maps it (a DAX store into a
    // hole would fault in the VMM): on a full file system daxd refuses to serve it.
    let err = refused_start(&[
        "--region",
        fs.path.join("pmem.img").to_str().unwrap(),
        "--size",
        "16M",
        "--socket-path",
        dir.path().join("pmem-blk.sock").to_str().unwrap(),
        "--window",
        "name=disk,size=8M,serve=blk",
        "--window",
        "name=pm0,offset=8M,size=8M,serve=pmem",
    ]);
    assert!(
        err.contains("cannot give pmem window pm0 all its blocks") && err.contains("no space"),
        "{err}"
    );

    // Space back: the same write works.
    std::fs::remove_file(filler).unwrap();
    client.q().write(8 << 20, &pattern(2, 4096)).unwrap();
    client.q().flush().unwrap();
    assert_eq!(client.q().read(8 << 20, 4096).unwrap(), pattern(2, 4096));
    drop(client);
    assert!(
        daxd.terminate().success(),
        "daxd did not stay up through the full file system"
    );
    assert_eq!(file_bytes(&region, 8 << 20, 4096), pattern(2, 4096));
    assert_eq!(file_bytes(&region, 4096, 4096), pattern(3, 4096));
}

#[test]
#[ignore = "mounts a small tmpfs, which needs root; run by ci/test.sh"]
fn a_full_tmpfs_is_an_io_error_not_a_crash() {
    full_host_file_system(FsKind::Tmpfs);
}

#[test]
#[ignore = "loop-mounts a small ext4, which needs root; run by ci/test.sh"]
fn a_full_ext4_is_an_io_error_not_a_crash() {
    full_host_file_system(FsKind::Ext4);
}

/// The counters a user reads with `daxd inspect` (JSON and Prometheus) match what a client
/// did, per queue.
#[test]
fn inspect_counts_what_the_client_did() {
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let control = dir.path().join("control.sock");
    let daxd = Backend::start_daxd(
        dir.path(),
        &region,
        &[
            "--size",
            "4M",
            "--num-queues",
            "2",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    let mut client = Client::connect(&daxd.socket, 2, false).unwrap();
    for i in 0..5 {
        client.queues[1].write(i * 4096, &pattern(i, 4096)).unwrap();
    }
    client.queues[1].flush().unwrap();
    for i in 0..3 {
        client.queues[0].read(i * 4096, 8192).unwrap();
    }
    assert!(client.queues[0].read(4 << 20, 512).is_err());
    drop(client);

    let inspect = |format: &[&str]| crate::support::daxd_inspect(&control, format);
    let json: serde_json::Value = serde_json::from_str(&inspect(&["--json"])).unwrap();
    let blk = &json["blk"];
    assert_eq!(blk["version"], 1);
    let count = |queue: usize, kind: &str| {
        blk["queues"][queue]["requests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|pair| pair[0] == kind)
            .unwrap()[1]
            .as_u64()
            .unwrap()
    };
    assert_eq!((count(1, "write"), count(1, "flush")), (5, 1));
    assert_eq!((count(0, "read"), count(0, "invalid")), (3, 1));
    assert_eq!(blk["queues"][1]["bytes_written"], 5 * 4096);
    assert_eq!(blk["queues"][0]["bytes_read"], 3 * 8192);
    assert_eq!(blk["queues"][0]["ioerr"], 1);
    assert_eq!(blk["queues"][1]["ok"], 6);
    assert!(blk["region_flushes"].as_u64().unwrap() >= 1);

    let text = inspect(&["--prometheus"]);
    for line in [
        "daxd_blk_requests_total{queue=\"1\",type=\"write\"} 5",
        "daxd_blk_requests_total{queue=\"0\",type=\"read\"} 3",
        "daxd_blk_bytes_total{queue=\"0\",direction=\"read\"} 24576",
        "daxd_blk_completions_total{queue=\"0\",status=\"ioerr\"} 1",
        "daxd_blk_flush_latency_seconds_count{queue=\"1\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(inspect(&[]).contains("region flushes:"));
    assert!(daxd.terminate().success());
}

/// Polling is on by default and adapts: under load the worker polls (and serves requests
/// without notifications), and once the load stops it costs nothing: daxd uses under 1% of
/// a core while its client stays connected but idle.
#[test]
fn an_idle_daxd_uses_no_cpu_after_a_load() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "16M"]);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let start = std::time::Instant::now();
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        client.q().read((i % 4096) * 4096, 4096).unwrap();
        i += 1;
    }
    let loaded = daxd.cpu_ticks();
    std::thread::sleep(Duration::from_millis(300));
    let before = daxd.cpu_ticks();
    std::thread::sleep(Duration::from_secs(3));
    let idle = daxd.cpu_ticks() - before;
    // 100 ticks per second of one core: 3 ticks in 3 s is 1%.
    assert!(
        idle < 3,
        "daxd used {idle} clock ticks in 3 idle seconds (and {loaded} for {i} requests)"
    );
    // Still serving.
    assert_eq!(client.q().read(0, 512).unwrap().len(), 512);
    drop(client);
    assert!(daxd.terminate().success());
}

/// Runs of [`a_request_mix_on_a_new_sparse_region`] per queue count: a failure that
/// happens in one run of five is missed by 20 runs with a probability of 1.2 %.
/// `DAXD_MIX_RUNS` asks for more (the issue's figures come from 50 and more).
fn mix_runs() -> usize {
    std::env::var("DAXD_MIX_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(20)
}

/// One run: daxd with its defaults (`--seccomp kill` among them) serves a new sparse 1 GiB
/// region to a client that sends every kind of request on `queues` queues at once, most
/// of them into holes. Every request must complete with what a model of the disk says
/// (each queue owns a part of the disk), and daxd must still be serving at the end and
/// exit cleanly. glibc's malloc opens files on whichever thread first shrinks a heap; on a
/// confined queue worker that ended daxd with SIGSYS in about one run in five.
fn a_request_mix_on_a_new_sparse_region(queues: usize, run: usize) {
    use std::collections::HashMap;
    const REQUESTS: usize = 300;
    const BLOCK: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let mut daxd = Backend::start_daxd(
        dir.path(),
        &region,
        &["--size", "1G", "--num-queues", &queues.to_string()],
    );
    let Client {
        blkio,
        queues: handles,
        ..
    } = Client::connect(&daxd.socket, queues, false).unwrap();
    let share = 1024 * MIB / queues as u64;
    let start = Arc::new(Barrier::new(queues));
    let workers: Vec<_> = handles
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let start = start.clone();
            std::thread::spawn(move || {
                let seed = (queues as u64) << 48 | (run as u64) << 16 | i as u64;
                let mut rng = SmallRng::seed_from_u64(seed);
                // Block -> the seed of its pattern; absent: zeroes.
                let mut model: HashMap<u64, u64> = HashMap::new();
                let base = i as u64 * share;
                start.wait();
                for n in 0..REQUESTS {
                    let blocks = rng.random_range(1..=64u64);
                    let first = base / BLOCK + rng.random_range(0..share / BLOCK - blocks);
                    let (offset, len) = (first * BLOCK, blocks * BLOCK);
                    let what = format!("queue {i}, request {n}, seed {seed:#x}");
                    match rng.random_range(0..100) {
                        0..40 => {
                            let mut data = Vec::with_capacity(len as usize);
                            for block in first..first + blocks {
                                let block_seed = rng.random::<u64>();
                                data.extend(pattern(block_seed, BLOCK as usize));
                                model.insert(block, block_seed);
                            }
                            q.write(offset, &data)
                                .unwrap_or_else(|e| panic!("{what}: write failed ({e})"));
                        }
                        40..70 => {
                            let data = q
                                .read(offset, len as usize)
                                .unwrap_or_else(|e| panic!("{what}: read failed ({e})"));
                            for (k, block) in (first..first + blocks).enumerate() {
                                let expected = match model.get(&block) {
                                    Some(&block_seed) => pattern(block_seed, BLOCK as usize),
                                    None => vec![0; BLOCK as usize],
                                };
                                let got = &data[k * BLOCK as usize..][..BLOCK as usize];
                                assert!(got == expected, "{what}: block {block} read back wrong");
                            }
                        }
                        70..80 => q
                            .flush()
                            .unwrap_or_else(|e| panic!("{what}: flush failed ({e})")),
                        80..90 => {
                            q.discard(offset, len)
                                .unwrap_or_else(|e| panic!("{what}: discard failed ({e})"));
                            model.retain(|b, _| !(first..first + blocks).contains(b));
                        }
                        _ => {
                            q.write_zeroes(offset, len, rng.random())
                                .unwrap_or_else(|e| panic!("{what}: write-zeroes failed ({e})"));
                            model.retain(|b, _| !(first..first + blocks).contains(b));
                        }
                    }
                }
                q.flush().unwrap();
                q
            })
        })
        .collect();
    let handles: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        daxd.is_running(),
        "daxd ended during run {run} with {queues} queues"
    );
    drop(handles);
    drop(blkio);
    let status = daxd.terminate();
    assert!(
        status.success(),
        "run {run} with {queues} queues: daxd ended with {status}"
    );
}

/// glibc touches files on whichever thread it likes (see daxd_confine's malloc settings):
/// one, two and four queues, many runs, each on a new sparse region under the default
/// `--seccomp kill`.
#[test]
fn a_request_mix_on_new_sparse_regions_never_ends_daxd() {
    for queues in [1, 2, 4] {
        for run in 0..mix_runs() {
            a_request_mix_on_a_new_sparse_region(queues, run);
        }
    }
}

/// What a soak samples of daxd: anonymous resident memory (its heap; the region's pages
/// are file-backed and not counted), open file descriptors, threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProcessSample {
    rss_anon_kib: u64,
    fds: usize,
    threads: usize,
}

fn sample(pid: u32) -> ProcessSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    ProcessSample {
        rss_anon_kib: field("RssAnon:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count(),
        threads: field("Threads:") as usize,
    }
}

/// 1,000 connections one after another and 100 million 4 KiB requests among them (QD32
/// on each of 2 queues, reads and writes at random offsets) against one daxd: its heap,
/// open file descriptors and threads, sampled while each connection is up and after it
/// ended, stay flat. `DAXD_SOAK_REQUESTS` and `DAXD_SOAK_CONNECTIONS` change the counts.
#[test]
#[ignore = "by hand: cargo test --release --test e2e soak_reconnects -- --ignored --nocapture"]
fn soak_reconnects_and_requests_leave_daxd_flat() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let connections = env("DAXD_SOAK_CONNECTIONS", 1000);
    let requests = env("DAXD_SOAK_REQUESTS", 100_000_000);
    let per_queue = requests / connections / 2;
    let dir = tempfile::tempdir().unwrap();
    let region = new_region(&dir);
    let span = 256 * MIB;
    let daxd = Backend::start_daxd(
        dir.path(),
        &region,
        &["--size", "256M", "--num-queues", "2"],
    );
    // Allocated first, so that requests take the mapping rather than the holes' paths.
    {
        let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
        for mib in 0..span / MIB {
            client
                .q()
                .write(mib * MIB, &pattern(mib, MIB as usize))
                .unwrap();
        }
        client.q().flush().unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let idle = sample(daxd.pid());
    eprintln!("idle, before the connections: {idle:?}");
    let started = std::time::Instant::now();
    let mut connected = Vec::new();
    let mut after = Vec::new();
    for n in 0..connections {
        let client = Client::connect(&daxd.socket, 2, false)
            .unwrap_or_else(|e| panic!("connection {n}: {}", e.message()));
        let mut queues = client.queues.into_iter();
        let (mut q0, mut q1) = (queues.next().unwrap(), queues.next().unwrap());
        let other = std::thread::spawn(move || {
            q1.random_io(per_queue, 32, span, 2 * n + 1);
            q1
        });
        q0.random_io(per_queue, 32, span, 2 * n + 2);
        let q1 = other.join().unwrap();
        connected.push(sample(daxd.pid()));
        drop((q0, q1, client.blkio));
        // The connection's threads end once daxd has seen the disconnect.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let ended = loop {
            let s = sample(daxd.pid());
            if s.threads <= idle.threads || std::time::Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        after.push(ended);
        if n % 100 == 99 || n + 1 == connections {
            eprintln!(
                "after {} connections, {} requests, {:.0?}: connected {:?}, after {:?}",
                n + 1,
                (n + 1) * per_queue * 2,
                started.elapsed(),
                connected.last().unwrap(),
                ended
            );
        }
    }
    let elapsed = started.elapsed();
    let total = connections * per_queue * 2;
    eprintln!(
        "{connections} connections, {total} requests in {elapsed:.0?} ({:.0} per second)",
        total as f64 / elapsed.as_secs_f64()
    );
    // Flat: the last tenth's descriptors and threads no more than the first tenth's
    // (a connection's teardown ends a moment after the client's, so one sample may catch
    // one more), and its heap no larger than the first tenth's (after the allocator
    // settled) plus 1 MiB.
    let tenth = (connections as usize / 10).max(1);
    for (when, samples) in [("connected", &connected), ("after", &after)] {
        let first = &samples[..tenth];
        let last = &samples[samples.len() - tenth..];
        let max =
            |of: &[ProcessSample], f: fn(&ProcessSample) -> u64| of.iter().map(f).max().unwrap();
        for (what, f, slack) in [
            (
                "open descriptors",
                (|s: &ProcessSample| s.fds as u64) as fn(&ProcessSample) -> u64,
                0,
            ),
            ("threads", |s: &ProcessSample| s.threads as u64, 0),
            ("heap (KiB)", |s: &ProcessSample| s.rss_anon_kib, 1024),
        ] {
            let (early, late) = (max(first, f), max(last, f));
            eprintln!("{when}: {what}: first tenth at most {early}, last tenth at most {late}");
            assert!(
                late <= early + slack,
                "{when}: daxd's {what} grew from {early} to {late} over {connections} connections"
            );
        }
    }
    assert!(daxd.terminate().success());
}
