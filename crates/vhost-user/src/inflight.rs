//! In-flight I/O tracking for split virtqueues (vhost-user.rst, "Inflight I/O tracking";
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`). The frontend keeps a shared area across
//! backend restarts; in it the backend marks every request it takes from a ring and clears
//! the mark once the request's used entry is published. A backend started after a crash
//! finds what its predecessor took and never completed, and serves it again before it
//! takes new requests, so the guest sees each request completed exactly once.
//!
//! The layout is libvhost-user's byte for byte, because QEMU keeps the area and may hand it
//! to any backend: per queue a header (`features: u64, version: u16, desc_num: u16,
//! last_batch_head: u16, used_idx: u16`), then one 16-byte entry per descriptor
//! (`inflight: u8, padding: [u8; 5], next: u16, counter: u64`); queues are
//! `align_up(16 * queue_size + 2, 64)` bytes apart.

use std::fs::File;
use std::mem::{offset_of, size_of};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{MemfdFlags, SealFlags};
use vhost::vhost_user::message::{DescStateSplit, QueueRegionSplit, VhostUserInflight};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory, VolatileSlice};

/// The area's version, set in a queue's header when it is first used.
const VERSION: u16 = 1;
/// Bytes of a queue's header: `QueueRegionSplit` up to its `desc` field, which in
/// libvhost-user's struct is the array of entries itself, not a pointer to it.
const HEADER: usize = offset_of!(QueueRegionSplit, desc);
/// Bytes of one descriptor's entry.
const ENTRY: usize = size_of::<DescStateSplit>();
const ALIGNMENT: usize = 64;

// Header fields.
const VERSION_AT: usize = offset_of!(QueueRegionSplit, version);
const DESC_NUM_AT: usize = offset_of!(QueueRegionSplit, desc_num);
const LAST_BATCH_HEAD_AT: usize = offset_of!(QueueRegionSplit, last_batch_head);
const USED_IDX_AT: usize = offset_of!(QueueRegionSplit, used_idx);
// Entry fields.
const INFLIGHT_AT: usize = offset_of!(DescStateSplit, inflight);
const COUNTER_AT: usize = offset_of!(DescStateSplit, counter);

// libvhost-user's layout, which QEMU hands to whichever backend comes next.
const _: () = assert!(HEADER == 16 && ENTRY == 16 && COUNTER_AT == 8 && USED_IDX_AT == 14);

#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("in-flight area for {num_queues} queues of {queue_size} descriptors: {why}")]
    Shape {
        num_queues: u16,
        queue_size: u16,
        why: &'static str,
    },
    #[error("cannot create the in-flight area")]
    Create(#[source] std::io::Error),
    #[error("the frontend's in-flight area is not sealed against shrinking: refused, since a shrunk area would fault")]
    NotSealed,
    #[error("cannot map the frontend's in-flight area")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Bytes of one queue's part of the area (libvhost-user's `vu_inflight_queue_size`).
pub fn queue_bytes(queue_size: u16) -> usize {
    (ENTRY * usize::from(queue_size) + 2).next_multiple_of(ALIGNMENT)
}

/// Creates a zeroed, sealed area for `request` (`GET_INFLIGHT_FD`): returns the reply and
/// the file to send. The area is mapped when the frontend sends it back with
/// `SET_INFLIGHT_FD`, which it does on every connection, the first one included.
pub fn create(
    request: &VhostUserInflight,
    max_queues: usize,
    max_queue_size: usize,
) -> Result<(VhostUserInflight, File), InflightError> {
    let size = area_bytes(request, max_queues, max_queue_size)?;
    let fd = rustix::fs::memfd_create(
        "daxd-inflight",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| InflightError::Create(e.into()))?;
    rustix::fs::ftruncate(&fd, size as u64).map_err(|e| InflightError::Create(e.into()))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)
        .map_err(|e| InflightError::Create(e.into()))?;
    let reply = VhostUserInflight::new(size as u64, 0, request.num_queues, request.queue_size);
    Ok((reply, File::from(fd)))
}

fn area_bytes(
    request: &VhostUserInflight,
    max_queues: usize,
    max_queue_size: usize,
) -> Result<usize, InflightError> {
    let shape = |why| InflightError::Shape {
        num_queues: request.num_queues,
        queue_size: request.queue_size,
        why,
    };
    if request.num_queues == 0 || usize::from(request.num_queues) > max_queues {
        return Err(shape("the device does not have that many queues"));
    }
    if request.queue_size == 0 || usize::from(request.queue_size) > max_queue_size {
        return Err(shape("queues are not that large"));
    }
    Ok(queue_bytes(request.queue_size) * usize::from(request.num_queues))
}

/// A queue's next submission counter, on a cache line of its own: each queue worker bumps
/// its own for every request, and two on one line made two workers take the line in turn
/// (the hot-path bench, 2 queues: tracking cost 5.5-18.4 % per request with the counters
/// side by side, 1.2-5.3 % apart; one run each).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Counter(AtomicU64);

