//! The page-descriptor registry: host-side bookkeeping for every page of the region that a
//! guest can reach through its MMU.
//!
//! Linux gives persistent memory `struct page`s (ZONE_DEVICE) because pages mapped into
//! address spaces need map counts, pins and layout locks; pages touched only by block I/O
//! do not. daxd follows the same rule: a page frame has a descriptor only while a
//! guest-visible mapping covers it (or in-flight I/O still pins it after its mapping
//! went), keyed by region page frame so that aliased mappings of the same file pages share
//! one descriptor. Like Linux's sparse memory model, descriptors are allocated in chunks
//! of [`CHUNK_FRAMES`] frames (2 MiB of region, 8 KiB of descriptors): a chunk exists while
//! any of its frames has a descriptor, and the region keeps one pointer per chunk.
//!
//! Two kinds of callers, two kinds of paths. Mapping, unmapping, layout changes, flush
//! completion and snapshots are rare and serialise on one mutex. Queue workers pin guest
//! buffers and mark written pages dirty on every request that touches guest-visible
//! pages: those paths take no lock and allocate nothing; they find a chunk through its
//! slot and change only atomics in it. A chunk is freed only after it is *retired*, which
//! succeeds only while no pin holds it, so a pin can always release what it took.

mod chunk;
mod flush;
mod frames;
mod pins;
mod rmap;
mod snapshot;

pub use chunk::PageDescriptor;
use chunk::{Chunk, Descriptor};
pub use flush::FlushTicket;
use frames::{chunk_parts, split};
pub use frames::{FrameRange, CHUNK_FRAMES};
pub use pins::{PinSet, Pins};
pub use snapshot::{BusySnapshot, MappingSnapshot, SectionSnapshot, Snapshot};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use rmap::RmapSets;

/// Identifies one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MappingId(pub u32);

/// The party that created mappings (a vhost-user connection, a device instance): when it
/// goes away, all its mappings go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OwnerId(pub u64);

/// Where the guest sees the pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Mapped by the VMM into guest physical memory at `gpa` (a memory-backend-file
    /// window that daxd found in a vhost-user memory table).
    GuestPhysical { gpa: u64 },
    /// Mapped by daxd into a virtio shared-memory region (VHOST_USER_BACKEND_SHMEM_MAP).
    SharedMemory { shmid: u8, offset: u64 },
}

/// What a new mapping covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRequest {
    /// The device the mapping belongs to (e.g. "virtio-pmem", "vhost-user-blk memory table").
    pub device: String,
    pub target: Target,
    pub frames: FrameRange,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("frames {0:?} are empty or outside the region's {1} frames")]
    OutOfRange(FrameRange, u64),
    #[error("no mapping {0:?}")]
    NoSuchMapping(MappingId),
    #[error("a page of frames {0:?} already has the maximum number of mappings")]
    TooManyMappings(FrameRange),
    #[error("frames {frames:?} are in use by the guest ({mapped} mapped, {pinned} pinned pages): refusing to {what} them")]
    Busy {
        frames: FrameRange,
        mapped: u64,
        pinned: u64,
        what: &'static str,
    },
}

struct Mapping {
    owner: OwnerId,
    request: MappingRequest,
}

/// What changes only under the registry's mutex.
struct Inner {
    mappings: BTreeMap<MappingId, Mapping>,
    owners: HashMap<OwnerId, String>,
    rmap: RmapSets,
    /// Indices of the chunks that exist.
    chunks: BTreeSet<usize>,
    /// Ranges under a layout change (hole punch, zeroing, resize); maps wait for them.
    busy: Vec<(u64, FrameRange, &'static str)>,
    next_mapping: u32,
    next_owner: u64,
    next_busy: u64,
    last_flushed: u32,
}

/// The registry of one region.
pub struct Registry {
    frames: u64,
    inner: Mutex<Inner>,
    layout_done: Condvar,
    /// One slot per [`CHUNK_FRAMES`] frames of the region; filled and emptied under the
    /// mutex, read without it.
    slots: Box<[ArcSwapOption<Chunk>]>,
    /// First and end frame of the chunks that exist (equal while none does): a request
    /// outside them costs two atomic loads.
    visible_lo: AtomicU64,
    visible_hi: AtomicU64,
    /// The epoch new writes are recorded in.
    epoch: AtomicU32,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("frames", &self.frames)
            .field("visible_lo", &self.visible_lo)
            .field("visible_hi", &self.visible_hi)
            .finish_non_exhaustive()
    }
}

