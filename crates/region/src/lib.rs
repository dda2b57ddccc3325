//! One host file, mapped shared once, seen as 4 KiB page frames.
//!
//! Everything daxd serves comes out of a [`Region`]: the block device addresses it by
//! 512-byte sectors, persistent-memory windows by page frames. Both end up as byte ranges
//! of the one shared mapping, so a byte written through either path is the same byte of
//! the file. All access goes through [`VolatileSlice`]s because the guest may be writing
//! the same pages through its MMU at the same time.

mod layout;
mod size;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use log::{info, warn};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

pub use layout::{Layout, Serve, Window, PMEM_ALIGN};
pub use size::parse_size;

/// Bytes in a page frame: the unit of guest-visible mappings and of the registry.
pub const PAGE_SIZE: u64 = 4096;
/// Bytes in a sector: the unit of virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// Errors from opening or accessing a region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error(
        "invalid size {0:?}: expected a number with an optional K, M, G or T suffix (e.g. 4G)"
    )]
    InvalidSize(String),
    #[error("bad --window: {0}")]
    BadWindow(String),
    #[error("region size {0} is not a positive multiple of 4096 bytes; choose a size such as 1G")]
    UnalignedSize(u64),
    #[error("region file {path} does not exist; pass --size to create it")]
    MissingFile { path: PathBuf },
    #[error("region file {path} is {actual} bytes but {requested} were requested; pass --resize to change it, or drop --size to use the file as it is")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("region file {path} is not a regular file; daxd serves regular files only")]
    NotRegularFile { path: PathBuf },
    #[error("a read-only region cannot be created or resized: {path}")]
    ReadOnlyResize { path: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} cannot be mapped with MAP_SYNC ({source}): direct access needs the file on a DAX file system (e.g. ext4 or xfs mounted -o dax on host persistent memory); drop the direct option to serve it through the page cache")]
    NotDax {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("range of {len} bytes at offset {offset} is outside the region of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the region is read-only")]
    ReadOnly,
}

/// How to open the backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// The backing file.
    pub path: PathBuf,
    /// Expected size. Creates the file when it is missing; must match an existing file
    /// unless `resize` is set.
    pub size: Option<u64>,
    /// Grow or shrink an existing file to `size`.
    pub resize: bool,
    /// Open and map the file read-only: nothing daxd does can change it.
    pub read_only: bool,
    /// Require a synchronous DAX mapping (`MAP_SYNC`): the file must live on a DAX file
    /// system (host persistent memory), so stores bypass the host page cache entirely.
    pub direct: bool,
}

/// Identifies the backing file independently of paths and file descriptors, so that a
/// mapping of the same file handed over by a VMM can be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// A half-open range of page frames `[start, end)` of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct FrameRange {
    pub start: u64,
    pub end: u64,
}

impl FrameRange {
    /// Page frames touched by `len` bytes at `offset`; empty when `len` is 0.
    pub fn covering(offset: u64, len: u64) -> FrameRange {
        if len == 0 {
            let frame = offset >> PAGE_SHIFT;
            return FrameRange {
                start: frame,
                end: frame,
            };
        }
        // Callers pass ranges already checked against the region, so this cannot overflow.
        FrameRange {
            start: offset >> PAGE_SHIFT,
            end: (offset + len - 1) / PAGE_SIZE + 1,
        }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn overlaps(&self, other: &FrameRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    pub fn contains(&self, frame: u64) -> bool {
        self.start <= frame && frame < self.end
    }

    /// The part of `self` inside `other`, if any.
    pub fn intersect(&self, other: &FrameRange) -> Option<FrameRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(FrameRange { start, end })
    }
}

/// The mapped backing file.
#[derive(Debug)]
pub struct Region {
    file: File,
    path: PathBuf,
    base: NonNull<u8>,
    size: u64,
    read_only: bool,
    map_sync: bool,
    identity: FileIdentity,
}

// SAFETY: the mapping is plain shared memory owned by the Region for its whole life; all
// access to it goes through VolatileSlice (no references to its bytes are handed out), so
// concurrent access from several threads is no different from a guest's vCPUs sharing RAM.
unsafe impl Send for Region {}
// SAFETY: see `Send` above; no method takes `&self` and mutates Region's own fields.
unsafe impl Sync for Region {}

impl Region {
    /// Opens (or creates) the backing file and maps it.
    ///
    /// An existing file is never truncated or grown unless `config.resize` asks for it.
    pub fn open(config: &RegionConfig) -> Result<Region, RegionError> {
        let path = config.path.clone();
        let io_err = |what, source| RegionError::Io {
            what,
            path: path.clone(),
            source,
        };
        if let Some(size) = config.size {
            check_size(size)?;
        }
        if config.read_only && config.resize {
            return Err(RegionError::ReadOnlyResize { path });
        }

        let exists = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => true,
            Ok(_) => return Err(RegionError::NotRegularFile { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("inspect", e)),
        };

        let file = if exists {
            OpenOptions::new()
                .read(true)
                .write(!config.read_only)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io_err("open", e))?
        } else {
            let Some(size) = config.size else {
                return Err(RegionError::MissingFile { path });
            };
            if config.read_only {
                return Err(RegionError::ReadOnlyResize { path });
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io_err("create", e))?;
            file.set_len(size).map_err(|e| io_err("size", e))?;
            info!("created region file {} of {size} bytes", path.display());
            file
        };

