//! Descriptors and the chunks that hold them: 16 bytes a page, allocated 512 at a time
//! (2 MiB of region), changed with atomics only on the queue workers' paths.

use crate::frames::CHUNK_FRAMES;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// One guest-visible page frame, as [`Registry::descriptor`](crate::Registry::descriptor) reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageDescriptor {
    /// Mappings covering the page (aliases of the same file page count once each).
    pub map_count: u16,
    /// Bit flags, see [`PageDescriptor::WRITABLE`].
    pub state: u8,
    /// In-flight requests whose buffers are in this page.
    pub pin_count: u32,
    /// Flush epoch in which daxd last wrote the page; 0 while clean.
    pub dirty_epoch: u32,
    /// The set of mappings covering the page (reverse map), see [`Registry::rmap`](crate::Registry::rmap).
    pub rmap: u32,
}

impl PageDescriptor {
    /// At least one covering mapping is writable.
    pub const WRITABLE: u8 = 1;
}

/// The stored descriptor: 16 bytes, as Linux's `struct page` is 64. Every field is an
/// atomic because queue workers change pin counts and dirty epochs without the registry's
/// lock; the other fields change only under it.
#[derive(Debug, Default)]
#[repr(C)]
pub(crate) struct Descriptor {
    pub(crate) map_count: AtomicU16,
    pub(crate) state: AtomicU8,
    pub(crate) _reserved: u8,
    pub(crate) pin_count: AtomicU32,
    pub(crate) dirty_epoch: AtomicU32,
    pub(crate) rmap: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == 16);

impl Descriptor {
    pub(crate) fn read(&self) -> PageDescriptor {
        PageDescriptor {
            map_count: self.map_count.load(Ordering::Relaxed),
            state: self.state.load(Ordering::Relaxed),
            pin_count: self.pin_count.load(Ordering::Acquire),
            dirty_epoch: self.dirty_epoch.load(Ordering::Acquire),
            rmap: self.rmap.load(Ordering::Relaxed),
        }
    }

    /// Whether the frame has a descriptor: mapped, or pinned by in-flight I/O.
    pub(crate) fn exists(&self) -> bool {
        self.map_count.load(Ordering::Relaxed) > 0 || self.pin_count.load(Ordering::Acquire) > 0
    }
}

/// Set in [`Chunk::pins`] once the chunk is being freed: no pin may take it.
pub(crate) const RETIRED: u64 = 1 << 63;

/// The descriptors of [`CHUNK_FRAMES`] consecutive frames.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) descs: Box<[Descriptor]>,
    /// Pins holding the chunk (one per pinned run), or [`RETIRED`].
    pub(crate) pins: AtomicU64,
    /// Descriptors with a dirty epoch, so that a flush skips clean chunks.
    pub(crate) dirty: AtomicU64,
    /// The chunk lost its last mapping while pinned: the last pin to go frees it.
    pub(crate) needs_prune: AtomicBool,
}

impl Chunk {
    pub(crate) fn new() -> Chunk {
        Chunk {
            descs: (0..CHUNK_FRAMES).map(|_| Descriptor::default()).collect(),
            pins: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            needs_prune: AtomicBool::new(false),
        }
    }

    /// Counts a pin, unless the chunk is retired.
    pub(crate) fn acquire(&self) -> bool {
        self.pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |pins| {
                (pins & RETIRED == 0).then_some(pins + 1)
            })
            .is_ok()
    }

    /// Drops a pin; true if it was the last and the chunk waits to be freed.
    pub(crate) fn release(&self) -> bool {
        self.pins.fetch_sub(1, Ordering::SeqCst) == 1 && self.needs_prune.load(Ordering::SeqCst)
    }

    /// Retires the chunk if no pin holds it.
    pub(crate) fn retire(&self) -> bool {
        self.pins
            .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    pub(crate) fn mark_dirty(&self, range: std::ops::Range<usize>, epoch: u32) {
        for d in &self.descs[range] {
            if d.exists() && d.dirty_epoch.swap(epoch, Ordering::AcqRel) == 0 {
                self.dirty.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}
