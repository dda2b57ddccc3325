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

mod rmap;

use std::borrow::BorrowMut;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

use rmap::RmapSets;

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

/// One guest-visible page frame, as [`Registry::descriptor`] reads it.
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
    /// The set of mappings covering the page (reverse map), see [`Registry::rmap`].
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
struct Descriptor {
    map_count: AtomicU16,
    state: AtomicU8,
    _reserved: u8,
    pin_count: AtomicU32,
    dirty_epoch: AtomicU32,
    rmap: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == 16);

impl Descriptor {
    fn read(&self) -> PageDescriptor {
        PageDescriptor {
            map_count: self.map_count.load(Ordering::Relaxed),
            state: self.state.load(Ordering::Relaxed),
            pin_count: self.pin_count.load(Ordering::Acquire),
            dirty_epoch: self.dirty_epoch.load(Ordering::Acquire),
            rmap: self.rmap.load(Ordering::Relaxed),
        }
    }

    /// Whether the frame has a descriptor: mapped, or pinned by in-flight I/O.
    fn exists(&self) -> bool {
        self.map_count.load(Ordering::Relaxed) > 0 || self.pin_count.load(Ordering::Acquire) > 0
    }
}

/// Set in [`Chunk::pins`] once the chunk is being freed: no pin may take it.
const RETIRED: u64 = 1 << 63;

/// The descriptors of [`CHUNK_FRAMES`] consecutive frames.
#[derive(Debug)]
struct Chunk {
    descs: Box<[Descriptor]>,
    /// Pins holding the chunk (one per pinned run), or [`RETIRED`].
    pins: AtomicU64,
    /// Descriptors with a dirty epoch, so that a flush skips clean chunks.
    dirty: AtomicU64,
    /// The chunk lost its last mapping while pinned: the last pin to go frees it.
    needs_prune: AtomicBool,
}

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            descs: (0..CHUNK_FRAMES).map(|_| Descriptor::default()).collect(),
            pins: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            needs_prune: AtomicBool::new(false),
        }
    }

    /// Counts a pin, unless the chunk is retired.
    fn acquire(&self) -> bool {
        self.pins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |pins| {
                (pins & RETIRED == 0).then_some(pins + 1)
            })
            .is_ok()
    }

    /// Drops a pin; true if it was the last and the chunk waits to be freed.
    fn release(&self) -> bool {
        self.pins.fetch_sub(1, Ordering::SeqCst) == 1 && self.needs_prune.load(Ordering::SeqCst)
    }

    /// Retires the chunk if no pin holds it.
    fn retire(&self) -> bool {
        self.pins
            .compare_exchange(0, RETIRED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    fn mark_dirty(&self, range: std::ops::Range<usize>, epoch: u32) {
        for d in &self.descs[range] {
            if d.exists() && d.dirty_epoch.swap(epoch, Ordering::AcqRel) == 0 {
                self.dirty.fetch_add(1, Ordering::AcqRel);
            }
        }
    }
}

/// The chunk index of `frame` and its index in the chunk.
fn split(frame: u64) -> (usize, usize) {
    (
        (frame / CHUNK_FRAMES) as usize,
        (frame % CHUNK_FRAMES) as usize,
    )
}

/// The per-chunk parts of `frames`: (chunk index, descriptor indices in the chunk).
fn chunk_parts(frames: FrameRange) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> {
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

/// A flush in progress: writes marked dirty before it began are clean once it completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket(u32);

/// `a <= b` in serial-number arithmetic, so epochs keep working when u32 wraps.
fn epoch_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < (1 << 31)
}

fn next_epoch(e: u32) -> u32 {
    match e.wrapping_add(1) {
        0 => 1,
        n => n,
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

    /// Everything `daxd inspect` shows. Sections are the runs of frames with descriptors.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let mut descriptors = 0;
        let mut sections: Vec<SectionSnapshot> = Vec::new();
        for &i in &inner.chunks {
            let Some(chunk) = self.slots[i].load_full() else {
                continue;
            };
            for (at, d) in chunk.descs.iter().enumerate() {
                let d = d.read();
                if d.map_count == 0 && d.pin_count == 0 {
                    continue;
                }
                descriptors += 1;
                let frame = i as u64 * CHUNK_FRAMES + at as u64;
                let section = match sections.last_mut() {
                    Some(s) if s.frames.end == frame => s,
                    _ => {
                        sections.push(SectionSnapshot {
                            frames: FrameRange {
                                start: frame,
                                end: frame,
                            },
                            mapped: 0,
                            pinned: 0,
                            dirty: 0,
                            max_map_count: 0,
                        });
                        sections.last_mut().expect("just pushed")
                    }
                };
                section.frames.end = frame + 1;
                section.mapped += u64::from(d.map_count > 0);
                section.pinned += u64::from(d.pin_count > 0);
                section.dirty += u64::from(d.dirty_epoch != 0);
                section.max_map_count = section.max_map_count.max(d.map_count);
            }
        }
        let mappings = inner
            .mappings
            .iter()
            .map(|(id, m)| MappingSnapshot {
                id: *id,
                owner: inner.owners.get(&m.owner).cloned().unwrap_or_default(),
                device: m.request.device.clone(),
                target: m.request.target.clone(),
                frames: m.request.frames,
                writable: m.request.writable,
            })
            .collect();
        Snapshot {
            descriptors,
            descriptor_bytes: inner.chunks.len() as u64
                * CHUNK_FRAMES
                * std::mem::size_of::<Descriptor>() as u64,
            epoch: self.epoch.load(Ordering::SeqCst),
            last_flushed: inner.last_flushed,
            mappings,
            sections,
            busy: inner
                .busy
                .iter()
                .map(|(_, frames, what)| BusySnapshot {
                    frames: *frames,
                    what: (*what).to_owned(),
                })
                .collect(),
        }
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

/// `daxd inspect`'s view of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub descriptors: u64,
    pub descriptor_bytes: u64,
    /// The epoch new writes are recorded in.
    pub epoch: u32,
    /// The newest epoch a completed flush covered (0: none yet).
    pub last_flushed: u32,
    pub mappings: Vec<MappingSnapshot>,
    pub sections: Vec<SectionSnapshot>,
    pub busy: Vec<BusySnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSnapshot {
    pub id: MappingId,
    pub owner: String,
    pub device: String,
    pub target: Target,
    pub frames: FrameRange,
    pub writable: bool,
}

/// A run of frames with descriptors and how many of them are in each state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSnapshot {
    pub frames: FrameRange,
    pub mapped: u64,
    pub pinned: u64,
    pub dirty: u64,
    pub max_map_count: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusySnapshot {
    pub frames: FrameRange,
    pub what: String,
}

#[cfg(test)]
mod tests;