/// The mapped area of one connection.
#[derive(Debug)]
pub struct InflightArea {
    map: MmapRegion,
    queue_size: u16,
    num_queues: usize,
    /// The next submission counter of each queue.
    counters: Vec<Counter>,
}

/// What the area says about a queue when it starts.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Never used: the ring state the frontend sent stands.
    Fresh,
    /// A previous backend used it: continue at `next_avail`, after serving `resubmit`
    /// (heads, oldest submission first).
    Resume { next_avail: u16, resubmit: Vec<u16> },
}

impl InflightArea {
    /// Maps the area the frontend sent with `SET_INFLIGHT_FD`. Only areas sealed against
    /// shrinking are taken: a frontend that shrank the file later would make every
    /// access fault.
    pub fn map(
        request: &VhostUserInflight,
        file: File,
        max_queues: usize,
        max_queue_size: usize,
    ) -> Result<InflightArea, InflightError> {
        let size = area_bytes(request, max_queues, max_queue_size)?;
        let seals = rustix::fs::fcntl_get_seals(file.as_fd()).unwrap_or(SealFlags::empty());
        if !seals.contains(SealFlags::SHRINK) {
            return Err(InflightError::NotSealed);
        }
        let shape = |why| InflightError::Shape {
            num_queues: request.num_queues,
            queue_size: request.queue_size,
            why,
        };
        if request.mmap_size < size as u64 {
            return Err(shape("the area is too small"));
        }
        let file_len = file.metadata().map_err(InflightError::Create)?.len();
        if request
            .mmap_offset
            .checked_add(size as u64)
            .is_none_or(|end| end > file_len)
        {
            return Err(shape("the area extends past the end of its file"));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, request.mmap_offset), size)
            .map_err(InflightError::Map)?;
        let area = InflightArea {
            map,
            queue_size: request.queue_size,
            num_queues: usize::from(request.num_queues),
            counters: (0..request.num_queues)
                .map(|_| Counter::default())
                .collect(),
        };
        for queue in 0..area.num_queues {
            if let Some(q) = area.queue(queue) {
                q.put(request.queue_size, DESC_NUM_AT);
            }
        }
        Ok(area)
    }

    fn queue(&self, queue: usize) -> Option<VolatileSlice<'_>> {
        if queue >= self.num_queues {
            return None;
        }
        let bytes = queue_bytes(self.queue_size);
        self.map.get_slice(queue * bytes, bytes).ok()
    }

    /// Marks `head` of `queue` taken from the ring.
    pub fn take(&self, queue: usize, head: u16) {
        let (Some(q), Some(counter)) = (self.queue(queue), self.counters.get(queue)) else {
            return;
        };
        if head >= self.queue_size {
            return;
        }
        let entry = HEADER + ENTRY * usize::from(head);
        q.put(
            counter.0.fetch_add(1, Ordering::Relaxed),
            entry + COUNTER_AT,
        );
        q.put(1u8, entry + INFLIGHT_AT);
    }

    /// Records that `head`'s used entry is about to be published: a crash after the
    /// publication and before [`InflightArea::published`] is repaired from it.
    pub fn publishing(&self, queue: usize, head: u16) {
        if let Some(q) = self.queue(queue) {
            q.put(head, LAST_BATCH_HEAD_AT);
        }
    }

    /// Clears `head` once the used ring's index is `used_idx` with its entry in it.
    pub fn published(&self, queue: usize, head: u16, used_idx: u16) {
        let Some(q) = self.queue(queue) else {
            return;
        };
        if head < self.queue_size {
            q.put(0u8, HEADER + ENTRY * usize::from(head) + INFLIGHT_AT);
        }
        q.put(used_idx, USED_IDX_AT);
    }

    /// Reads `queue`'s part when the queue starts, with the used ring's index as the guest
    /// sees it, and makes it consistent: a request whose used entry was published just
    /// before a crash is no longer in flight.
    pub fn recover(&self, queue: usize, ring_used_idx: u16) -> Recovery {
        let Some(q) = self.queue(queue) else {
            return Recovery::Fresh;
        };
        let counter = &self.counters[queue].0;
        if q.load::<u16>(VERSION_AT, Ordering::Acquire).unwrap_or(0) == 0 {
            q.put(VERSION, VERSION_AT);
            counter.store(0, Ordering::Relaxed);
            return Recovery::Fresh;
        }
        if q.load::<u16>(USED_IDX_AT, Ordering::Acquire).unwrap_or(0) != ring_used_idx {
            let last = q
                .load::<u16>(LAST_BATCH_HEAD_AT, Ordering::Acquire)
                .unwrap_or(0);
            if last < self.queue_size {
                q.put(0u8, HEADER + ENTRY * usize::from(last) + INFLIGHT_AT);
            }
            q.put(ring_used_idx, USED_IDX_AT);
        }
        let mut taken: Vec<(u64, u16)> = (0..self.queue_size)
            .filter_map(|head| {
                let entry = HEADER + ENTRY * usize::from(head);
                let inflight = q.load::<u8>(entry + INFLIGHT_AT, Ordering::Acquire).ok()?;
                (inflight == 1).then(|| {
                    let counter = q.load::<u64>(entry + COUNTER_AT, Ordering::Acquire);
                    (counter.unwrap_or(0), head)
                })
            })
            .collect();
        taken.sort_unstable();
        // At most one per descriptor, so it fits the ring's u16 index arithmetic.
        let count = taken.len() as u16;
        counter.store(
            taken.last().map_or(0, |&(c, _)| c.wrapping_add(1)),
            Ordering::Relaxed,
        );
        Recovery::Resume {
            next_avail: ring_used_idx.wrapping_add(count),
            resubmit: taken.into_iter().map(|(_, head)| head).collect(),
        }
    }
}

