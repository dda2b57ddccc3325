//! The page-descriptor registry: host-side bookkeeping for every page of the region that a
//! guest can reach through its MMU.
//!
//! Linux gives persistent memory `struct page`s (ZONE_DEVICE) because pages mapped into
//! address spaces need map counts, pins and layout locks; pages touched only by block I/O
//! do not. daxd follows the same rule: descriptors exist only for page frames covered by
//! a guest-visible mapping (or still pinned by in-flight I/O after their mapping went),
//! keyed by region page frame so that aliased mappings of the same file pages share one
//! descriptor. The block path asks the registry only when something is visible at all.

mod rmap;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock};

use serde::Serialize;

pub use daxd_region::FrameRange;
use rmap::RmapSets;

/// One guest-visible page frame. 16 bytes; Linux's `struct page` is 64.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PageDescriptor {
    /// Mappings covering the page (aliases of the same file page count once each).
    pub map_count: u16,
    /// Bit flags, see [`PageDescriptor::WRITABLE`].
    pub state: u8,
    _reserved: u8,
    /// In-flight requests whose buffers are in this page.
    pub pin_count: u32,
    /// Flush epoch in which daxd last wrote the page; 0 while clean.
    pub dirty_epoch: u32,
    /// The set of mappings covering the page (reverse map), see [`Registry::rmap`].
    pub rmap: u32,
}

const _: () = assert!(std::mem::size_of::<PageDescriptor>() == 16);

impl PageDescriptor {
    /// At least one covering mapping is writable.
    pub const WRITABLE: u8 = 1;
}

/// Identifies one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MappingId(pub u32);

/// The party that created mappings (a vhost-user connection, a device instance): when it
/// goes away, all its mappings go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct OwnerId(pub u64);

/// Where the guest sees the pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Mapped by the VMM into guest physical memory at `gpa` (a memory-backend-file
    /// window that daxd found in a vhost-user memory table).
    GuestPhysical { gpa: u64 },
    /// Mapped by daxd into a virtio shared-memory region (VHOST_USER_BACKEND_SHMEM_MAP).
    SharedMemory { shmid: u8, offset: u64 },
}

/// What a new mapping covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

struct Inner {
    /// Runs of descriptors, keyed by their first frame; never overlapping.
    sections: BTreeMap<u64, Vec<PageDescriptor>>,
    mappings: BTreeMap<MappingId, Mapping>,
    owners: HashMap<OwnerId, String>,
    rmap: RmapSets,
    /// Ranges under a layout change (hole punch, zeroing, resize); maps wait for them.
    busy: Vec<(u64, FrameRange, &'static str)>,
    next_mapping: u32,
    next_owner: u64,
    next_busy: u64,
    /// Descriptors with a dirty epoch: lets a flush skip the scan when there are none.
    dirty: u64,
    epoch: u32,
    last_flushed: u32,
}

/// The registry of one region.
pub struct Registry {
    frames: u64,
    inner: Mutex<Inner>,
    layout_done: Condvar,
    /// False while no descriptor exists: lets the block path skip the registry entirely.
    any_visible: AtomicBool,
    /// First and end frame of everything visible: a request outside them skips the lock.
    visible_lo: AtomicU64,
    visible_hi: AtomicU64,
    /// Merged frame ranges that have descriptors, for the block path's overlap checks.
    visible: RwLock<Vec<FrameRange>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("frames", &self.frames)
            .field("any_visible", &self.any_visible)
            .finish_non_exhaustive()
    }
}

/// Pages pinned for one request; unpinned on drop.
#[must_use]
#[derive(Debug)]
pub struct Pin<'a> {
    registry: &'a Registry,
    ranges: Vec<FrameRange>,
}

impl Pin<'_> {
    /// The frames actually pinned (the visible part of what was asked).
    pub fn ranges(&self) -> &[FrameRange] {
        &self.ranges
    }
}

