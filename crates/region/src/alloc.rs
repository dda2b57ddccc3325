//! Which parts of the region file surely hold data, so that a store through the mapping
//! never lands in a hole when the host file system is full: such a store would fault
//! (SIGBUS) instead of failing. Tracked per [`GRANULE`] (one bit per 64 KiB, 2 KiB per
//! GiB of region; no per-page bookkeeping). Writes into a granule that is not known to be
//! data go through pwrite(2), which fails cleanly with ENOSPC; a granule becomes known once
//! SEEK_HOLE finds no hole in it, and is forgotten when a hole is punched or a range is
//! zeroed in it.
//!
//! Granules are allocated by writing them, not with `fallocate`: blocks allocated but not
//! written are unwritten extents, which SEEK_DATA reports as holes, so the scan at the next
//! start would not find them again.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::SeekFrom;

/// Bytes per tracked granule.
pub const GRANULE: u64 = 64 << 10;

#[derive(Debug)]
pub(crate) struct Allocation {
    bits: Box<[AtomicU64]>,
}

impl Allocation {
    /// Tracking for a file of `size` bytes, starting from what is allocated already.
    pub(crate) fn scan(file: &File, size: u64) -> Allocation {
        let granules = size.div_ceil(GRANULE);
        let allocation = Allocation {
            bits: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        };
        // Data runs of the file: every granule wholly inside one is allocated.
        let mut at = 0;
        while at < size {
            let Ok(data) = rustix::fs::seek(file, SeekFrom::Data(at)) else {
                break; // ENXIO: only hole from here on.
            };
            let hole = rustix::fs::seek(file, SeekFrom::Hole(data)).unwrap_or(size);
            // Data up to the end of the file covers the last, partial granule too.
            let end = if hole >= size {
                size.next_multiple_of(GRANULE)
            } else {
                hole
            };
            allocation.mark(data, end);
            at = hole.max(data + 1);
        }
        allocation
    }

    /// Tracking for memory of `size` bytes, which has no holes (device-DAX).
    pub(crate) fn full(size: u64) -> Allocation {
        let granules = size.div_ceil(GRANULE);
        Allocation {
            bits: (0..granules.div_ceil(64))
                .map(|_| AtomicU64::new(u64::MAX))
                .collect(),
        }
    }

    /// Granules wholly inside `start..end`.
    fn whole(start: u64, end: u64) -> std::ops::Range<u64> {
        let first = start.div_ceil(GRANULE);
        let last = end / GRANULE;
        first..last.max(first)
    }

    /// Granules touching `offset..offset+len`.
    pub(crate) fn touched(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / GRANULE..(offset + len - 1) / GRANULE + 1
    }

    /// Records that the granules wholly inside `start..end` have blocks.
    pub(crate) fn mark(&self, start: u64, end: u64) {
        for granule in Self::whole(start, end) {
            self.set(granule, true);
        }
    }

    /// Whether every granule touching `offset..offset+len` is known to be data.
    pub(crate) fn covers(&self, offset: u64, len: u64) -> bool {
        Self::touched(offset, len).all(|g| self.is_allocated(g))
    }

    pub(crate) fn is_allocated(&self, granule: u64) -> bool {
        self.bits
            .get((granule / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (granule % 64)) != 0)
    }

    pub(crate) fn set(&self, granule: u64, allocated: bool) {
        if let Some(word) = self.bits.get((granule / 64) as usize) {
            let bit = 1 << (granule % 64);
            if allocated {
                word.fetch_or(bit, Ordering::AcqRel);
            } else {
                word.fetch_and(!bit, Ordering::AcqRel);
            }
        }
    }
}
