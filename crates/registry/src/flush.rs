//! Dirty and flush epochs: a page daxd writes carries the epoch it was written in, and a
//! completed flush cleans the pages of the epochs before it began.

use std::sync::atomic::Ordering;

use crate::frames::{chunk_parts, FrameRange};
use crate::Registry;

/// A flush in progress: writes marked dirty before it began are clean once it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket(pub(crate) u32);

/// `a <= b` in serial-number arithmetic, so epochs keep working when u32 wraps.
pub(crate) fn epoch_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < (1 << 31)
}

pub(crate) fn next_epoch(e: u32) -> u32 {
    match e.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

impl Registry {
    /// Records that daxd wrote `frames` (blk writes into a visible range). Lock-free.
    pub fn mark_dirty(&self, frames: FrameRange) {
        if !self.may_be_visible(frames) {
            return;
        }
        // Read after the data was written: a flush that began before this load covers it.
        let epoch = self.epoch.load(Ordering::SeqCst);
        for (i, range) in chunk_parts(frames) {
            if let Some(chunk) = &*self.slots[i].load() {
                chunk.mark_dirty(range, epoch);
            }
        }
    }

    /// Runs `flush` (which makes the file durable) as a flush of the registry: the pages
    /// dirtied before it began are clean once it succeeded. The one way the devices
    /// flush.
    pub fn flushing<E>(&self, flush: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let ticket = self.flush_begin();
        flush()?;
        self.flush_complete(ticket);
        Ok(())
    }

    /// Starts a flush: everything marked dirty so far belongs to its epoch.
    pub fn flush_begin(&self) -> FlushTicket {
        let previous = self
            .epoch
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |e| Some(next_epoch(e)))
            .unwrap_or_else(|e| e);
        FlushTicket(previous)
    }

    /// The flush made everything written before it durable: those pages are clean.
    pub fn flush_complete(&self, ticket: FlushTicket) {
        let mut inner = self.lock();
        for &i in &inner.chunks {
            let Some(chunk) = self.slots[i].load_full() else {
                continue;
            };
            if chunk.dirty.load(Ordering::Acquire) == 0 {
                continue;
            }
            for d in chunk.descs.iter() {
                let e = d.dirty_epoch.load(Ordering::Acquire);
                // A page written again meanwhile carries a newer epoch and stays dirty.
                if e != 0
                    && epoch_le(e, ticket.0)
                    && d.dirty_epoch
                        .compare_exchange(e, 0, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    chunk.dirty.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
        if inner.last_flushed == 0 || epoch_le(inner.last_flushed, ticket.0) {
            inner.last_flushed = ticket.0;
        }
    }
}
