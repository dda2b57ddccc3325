//! Pins: the guest-visible frames under a request's buffers, held while it runs, so that
//! a layout change under them is refused. Lock-free and allocation-free once a worker's
//! [`PinSet`] has grown.

use std::borrow::BorrowMut;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::chunk::Chunk;
use crate::frames::{chunk_parts, FrameRange, CHUNK_FRAMES};
use crate::Registry;

/// One pinned run of frames, inside one chunk.
#[derive(Debug)]
struct PinnedPart {
    chunk: Arc<Chunk>,
    range: std::ops::Range<usize>,
    first_frame: u64,
}

/// The pins of one request. Kept by each queue worker and reused, so pinning allocates
/// nothing once it has grown; fill it through a [`Pins`] guard.
#[derive(Debug, Default)]
pub struct PinSet {
    parts: Vec<PinnedPart>,
}

/// Pins taken for one request; all released when the guard drops. `S` is the [`PinSet`]
/// it fills: a queue worker's own, borrowed (`&mut PinSet`), or an owned one.
#[must_use]
#[derive(Debug)]
pub struct Pins<'a, S: BorrowMut<PinSet>> {
    registry: &'a Registry,
    set: S,
}

impl<S: BorrowMut<PinSet>> Pins<'_, S> {
    /// Pins the frames of `frames` that have descriptors (guest-visible ones): layout
    /// changes of them are refused until the guard drops. Lock-free unless a chunk is
    /// being freed at that moment.
    pub fn pin(&mut self, frames: FrameRange) {
        self.registry.pin_into(frames, self.set.borrow_mut());
    }

    /// The frames pinned so far (the visible part of what was asked).
    pub fn frames(&self) -> impl Iterator<Item = FrameRange> + '_ {
        self.set.borrow().parts.iter().map(|p| FrameRange {
            start: p.first_frame,
            end: p.first_frame + p.range.len() as u64,
        })
    }
}

impl<S: BorrowMut<PinSet>> Drop for Pins<'_, S> {
    fn drop(&mut self) {
        for part in self.set.borrow_mut().parts.drain(..) {
            for d in &part.chunk.descs[part.range.clone()] {
                d.pin_count.fetch_sub(1, Ordering::AcqRel);
            }
            if part.chunk.release() {
                self.registry.prune_released(part.first_frame);
            }
        }
    }
}

impl Registry {
    /// A guard for the pins of one request, kept in `set`; every pin taken through it is
    /// released when it drops.
    pub fn pins<S: BorrowMut<PinSet>>(&self, set: S) -> Pins<'_, S> {
        debug_assert!(set.borrow().parts.is_empty());
        Pins {
            registry: self,
            set,
        }
    }

    fn pin_into(&self, frames: FrameRange, set: &mut PinSet) {
        if !self.may_be_visible(frames) {
            return;
        }
        for (i, range) in chunk_parts(frames) {
            let Some(chunk) = self.slots[i].load_full() else {
                continue;
            };
            let chunk = if chunk.acquire() {
                chunk
            } else {
                // Being freed, so nothing in it is mapped; a new chunk may already have
                // taken its place under the mutex.
                let _inner = self.lock();
                match self.slots[i].load_full() {
                    Some(chunk) if chunk.acquire() => chunk,
                    _ => continue,
                }
            };
            if pin_runs(&chunk, i, range, set) {
                self.prune_released(i as u64 * CHUNK_FRAMES);
            }
        }
    }
}

/// Pins the runs of frames in `range` of chunk `i` that have descriptors; `chunk` has
/// been acquired once for this call, and each run beyond the first acquires it again.
/// Returns true if nothing was pinned and dropping that first acquisition left a chunk
/// waiting to be freed.
fn pin_runs(chunk: &Arc<Chunk>, i: usize, range: std::ops::Range<usize>, set: &mut PinSet) -> bool {
    let first_frame = |at: usize| i as u64 * CHUNK_FRAMES + at as u64;
    let mut run: Option<usize> = None;
    let mut pinned_runs = 0;
    let mut push = |start: usize, end: usize, set: &mut PinSet| {
        if pinned_runs > 0 && !chunk.acquire() {
            return;
        }
        for d in &chunk.descs[start..end] {
            d.pin_count.fetch_add(1, Ordering::AcqRel);
        }
        set.parts.push(PinnedPart {
            chunk: chunk.clone(),
            range: start..end,
            first_frame: first_frame(start),
        });
        pinned_runs += 1;
    };
    for at in range.clone() {
        match (chunk.descs[at].exists(), run) {
            (true, None) => run = Some(at),
            (false, Some(start)) => {
                push(start, at, set);
                run = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run {
        push(start, range.end, set);
    }
    pinned_runs == 0 && chunk.release()
}
