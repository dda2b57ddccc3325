//! One host file, mapped shared once, seen as 4 KiB page frames.
//!
//! Everything daxd serves comes out of a [`Region`]: the block device addresses it by
//! 512-byte sectors, persistent-memory windows by page frames. Both end up as byte ranges
//! of the one shared mapping, so a byte written through either path is the same byte of
//! the file. All access goes through [`VolatileSlice`]s because the guest may be writing
//! the same pages through its MMU at the same time.

mod alloc;
mod kind;
mod layout;
mod lock;
pub mod persist;
pub mod writeback;
pub use writeback::WritePath;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;
use rustix::fs::FallocateFlags;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

pub use alloc::GRANULE;
pub use kind::{BlockDevice, DeviceDax, RegionKind};
pub use layout::{Layout, LayoutError, Serve, SharedLayout, Window, PMEM_ALIGN};
pub use lock::LockKind;
pub use persist::CacheWriteBack;

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
    #[error("region size {0} is not a positive multiple of 4096 bytes")]
    UnalignedSize(u64),
    #[error("region file {path} does not exist and no size was given to create it with")]
    MissingFile { path: PathBuf },
    #[error("region file {path} is {actual} bytes, but {requested} were requested")]
    SizeMismatch {
        path: PathBuf,
        actual: u64,
        requested: u64,
    },
    #[error("region {path} is neither a regular file, a block device nor a device-DAX device")]
    NeitherFileNorBlockDevice { path: PathBuf },
    #[error("region {path} is a device-DAX device: it cannot be created or resized (drop --resize; --size, if given, must be the device's size)")]
    DeviceDaxResize { path: PathBuf },
    #[error("region {path} is a device-DAX device, which only a mapping reaches: --write-path pwrite cannot serve it (drop the option)")]
    DeviceDaxPwrite { path: PathBuf },
    #[error(
        "region {path} is a device-DAX device, which has no fdatasync: drop --flush-path fdatasync"
    )]
    DeviceDaxFdatasync { path: PathBuf },
    #[error("region {path} is persistent memory, but daxd cannot write cache lines back on this CPU architecture ({arch}); serve a file on a DAX file system without --direct instead")]
    NoCacheWriteBack { path: PathBuf, arch: &'static str },
    #[error("region {path} is a block device: it cannot be created or resized (drop --resize; --size, if given, must be the device's size)")]
    BlockDeviceResize { path: PathBuf },
    #[error("block device {path} is read-only: serve it with --read-only")]
    ReadOnlyDevice { path: PathBuf },
    #[error("block device {path} is in use: mounted, or claimed by another process (another daxd, a VMM); daxd claims a whole block device for itself")]
    DeviceBusy { path: PathBuf },
    #[error("a read-only region cannot be created or resized: {path}")]
    ReadOnlyResize { path: PathBuf },
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} cannot be mapped with MAP_SYNC: a synchronous mapping needs the file on a DAX file system (e.g. ext4 or xfs mounted -o dax on host persistent memory)")]
    NotDax {
        path: PathBuf,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("region file {path} is in use: another process holds {held} lock on it")]
    Locked { path: PathBuf, held: LockKind },
    #[error("region file {path} is in use: another process holds a conflicting lock on it")]
    LockedByUnknown { path: PathBuf },
    #[error("no space left on the file system of {path} to allocate bytes {offset:#x}+{len:#x} of the region")]
    NoSpace {
        path: PathBuf,
        offset: u64,
        len: u64,
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
    /// Lock the file (exclusive when writable, shared when read-only) so that no other
    /// writer can use it at the same time.
    pub lock: bool,
    /// How writes into allocated blocks reach the file (see [`writeback`]).
    pub write_path: WritePath,
    /// How a FLUSH makes stores through a synchronous mapping durable (see [`persist`]).
    pub flush_path: FlushPath,
}

/// How a FLUSH makes the writes through a synchronous mapping (MAP_SYNC on a DAX file
/// system, device-DAX) durable (`--flush-path`). Elsewhere it is always `fdatasync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlushPath {
    /// daxd writes back the cache lines of the pages it stored into (see [`persist`]).
    #[default]
    Auto,
    /// The kernel's path: `fdatasync` of the file, which writes back the cache lines of
    /// every page any mapping dirtied (not possible on device-DAX).
    Fdatasync,
}

impl RegionConfig {
    /// A writable, locked region of the file at `path`, created with `size` bytes when it
    /// is missing (with `size` given, an existing file must have that size).
    pub fn new(path: impl Into<PathBuf>, size: Option<u64>) -> RegionConfig {
        RegionConfig {
            path: path.into(),
            size,
            resize: false,
            read_only: false,
            direct: false,
            flush_path: FlushPath::Auto,
            lock: true,
            write_path: WritePath::Auto,
        }
    }
}

/// Identifies the backing file independently of paths and file descriptors, so that a
/// mapping of the same file handed over by a VMM can be recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// The mapped backing file.
#[derive(Debug)]
pub struct Region {
    file: Arc<File>,
    /// A second open of the same file, without the lock, for VMMs that map it.
    shareable: File,
    path: PathBuf,
    mapping: MmapRegion,
    allocation: alloc::Allocation,
    /// Whether writes into allocated blocks go through the mapping or pwrite(2).
    writeback: writeback::WriteBack,
    /// The file system allocates a page even to read a hole through a shared mapping
    /// (tmpfs), so reads must find blocks too.
    allocates_on_read: bool,
    read_only: bool,
    map_sync: bool,
    identity: FileIdentity,
    kind: RegionKind,
    /// How writes become durable.
    durability: Durability,
}

