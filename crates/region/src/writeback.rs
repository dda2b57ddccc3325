//! Which path a write into allocated blocks takes: a store through the shared mapping, or
//! pwrite(2) from guest memory.
//!
//! A store through the mapping costs no system call, but only where the page is resident
//! and its page-table entry writable, that is, already dirty since it was last written
//! back. Otherwise it faults: after every `fdatasync` each page written back is
//! write-protected again (a fault per 4 KiB page on its next store), a page not in the
//! page cache is read from the disk before the store (a synchronous read a full-page
//! pwrite(2) does not need), and the store dirties the whole folio it lands in, which
//! write-back then writes whole: ext4 and XFS track dirt per block only for write(2). A
//! file written with large buffered writes (an image copied in with `cp` or `qemu-img
//! convert`) sits in folios of up to 2 MiB, so a 4 KiB write and a FLUSH write back up to
//! 512 times what was written (16-19 times on average in daxd-bench).
//!
//! So the mapping pays where writes come back to pages they dirtied since the last flush
//! (no FLUSH, or the same blocks rewritten between FLUSHes), and pwrite(2) pays where
//! FLUSHes clean what writes touch. Flushes tell which: just before a disk's `fdatasync`,
//! at most once per [`LOOK_EVERY`], `cachestat(2)` counts the file's dirty pages, and
//! their ratio to the bytes written since the previous flush decides: at least
//! [`TO_PWRITE`] (each write found a clean page, or dirtied more than it wrote) turns
//! writes to pwrite(2), below [`TO_MAP`] (pages rewritten several times between
//! flushes) back to the mapping. Without FLUSHes nothing changes: writes stay on the
//! mapping, where they stay dirty. cachestat(2) walks every cached page of the file
//! (about 2 ns each: 0.5 ms for 1 GiB cached, which at every FLUSH took two thirds of
//! daxd's CPU in daxd-bench), hence the interval.
//!
//! Both paths write the same page cache, so reads through the mapping, guest DAX windows
//! and the registry see every write at once, and one `fdatasync` makes both durable.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use log::{debug, info};

/// Dirty bytes per byte written at flushes from which writes go through pwrite(2), in
/// sixteenths: a half (every other write found a clean page).
pub const TO_PWRITE: u64 = 8;

/// Dirty bytes per byte written at flushes below which writes go through the mapping, in
/// sixteenths: a quarter (pages rewritten four times between flushes).
pub const TO_MAP: u64 = 4;

/// How often a flush looks at the page cache.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub(crate) struct WriteBack {
    /// Bytes per page, looked up before the process confines itself (rustix reads it
    /// from the auxiliary vector with prctl(2) the first time).
    page_size: u64,
    /// `WritePath::Auto`: flushes look at what writes dirtied.
    watch: bool,
    /// Writes into allocated blocks go through pwrite(2).
    pwrite: AtomicBool,
    /// The kernel has no cachestat(2) (before Linux 6.5): nothing to look at.
    no_cachestat: AtomicBool,
    /// How often the path changed.
    changes: AtomicU64,
    /// When a flush last looked at the page cache.
    looked: Mutex<Option<Instant>>,
}

/// `struct cachestat_range` of linux/mman.h.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of linux/mman.h, in pages.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The same on every architecture (it came after the syscall tables were unified).
const SYS_CACHESTAT: libc::c_long = 451;

/// Pages of `file` dirty in the page cache, or `None` where cachestat(2) is missing.
fn dirty_pages(file: &File) -> Option<u64> {
    // The whole file: len 0 means to its end.
    let range = CachestatRange { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: cachestat(2) reads `range` and writes `stat`, both live and of the layout
    // the kernel expects (linux/mman.h); flags must be 0. It touches no other memory.
    let done = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    (done == 0).then_some(stat.nr_dirty)
}

/// How writes into allocated blocks reach the file (`--write-path`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WritePath {
    /// Whichever flushes show to be cheaper (see the module's documentation); the
    /// mapping to start with.
    #[default]
    Auto,
    /// Always stores through the mapping.
    Map,
    /// Always pwrite(2).
    Pwrite,
}

impl WriteBack {
    pub(crate) fn new(path: WritePath) -> WriteBack {
        WriteBack {
            page_size: rustix::param::page_size() as u64,
            watch: path == WritePath::Auto,
            pwrite: AtomicBool::new(path == WritePath::Pwrite),
            no_cachestat: AtomicBool::new(false),
            looked: Mutex::new(None),
            changes: AtomicU64::new(0),
        }
    }

    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub(crate) fn writes_pwrite(&self) -> bool {
        self.pwrite.load(Ordering::Relaxed)
    }