impl Drop for Pin<'_> {
    fn drop(&mut self) {
        if !self.ranges.is_empty() {
            self.registry.unpin(&self.ranges);
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
                sections: BTreeMap::new(),
                mappings: BTreeMap::new(),
                owners: HashMap::new(),
                rmap: RmapSets::new(),
                busy: Vec::new(),
                next_mapping: 1,
                next_owner: 1,
                next_busy: 1,
                dirty: 0,
                epoch: 1,
                last_flushed: 0,
            }),
            layout_done: Condvar::new(),
            any_visible: AtomicBool::new(false),
            visible_lo: AtomicU64::new(0),
            visible_hi: AtomicU64::new(0),
            visible: RwLock::new(Vec::new()),
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
            Self::unmap_locked(&mut inner, id);
        }
        inner.owners.remove(&owner);
        self.publish_visible(&inner);
    }

    /// Maps `request.frames`: creates descriptors for frames that had none, and counts
    /// the mapping on every frame. Waits while a layout change covers the frames. On
    /// error nothing changes.
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
        let saturated = sections_in(&inner.sections, frames)
            .any(|(_, descs)| descs.iter().any(|d| d.map_count == u16::MAX));
        if saturated {
            return Err(RegistryError::TooManyMappings(frames));
        }
        let id = MappingId(inner.next_mapping);
        inner.next_mapping = inner.next_mapping.wrapping_add(1).max(1);
        ensure_sections(&mut inner.sections, frames);
        let Inner { sections, rmap, .. } = &mut *inner;
        let mut moves = rmap::Moves::default();
        for_each_desc(sections, frames, |d| {
            d.map_count += 1;
            if request.writable {
                d.state |= PageDescriptor::WRITABLE;
            }
            d.rmap = moves.add(rmap, d.rmap, id);
        });
        moves.apply(rmap);
        inner.mappings.insert(id, Mapping { owner, request });
        self.publish_visible(&inner);
        Ok(id)
    }

    /// Removes one mapping; descriptors that no mapping covers and no request pins go.
    pub fn unmap(&self, id: MappingId) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        if !inner.mappings.contains_key(&id) {
            return Err(RegistryError::NoSuchMapping(id));
        }
        Self::unmap_locked(&mut inner, id);
        self.publish_visible(&inner);
        Ok(())
    }

    fn unmap_locked(inner: &mut Inner, id: MappingId) {
        let Some(mapping) = inner.mappings.remove(&id) else {
            return;
        };
        let frames = mapping.request.frames;
        let Inner {
            sections,
            rmap,
            mappings,
            dirty,
            ..
        } = inner;
        let mut moves = rmap::Moves::default();
        // Whether a page stays writable depends only on its new reverse-map set.
        let mut writable_sets: Vec<(u32, bool)> = Vec::new();
        for_each_desc(sections, frames, |d| {
            d.map_count -= 1;
            d.rmap = moves.remove(rmap, d.rmap, id);
            let set = d.rmap;
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
            if writable {
                d.state |= PageDescriptor::WRITABLE;
            } else {
                d.state &= !PageDescriptor::WRITABLE;
            }
        });
        moves.apply(rmap);
        *dirty -= prune(sections, frames);
    }

    /// Whether any frame of `frames` is guest-visible. Costs one atomic load while
    /// nothing is mapped, three when `frames` is outside every visible frame's bounds.
    pub fn is_visible(&self, frames: FrameRange) -> bool {
        if !self.any_visible.load(Ordering::Acquire)
            || frames.end <= self.visible_lo.load(Ordering::Acquire)
            || frames.start >= self.visible_hi.load(Ordering::Acquire)
        {
            return false;
        }
        let visible = self.visible.read().unwrap_or_else(|e| e.into_inner());
        visible.iter().any(|r| r.overlaps(&frames))
    }

    /// Pins the guest-visible frames of `frames` until the returned guard drops: a request
    /// whose guest buffers live in a mapped window.
    pub fn pin(&self, frames: FrameRange) -> Pin<'_> {
        let mut ranges = Vec::new();
        if self.is_visible(frames) {
            let mut inner = self.lock();
            for (start, descs) in sections_in_mut(&mut inner.sections, frames) {
                let section = FrameRange {
                    start,
                    end: start + descs.len() as u64,
                };
                if let Some(part) = section.intersect(&frames) {
                    for d in &mut descs[(part.start - start) as usize..(part.end - start) as usize]
                    {
                        d.pin_count += 1;
                    }
                    ranges.push(part);
                }
            }
        }
        Pin {
            registry: self,
            ranges,
        }
    }

    fn unpin(&self, ranges: &[FrameRange]) {
        let mut inner = self.lock();
        for range in ranges {
            for_each_desc(&mut inner.sections, *range, |d| d.pin_count -= 1);
            let dropped = prune(&mut inner.sections, *range);
            inner.dirty -= dropped;
        }
        self.publish_visible(&inner);
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
        for (start, descs) in sections_in(&inner.sections, frames) {
            for (i, d) in descs.iter().enumerate() {
                if frames.contains(start + i as u64) {
                    mapped += u64::from(d.map_count > 0);
                    pinned += u64::from(d.pin_count > 0);
                }
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

    /// Records that daxd wrote `frames` (blk writes into a visible range).
    pub fn mark_dirty(&self, frames: FrameRange) {
        if !self.is_visible(frames) {
            return;
        }
        let mut inner = self.lock();
        let epoch = inner.epoch;
        let mut newly_dirty = 0;
        for_each_desc(&mut inner.sections, frames, |d| {
            newly_dirty += u64::from(d.dirty_epoch == 0);
            d.dirty_epoch = epoch;
        });
        inner.dirty += newly_dirty;
    }

    /// Starts a flush: everything marked dirty so far belongs to its epoch.
    pub fn flush_begin(&self) -> FlushTicket {
        let mut inner = self.lock();
        let ticket = FlushTicket(inner.epoch);
        inner.epoch = next_epoch(inner.epoch);
        ticket
    }

    /// The flush made everything written before it durable: those pages are clean.
    pub fn flush_complete(&self, ticket: FlushTicket) {
        let mut inner = self.lock();
        if inner.dirty > 0 {
            let mut cleaned = 0;
            for descs in inner.sections.values_mut() {
                for d in descs.iter_mut() {
                    if d.dirty_epoch != 0 && epoch_le(d.dirty_epoch, ticket.0) {
                        d.dirty_epoch = 0;
                        cleaned += 1;
                    }
                }
            }
            inner.dirty -= cleaned;
        }
        if inner.last_flushed == 0 || epoch_le(inner.last_flushed, ticket.0) {
            inner.last_flushed = ticket.0;
        }
    }

    /// The descriptor of `frame`, if it has one.
    pub fn descriptor(&self, frame: u64) -> Option<PageDescriptor> {
        let inner = self.lock();
        let (start, descs) = inner.sections.range(..=frame).next_back()?;
        descs.get((frame - start) as usize).copied()
    }

    /// The mappings covering `frame` (its descriptor's reverse map).
    pub fn rmap(&self, frame: u64) -> Vec<MappingId> {
        let inner = self.lock();
        let Some((start, descs)) = inner.sections.range(..=frame).next_back() else {
            return Vec::new();
        };
        descs
            .get((frame - start) as usize)
            .map(|d| inner.rmap.members(d.rmap).to_vec())
            .unwrap_or_default()
    }

    /// Everything `daxd inspect` shows.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let mut descriptors = 0;
        let mut sections = Vec::new();
        for (start, descs) in &inner.sections {
            descriptors += descs.len() as u64;
            sections.push(SectionSnapshot {
                frames: FrameRange {
                    start: *start,
                    end: start + descs.len() as u64,
                },
                mapped: descs.iter().filter(|d| d.map_count > 0).count() as u64,
                pinned: descs.iter().filter(|d| d.pin_count > 0).count() as u64,
                dirty: descs.iter().filter(|d| d.dirty_epoch != 0).count() as u64,
                max_map_count: descs.iter().map(|d| d.map_count).max().unwrap_or(0),
            });
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
            descriptor_bytes: descriptors * std::mem::size_of::<PageDescriptor>() as u64,
            epoch: inner.epoch,
            last_flushed: inner.last_flushed,
            mappings,
            sections,
            busy: inner
                .busy
                .iter()
                .map(|(_, frames, what)| BusySnapshot {
                    frames: *frames,
                    what,
                })
                .collect(),
        }
    }

    fn publish_visible(&self, inner: &Inner) {
        let mut merged: Vec<FrameRange> = Vec::with_capacity(inner.sections.len());
        for (start, descs) in &inner.sections {
            let range = FrameRange {
                start: *start,
                end: start + descs.len() as u64,
            };
            match merged.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => merged.push(range),
            }
        }
        let any = !merged.is_empty();
        let lo = merged.first().map_or(0, |r| r.start);
        let hi = merged.last().map_or(0, |r| r.end);
        *self.visible.write().unwrap_or_else(|e| e.into_inner()) = merged;
        // Widen the bounds before narrowing them, so that a reader racing with this update
        // never sees bounds that exclude frames visible both before and after it.
        self.visible_lo.fetch_min(lo, Ordering::AcqRel);
        self.visible_hi.fetch_max(hi, Ordering::AcqRel);
        self.visible_lo.store(lo, Ordering::Release);
        self.visible_hi.store(hi, Ordering::Release);
        self.any_visible.store(any, Ordering::Release);
    }
}