/// How a FLUSH makes the region's writes durable.
#[derive(Debug)]
enum Durability {
    /// `fdatasync`: the page cache is written back to the file's blocks.
    PageCache,
    /// A synchronous mapping (`MAP_SYNC` on a DAX file system, or device-DAX): the cache
    /// lines daxd stored into are written back (see [`persist`]).
    Synchronous(Synchronous),
}

#[derive(Debug)]
struct Synchronous {
    how: CacheWriteBack,
    line: usize,
    dirty: persist::DirtyPages,
    /// A system call changed the file (pwrite into a hole, a range zeroed or punched):
    /// its data is on the media, but the file system's record of the blocks may not be,
    /// so the next FLUSH makes an `fdatasync` too. Never set on device-DAX.
    metadata: std::sync::atomic::AtomicBool,
    written_back: std::sync::atomic::AtomicU64,
    fdatasyncs: std::sync::atomic::AtomicU64,
}

/// What FLUSHes of a region with a synchronous mapping did, for `daxd inspect` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteBackStats {
    /// Bytes of cache lines written back (whole pages daxd stored into).
    pub bytes: u64,
    /// `fdatasync` calls a FLUSH made because the file's blocks changed.
    pub fdatasyncs: u64,
}

impl Region {
    /// Opens (or creates) the backing file and maps it.
    ///
    /// An existing file is never truncated or grown unless `config.resize` asks for it.
    pub fn open(config: &RegionConfig) -> Result<Region, RegionError> {
        if let Some(size) = config.size {
            check_size(size)?;
        }
        if config.read_only && config.resize {
            return Err(RegionError::ReadOnlyResize {
                path: config.path.clone(),
            });
        }
        let (file, kind) = open_or_create(config)?;
        // A block device is claimed when it is opened (O_EXCL).
        if config.lock && !matches!(kind, RegionKind::BlockDevice(_)) {
            // Before anything about the file changes: a refused start leaves it as it was.
            lock_file(&file, config)?;
        }
        let meta = file
            .metadata()
            .map_err(|e| io_error(config, "inspect", e))?;
        let current = match kind {
            RegionKind::File => meta.len(),
            RegionKind::BlockDevice(_) => rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                .map_err(|e| io_error(config, "find the size of", e.into()))?,
            RegionKind::DeviceDax(dax) => dax.size,
        };
        let size = settle_size(&file, current, config)?;
        // Through /proc, so that it is the same inode even if the path changed meanwhile.
        let shareable = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| io_error(config, "open a second descriptor of", e))?;
        let file = Arc::new(file);
        let (mapping, map_sync) = map_file(&file, size, config.read_only, config.direct).map_err(
            |source| match config.direct {
                true => RegionError::NotDax {
                    path: config.path.clone(),
                    source,
                },
                false => io_error(config, "map", io::Error::other(source)),
            },
        )?;
        let durability = durability(config, kind, map_sync, size)?;
        let allocation = match kind {
            RegionKind::DeviceDax(_) => alloc::Allocation::full(size),
            _ => alloc::Allocation::scan(&file, size),
        };
        // Stores through a synchronous mapping reach the media, with no page cache whose
        // dirty pages would pick the path; only an explicit choice takes pwrite there.
        let write_path = match config.write_path {
            WritePath::Auto if map_sync => WritePath::Map,
            path => path,
        };
        // (A device node's file system is devtmpfs, which says nothing about the device.)
        let allocates_on_read = kind == RegionKind::File
            && rustix::fs::fstatfs(&*file)
                .map(|fs| fs.f_type == libc::TMPFS_MAGIC)
                .unwrap_or(false);
        Ok(Region {
            file,
            shareable,
            path: config.path.clone(),
            mapping,
            allocation,
            writeback: writeback::WriteBack::new(write_path),
            allocates_on_read,
            read_only: config.read_only,
            map_sync,
            identity: FileIdentity {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            kind,
            durability,
        })
    }

    /// What backs the region.
    pub fn kind(&self) -> RegionKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An open of the backing file to hand to a VMM that maps it (SHMEM_MAP). It is a
    /// separate open file description from the one that holds the region's lock: a VMM
    /// that keeps the file mapped must not keep daxd's lock alive after daxd is gone.
    pub fn shareable_file(&self) -> &File {
        &self.shareable
    }

    /// Size in bytes; always a multiple of [`PAGE_SIZE`].
    pub fn size(&self) -> u64 {
        self.mapping.size() as u64
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size() >> SECTOR_SHIFT
    }