/// A layout change in progress; new mappings of its frames wait until it is dropped.
#[must_use]
#[derive(Debug)]
pub struct LayoutChange<'a> {
    registry: &'a Registry,
    token: u64,
}

impl Drop for LayoutChange<'_> {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        inner.busy.retain(|(token, _, _)| *token != self.token);
        drop(inner);
        self.registry.layout_done.notify_all();
    }
}

impl Registry {
    /// A registry for a region of `frames` page frames.
    pub fn new(frames: u64) -> Registry {
        Registry {
            frames,
            inner: Mutex::new(Inner {
                mappings: BTreeMap::new(),
                owners: HashMap::new(),
                rmap: RmapSets::new(),
                chunks: BTreeSet::new(),
                busy: Vec::new(),
                next_mapping: 1,
                next_owner: 1,
                next_busy: 1,
                last_flushed: 0,
            }),
            layout_done: Condvar::new(),
            slots: (0..frames.div_ceil(CHUNK_FRAMES))
                .map(|_| ArcSwapOption::empty())
                .collect(),
            visible_lo: AtomicU64::new(0),
            visible_hi: AtomicU64::new(0),
            epoch: AtomicU32::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a party that will own mappings.
    pub fn new_owner(&self, label: &str) -> OwnerId {
        let mut inner = self.lock();
        let id = OwnerId(inner.next_owner);
        inner.next_owner += 1;
        inner.owners.insert(id, label.to_owned());
        id
    }

    /// Removes every mapping of `owner` (its connection ended or its device was reset)
    /// and forgets it.
    pub fn release_owner(&self, owner: OwnerId) {
        let mut inner = self.lock();
        let ids: Vec<MappingId> = inner
            .mappings
            .iter()
            .filter(|(_, m)| m.owner == owner)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.unmap_locked(&mut inner, id);
        }
        inner.owners.remove(&owner);
    }

    /// The chunks under `frames` that exist, with the descriptor indices of each.
    fn existing(
        &self,
        frames: FrameRange,
    ) -> impl Iterator<Item = (Arc<Chunk>, std::ops::Range<usize>)> + '_ {
        chunk_parts(frames).filter_map(|(i, range)| self.slots[i].load_full().map(|c| (c, range)))
    }