/// `daxd inspect`'s view of the registry.
#[derive(Debug, Clone, Serialize)]
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

#[derive(Debug, Clone, Serialize)]
pub struct MappingSnapshot {
    pub id: MappingId,
    pub owner: String,
    pub device: String,
    pub target: Target,
    pub frames: FrameRange,
    pub writable: bool,
}

/// A run of frames with descriptors and how many of them are in each state.
#[derive(Debug, Clone, Serialize)]
pub struct SectionSnapshot {
    pub frames: FrameRange,
    pub mapped: u64,
    pub pinned: u64,
    pub dirty: u64,
    pub max_map_count: u16,
}

#[derive(Debug, Clone, Serialize)]
pub struct BusySnapshot {
    pub frames: FrameRange,
    pub what: &'static str,
}

/// The key from which sections overlapping `frames` start: the section starting at or
/// before `frames.start` may reach into the range.
fn first_candidate(sections: &BTreeMap<u64, Vec<PageDescriptor>>, frames: FrameRange) -> u64 {
    sections
        .range(..=frames.start)
        .next_back()
        .map(|(s, _)| *s)
        .unwrap_or(frames.start)
}

/// Sections overlapping `frames`, as (first frame, descriptors).
fn sections_in(
    sections: &BTreeMap<u64, Vec<PageDescriptor>>,
    frames: FrameRange,
) -> impl Iterator<Item = (u64, &Vec<PageDescriptor>)> {
    sections
        .range(first_candidate(sections, frames)..frames.end)
        .filter(move |(s, d)| **s + d.len() as u64 > frames.start)
        .map(|(s, d)| (*s, d))
}

