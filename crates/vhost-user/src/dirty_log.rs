//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL`, `LOG_SHMFD`): while the
//! frontend migrates the guest, every page daxd writes (data of a read, status bytes,
//! GET_ID strings, used-ring entries and event indexes) must be marked in the log the
//! frontend shares, or the destination gets a stale copy of it.
//!
//! Every write into guest memory goes through vm-memory's `VolatileSlice`, which marks its
//! range in the bitmap of the region it belongs to; [`DirtyLog`] is that bitmap. The
//! handler attaches the frontend's log to each region (`SET_LOG_BASE`, and any memory
//! mapped while it is on) and detaches it when the frontend acks features without
//! `LOG_ALL` again.
//!
//! vhost-user-backend's own `BitmapMmapRegion` does the same with an `Arc` clone for every
//! slice and a lock for every mark; here a slice ([`DirtyLogSlice`]) borrows the region's
//! bitmap, and a mark with no log attached is one relaxed load inlined into the copy, so
//! that the request path costs what it did without logging (the hot-path bench, when it
//! could still run on plain memory: under callgrind, 0.7 % more instructions with this
//! bitmap than with none; with vm-memory's generic `RefSlice` and an out-of-line mark it
//! was 2.4 %).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;

/// Guest memory as daxd's backends see it: mmapped regions, each with a [`DirtyLog`].
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyLog>;

/// A vring over that memory.
pub type Vring = vhost_user_backend::VringRwLock<vm_memory::GuestMemoryAtomic<GuestMemory>>;

/// A vring's state over that memory.
pub type VringState = vhost_user_backend::VringState<vm_memory::GuestMemoryAtomic<GuestMemory>>;

/// One guest memory region's view of the frontend's dirty log (none attached: writes are
/// not logged). Clones share it (vhost-user-backend requires `Clone`).
#[derive(Debug, Default, Clone)]
pub struct DirtyLog(Arc<Attached>);

#[derive(Debug, Default)]
struct Attached {
    /// Whether `log` holds a log: read without the lock on every write.
    active: AtomicBool,
    log: RwLock<Option<AtomicBitmapMmap>>,
}

impl DirtyLog {
    fn set(&self, log: Option<AtomicBitmapMmap>) {
        let mut current = self.0.log.write().unwrap_or_else(|e| e.into_inner());
        self.0.active.store(log.is_some(), Ordering::Release);
        *current = log;
    }
}

impl Attached {
    /// What a write costs while no log is attached: one load, inlined into every copy
    /// into guest memory.
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.active.load(Ordering::Relaxed) {
            self.mark_dirty_in_log(offset, len);
        }
    }

    #[cold]
    #[inline(never)]
    fn mark_dirty_in_log(&self, offset: usize, len: usize) {
        if let Some(log) = &*self.log.read().unwrap_or_else(|e| e.into_inner()) {
            log.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|log| log.dirty_at(offset))
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = DirtyLogSlice<'a>;
}

impl Bitmap for DirtyLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.0.mark_dirty(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.dirty_at(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> DirtyLogSlice<'_> {
        DirtyLogSlice {
            log: &self.0,
            offset,
        }
    }
}

/// The part of a region's [`DirtyLog`] from `offset` on, as a `VolatileSlice` of guest
/// memory carries it: a borrow, where vhost-user-backend's bitmap slices clone an `Arc`.
#[derive(Debug, Clone, Copy)]
pub struct DirtyLogSlice<'a> {
    log: &'a Attached,
    offset: usize,
}

impl WithBitmapSlice<'_> for DirtyLogSlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtyLogSlice<'_> {}

impl Bitmap for DirtyLogSlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // Wrapping as vm-memory's own slices do: offsets come from accesses already
        // checked against the slice, and an overflow could only mark a page too many.
        self.log.mark_dirty(self.offset.wrapping_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.dirty_at(self.offset.wrapping_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        DirtyLogSlice {
            log: self.log,
            offset: self.offset.wrapping_add(offset),
        }
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        DirtyLog::default()
    }
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = AtomicBitmapMmap;

    fn replace(&self, log: AtomicBitmapMmap) {
        self.set(Some(log));
    }

    fn clear(&self) {
        self.set(None);
    }
}
