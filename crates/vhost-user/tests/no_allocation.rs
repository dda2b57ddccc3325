//! The request path allocates nothing: every kind of request, served by the blk backend's
//! queue worker (`handle_event`, as the vhost-user daemon calls it) and its flusher
//! thread, with a counting global allocator. An allocation on a confined thread can make
//! glibc open a file (see daxd_confine), and costs time besides.
//!
//! One test in this binary, so that the only threads are the test's own (the queue
//! worker's work runs on it) and the flusher.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use daxd_blk::wire::{DiscardWriteZeroes, RequestHeader};
use daxd_blk::{BlkConfig, BlkDevice, Serial};
use daxd_region::{Layout, Region, RegionConfig};
use daxd_registry::Registry;
use daxd_vhost_user::dirty_log::{GuestMemory, Vring};
use daxd_vhost_user::VhostUserBlkBackend;

/// Counts allocations (and reallocations) on every thread while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

impl Counting {
    fn count(&self) {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        self.count();
        // SAFETY: the caller's guarantees for `layout` are System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        self.count();
        // SAFETY: as in alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const QUEUE_SIZE: u16 = 64;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const SEGMENT: u64 = 0x3100;
const STATUS: u64 = 0x3200;
const DATA: u64 = 0x10000;
const DATA_LEN: u64 = 256 << 10;
const MEM_LEN: usize = 1 << 20;
/// The region: 64 MiB, new and sparse, so that writes land in holes.
const REGION: u64 = 64 << 20;

/// A driver with one queue, the blk backend serving it, and the device's region.
struct Rig {
    backend: VhostUserBlkBackend,
    vring: Vring,
    mem: GuestMemoryAtomic<GuestMemory>,
    device: Arc<BlkDevice>,
    avail: u16,
    _call: File,
}

impl Rig {
    fn new(dir: &Path) -> Rig {
        let region =
            Arc::new(Region::open(&RegionConfig::new(dir.join("r.img"), Some(REGION))).unwrap());
        let layout = Arc::new(arc_swap::ArcSwap::from_pointee(
            Layout::new(region.size(), vec![], false).unwrap(),
        ));
        let registry = Arc::new(Registry::new(region.frames()));
        let device = Arc::new(
            BlkDevice::new(
                region,
                registry.clone(),
                layout.load().blk().unwrap(),
                BlkConfig {
                    num_queues: 1,
                    queue_size: QUEUE_SIZE,
                    read_only: false,
                    sync: false,
                    serial: Serial::new("no-allocation").unwrap(),
                },
            )
            .unwrap(),
        );
        let mem = GuestMemoryAtomic::new(
            GuestMemory::from_ranges(&[(GuestAddress(0), MEM_LEN)]).unwrap(),
        );
        let backend = VhostUserBlkBackend::new(
            device.clone(),
            layout,
            Default::default(),
            registry.new_owner("test"),
            mem.clone(),
            Duration::ZERO,
        );
        backend.acked_features(device.features());
        backend.set_event_idx(false);
        let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        let call = File::from(eventfd(0, EventfdFlags::NONBLOCK).unwrap());
        vring.set_call(Some(call.try_clone().unwrap()));
        Rig {
            backend,
            vring,
            mem,
            device,
            avail: 0,
            _call: call,
        }
    }

    /// Sends one request (header, optional data, status) and waits for its completion;
    /// returns its status.
    fn request(&mut self, request_type: u32, sector: u64, data: Option<(u64, bool)>) -> u8 {
        let mem = self.mem.memory();
        let header = RequestHeader {
            request_type: request_type.into(),
            reserved: 0.into(),
            sector: sector.into(),
        };
        mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        // Up to three descriptors a chain, each chain in descriptors of its own (the
        // previous one has completed, but a different head shows that heads are read).
        let first = 3 * (self.avail % (QUEUE_SIZE / 3));
        let entry = |index: u16, descriptor: Descriptor| {
            mem.write_obj(descriptor, GuestAddress(DESC + 16 * u64::from(index)))
                .unwrap();
        };
        let status_at = match data {
            Some((len, writable)) => {
                let addr = if request_type == VIRTIO_BLK_T_DISCARD
                    || request_type == VIRTIO_BLK_T_WRITE_ZEROES
                {
                    SEGMENT
                } else {
                    DATA
                };
                let flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                entry(
                    first,
                    Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, first + 1),
                );
                entry(
                    first + 1,
                    Descriptor::new(
                        addr,
                        len as u32,
                        (flags | VRING_DESC_F_NEXT) as u16,
                        first + 2,
                    ),
                );
                first + 2
            }
            None => {
                entry(
                    first,
                    Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, first + 1),
                );
                first + 1
            }
        };
        entry(
            status_at,
            Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
        );
        // The entry before the index that publishes it; the worker runs on this thread.
        mem.write_obj(
            first,
            GuestAddress(AVAIL + 4 + 2 * u64::from(self.avail % QUEUE_SIZE)),
        )
        .unwrap();
        self.avail = self.avail.wrapping_add(1);
        mem.write_obj(self.avail, GuestAddress(AVAIL + 2)).unwrap();
        self.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
        // A FLUSH completes on the flusher thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != self.avail {
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::yield_now();
        }
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn segment(&self, sector: u64, sectors: u32, flags: u32) {
        let segment = DiscardWriteZeroes {
            sector: sector.into(),
            num_sectors: sectors.into(),
            flags: flags.into(),
        };
        self.mem
            .memory()
            .write_obj(segment, GuestAddress(SEGMENT))
            .unwrap();
    }
}

