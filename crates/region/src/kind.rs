//! What backs a region: a regular file, or a block device (an NVMe partition, an LVM
//! volume, a loop device, an iSCSI or RBD device the host kernel maps).
//!
//! Both are served through a shared mapping of their page cache, with `fdatasync` making
//! writes durable. What differs is read here, at open, before the process confines itself:
//! a block device has no size in `stat` (its size is where `lseek(SEEK_END)` lands), fixed
//! logical and physical block sizes and a read-only flag (sysfs), is claimed with
//! `O_EXCL` (a mounted device, or one another process claimed, is refused with EBUSY)
//! rather than locked, and cannot be created or resized.

use std::io;
use std::path::PathBuf;

/// What a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice(BlockDevice),
}

/// A block device's facts, from `/sys/dev/block/MAJ:MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDevice {
    /// The smallest unit the device addresses (512 or 4096).
    pub logical_block: u32,
    /// The unit it writes without a read-modify-write.
    pub physical_block: u32,
    /// The device is read-only (a write-protected disk, `losetup -r`, `blockdev --setro`).
    pub read_only: bool,
}

impl RegionKind {
    /// Bytes of the smallest unit the backing store addresses: the disk's `blk_size`.
    /// A file's page cache takes any sector, so 512 for files.
    pub fn logical_block(&self) -> u32 {
        match self {
            RegionKind::File => 512,
            RegionKind::BlockDevice(device) => device.logical_block,
        }
    }

    /// Bytes of the unit written without a read-modify-write: the page (the page cache
    /// writes whole pages back), or the device's physical block where that is larger.
    pub fn physical_block(&self) -> u32 {
        let page = crate::PAGE_SIZE as u32;
        match self {
            RegionKind::File => page,
            RegionKind::BlockDevice(device) => device.physical_block.max(page),
        }
    }

    /// How `daxd inspect` and the logs name it.
    pub fn describe(&self) -> &'static str {
        match self {
            RegionKind::File => "file",
            RegionKind::BlockDevice(_) => "block device",
        }
    }
}

impl BlockDevice {
    /// The facts of the block device with device number `rdev` (`st_rdev`).
    pub(crate) fn of(rdev: u64) -> io::Result<BlockDevice> {
        let dir = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ));
        let read = |name: &str| -> io::Result<u32> {
            // A partition has no queue of its own: its disk's is one directory up.
            let text = std::fs::read_to_string(dir.join("queue").join(name))
                .or_else(|_| std::fs::read_to_string(dir.join("../queue").join(name)))?;
            text.trim().parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}/queue/{name}: {e}", dir.display()),
                )
            })
        };
        let read_only = std::fs::read_to_string(dir.join("ro"))?.trim() == "1";
        Ok(BlockDevice {
            logical_block: read("logical_block_size")?,
            physical_block: read("physical_block_size")?,
            read_only,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_takes_any_sector_and_writes_pages() {
        assert_eq!(RegionKind::File.logical_block(), 512);
        assert_eq!(RegionKind::File.physical_block(), 4096);
    }

    #[test]
    fn a_device_addresses_its_logical_blocks_and_writes_at_least_pages() {
        let device = |logical_block, physical_block| {
            RegionKind::BlockDevice(BlockDevice {
                logical_block,
                physical_block,
                read_only: false,
            })
        };
        assert_eq!(device(512, 512).logical_block(), 512);
        assert_eq!(device(512, 512).physical_block(), 4096);
        assert_eq!(device(4096, 4096).logical_block(), 4096);
        assert_eq!(device(512, 16384).physical_block(), 16384);
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_guess() {
        // No block device has major 0 (the unnamed devices).
        assert!(BlockDevice::of(libc::makedev(0, 0xfffff)).is_err());
    }
}