    /// Maps `request.frames`: gives frames that had none a descriptor, and counts the
    /// mapping on every frame. Waits while a layout change covers the frames. On error
    /// nothing changes.
    pub fn map(&self, owner: OwnerId, request: MappingRequest) -> Result<MappingId, RegistryError> {
        let frames = request.frames;
        if frames.is_empty() || frames.end > self.frames {
            return Err(RegistryError::OutOfRange(frames, self.frames));
        }
        let mut inner = self.lock();
        while inner.busy.iter().any(|(_, r, _)| r.overlaps(&frames)) {
            inner = self
                .layout_done
                .wait(inner)
                .unwrap_or_else(|e| e.into_inner());
        }
        let saturated = self.existing(frames).any(|(chunk, range)| {
            chunk.descs[range]
                .iter()
                .any(|d| d.map_count.load(Ordering::Relaxed) == u16::MAX)
        });
        if saturated {
            return Err(RegistryError::TooManyMappings(frames));
        }
        let id = MappingId(inner.next_mapping);
        inner.next_mapping = inner.next_mapping.wrapping_add(1).max(1);
        let mut added = false;
        for (i, _) in chunk_parts(frames) {
            if self.slots[i].load().is_none() {
                self.slots[i].store(Some(Arc::new(Chunk::new())));
                inner.chunks.insert(i);
                added = true;
            }
        }
        let Inner { rmap, .. } = &mut *inner;
        let mut moves = rmap::Moves::default();
        for (chunk, range) in self.existing(frames) {
            // A frame that had no descriptor may still carry the state of an earlier
            // life in this chunk: it starts clean.
            for d in &chunk.descs[range] {
                if !d.exists() {
                    d.state.store(0, Ordering::Relaxed);
                    if d.dirty_epoch.swap(0, Ordering::AcqRel) != 0 {
                        chunk.dirty.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                // Only the mutex holder writes these: plain loads and stores suffice.
                let count = d.map_count.load(Ordering::Relaxed);
                d.map_count.store(count + 1, Ordering::Relaxed);
                if request.writable {
                    let state = d.state.load(Ordering::Relaxed);
                    d.state
                        .store(state | PageDescriptor::WRITABLE, Ordering::Relaxed);
                }
                let set = moves.add(rmap, d.rmap.load(Ordering::Relaxed), id);
                d.rmap.store(set, Ordering::Relaxed);
            }
            chunk.needs_prune.store(false, Ordering::SeqCst);
        }
        moves.apply(rmap);
        inner.mappings.insert(id, Mapping { owner, request });
        if added {
            self.publish_bounds(&inner);
        }
        Ok(id)
    }

    /// Removes one mapping; frames that no mapping covers and no request pins lose their
    /// descriptors.
    pub fn unmap(&self, id: MappingId) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        if !inner.mappings.contains_key(&id) {
            return Err(RegistryError::NoSuchMapping(id));
        }
        self.unmap_locked(&mut inner, id);
        Ok(())
    }

    fn unmap_locked(&self, inner: &mut Inner, id: MappingId) {
        let Some(mapping) = inner.mappings.remove(&id) else {
            return;
        };
        let frames = mapping.request.frames;
        let Inner { rmap, mappings, .. } = &mut *inner;
        let mut moves = rmap::Moves::default();
        // Whether a page stays writable depends only on its new reverse-map set.
        let mut writable_sets: Vec<(u32, bool)> = Vec::new();
        for (chunk, range) in self.existing(frames) {
            for d in &chunk.descs[range] {
                let count = d.map_count.load(Ordering::Relaxed);
                d.map_count.store(count - 1, Ordering::Relaxed);
                let set = moves.remove(rmap, d.rmap.load(Ordering::Relaxed), id);
                d.rmap.store(set, Ordering::Relaxed);
                let writable = match writable_sets.iter().find(|(s, _)| *s == set) {
                    Some((_, w)) => *w,
                    None => {
                        let w = rmap
                            .members(set)
                            .iter()
                            .any(|m| mappings.get(m).is_some_and(|m| m.request.writable));
                        writable_sets.push((set, w));
                        w
                    }
                };
                let state = d.state.load(Ordering::Relaxed);
                let state = if writable {
                    state | PageDescriptor::WRITABLE
                } else {
                    state & !PageDescriptor::WRITABLE
                };
                d.state.store(state, Ordering::Relaxed);
            }
        }
        moves.apply(rmap);
        let mut changed = false;
        for (i, _) in chunk_parts(frames) {
            changed |= self.prune(inner, i);
        }
        if changed {
            self.publish_bounds(inner);
        }
    }

    /// Frees chunk `i` if none of its frames is mapped any more, or leaves that to the
    /// last pin if one still holds it. Returns whether the chunk went.
    fn prune(&self, inner: &mut Inner, i: usize) -> bool {
        let Some(chunk) = self.slots[i].load_full() else {
            return false;
        };
        if chunk
            .descs
            .iter()
            .any(|d| d.map_count.load(Ordering::Relaxed) > 0)
        {
            return false;
        }
        // Flag first, retire second: either the retire sees no pin, or the last pin's
        // release sees the flag.
        chunk.needs_prune.store(true, Ordering::SeqCst);
        if !chunk.retire() {
            return false;
        }
        self.slots[i].store(None);
        inner.chunks.remove(&i);
        true
    }

    /// The last pin of the chunk holding `frame` went while the chunk waited to be freed.
    fn prune_released(&self, frame: u64) {
        let mut inner = self.lock();
        if self.prune(&mut inner, split(frame).0) {
            self.publish_bounds(&inner);
        }
    }

    /// Whether any frame of `frames` is guest-visible (has a descriptor).
    pub fn is_visible(&self, frames: FrameRange) -> bool {
        self.may_be_visible(frames)
            && self
                .existing(frames)
                .any(|(chunk, range)| chunk.descs[range].iter().any(Descriptor::exists))
    }

    /// False when `frames` is outside the bounds of every chunk: two atomic loads, which
    /// is all the block path pays while nothing it touches is guest-visible.
    fn may_be_visible(&self, frames: FrameRange) -> bool {
        frames.end > self.visible_lo.load(Ordering::Acquire)
            && frames.start < self.visible_hi.load(Ordering::Acquire)
    }

    /// Starts a change of the file's layout under `frames` (punching a hole, zeroing a
    /// range, truncating). Refused while any of the frames is mapped or pinned, as Linux's
    /// `dax_layout_busy_page` would block it; while the guard lives, new mappings of the
    /// frames wait.
    pub fn begin_layout_change(
        &self,
        frames: FrameRange,
        what: &'static str,
    ) -> Result<LayoutChange<'_>, RegistryError> {
        let mut inner = self.lock();
        let (mut mapped, mut pinned) = (0, 0);
        for (chunk, range) in self.existing(frames) {
            for d in &chunk.descs[range] {
                mapped += u64::from(d.map_count.load(Ordering::Relaxed) > 0);
                pinned += u64::from(d.pin_count.load(Ordering::Acquire) > 0);
            }
        }
        if mapped > 0 || pinned > 0 {
            return Err(RegistryError::Busy {
                frames,
                mapped,
                pinned,
                what,
            });
        }
        let token = inner.next_busy;
        inner.next_busy += 1;
        inner.busy.push((token, frames, what));
        Ok(LayoutChange {
            registry: self,
            token,
        })
    }