        let meta = file.metadata().map_err(|e| io_err("inspect", e))?;
        let mut size = meta.len();
        if let Some(requested) = config.size {
            if requested != size {
                if !config.resize {
                    return Err(RegionError::SizeMismatch {
                        path,
                        actual: size,
                        requested,
                    });
                }
                file.set_len(requested).map_err(|e| io_err("resize", e))?;
                file.sync_all().map_err(|e| io_err("sync", e))?;
                info!(
                    "resized region file {} from {size} to {requested} bytes",
                    path.display()
                );
                size = requested;
            }
        }
        check_size(size)?;

        let (base, map_sync) = match map_file(&file, size, config.read_only, config.direct) {
            Ok(mapped) => mapped,
            Err(source) if config.direct => return Err(RegionError::NotDax { path, source }),
            Err(e) => return Err(io_err("map", e)),
        };
        Ok(Region {
            file,
            path,
            base,
            size,
            read_only: config.read_only,
            map_sync,
            identity: FileIdentity {
                dev: meta.dev(),
                ino: meta.ino(),
            },
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open backing file (to hand to a VMM that maps it, e.g. SHMEM_MAP).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size in bytes; always a multiple of [`PAGE_SIZE`].
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size >> SECTOR_SHIFT
    }

    /// Size in 4 KiB page frames.
    pub fn frames(&self) -> u64 {
        self.size >> PAGE_SHIFT
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Whether the mapping is a synchronous DAX mapping (`MAP_SYNC`): stores reach the
    /// file system's media without a page cache in between.
    pub fn is_map_sync(&self) -> bool {
        self.map_sync
    }

    pub fn identity(&self) -> FileIdentity {
        self.identity
    }

    /// Checks that `len` bytes at `offset` lie inside the region.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(RegionError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_>, RegionError> {
        self.check_range(offset, len as u64)?;
        // SAFETY: offset + len lies within the mapping (checked above), which stays mapped
        // for as long as `self` lives; the slice borrows `self`.
        Ok(unsafe { VolatileSlice::new(self.base.as_ptr().wrapping_add(offset as usize), len) })
    }

    /// Copies `dst.len()` bytes of the region at `offset` into `dst` (guest memory).
    pub fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        dst: VolatileSlice<'_, B>,
    ) -> Result<(), RegionError> {
        self.slice(offset, dst.len())?.copy_to_volatile_slice(dst);
        Ok(())
    }

    /// Copies `src` (guest memory) into the region at `offset`.
    pub fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        src: VolatileSlice<'_, B>,
    ) -> Result<(), RegionError> {
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        src.copy_to_volatile_slice(self.slice(offset, src.len())?);
        Ok(())
    }

