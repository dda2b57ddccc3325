//! What FLUSH-heavy writes cost the host disk: a region whose file sits in large page-cache
//! folios (an image just copied in) must write back no more than the client wrote, on
//! ext4 and on XFS, and what was acknowledged before a FLUSH must be on the disk whichever
//! path the write took.
//!
//! Each case runs on a small file system of its own on a loop device, whose counters in
//! /sys/dev/block/MAJ:MIN/stat count exactly what reached it: nothing else writes there.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::support::{inspection_json, pattern, Backend, Client, FsKind, SmallFs};

const MIB: u64 = 1 << 20;

/// Bytes the block device under `path` has written so far.
fn device_bytes_written(path: &Path) -> u64 {
    let dev = std::fs::metadata(path).unwrap().dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).unwrap();
    let sectors: u64 = stat.split_whitespace().nth(6).unwrap().parse().unwrap();
    sectors * 512
}

/// An image written with large buffered writes and copied in with `cp`, as a user
/// provisions one: the copy sits in the page cache in large folios. (`--reflink=never`:
/// on XFS `cp` would otherwise share the blocks and leave nothing in the page cache; a
/// copy from another file system is what this one stands for.)
fn copy_in_image(fs: &SmallFs, size: u64) -> std::path::PathBuf {
    use std::io::Write;
    let source = fs.path.join("source.img");
    let mut out = std::fs::File::create(&source).unwrap();
    for chunk in 0..size / MIB {
        out.write_all(&pattern(chunk, MIB as usize)).unwrap();
    }
    drop(out);
    let image = fs.path.join("region.img");
    let copied = Command::new("cp")
        .arg("--reflink=never")
        .arg(&source)
        .arg(&image)
        .status()
        .unwrap();
    assert!(copied.success(), "cp");
    std::fs::remove_file(&source).unwrap();
    assert!(Command::new("sync").status().unwrap().success());
    image
}

/// How each write becomes durable.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Durable {
    /// The client sends a FLUSH after it.
    Flush,
    /// daxd runs with `--sync`: every write is flushed before it completes.
    Sync,
}

/// 4 KiB writes at random 4 KiB-aligned offsets, each made durable (a database's
/// commits), into a copied-in image: the host disk writes about what the client wrote.
fn flush_heavy_writes_into_a_copied_image(kind: FsKind, durable: Durable) {
    const SIZE: u64 = 128 * MIB;
    const WRITES: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(dir.path(), kind, 512 * MIB);
    let image = copy_in_image(&fs, SIZE);
    let control = dir.path().join("control.sock");
    let mut args = vec!["--control-socket", control.to_str().unwrap()];
    if durable == Durable::Sync {
        args.push("--sync");
    }
    let daxd = Backend::start_daxd(dir.path(), &image, &args);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let mut rng = SmallRng::seed_from_u64(0x3b1c);
    let mut model = std::collections::HashMap::new();
    let before = device_bytes_written(&image);
    for n in 0..WRITES {
        let offset = rng.random_range(0..SIZE / 4096) * 4096;
        let data = pattern(n + 1000, 4096);
        client.q().write(offset, &data).unwrap();
        if durable == Durable::Flush {
            client.q().flush().unwrap();
        }
        model.insert(offset, data);
    }
    let written = device_bytes_written(&image) - before;
    let amplification = written as f64 / (WRITES * 4096) as f64;
    eprintln!(
        "{kind:?}, {durable:?}: {WRITES} writes of 4 KiB, each flushed: the device wrote \
         {written} bytes, {amplification:.2} per byte written"
    );
    assert!(
        amplification <= 1.2,
        "{kind:?}, {durable:?}: the host disk wrote {amplification:.2} bytes per byte the client wrote \
         ({written} bytes for {WRITES} writes of 4 KiB): writes dirty whole large folios"
    );
    // What an operator sees: writes went over to pwrite(2), once.
    let inspection = inspection_json(&control);
    assert_eq!(
        (
            &inspection["blk"]["writes_pwrite"],
            &inspection["blk"]["write_path_changes"]
        ),
        (&serde_json::json!(true), &serde_json::json!(1)),
        "{kind:?}, {durable:?}"
    );
    drop(client);
    assert!(daxd.terminate().success());
    // What was acknowledged is in the file.
    let file = std::fs::read(&image).unwrap();
    for (offset, data) in &model {
        assert!(
            file[*offset as usize..*offset as usize + 4096] == data[..],
            "write at {offset} is not in the file"
        );
    }
}

#[test]
fn flush_heavy_writes_into_a_copied_image_on_ext4_write_back_what_they_wrote() {
    flush_heavy_writes_into_a_copied_image(FsKind::Ext4, Durable::Flush);
}

#[test]
fn sync_writes_into_a_copied_image_on_ext4_write_back_what_they_wrote() {
    flush_heavy_writes_into_a_copied_image(FsKind::Ext4, Durable::Sync);
}

#[test]
fn flush_heavy_writes_into_a_copied_image_on_xfs_write_back_what_they_wrote() {
    flush_heavy_writes_into_a_copied_image(FsKind::Xfs, Durable::Flush);
}