    /// The descriptor of `frame`, if it has one.
    pub fn descriptor(&self, frame: u64) -> Option<PageDescriptor> {
        let _inner = self.lock();
        self.descriptor_locked(frame)
    }

    /// The mappings covering `frame` (its descriptor's reverse map).
    pub fn rmap(&self, frame: u64) -> Vec<MappingId> {
        let inner = self.lock();
        self.descriptor_locked(frame)
            .map(|d| inner.rmap.members(d.rmap).to_vec())
            .unwrap_or_default()
    }

    fn descriptor_locked(&self, frame: u64) -> Option<PageDescriptor> {
        let (i, at) = split(frame);
        let chunk = self.slots.get(i)?.load_full()?;
        let d = &chunk.descs[at];
        d.exists().then(|| d.read())
    }

    /// Publishes the bounds of the chunks that exist to the lock-free paths. Called with
    /// the mutex held, after a chunk came or went.
    fn publish_bounds(&self, inner: &Inner) {
        let lo = inner.chunks.first().map_or(0, |&i| i as u64 * CHUNK_FRAMES);
        let hi = inner
            .chunks
            .last()
            .map_or(0, |&i| (i as u64 + 1) * CHUNK_FRAMES);
        self.visible_lo.store(lo, Ordering::Release);
        self.visible_hi.store(hi, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