fn sections_in_mut(
    sections: &mut BTreeMap<u64, Vec<PageDescriptor>>,
    frames: FrameRange,
) -> impl Iterator<Item = (u64, &mut Vec<PageDescriptor>)> {
    let first = first_candidate(sections, frames);
    sections
        .range_mut(first..frames.end)
        .filter(move |(s, d)| **s + d.len() as u64 > frames.start)
        .map(|(s, d)| (*s, d))
}

fn for_each_desc(
    sections: &mut BTreeMap<u64, Vec<PageDescriptor>>,
    frames: FrameRange,
    mut f: impl FnMut(&mut PageDescriptor),
) {
    for (start, descs) in sections_in_mut(sections, frames) {
        let section = FrameRange {
            start,
            end: start + descs.len() as u64,
        };
        if let Some(part) = section.intersect(&frames) {
            descs[(part.start - start) as usize..(part.end - start) as usize]
                .iter_mut()
                .for_each(&mut f);
        }
    }
}

/// Creates descriptor sections for the frames of `frames` that have none.
fn ensure_sections(sections: &mut BTreeMap<u64, Vec<PageDescriptor>>, frames: FrameRange) {
    let covered: Vec<FrameRange> = sections_in(sections, frames)
        .map(|(s, d)| FrameRange {
            start: s,
            end: s + d.len() as u64,
        })
        .collect();
    let mut at = frames.start;
    for range in covered.iter().chain(std::iter::once(&FrameRange {
        start: frames.end,
        end: frames.end,
    })) {
        if range.start > at {
            let end = range.start.min(frames.end);
            sections.insert(at, vec![PageDescriptor::default(); (end - at) as usize]);
        }
        at = at.max(range.end);
        if at >= frames.end {
            break;
        }
    }
}

/// Drops descriptors in `frames` that are neither mapped nor pinned, splitting sections.
/// Returns how many dropped descriptors were dirty.
fn prune(sections: &mut BTreeMap<u64, Vec<PageDescriptor>>, frames: FrameRange) -> u64 {
    let mut dropped_dirty = 0;
    let touched: Vec<u64> = sections_in(sections, frames).map(|(s, _)| s).collect();
    for start in touched {
        let Some(descs) = sections.get(&start) else {
            continue;
        };
        let live = |d: &PageDescriptor| d.map_count > 0 || d.pin_count > 0;
        let live_count = descs.iter().filter(|d| live(d)).count();
        if live_count == descs.len() {
            continue;
        }
        let descs = sections.remove(&start).unwrap_or_default();
        dropped_dirty += descs
            .iter()
            .filter(|d| !live(d) && d.dirty_epoch != 0)
            .count() as u64;
        if live_count == 0 {
            continue;
        }
        let mut run_start = None;
        for (i, d) in descs.iter().enumerate() {
            match (live(d), run_start) {
                (true, None) => run_start = Some(i),
                (false, Some(s)) => {
                    sections.insert(start + s as u64, descs[s..i].to_vec());
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run_start {
            sections.insert(start + s as u64, descs[s..].to_vec());
        }
    }
    dropped_dirty
}

#[cfg(test)]
mod tests;