    /// Copies bytes of the region into a host buffer (control paths and tests).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), RegionError> {
        self.slice(offset, buf.len())?.copy_to(buf);
        Ok(())
    }

    /// Copies a host buffer into the region (control paths and tests).
    pub fn write_bytes(&self, offset: u64, buf: &[u8]) -> Result<(), RegionError> {
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        self.slice(offset, buf.len())?.copy_from(buf);
        Ok(())
    }

    /// Makes every earlier write to the region durable.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // fdatasync writes back pages dirtied through the mapping as well as metadata
        // changes from fallocate, so one call covers both the data and the discard paths.
        // SAFETY: fdatasync on a file descriptor we own; no memory is involved.
        check(unsafe { libc::fdatasync(self.file.as_raw_fd()) })
    }

    /// Makes earlier writes to `len` bytes at `offset` durable.
    pub fn flush_range(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.check_range(offset, len)?;
        if self.read_only || len == 0 {
            return Ok(());
        }
        let start = offset & !(PAGE_SIZE - 1);
        let end = (offset + len).next_multiple_of(PAGE_SIZE).min(self.size);
        // SAFETY: [start, end) is page aligned and inside our own mapping.
        let ret = unsafe {
            libc::msync(
                self.base.as_ptr().wrapping_add(start as usize).cast(),
                (end - start) as usize,
                libc::MS_SYNC,
            )
        };
        check(ret).map_err(|source| self.io_error("flush", source))
    }

    /// Deallocates `len` bytes at `offset`: they read back as zeroes and no longer use
    /// space in the file system where it can punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.zero(
            offset,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    /// Zeroes `len` bytes at `offset`, keeping them allocated where possible.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.zero(
            offset,
            len,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    fn zero(&self, offset: u64, len: u64, mode: libc::c_int) -> Result<(), RegionError> {
        self.check_range(offset, len)?;
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on our own descriptor over a range inside the file; the kernel
        // zaps our mapping's page-table entries for it, so later loads see zeroes.
        let ret = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        match check(ret) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => {
                // File systems without hole punching or zero ranges (tmpfs lacks the
                // latter): store zeroes through the mapping, which has the same result for
                // readers.
                warn!(
                    "fallocate mode {mode:#x} unsupported on {}: {e}; writing zeroes instead",
                    self.path.display()
                );
                self.store_zeroes(offset, len)
            }
            Err(source) => Err(self.io_error("zero a range of", source)),
        }
    }

    fn store_zeroes(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        const CHUNK: usize = 64 << 10;
        static ZEROES: [u8; CHUNK] = [0; CHUNK];
        let slice = self.slice(offset, len as usize)?;
        let mut done = 0;
        while done < slice.len() {
            let n = (slice.len() - done).min(CHUNK);
            // In range by construction: done + n <= slice.len().
            if let Ok(piece) = slice.subslice(done, n) {
                piece.copy_from(&ZEROES[..n]);
            }
            done += n;
        }
        Ok(())
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> RegionError {
        RegionError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base/size describe the mapping created in `open`, which nothing else
        // unmaps; all slices borrowing `self` are gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) };
    }
}

