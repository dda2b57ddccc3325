//! Page frames of the region and how they fall into descriptor chunks.

use serde::{Deserialize, Serialize};

/// Frames per descriptor chunk: 2 MiB of region, the alignment of pmem windows.
pub const CHUNK_FRAMES: u64 = 512;

/// A half-open range of page frames `[start, end)` of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrameRange {
    pub start: u64,
    pub end: u64,
}

impl FrameRange {
    /// Page frames touched by `len` bytes at `offset`; empty when `len` is 0.
    pub fn covering(offset: u64, len: u64) -> FrameRange {
        let start = offset >> daxd_region::PAGE_SHIFT;
        if len == 0 {
            return FrameRange { start, end: start };
        }
        // Callers pass ranges already checked against the region, so this cannot overflow.
        FrameRange {
            start,
            end: (offset + len - 1) / daxd_region::PAGE_SIZE + 1,
        }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
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

/// The chunk index of `frame` and its index in the chunk.
pub(crate) fn split(frame: u64) -> (usize, usize) {
    (
        (frame / CHUNK_FRAMES) as usize,
        (frame % CHUNK_FRAMES) as usize,
    )
}

/// The per-chunk parts of `frames`: (chunk index, descriptor indices in the chunk).
pub(crate) fn chunk_parts(
    frames: FrameRange,
) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
    let mut at = frames.start;
    std::iter::from_fn(move || {
        if at >= frames.end {
            return None;
        }
        let (chunk, first) = split(at);
        let end = ((at / CHUNK_FRAMES + 1) * CHUNK_FRAMES).min(frames.end);
        let part = (chunk, first..first + (end - at) as usize);
        at = end;
        Some(part)
    })
}