/// One request of each kind; `round` moves the writes into holes they have not met yet.
fn every_kind(rig: &mut Rig, round: u64) -> Vec<(&'static str, u64)> {
    const SEGMENT_LEN: u64 = std::mem::size_of::<DiscardWriteZeroes>() as u64;
    let ok = VIRTIO_BLK_S_OK as u8;
    let mut counts = Vec::with_capacity(16);
    let mut counted = |name: &'static str, rig: &mut Rig, run: &dyn Fn(&mut Rig) -> u8| {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let status = run(rig);
        counts.push((name, ALLOCATIONS.load(Ordering::Relaxed) - before));
        assert_eq!(status, ok, "{name} failed: {:?}", rig.device.metrics());
    };
    // Each round writes into a granule (64 KiB) of its own: a hole until then.
    let hole = (1 << 20) + round * (128 << 10);
    counted("a 4 KiB write into a hole", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_OUT, hole >> 9, Some((4096, false)))
    });
    counted("a 256 KiB write into holes", rig, &|rig| {
        rig.request(
            VIRTIO_BLK_T_OUT,
            ((32 << 20) + round * (512 << 10)) >> 9,
            Some((DATA_LEN, false)),
        )
    });
    counted("a write into written blocks", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_OUT, (32 << 20) >> 9, Some((DATA_LEN, false)))
    });
    counted("a read of written blocks", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_IN, (32 << 20) >> 9, Some((DATA_LEN, true)))
    });
    counted("a read of a hole", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_IN, (48 << 20) >> 9, Some((DATA_LEN, true)))
    });
    counted("a FLUSH", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_FLUSH, 0, None)
    });
    counted("a discard", rig, &|rig| {
        rig.segment(hole >> 9, 8, 0);
        rig.request(VIRTIO_BLK_T_DISCARD, 0, Some((SEGMENT_LEN, false)))
    });
    counted("a write-zeroes", rig, &|rig| {
        rig.segment((32 << 20) >> 9, 16, 0);
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((SEGMENT_LEN, false)))
    });
    counted("a write-zeroes that may unmap", rig, &|rig| {
        rig.segment(
            ((32 << 20) + (64 << 10)) >> 9,
            16,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        );
        rig.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((SEGMENT_LEN, false)))
    });
    counted("a GET_ID", rig, &|rig| {
        rig.request(VIRTIO_BLK_T_GET_ID, 0, Some((20, true)))
    });
    counts
}

/// Every request kind, on a region on the test directory's file system and on one in
/// tmpfs (where reads of holes go through pread(2), since a load through the mapping
/// would allocate a page).
#[test]
fn no_request_allocates() {
    let disk_dir = tempfile::tempdir().unwrap();
    let tmpfs_dir = tempfile::tempdir_in("/dev/shm").unwrap();
    for dir in [disk_dir.path(), tmpfs_dir.path()] {
        let mut rig = Rig::new(dir);
        // The first round sets up what lives as long as the connection (the worker's
        // chain buffers, thread-locals, the first FLUSH's wake-up).
        every_kind(&mut rig, 0);
        COUNTING.store(true, Ordering::Relaxed);
        let rounds: Vec<_> = (1..8).map(|round| every_kind(&mut rig, round)).collect();
        COUNTING.store(false, Ordering::Relaxed);
        let mut allocating = std::collections::BTreeMap::new();
        for (name, allocations) in rounds.iter().flatten() {
            if *allocations > 0 {
                *allocating.entry(*name).or_insert(0) += allocations;
            }
        }
        assert!(
            allocating.is_empty(),
            "allocations in 7 requests of each kind on {}: {allocating:?}",
            dir.display()
        );
        assert!(rig.device.metrics().region_flushes >= 8);
    }
}