trait Store {
    fn put<T: vm_memory::AtomicAccess>(&self, value: T, at: usize);
}

impl Store for VolatileSlice<'_> {
    /// Offsets are constants inside the queue's part, checked by the slice; a failure
    /// would be a bug here, never the frontend's doing.
    fn put<T: vm_memory::AtomicAccess>(&self, value: T, at: usize) {
        if let Err(e) = Bytes::store(self, value, at, Ordering::Release) {
            debug_assert!(false, "in-flight area store at {at}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(queues: u16, size: u16) -> (InflightArea, File) {
        let request = VhostUserInflight::new(0, 0, queues, size);
        let (reply, file) = create(&request, 4, 1024).unwrap();
        let area = InflightArea::map(&reply, file.try_clone().unwrap(), 4, 1024).unwrap();
        (area, file)
    }

    #[test]
    fn the_layout_is_libvhost_users() {
        assert_eq!(queue_bytes(128), 2112);
        assert_eq!(queue_bytes(256), 4160);
        let (area, file) = area(2, 128);
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        assert_eq!(area.recover(1, 0), Recovery::Fresh);
        area.take(1, 5);
        area.take(1, 6);
        area.publishing(1, 5);
        area.published(1, 5, 1);
        let mut bytes = vec![0u8; 2 * 2112];
        rustix::io::pread(&file, &mut bytes, 0).unwrap();
        let q1 = &bytes[2112..];
        assert_eq!(u16::from_le_bytes([q1[8], q1[9]]), 1, "version");
        assert_eq!(u16::from_le_bytes([q1[10], q1[11]]), 128, "desc_num");
        assert_eq!(u16::from_le_bytes([q1[12], q1[13]]), 5, "last_batch_head");
        assert_eq!(u16::from_le_bytes([q1[14], q1[15]]), 1, "used_idx");
        let entry = |head: usize| &q1[16 + 16 * head..32 + 16 * head];
        assert_eq!(entry(5)[0], 0);
        assert_eq!(entry(6)[0], 1);
        assert_eq!(u64::from_le_bytes(entry(6)[8..16].try_into().unwrap()), 1);
        // Queue 0 untouched but for its descriptor count.
        assert!(bytes[..10].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_restart_serves_what_was_taken_oldest_first() {
        let (area, file) = area(1, 8);
        assert_eq!(area.recover(0, 0), Recovery::Fresh);
        for head in [3, 1, 7, 2] {
            area.take(0, head);
        }
        // 1 completed out of order; 7 published, then the backend died before clearing it.
        area.publishing(0, 1);
        area.published(0, 1, 1);
        area.publishing(0, 7);
        let request = VhostUserInflight::new(queue_bytes(8) as u64, 0, 1, 8);
        let next = InflightArea::map(&request, file, 4, 1024).unwrap();
        assert_eq!(
            next.recover(0, 2),
            Recovery::Resume {
                next_avail: 4,
                resubmit: vec![3, 2]
            }
        );
        // New submissions count on from the newest one found.
        next.take(0, 5);
        next.publishing(0, 3);
        next.published(0, 3, 3);
        assert_eq!(
            next.recover(0, 3),
            Recovery::Resume {
                next_avail: 5,
                resubmit: vec![2, 5]
            }
        );
    }

    #[test]
    fn hostile_areas_are_refused() {
        let request = VhostUserInflight::new(0, 0, 1, 8);
        assert!(create(&request, 0, 1024).is_err());
        assert!(create(&VhostUserInflight::new(0, 0, 1, 0), 4, 1024).is_err());
        assert!(create(&VhostUserInflight::new(0, 0, 1, 2048), 4, 1024).is_err());
        // Unsealed file.
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let request = VhostUserInflight::new(4096, 0, 1, 8);
        assert!(matches!(
            InflightArea::map(&request, file, 4, 1024),
            Err(InflightError::NotSealed)
        ));
        // Sealed, but smaller than it claims, or than the queues need.
        let (reply, file) = create(&VhostUserInflight::new(0, 0, 1, 8), 4, 1024).unwrap();
        let beyond = VhostUserInflight::new(reply.mmap_size, 64, 1, 8);
        assert!(InflightArea::map(&beyond, file.try_clone().unwrap(), 4, 1024).is_err());
        let larger = VhostUserInflight::new(reply.mmap_size, 0, 2, 8);
        assert!(InflightArea::map(&larger, file, 4, 1024).is_err());
    }
}