fn check_size(size: u64) -> Result<(), RegionError> {
    if size == 0 || size % PAGE_SIZE != 0 || usize::try_from(size).is_err() {
        return Err(RegionError::UnalignedSize(size));
    }
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Maps the whole file shared. Tries `MAP_SYNC` first: on a DAX file system it makes
/// stores durable without a page cache, elsewhere the kernel refuses it and a normal shared
/// mapping is used, unless `direct` insists on MAP_SYNC.
fn map_file(
    file: &File,
    size: u64,
    read_only: bool,
    direct: bool,
) -> io::Result<(NonNull<u8>, bool)> {
    let prot = if read_only {
        libc::PROT_READ
    } else {
        libc::PROT_READ | libc::PROT_WRITE
    };
    let attempts: &[(libc::c_int, bool)] = if read_only {
        &[(libc::MAP_SHARED, false)]
    } else if direct {
        &[(libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC, true)]
    } else {
        &[
            (libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC, true),
            (libc::MAP_SHARED, false),
        ]
    };
    let mut last_error = io::Error::from_raw_os_error(libc::EINVAL);
    for &(flags, sync) in attempts {
        // SAFETY: a fresh mapping of our own file at an address the kernel chooses; it
        // does not alias any Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                prot,
                flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            last_error = io::Error::last_os_error();
            continue;
        }
        if let Some(base) = NonNull::new(ptr.cast::<u8>()) {
            return Ok((base, sync));
        }
    }
    Err(last_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: &Path, size: Option<u64>) -> RegionConfig {
        RegionConfig {
            path: path.to_owned(),
            size,
            resize: false,
            read_only: false,
            direct: false,
        }
    }

    #[test]
    fn creates_missing_file_sparse_with_requested_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(1 << 20))).unwrap();
        assert_eq!(region.size(), 1 << 20);
        assert_eq!(region.sectors(), 2048);
        assert_eq!(region.frames(), 256);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    }

    #[test]
    fn missing_file_without_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Region::open(&config(&dir.path().join("nope"), None)).unwrap_err();
        assert!(matches!(err, RegionError::MissingFile { .. }), "{err}");
    }

    #[test]
    fn existing_file_is_never_silently_resized() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let err = Region::open(&config(&path, Some(16384))).unwrap_err();
        assert!(
            matches!(err, RegionError::SizeMismatch { actual: 8192, .. }),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);

        let region = Region::open(&config(&path, None)).unwrap();
        assert_eq!(region.size(), 8192);
        drop(region);

        let mut grow = config(&path, Some(16384));
        grow.resize = true;
        let region = Region::open(&grow).unwrap();
        assert_eq!(region.size(), 16384);
        let mut head = [0u8; 4];
        region.read_bytes(8188, &mut head).unwrap();
        assert_eq!(head, [7, 7, 7, 7], "resize must keep existing bytes");
    }

    #[test]
    fn unaligned_sizes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.img");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            Region::open(&config(&path, None)).unwrap_err(),
            RegionError::UnalignedSize(1000)
        ));
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(Region::open(&config(&empty, None)).is_err());
    }

    #[test]
    fn writes_reach_the_file_and_ranges_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(3 * PAGE_SIZE))).unwrap();
        region.write_bytes(PAGE_SIZE + 5, b"hello").unwrap();
        region.flush().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[4101..4106], b"hello");

        assert!(region.write_bytes(3 * PAGE_SIZE - 2, b"abc").is_err());
        assert!(region.check_range(u64::MAX, 2).is_err());
        assert!(region.check_range(3 * PAGE_SIZE, 0).is_ok());
        region.flush_range(PAGE_SIZE, 10).unwrap();
    }

    #[test]
    fn punch_hole_and_write_zeroes_read_back_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(4 * PAGE_SIZE))).unwrap();
        region
            .write_bytes(0, &vec![0xaa; 4 * PAGE_SIZE as usize])
            .unwrap();
        region.punch_hole(PAGE_SIZE, PAGE_SIZE).unwrap();
        region.write_zeroes(3 * PAGE_SIZE, 512).unwrap();
        let mut all = vec![0u8; 4 * PAGE_SIZE as usize];
        region.read_bytes(0, &mut all).unwrap();
        assert!(all[..4096].iter().all(|&b| b == 0xaa));
        assert!(all[4096..8192].iter().all(|&b| b == 0));
        assert!(all[8192..12288].iter().all(|&b| b == 0xaa));
        assert!(all[12288..12800].iter().all(|&b| b == 0));
        assert!(all[12800..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn read_only_region_refuses_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let mut ro = config(&path, None);
        ro.read_only = true;
        let region = Region::open(&ro).unwrap();
        assert!(matches!(
            region.write_bytes(0, b"x"),
            Err(RegionError::ReadOnly)
        ));
        assert!(matches!(
            region.punch_hole(0, 4096),
            Err(RegionError::ReadOnly)
        ));
        assert!(matches!(
            region.write_zeroes(0, 4096),
            Err(RegionError::ReadOnly)
        ));
        region.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 8192]);
    }

    #[test]
    fn direct_needs_a_dax_file_system() {
        // Test temp directories are never on DAX here; MAP_SYNC must be refused with an
        // error that says what to do, not silently downgraded.
        let dir = tempfile::tempdir().unwrap();
        let mut direct = config(&dir.path().join("r.img"), Some(PAGE_SIZE));
        direct.direct = true;
        match Region::open(&direct) {
            Err(e @ RegionError::NotDax { .. }) => assert!(e.to_string().contains("-o dax")),
            Ok(region) => assert!(region.is_map_sync()),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn frame_ranges_cover_partial_pages() {
        assert_eq!(
            FrameRange::covering(0, 4096),
            FrameRange { start: 0, end: 1 }
        );
        assert_eq!(
            FrameRange::covering(4095, 2),
            FrameRange { start: 0, end: 2 }
        );
        assert_eq!(
            FrameRange::covering(8192, 512),
            FrameRange { start: 2, end: 3 }
        );
        assert!(FrameRange::covering(8192, 0).is_empty());
        assert!(FrameRange { start: 0, end: 2 }.overlaps(&FrameRange { start: 1, end: 5 }));
        assert!(!FrameRange { start: 0, end: 2 }.overlaps(&FrameRange { start: 2, end: 5 }));
    }
}