    /// Looks at what `written` bytes of writes since the last flush left dirty in `file`,
    /// just before the flush, and picks the path for the writes to come.
    pub(crate) fn before_flush(&self, file: &File, path: &std::path::Path, written: u64) {
        if !self.watch || written == 0 || self.no_cachestat.load(Ordering::Relaxed) {
            return;
        }
        // Another flush (a queue worker's, without a flusher thread) is looking already.
        let Ok(mut looked) = self.looked.try_lock() else {
            return;
        };
        let now = Instant::now();
        if looked.is_some_and(|at| now.duration_since(at) < LOOK_EVERY) {
            return;
        }
        *looked = Some(now);
        drop(looked);
        let Some(dirty) = dirty_pages(file).map(|pages| pages * self.page_size) else {
            self.no_cachestat.store(true, Ordering::Relaxed);
            info!(
                "{}: cachestat(2) is not available (Linux 6.5 or later has it): writes stay \
                 on the mapping, even where FLUSHes make pwrite(2) cheaper",
                path.display()
            );
            return;
        };
        if self.observe(written, dirty) {
            debug!(
                "{}: {written} bytes written since the last flush left {dirty} bytes dirty: \
                 writes go through {} from now on",
                path.display(),
                if self.writes_pwrite() {
                    "pwrite(2)"
                } else {
                    "the mapping"
                }
            );
        }
    }

    /// Picks the path after `written` bytes of writes left `dirty` bytes dirty; whether
    /// that changed it.
    fn observe(&self, written: u64, dirty: u64) -> bool {
        let sixteenths = dirty.saturating_mul(16) / written.max(1);
        let was = self.writes_pwrite();
        let now = if sixteenths >= TO_PWRITE {
            true
        } else if sixteenths < TO_MAP {
            false
        } else {
            was
        };
        self.pwrite.store(now, Ordering::Relaxed);
        if now != was {
            self.changes.fetch_add(1, Ordering::Relaxed);
        }
        now != was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_that_clean_what_writes_touch_turn_writes_to_pwrite() {
        // A database's commit into a copied image: 4 KiB written, one 64 KiB folio dirty.
        let writeback = WriteBack::new(WritePath::Auto);
        assert!(writeback.observe(4096, 65536));
        assert!(writeback.writes_pwrite());
        // Small folios, each write into a page clean since the last flush: pwrite too.
        let writeback = WriteBack::new(WritePath::Auto);
        assert!(writeback.observe(16 * 4096, 16 * 4096));
        assert!(writeback.writes_pwrite());
    }

    #[test]
    fn pages_rewritten_between_flushes_keep_writes_on_the_mapping() {
        // 128 writes of 4 KiB into the same 16 pages between flushes.
        let writeback = WriteBack::new(WritePath::Auto);
        assert!(!writeback.observe(128 * 4096, 16 * 4096));
        assert!(!writeback.writes_pwrite());
        // Then the workload changes, and changes back.
        assert!(writeback.observe(4096, 4096));
        assert!(writeback.writes_pwrite());
        assert!(writeback.observe(128 * 4096, 16 * 4096));
        assert!(!writeback.writes_pwrite());
        assert_eq!(writeback.changes(), 2);
        // Between the two thresholds the path stays as it is.
        assert!(!writeback.observe(64 * 4096, 24 * 4096));
        assert!(!writeback.writes_pwrite());
        writeback.observe(4096, 4096);
        assert!(!writeback.observe(64 * 4096, 24 * 4096));
        assert!(writeback.writes_pwrite());
    }

    #[test]
    fn flushes_look_at_most_once_per_interval() {
        let writeback = WriteBack::new(WritePath::Auto);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 1 << 20]).unwrap();
        let file = File::options().write(true).open(&path).unwrap();
        // Nothing dirty after 1 MiB written: pages rewritten, the mapping.
        rustix::fs::fsync(&file).unwrap();
        writeback.before_flush(&file, &path, 1 << 20);
        assert!(!writeback.writes_pwrite());
        // 1 MiB dirty after 4 KiB written, but within the interval: not looked at.
        rustix::io::pwrite(&file, &vec![2u8; 1 << 20], 0).unwrap();
        writeback.before_flush(&file, &path, 4096);
        assert!(!writeback.writes_pwrite());
        *writeback.looked.lock().unwrap() = Some(Instant::now() - LOOK_EVERY);
        writeback.before_flush(&file, &path, 4096);
        if has_cachestat() {
            assert!(writeback.writes_pwrite(), "1 MiB dirty after 4 KiB written");
        } else {
            // Before Linux 6.5: nothing to look at, the path stays and later flushes
            // no longer try.
            assert!(writeback.no_cachestat.load(Ordering::Relaxed));
            assert!(!writeback.writes_pwrite());
        }
    }

    /// Whether the running kernel is Linux 6.5 or later, which has cachestat(2).
    fn has_cachestat() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let major = numbers.next().unwrap_or(0);
        let minor = numbers.next().unwrap_or(0);
        (major, minor) >= (6, 5)
    }

    #[test]
    fn the_fixed_paths_do_not_turn() {
        assert!(WriteBack::new(WritePath::Pwrite).writes_pwrite());
        let map = WriteBack::new(WritePath::Map);
        let file = tempfile::tempfile().unwrap();
        map.before_flush(&file, std::path::Path::new("x"), 1 << 30);
        assert!(!map.writes_pwrite());
    }
}
