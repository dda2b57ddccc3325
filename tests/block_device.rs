//! A region on a block device (issue 27): a loop device stands for an NVMe partition or an
//! LVM volume. daxd takes its size from the device, its block size into the disk's config
//! space, claims it with O_EXCL, refuses a read-only device unless asked to serve it
//! read-only, and a discard reaches the device: the loop device's backing file gives the
//! blocks back.
//!
//! Needs root (losetup), as the suites that mount small file systems do.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{
    file_bytes, inspection_json, next_data, pattern, refused_start, test_dir, Backend, Client,
};

const MIB: u64 = 1 << 20;

/// A loop device over a file, detached on drop.
struct LoopDevice {
    device: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    /// A loop device over a new sparse file of `size` bytes in `dir`, with `args` for
    /// losetup (`-r`, `--sector-size 4096`).
    fn new(dir: &Path, size: u64, args: &[&str]) -> LoopDevice {
        let backing = dir.join("backing.img");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .args(args)
            .arg(&backing)
            .output()
            .unwrap_or_else(|e| panic!("losetup: {e} (util-linux; ci/install-deps installs it)"));
        assert!(
            out.status.success(),
            "losetup (needs root and loop devices): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        LoopDevice { device, backing }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let detached = Command::new("losetup").arg("-d").arg(&self.device).status();
        if !matches!(detached, Ok(s) if s.success()) {
            eprintln!("cannot detach {}", self.device.display());
        }
    }
}

#[test]
fn a_block_device_region_is_served_with_its_size_and_discards_reach_the_device() {
    let dir = test_dir("daxd-bdev-");
    let d = dir.path();
    let dev = LoopDevice::new(d, 64 * MIB, &[]);
    let control = d.join("control.sock");
    let daxd = Backend::start_daxd(
        d,
        &dev.device,
        &["--control-socket", control.to_str().unwrap()],
    );
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    // The size is the device's: no --size given, none in stat.
    assert_eq!(client.capacity, 64 * MIB);
    let inspection = inspection_json(&control);
    assert_eq!(inspection["region"]["kind"], "block device");
    assert_eq!(inspection["region"]["logical_block"], 512);

    // Written and flushed through daxd, on the device: the loop device's backing file has
    // the bytes at their offsets.
    let writes: Vec<(u64, Vec<u8>)> = (0..8)
        .map(|n| (n * 4 * MIB + n * 4096, pattern(n, 256 << 10)))
        .collect();
    for (offset, data) in &writes {
        client.q().write(*offset, data).unwrap();
    }
    client.q().flush().unwrap();
    for (offset, data) in &writes {
        assert!(
            file_bytes(&dev.backing, *offset, data.len()) == *data,
            "write at {offset} is not on the device"
        );
        assert_eq!(client.q().read(*offset, data.len()).unwrap(), *data);
    }

    // A discard reads back as zeroes and deallocates the device's blocks: the backing
    // file has a hole there.
    let (offset, data) = &writes[2];
    assert!(
        next_data(&dev.backing, *offset) <= *offset,
        "written, so allocated"
    );
    client.q().discard(*offset, data.len() as u64).unwrap();
    assert_eq!(
        client.q().read(*offset, data.len()).unwrap(),
        vec![0; data.len()]
    );
    client.q().flush().unwrap();
    assert!(
        next_data(&dev.backing, *offset) >= offset + data.len() as u64,
        "the discarded range is still allocated in the backing file"
    );
    // The other writes are untouched.
    let (offset, data) = &writes[3];
    assert_eq!(client.q().read(*offset, data.len()).unwrap(), *data);

    // Claimed: a second daxd cannot serve the same device.
    let refused = refused_start(&[
        "--region",
        dev.device.to_str().unwrap(),
        "--socket-path",
        d.join("second.sock").to_str().unwrap(),
    ]);
    assert!(refused.contains("is in use"), "{refused}");

    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn a_read_only_block_device_is_served_only_read_only() {
    let dir = test_dir("daxd-bdev-ro-");
    let d = dir.path();
    let dev = LoopDevice::new(d, 16 * MIB, &["--read-only"]);
    let device = dev.device.to_str().unwrap();
    let socket = d.join("blk.sock");
    let refused = refused_start(&[
        "--region",
        device,
        "--socket-path",
        socket.to_str().unwrap(),
    ]);
    assert!(
        refused.contains("is read-only: serve it with --read-only"),
        "{refused}"
    );
    let daxd = Backend::start_daxd(d, &dev.device, &["--read-only"]);
    let mut client = Client::connect(&daxd.socket, 1, true).unwrap();
    assert_eq!(client.capacity, 16 * MIB);
    assert_eq!(client.q().read(0, 4096).unwrap(), vec![0; 4096]);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn a_block_device_with_4k_sectors_is_a_disk_with_4k_blocks() {
    let dir = test_dir("daxd-bdev-4k-");
    let d = dir.path();
    let dev = LoopDevice::new(d, 16 * MIB, &["--sector-size", "4096"]);
    let control = d.join("control.sock");
    let daxd = Backend::start_daxd(
        d,
        &dev.device,
        &["--control-socket", control.to_str().unwrap()],
    );
    let client = Client::connect(&daxd.socket, 1, false).unwrap();
    // The driver learns the block size from the config space (blkio's request alignment).
    assert_eq!(client.blkio.get_i32("request-alignment").unwrap(), 4096);
    let inspection = inspection_json(&control);
    assert_eq!(inspection["region"]["logical_block"], 4096);
    drop(client);
    assert!(daxd.terminate().success());
}

#[test]
fn a_block_device_cannot_be_resized() {
    let dir = test_dir("daxd-bdev-size-");
    let d = dir.path();
    let dev = LoopDevice::new(d, 16 * MIB, &[]);
    let device = dev.device.to_str().unwrap();
    let socket = d.join("blk.sock");
    let socket = socket.to_str().unwrap();
    let refused = refused_start(&[
        "--region",
        device,
        "--size",
        "32M",
        "--resize",
        "--socket-path",
        socket,
    ]);
    assert!(
        refused.contains("cannot be created or resized"),
        "{refused}"
    );
    let refused = refused_start(&["--region", device, "--size", "32M", "--socket-path", socket]);
    assert!(refused.contains("33554432 were requested"), "{refused}");
}