    /// Size in 4 KiB page frames.
    pub fn frames(&self) -> u64 {
        self.size() >> PAGE_SHIFT
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
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(RegionError::OutOfRange {
                offset,
                len,
                size: self.size(),
            }),
        }
    }

    fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_>, RegionError> {
        self.check_range(offset, len as u64)?;
        // In range (checked above), so the mapping's own bounds check cannot fail.
        self.mapping
            .get_slice(offset as usize, len)
            .map_err(|_| RegionError::OutOfRange {
                offset,
                len: len as u64,
                size: self.size(),
            })
    }

    /// Copies `dst.len()` bytes of the region at `offset` into `dst` (guest memory).
    pub fn read_into<B: BitmapSlice>(
        &self,
        offset: u64,
        dst: VolatileSlice<'_, B>,
    ) -> Result<(), RegionError> {
        let src = self.slice(offset, dst.len())?;
        if self.allocates_on_read && !self.allocation.covers(offset, dst.len() as u64) {
            // A load from a hole through the mapping would allocate a page (and fault
            // when there is no space); read(2) gives a hole's zeroes without allocating.
            return self.read_with_syscall(offset, dst);
        }
        src.copy_to_volatile_slice(dst);
        Ok(())
    }

    fn read_with_syscall<B: BitmapSlice>(
        &self,
        offset: u64,
        dst: VolatileSlice<'_, B>,
    ) -> Result<(), RegionError> {
        let mut done = 0;
        while done < dst.len() {
            let rest = dst.offset(done).map_err(|_| RegionError::OutOfRange {
                offset,
                len: dst.len() as u64,
                size: self.size(),
            })?;
            match pread_volatile(&self.file, &rest, offset + done as u64) {
                Ok(0) => {
                    return Err(self.io_error("read", io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.io_error("read", e.into())),
            }
        }
        Ok(())
    }

    /// Copies `src` (guest memory) into the region at `offset`. Where the file is known
    /// to have blocks, through the mapping; elsewhere (holes of a sparse region) with
    /// pwrite(2), which allocates or fails cleanly with ENOSPC when the file system is full,
    /// where a store through the mapping would fault.
    pub fn write_from<B: BitmapSlice>(
        &self,
        offset: u64,
        src: VolatileSlice<'_, B>,
    ) -> Result<(), RegionError> {
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        let dst = self.slice(offset, src.len())?;
        let allocated = self.allocation.covers(offset, src.len() as u64);
        if allocated && !self.writeback.writes_pwrite() {
            src.copy_to_volatile_slice(dst);
            self.stored(offset, src.len() as u64);
            return Ok(());
        }
        self.pwrite_loop(offset, src.len(), |done, at| {
            // `done` < `src.len()`: the offset is inside the slice.
            let rest = src.offset(done).map_err(|_| rustix::io::Errno::FAULT)?;
            pwrite_volatile(&self.file, &rest, at)
        })?;
        if !allocated {
            self.note_data(offset, src.len() as u64);
        }
        Ok(())
    }

    /// Writes `len` bytes of the region at `offset` into `file` at `at` (a recording's
    /// log), straight from the mapping: no buffer, so a queue worker allocates nothing.
    pub fn copy_to_file(&self, offset: u64, len: u64, file: &File, at: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let src = self.slice(offset, len).map_err(io::Error::other)?;
        let mut done = 0;
        while done < len {
            let rest = src.offset(done).map_err(io::Error::other)?;
            match pwrite_volatile(file, &rest, at + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Copies bytes of the region into a host buffer (control paths and tests).
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), RegionError> {
        self.slice(offset, buf.len())?.copy_to(buf);
        Ok(())
    }

    /// Copies a host buffer into the region (control paths and tests), as
    /// [`Region::write_from`] does.
    pub fn write_bytes(&self, offset: u64, buf: &[u8]) -> Result<(), RegionError> {
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        let dst = self.slice(offset, buf.len())?;
        if self.allocation.covers(offset, buf.len() as u64) {
            dst.copy_from(buf);
            self.stored(offset, buf.len() as u64);
            return Ok(());
        }
        self.pwrite_all(offset, buf)?;
        self.note_data(offset, buf.len() as u64);
        Ok(())
    }

    fn pwrite_all(&self, offset: u64, buf: &[u8]) -> Result<(), RegionError> {
        self.pwrite_loop(offset, buf.len(), |done, at| {
            rustix::io::pwrite(&*self.file, &buf[done..], at)
        })
    }

    /// Records stores through the mapping into `len` bytes at `offset`, for the next
    /// FLUSH of a synchronous mapping to write their cache lines back.
    fn stored(&self, offset: u64, len: u64) {
        if let Durability::Synchronous(sync) = &self.durability {
            sync.dirty.mark(offset, len);
        }
    }

    /// Records that a system call changed the file's blocks (see
    /// [`Synchronous::metadata`]).
    fn changed_blocks(&self) {
        if let Durability::Synchronous(sync) = &self.durability {
            sync.metadata.store(true, Ordering::Release);
        }
    }

    /// Writes `len` bytes at region byte `offset` with `pwrite(done, at)`, which writes
    /// what it can of the bytes from `done` on at file offset `at`, until all are written.
    fn pwrite_loop(
        &self,
        offset: u64,
        len: usize,
        mut pwrite: impl FnMut(usize, u64) -> rustix::io::Result<usize>,
    ) -> Result<(), RegionError> {
        let written = self.pwrite_each(offset, len, &mut pwrite);
        // After the system calls, never before: a FLUSH that takes the mark before they
        // return could sync before they land, and leave the next FLUSH without the mark.
        self.changed_blocks();
        written
    }

    fn pwrite_each(
        &self,
        offset: u64,
        len: usize,
        pwrite: &mut impl FnMut(usize, u64) -> rustix::io::Result<usize>,
    ) -> Result<(), RegionError> {
        let mut done = 0;
        while done < len {
            let at = offset + done as u64;
            match pwrite(done, at) {
                Ok(0) => {
                    return Err(self.io_error("write", io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::NOSPC) => {
                    return Err(RegionError::NoSpace {
                        path: self.path.clone(),
                        offset: at,
                        len: (len - done) as u64,
                    })
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(self.io_error("write", e.into())),
            }
        }
        Ok(())
    }

    /// Marks the granules touched by `offset..offset+len` whose every byte is now data
    /// in the file (SEEK_HOLE finds no hole in them), so that later stores into them go
    /// through the mapping.
    fn note_data(&self, offset: u64, len: u64) {
        for granule in alloc::Allocation::touched(offset, len) {
            let start = granule * GRANULE;
            let end = (start + GRANULE).min(self.size());
            if let Ok(hole) = rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Hole(start)) {
                if hole >= end {
                    self.allocation.set(granule, true);
                }
            }
        }
    }

    /// Writes zeroes into every hole of `offset..offset+len` (also into blocks allocated
    /// but never written), so that stores through a mapping of the range (a guest's DAX
    /// mapping of a pmem window) never meet a hole. Only for ranges nobody maps yet: a
    /// store racing with it could be overwritten. Fails with [`RegionError::NoSpace`]
    /// when the file system cannot hold them.
    pub fn fill_holes(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.check_range(offset, len)?;
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        if matches!(self.kind, RegionKind::DeviceDax(_)) {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        static ZEROES: [u8; CHUNK as usize] = [0; CHUNK as usize];
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let hole = match rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Hole(at)) {
                Ok(hole) => hole,
                Err(e) => return Err(self.io_error("look for holes in", e.into())),
            };
            if hole >= end {
                break;
            }
            let data = rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Data(hole))
                .unwrap_or(self.size())
                .min(end);
            let mut zero_at = hole;
            while zero_at < data {
                let n = (data - zero_at).min(CHUNK);
                self.pwrite_all(zero_at, &ZEROES[..n as usize])?;
                zero_at += n;
            }
            at = data;
        }
        self.note_data(offset, len);
        Ok(())
    }

    /// Whether `offset..offset+len` has a hole (or blocks never written).
    pub fn has_holes(&self, offset: u64, len: u64) -> bool {
        if matches!(self.kind, RegionKind::DeviceDax(_)) {
            return false;
        }
        rustix::fs::seek(&*self.file, rustix::fs::SeekFrom::Hole(offset))
            .map_or(true, |hole| hole < offset + len)
    }

    /// Makes every earlier write to the region durable, daxd's own and the stores of
    /// guests that map parts of it (the final flush at shutdown).
    ///
    /// With a page cache, fdatasync writes back pages dirtied through the mapping or by
    /// pwrite(2), and the metadata of holes and zeroed ranges, so one call covers the data
    /// and the discard paths, whichever way a request took. On a DAX file system it also
    /// writes back the cache lines of every page stored into through any mapping of the
    /// file (the kernel tracks those by their write faults). On device-DAX nothing tracks
    /// a guest's stores, so every cache line of the region is written back.
    pub fn flush(&self) -> Result<(), RegionError> {
        self.flush_window(0, self.size())
    }

    /// Makes daxd's own writes durable, and the stores of guests into `len` bytes at
    /// `offset` (a pmem window's FLUSH): on device-DAX, every cache line of that range is
    /// written back; elsewhere as [`Region::flush`].
    pub fn flush_window(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        if self.read_only {
            return Ok(());
        }
        match &self.durability {
            Durability::PageCache => self.fdatasync(),
            Durability::Synchronous(sync) => {
                self.write_back_stored(sync);
                if let RegionKind::DeviceDax(_) = self.kind {
                    let range = self.slice(offset, len as usize)?;
                    sync.how
                        .write_back(range.ptr_guard().as_ptr(), range.len(), sync.line);
                    sync.how.fence();
                    sync.written_back.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                sync.metadata.store(false, Ordering::Release);
                self.fdatasync()?;
                sync.fdatasyncs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// A disk's FLUSH, after it wrote `written` bytes since its previous one: makes every
    /// write daxd completed durable. With a page cache, first looks at how much those
    /// writes left dirty, which picks the path of the writes to come (see [`writeback`]),
    /// then calls fdatasync. On a synchronous mapping it writes back the cache lines of the
    /// pages stored into since the previous FLUSH, and calls fdatasync only when a system
    /// call changed the file's blocks meanwhile.
    pub fn flush_after_writes(&self, written: u64) -> Result<(), RegionError> {
        if self.read_only {
            return Ok(());
        }
        match &self.durability {
            Durability::PageCache => {
                // Never on a DAX file (mapped with MAP_SYNC, flushed by --flush-path
                // fdatasync): it has no page cache to look at, and Linux 6.12's cachestat
                // oopses on its entries (workingset_test_recent, seen in the test guest).
                if !self.map_sync {
                    self.writeback.before_flush(&self.file, &self.path, written);
                }
                self.fdatasync()
            }
            Durability::Synchronous(sync) => {
                self.write_back_stored(sync);
                if sync.metadata.swap(false, Ordering::AcqRel) {
                    self.fdatasync()?;
                    sync.fdatasyncs.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// Writes back the cache lines of every page stored into since the last time.
    fn write_back_stored(&self, sync: &Synchronous) {
        let mut bytes = 0;
        sync.dirty.take(|first, pages| {
            let (offset, len) = (first << PAGE_SHIFT, pages << PAGE_SHIFT);
            if let Ok(range) = self.slice(offset, len as usize) {
                sync.how
                    .write_back(range.ptr_guard().as_ptr(), range.len(), sync.line);
                bytes += len;
            }
        });
        sync.how.fence();
        sync.written_back.fetch_add(bytes, Ordering::Relaxed);
    }

    fn fdatasync(&self) -> Result<(), RegionError> {
        self.file
            .sync_data()
            .map_err(|source| self.io_error("flush", source))
    }

    /// The cache write-back a synchronous mapping's FLUSHes use, with its line size;
    /// `None` for a region with a page cache.
    pub fn cache_write_back(&self) -> Option<(CacheWriteBack, usize)> {
        match &self.durability {
            Durability::PageCache => None,
            Durability::Synchronous(sync) => Some((sync.how, sync.line)),
        }
    }

    /// What the FLUSHes of a synchronous mapping did so far (zero with a page cache).
    pub fn write_back_stats(&self) -> WriteBackStats {
        match &self.durability {
            Durability::PageCache => WriteBackStats::default(),
            Durability::Synchronous(sync) => WriteBackStats {
                bytes: sync.written_back.load(Ordering::Relaxed),
                fdatasyncs: sync.fdatasyncs.load(Ordering::Relaxed),
            },
        }
    }

    /// Whether writes into allocated blocks go through pwrite(2) rather than the mapping
    /// (see [`writeback`]).
    pub fn writes_pwrite(&self) -> bool {
        self.writeback.writes_pwrite()
    }

    /// How often the write path changed (`WritePath::Auto`).
    pub fn write_path_changes(&self) -> u64 {
        self.writeback.changes()
    }

    /// Deallocates `len` bytes at `offset`: they read back as zeroes and no longer use
    /// space in the file system where it can punch holes.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.zero(
            offset,
            len,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        )
    }

    /// Zeroes `len` bytes at `offset`, keeping them allocated where possible.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), RegionError> {
        self.zero(
            offset,
            len,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        )
    }

    fn zero(&self, offset: u64, len: u64, mode: FallocateFlags) -> Result<(), RegionError> {
        self.check_range(offset, len)?;
        if self.read_only {
            return Err(RegionError::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        if let RegionKind::DeviceDax(_) = self.kind {
            // Memory has no holes and no fallocate: zeroing stores, written back at the
            // next FLUSH like any other.
            const CHUNK: usize = 1 << 16;
            static ZEROES: [u8; CHUNK] = [0; CHUNK];
            let range = self.slice(offset, len as usize)?;
            let mut done = 0;
            while done < range.len() {
                let n = (range.len() - done).min(CHUNK);
                // In range: `done + n` <= the slice's length.
                if let Ok(part) = range.subslice(done, n) {
                    part.copy_from(&ZEROES[..n]);
                }
                done += n;
            }
            self.stored(offset, len);
            return Ok(());
        }
        // Forgotten before the hole (or the unwritten zeroes) exists, so that a store
        // after it goes through pwrite(2) again.
        for granule in alloc::Allocation::touched(offset, len) {
            self.allocation.set(granule, false);
        }
        // The kernel zaps the mapping's page-table entries for the range, so later loads
        // through the mapping see zeroes. The blocks changed once it returns (see
        // pwrite_loop for why the mark comes after).
        let zeroed = rustix::fs::fallocate(&*self.file, mode, offset, len);
        self.changed_blocks();
        match zeroed {
            Ok(()) => Ok(()),
            Err(e)
                if mode.contains(FallocateFlags::PUNCH_HOLE)
                    && matches!(self.kind, RegionKind::BlockDevice(_))
                    && (e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS) =>
            {
                // A device that cannot unmap and read back zeroes (no WRITE ZEROES with
                // unmap): zeroes written instead, which the kernel falls back to itself.
                self.write_zeroes(offset, len)
            }
            Err(e)
                if mode.contains(FallocateFlags::ZERO_RANGE)
                    && (e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS) =>
            {
                // File systems without zero ranges (tmpfs): a hole, then zeroes written
                // into it, which keeps the range allocated as asked; no store through the
                // mapping.
                self.punch_hole(offset, len)?;
                self.fill_holes(offset, len)
            }
            Err(rustix::io::Errno::NOSPC) => Err(RegionError::NoSpace {
                path: self.path.clone(),
                offset,
                len,
            }),
            Err(e) => Err(self.io_error("zero a range of", e.into())),
        }
    }

    fn io_error(&self, what: &'static str, source: io::Error) -> RegionError {
        RegionError::Io {
            what,
            path: self.path.clone(),
            source,
        }
    }
}

/// The error of the system call just made through libc.
fn last_errno() -> rustix::io::Errno {
    rustix::io::Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(rustix::io::Errno::IO)
}

/// pread(2) from `file` at `offset` straight into `dst` (guest memory), as vm-memory's
/// `ReadVolatile` does read(2): no bounce buffer, so the request path allocates nothing
/// (an allocation on a confined thread can make glibc open files; see daxd_confine). The
/// bytes read are marked dirty for a migration's log.
fn pread_volatile<B: BitmapSlice>(
    file: &File,
    dst: &VolatileSlice<'_, B>,
    offset: u64,
) -> rustix::io::Result<usize> {
    let guard = dst.ptr_guard_mut();
    // SAFETY: the descriptor is the open file `file` borrows; `guard` points to `dst.len()`
    // bytes of mapped memory (a VolatileSlice's invariant) that stay mapped while `dst`'s
    // borrow lives. The kernel writes into them like any other store the guest may race
    // with; no Rust reference to them exists.
    let read = unsafe {
        libc::pread(
            file.as_raw_fd(),
            guard.as_ptr().cast(),
            dst.len(),
            offset as libc::off_t,
        )
    };
    match usize::try_from(read) {
        Ok(read) => {
            dst.bitmap().mark_dirty(0, read);
            Ok(read)
        }
        Err(_) => {
            // A partial read may have happened.
            dst.bitmap().mark_dirty(0, dst.len());
            Err(last_errno())
        }
    }
}

/// pwrite(2) of `src` (guest memory) into `file` at `offset`, without a bounce buffer (see
/// [`pread_volatile`]).
fn pwrite_volatile<B: BitmapSlice>(
    file: &File,
    src: &VolatileSlice<'_, B>,
    offset: u64,
) -> rustix::io::Result<usize> {
    let guard = src.ptr_guard();
    // SAFETY: the descriptor is the open file `file` borrows; `guard` points to `src.len()`
    // bytes of mapped memory that stay mapped while `src`'s borrow lives; the kernel only
    // reads them.
    let written = unsafe {
        libc::pwrite(
            file.as_raw_fd(),
            guard.as_ptr().cast(),
            src.len(),
            offset as libc::off_t,
        )
    };
    usize::try_from(written).map_err(|_| last_errno())
}

/// An I/O error of `what` on the region file of `config`.
fn io_error(config: &RegionConfig, what: &'static str, source: io::Error) -> RegionError {
    RegionError::Io {
        what,
        path: config.path.clone(),
        source,
    }
}

/// Opens the region file, or creates it with `config.size` bytes where it is missing; or
/// opens and claims the block device.
fn open_or_create(config: &RegionConfig) -> Result<(File, RegionKind), RegionError> {
    let path = &config.path;
    let exists = match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() => true,
        Ok(meta) if meta.file_type().is_block_device() => {
            return open_block_device(config, meta.rdev());
        }
        Ok(meta) if meta.file_type().is_char_device() => {
            return open_device_dax(config, meta.rdev());
        }
        Ok(_) => return Err(RegionError::NeitherFileNorBlockDevice { path: path.clone() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_error(config, "inspect", e)),
    };
    if exists {
        let file = open_existing(config, 0).map_err(|e| io_error(config, "open", e))?;
        return Ok((file, RegionKind::File));
    }
    let Some(size) = config.size else {
        return Err(RegionError::MissingFile { path: path.clone() });
    };
    if config.read_only {
        return Err(RegionError::ReadOnlyResize { path: path.clone() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| io_error(config, "create", e))?;
    file.set_len(size)
        .map_err(|e| io_error(config, "size", e))?;
    info!("created region file {} of {size} bytes", path.display());
    Ok((file, RegionKind::File))
}

/// Opens the block device `config.path` (device number `rdev`); a writable one with
/// `O_EXCL`, which claims it: the kernel refuses the open while the device is mounted or
/// claimed, and refuses others' claims while daxd holds it.
fn open_block_device(config: &RegionConfig, rdev: u64) -> Result<(File, RegionKind), RegionError> {
    let path = &config.path;
    if config.resize {
        return Err(RegionError::BlockDeviceResize { path: path.clone() });
    }
    let device =
        BlockDevice::of(rdev).map_err(|e| io_error(config, "read the sysfs facts of", e))?;
    if device.read_only && !config.read_only {
        return Err(RegionError::ReadOnlyDevice { path: path.clone() });
    }
    let claim = if !config.read_only && config.lock {
        libc::O_EXCL
    } else {
        0
    };
    let file = open_existing(config, claim).map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => RegionError::DeviceBusy { path: path.clone() },
        _ => io_error(config, "open", e),
    })?;
    info!(
        "{}: a block device of {} logical and {} physical bytes per block{}",
        path.display(),
        device.logical_block,
        device.physical_block,
        if device.read_only { ", read-only" } else { "" }
    );
    Ok((file, RegionKind::BlockDevice(device)))
}

/// What backs `path` and how large it is, found without claiming, locking or mapping it
/// (for `daxd print-qemu-args`); `None` when nothing is there yet.
pub fn probe(path: &Path) -> Result<Option<(RegionKind, u64)>, RegionError> {
    let config = RegionConfig::new(path, None);
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&config, "inspect", e)),
    };
    let file_type = meta.file_type();
    if meta.is_file() {
        return Ok(Some((RegionKind::File, meta.len())));
    }
    if file_type.is_block_device() {
        let device = BlockDevice::of(meta.rdev())
            .map_err(|e| io_error(&config, "read the sysfs facts of", e))?;
        let file = File::open(path).map_err(|e| io_error(&config, "open", e))?;
        let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
            .map_err(|e| io_error(&config, "find the size of", e.into()))?;
        return Ok(Some((RegionKind::BlockDevice(device), size)));
    }
    if file_type.is_char_device() {
        if let Some(dax) = DeviceDax::of(meta.rdev())
            .map_err(|e| io_error(&config, "read the sysfs facts of", e))?
        {
            return Ok(Some((RegionKind::DeviceDax(dax), dax.size)));
        }
    }
    Err(RegionError::NeitherFileNorBlockDevice {
        path: path.to_owned(),
    })
}

/// Opens what already is at `config.path`, for writing unless the region is read-only,
/// close-on-exec, with the open(2) `flags` besides.
fn open_existing(config: &RegionConfig, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!config.read_only)
        .custom_flags(libc::O_CLOEXEC | flags)
        .open(&config.path)
}

/// Opens the device-DAX device `config.path` (device number `rdev`).
fn open_device_dax(config: &RegionConfig, rdev: u64) -> Result<(File, RegionKind), RegionError> {
    let path = &config.path;
    let dax = DeviceDax::of(rdev)
        .map_err(|e| io_error(config, "read the sysfs facts of", e))?
        .ok_or_else(|| RegionError::NeitherFileNorBlockDevice { path: path.clone() })?;
    if config.resize {
        return Err(RegionError::DeviceDaxResize { path: path.clone() });
    }
    if config.write_path == WritePath::Pwrite {
        return Err(RegionError::DeviceDaxPwrite { path: path.clone() });
    }
    let file = open_existing(config, 0).map_err(|e| io_error(config, "open", e))?;
    info!(
        "{}: a device-DAX device of {} bytes, mapped in {} byte pages",
        path.display(),
        dax.size,
        dax.align
    );
    Ok((file, RegionKind::DeviceDax(dax)))
}

/// How a region's writes become durable: through a synchronous mapping (and its CPU's
/// cache write-back), or its page cache.
fn durability(
    config: &RegionConfig,
    kind: RegionKind,
    map_sync: bool,
    size: u64,
) -> Result<Durability, RegionError> {
    let device_dax = matches!(kind, RegionKind::DeviceDax(_));
    if device_dax && config.flush_path == FlushPath::Fdatasync {
        return Err(RegionError::DeviceDaxFdatasync {
            path: config.path.clone(),
        });
    }
    let synchronous = map_sync || device_dax;
    if !synchronous || config.read_only || config.flush_path == FlushPath::Fdatasync {
        return Ok(Durability::PageCache);
    }
    let Some((how, line)) = CacheWriteBack::detect() else {
        if map_sync && !config.direct && kind == RegionKind::File {
            // A DAX file: fdatasync writes the cache lines back too.
            return Ok(Durability::PageCache);
        }
        return Err(RegionError::NoCacheWriteBack {
            path: config.path.clone(),
            arch: std::env::consts::ARCH,
        });
    };
    info!(
        "{}: a synchronous mapping; a FLUSH writes back the cache lines stored into ({}, {line}-byte lines)",
        config.path.display(),
        how.name()
    );
    Ok(Durability::Synchronous(Synchronous {
        how,
        line,
        dirty: persist::DirtyPages::new(size),
        metadata: Default::default(),
        written_back: Default::default(),
        fdatasyncs: Default::default(),
    }))
}

/// Locks the region file: exclusive when writable, shared when read-only.
fn lock_file(file: &File, config: &RegionConfig) -> Result<(), RegionError> {
    let kind = if config.read_only {
        LockKind::Shared
    } else {
        LockKind::Exclusive
    };
    lock::lock(file, kind).map_err(|e| match e {
        lock::LockError::Conflict(Some(held)) => RegionError::Locked {
            path: config.path.clone(),
            held,
        },
        lock::LockError::Conflict(None) => RegionError::LockedByUnknown {
            path: config.path.clone(),
        },
        lock::LockError::Io(source) => io_error(config, "lock", source),
    })
}

/// The region's size: the file's `size`, which must be the one `config` asks for, unless
/// `config.resize` lets the file be truncated or grown to it.
fn settle_size(file: &File, size: u64, config: &RegionConfig) -> Result<u64, RegionError> {
    let size = match config.size {
        Some(requested) if requested != size => {
            if !config.resize {
                return Err(RegionError::SizeMismatch {
                    path: config.path.clone(),
                    actual: size,
                    requested,
                });
            }
            file.set_len(requested)
                .map_err(|e| io_error(config, "resize", e))?;
            file.sync_all().map_err(|e| io_error(config, "sync", e))?;
            info!(
                "resized region file {} from {size} to {requested} bytes",
                config.path.display()
            );
            requested
        }
        _ => size,
    };
    check_size(size)?;
    Ok(size)
}

fn check_size(size: u64) -> Result<(), RegionError> {
    if size == 0 || size % PAGE_SIZE != 0 || usize::try_from(size).is_err() {
        return Err(RegionError::UnalignedSize(size));
    }
    Ok(())
}

/// Maps the whole file shared. Tries `MAP_SYNC` first: on a DAX file system it makes
/// stores durable without a page cache; elsewhere the kernel refuses it and a normal shared
/// mapping is used, unless `direct` insists on MAP_SYNC.
fn map_file(
    file: &Arc<File>,
    size: u64,
    read_only: bool,
    direct: bool,
) -> Result<(MmapRegion, bool), vm_memory::mmap::MmapRegionError> {
    let map = |prot: i32, flags: i32| {
        MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::from_arc(file.clone(), 0))
            .with_mmap_prot(prot)
            .with_mmap_flags(flags)
            .build()
    };
    if read_only {
        return map(libc::PROT_READ, libc::MAP_SHARED).map(|m| (m, false));
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    match map(prot, libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC) {
        Ok(mapping) => Ok((mapping, true)),
        Err(e) if direct => Err(e),
        Err(_) => map(prot, libc::MAP_SHARED).map(|m| (m, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(path: &Path, size: Option<u64>) -> RegionConfig {
        RegionConfig::new(path.to_owned(), size)
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
    fn writes_into_holes_go_through_pwrite_until_a_granule_is_all_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(1 << 20))).unwrap();
        assert!(region.has_holes(0, 1 << 20), "a new region is sparse");
        // Part of granule 3: written, but the granule still has holes.
        region.write_bytes(200 << 10, &[7; 512]).unwrap();
        assert!(!region.allocation.is_allocated(3));
        // All of granule 4: now known, later stores into it use the mapping.
        region
            .write_bytes(4 * GRANULE, &vec![8; GRANULE as usize])
            .unwrap();
        assert!(region.allocation.is_allocated(4));
        let mut back = [0u8; 512];
        region.read_bytes(200 << 10, &mut back).unwrap();
        assert_eq!(back, [7; 512]);
        // A hole punched into it makes it unknown again.
        region.punch_hole(4 * GRANULE + 4096, 4096).unwrap();
        assert!(!region.allocation.is_allocated(4));

        // Reopened, granules that are all data are found by scanning the file.
        region
            .write_bytes(5 * GRANULE, &vec![9; GRANULE as usize])
            .unwrap();
        drop(region);
        let region = Region::open(&config(&path, None)).unwrap();
        assert!(region.allocation.is_allocated(5));
        assert!(!region.allocation.is_allocated(4));
        assert!(!region.allocation.is_allocated(3));
    }

    #[test]
    fn filled_holes_are_zeroes_with_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(1 << 20))).unwrap();
        region.write_bytes(8192, &[3; 4096]).unwrap();
        region.fill_holes(0, 256 << 10).unwrap();
        assert!(!region.has_holes(0, 256 << 10));
        assert!(region.has_holes(256 << 10, 4096));
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= 256 << 10);
        let mut all = vec![0u8; 256 << 10];
        region.read_bytes(0, &mut all).unwrap();
        assert!(all[..8192].iter().all(|&b| b == 0));
        assert!(all[8192..12288].iter().all(|&b| b == 3), "data was kept");
        assert!(all[12288..].iter().all(|&b| b == 0));
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
    fn the_shareable_descriptor_does_not_keep_the_lock() {
        // A VMM that was handed the shareable descriptor (SHMEM_MAP) may keep it, or a
        // mapping through it, long after daxd is gone; the next daxd must still start.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let region = Region::open(&config(&path, Some(PAGE_SIZE))).unwrap();
        let held_by_vmm = region.shareable_file().try_clone().unwrap();
        assert!(matches!(
            Region::open(&config(&path, None)),
            Err(RegionError::Locked {
                held: LockKind::Exclusive,
                ..
            })
        ));
        drop(region);
        Region::open(&config(&path, None)).expect("a descriptor held elsewhere kept the lock");
        drop(held_by_vmm);
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

    /// A region opened as if its mapping were synchronous (these machines have no DAX
    /// file system): its FLUSHes take the cache write-back path, on a page cache's pages,
    /// where the instructions work just as well.
    fn synchronous(path: &Path, size: u64) -> Region {
        let cfg = config(path, Some(size));
        let mut region = Region::open(&cfg).unwrap();
        region.durability = durability(&cfg, RegionKind::File, true, size).unwrap();
        region
    }

    #[test]
    fn a_synchronous_flush_writes_back_the_pages_stored_into_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        // Allocated first, so that stores go through the mapping.
        std::fs::write(&path, vec![1u8; 16 * PAGE_SIZE as usize]).unwrap();
        let region = synchronous(&path, 16 * PAGE_SIZE);
        assert!(region.cache_write_back().is_some());
        region.write_bytes(0, &[2; 10]).unwrap();
        region.write_bytes(5 * PAGE_SIZE - 1, &[3; 2]).unwrap(); // pages 4 and 5
        region.write_bytes(9 * PAGE_SIZE, &[4; 4096]).unwrap();
        region.flush_after_writes(10 + 2 + 4096).unwrap();
        let stats = region.write_back_stats();
        assert_eq!(
            stats,
            WriteBackStats {
                bytes: 4 * PAGE_SIZE,
                fdatasyncs: 0
            }
        );
        // Nothing stored since: nothing written back, no system call.
        region.flush_after_writes(0).unwrap();
        assert_eq!(region.write_back_stats(), stats);
        let mut back = [0u8; 2];
        region.read_bytes(5 * PAGE_SIZE - 1, &mut back).unwrap();
        assert_eq!(back, [3, 3]);
    }

    #[test]
    fn a_synchronous_flush_syncs_the_file_after_a_system_call_changed_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        // Sparse: the first write into a hole goes through pwrite(2).
        let region = synchronous(&path, 64 * PAGE_SIZE);
        region.write_bytes(0, &[5; 4096]).unwrap();
        region.flush_after_writes(4096).unwrap();
        assert_eq!(region.write_back_stats().fdatasyncs, 1);
        region.flush_after_writes(0).unwrap();
        assert_eq!(
            region.write_back_stats().fdatasyncs,
            1,
            "nothing changed since"
        );
        region.punch_hole(0, 4096).unwrap();
        region.flush_after_writes(0).unwrap();
        assert_eq!(region.write_back_stats().fdatasyncs, 2);
        // A window's FLUSH covers a guest's stores, which only the kernel tracks on a DAX
        // file system: always an fdatasync.
        region.flush_window(0, 2 << 20).unwrap();
        assert_eq!(region.write_back_stats().fdatasyncs, 3);
    }

    #[test]
    fn flush_path_fdatasync_takes_the_kernels_path_where_there_is_one() {
        let mut cfg = config(Path::new("/pmem/r.img"), Some(1 << 20));
        cfg.flush_path = FlushPath::Fdatasync;
        assert!(matches!(
            durability(&cfg, RegionKind::File, true, 1 << 20),
            Ok(Durability::PageCache)
        ));
        let dax = RegionKind::DeviceDax(DeviceDax {
            size: 2 << 20,
            align: 2 << 20,
        });
        let err = durability(&cfg, dax, true, 2 << 20).unwrap_err();
        assert!(
            matches!(err, RegionError::DeviceDaxFdatasync { .. }),
            "{err}"
        );
        cfg.flush_path = FlushPath::Auto;
        assert!(matches!(
            durability(&cfg, dax, true, 2 << 20),
            Ok(Durability::Synchronous(_))
        ));
        // Without MAP_SYNC a file has a page cache, whatever the flag.
        assert!(matches!(
            durability(&cfg, RegionKind::File, false, 1 << 20),
            Ok(Durability::PageCache)
        ));
    }

    #[test]
    fn a_page_cache_region_has_no_cache_write_back() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region::open(&config(&dir.path().join("r.img"), Some(PAGE_SIZE))).unwrap();
        if !region.is_map_sync() {
            assert!(region.cache_write_back().is_none());
            region.write_bytes(0, &[1; 8]).unwrap();
            region.flush().unwrap();
            assert_eq!(region.write_back_stats(), WriteBackStats::default());
        }
    }

    #[test]
    fn a_character_device_that_is_not_device_dax_is_refused() {
        let err = Region::open(&config(Path::new("/dev/null"), None)).unwrap_err();
        assert!(
            matches!(err, RegionError::NeitherFileNorBlockDevice { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("device-DAX"), "{err}");
    }
}
