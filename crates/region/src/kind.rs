//! What backs a region: a regular file, a block device (an NVMe partition, an LVM
//! volume, a loop device, an iSCSI or RBD device the host kernel maps), or a device-DAX
//! character device (`/dev/daxX.Y`: an NVDIMM namespace in devdax mode, or CXL memory).
//!
//! Files and block devices are served through a shared mapping of their page cache, with
//! `fdatasync` making writes durable (a file on a DAX file system mapped with `MAP_SYNC`
//! has no page cache: see [`crate::persist`]). What differs is read here, at open, before
//! the process confines itself: a block device has no size in `stat` (its size is where
//! `lseek(SEEK_END)` lands), fixed logical and physical block sizes and a read-only flag
//! (sysfs), is claimed with `O_EXCL` (a mounted device, or one another process claimed,
//! is refused with EBUSY) rather than locked, and cannot be created or resized. A
//! device-DAX device is memory and nothing else: it can only be mapped (no read, write,
//! fallocate or fsync), its size and alignment come from sysfs, every mapping of it must
//! be aligned to that alignment, and it has no holes.

use std::io;
use std::path::PathBuf;

/// What a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice(BlockDevice),
    /// A device-DAX character device.
    DeviceDax(DeviceDax),
}

/// A device-DAX device's facts, from `/sys/dev/char/MAJ:MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceDax {
    /// Bytes.
    pub size: u64,
    /// The page size of its mappings (4 KiB, 2 MiB or 1 GiB): every mapping of it, and
    /// every window a VMM maps, starts and ends on a multiple of it.
    pub align: u64,
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
            RegionKind::File | RegionKind::DeviceDax(_) => 512,
            RegionKind::BlockDevice(device) => device.logical_block,
        }
    }

    /// Bytes of the unit written without a read-modify-write: the page (the page cache
    /// writes whole pages back), or the device's physical block where that is larger.
    pub fn physical_block(&self) -> u32 {
        let page = crate::PAGE_SIZE as u32;
        match self {
            RegionKind::File | RegionKind::DeviceDax(_) => page,
            RegionKind::BlockDevice(device) => device.physical_block.max(page),
        }
    }

    /// What every mapping of the region must be aligned to: a page, or a device-DAX
    /// device's alignment.
    pub fn map_align(&self) -> u64 {
        match self {
            RegionKind::DeviceDax(dax) => dax.align,
            _ => crate::PAGE_SIZE,
        }
    }

    /// How `daxd inspect` and the logs name it.
    pub fn describe(&self) -> &'static str {
        match self {
            RegionKind::File => "file",
            RegionKind::BlockDevice(_) => "block device",
            RegionKind::DeviceDax(_) => "device-dax",
        }
    }
}

impl DeviceDax {
    /// The facts of the character device with device number `rdev`, or `None` when it is
    /// not a device-DAX device (its sysfs directory is not in the `dax` subsystem).
    pub(crate) fn of(rdev: u64) -> io::Result<Option<DeviceDax>> {
        let dir = PathBuf::from(format!(
            "/sys/dev/char/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ));
        Self::from_sysfs(&dir)
    }

    /// The facts in sysfs directory `dir` (tests give a directory of their own).
    pub(crate) fn from_sysfs(dir: &std::path::Path) -> io::Result<Option<DeviceDax>> {
        let subsystem = std::fs::read_link(dir.join("subsystem"))?;
        if subsystem.file_name().and_then(|n| n.to_str()) != Some("dax") {
            return Ok(None);
        }
        let read = |name: &str| -> io::Result<u64> {
            let text = std::fs::read_to_string(dir.join(name))?;
            text.trim().parse().map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}/{name}: {e}", dir.display()),
                )
            })
        };
        let size = read("size")?;
        // Kernels before 5.10 have no per-device `align`; their devices are 2 MiB aligned.
        let align = match read("align") {
            Ok(align) => align,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 2 << 20,
            Err(e) => return Err(e),
        };
        if align == 0 || !align.is_power_of_two() || align < crate::PAGE_SIZE || size % align != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: size {size} and align {align} are not a whole number of aligned pages",
                    dir.display()
                ),
            ));
        }
        Ok(Some(DeviceDax { size, align }))
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

    /// A sysfs directory as the kernel shows a device-DAX device: `subsystem` links to
    /// the dax bus.
    fn dax_sysfs(size: &str, align: Option<&str>, subsystem: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            format!("../../../bus/{subsystem}"),
            dir.path().join("subsystem"),
        )
        .unwrap();
        std::fs::write(dir.path().join("size"), size).unwrap();
        if let Some(align) = align {
            std::fs::write(dir.path().join("align"), align).unwrap();
        }
        dir
    }

    #[test]
    fn a_device_dax_takes_size_and_alignment_from_sysfs() {
        let dir = dax_sysfs("268435456\n", Some("2097152\n"), "dax");
        let dax = DeviceDax::from_sysfs(dir.path()).unwrap().unwrap();
        assert_eq!(
            dax,
            DeviceDax {
                size: 256 << 20,
                align: 2 << 20
            }
        );
        let kind = RegionKind::DeviceDax(dax);
        assert_eq!((kind.map_align(), kind.describe()), (2 << 20, "device-dax"));
        assert_eq!(RegionKind::File.map_align(), 4096);
        // Before Linux 5.10 there is no per-device alignment: 2 MiB.
        let dir = dax_sysfs("4194304", None, "dax");
        assert_eq!(
            DeviceDax::from_sysfs(dir.path()).unwrap().unwrap().align,
            2 << 20
        );
    }

    #[test]
    fn other_character_devices_and_odd_sizes_are_not_device_dax() {
        let dir = dax_sysfs("4096", None, "mem");
        assert_eq!(DeviceDax::from_sysfs(dir.path()).unwrap(), None);
        // A size that is not a whole number of aligned pages.
        let dir = dax_sysfs("3145728", Some("2097152"), "dax");
        assert!(DeviceDax::from_sysfs(dir.path()).is_err());
        let dir = dax_sysfs("4194304", Some("3000"), "dax");
        assert!(DeviceDax::from_sysfs(dir.path()).is_err());
    }

    #[test]
    fn a_missing_device_is_an_error_not_a_guess() {
        // No block device has major 0 (the unnamed devices).
        assert!(BlockDevice::of(libc::makedev(0, 0xfffff)).is_err());
    }
}
