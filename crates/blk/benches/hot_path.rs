//! The blk data path without sockets: 4 KiB reads and writes on a region, as queue workers
//! serve them: the chain popped from a split ring (avail index, ring entry, three
//! descriptors), parsed and executed, its used entry published and the EVENT_IDX check
//! made. `cargo bench -p daxd-blk` prints ns per request; under
//! `valgrind --tool=callgrind` it gives repeatable instruction counts.
//!
//! Three cases, each with 1 queue and with 2 queues served in parallel (one thread each):
//! - nothing mapped: the registry is empty;
//! - window mapped, I/O outside it: a pmem window is mapped next to the disk's target
//!   range, so the registry is live but no request touches mapped pages;
//! - I/O inside the mapped window: the disk's sectors are pages the guest has mapped
//!   (writes mark them dirty) and the guest's data buffers are themselves pages of the
//!   window (every request pins them), as when a guest does block I/O to and from its
//!   DAX-mapped persistent memory.
//!
//! Each on two kinds of guest memory: plain (`GuestMemoryMmap<()>`, what daxd used before
//! it could log dirty pages for live migration) and daxd's (`GuestMemoryMmap<DirtyLog>`,
//! no log attached, as whenever the VM is not being migrated): the cost of being able to
//! log, on the request path. The two run alternately, three times, so that a drift of the
//! machine shows as a spread between rounds rather than as a difference between them.
//!
//! Set DAXD_BENCH_ITERS to change the number of requests per queue and case (default
//! 1,000,000), and DAXD_BENCH_FAULT_RULES to a number of fault rules that every request is
//! matched against and none acts on (default none: the cost of rules being possible).

use std::fs::OpenOptions;
use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::{Bitmap, BitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use daxd_vhost_user::dirty_log::DirtyLog;

use daxd_blk::{BlkConfig, BlkDevice, ChainBuffers, GuestWindow, Handled, Serial};
use daxd_region::{Layout, Region, RegionConfig, Serve, Window};
use daxd_registry::{FrameRange, MappingRequest, Registry, Target};

const MIB: u64 = 1 << 20;
const REGION: u64 = 128 * MIB;
/// The pmem window: the second half of the region.
const WINDOW: u64 = REGION / 2;
/// Where the guest sees the window (as QEMU maps a memory-backend-file above RAM).
const WINDOW_GPA: u64 = 1 << 32;
/// Per-queue guest RAM: descriptor table at +0, header at +0x1000, data at +0x2000, avail
/// ring at +0x3000, used ring at +0x4000, status at +0x8000.
const QUEUE_RAM: u64 = 0x10000;
const QUEUE_SIZE: u16 = 256;
/// Data buffers inside the window, one 1 MiB area per queue at the window's end.
const WINDOW_BUFFERS: u64 = WINDOW - 4 * MIB;

#[derive(Clone, Copy, PartialEq)]
enum Case {
    NothingMapped,
    WindowOutside,
    InsideWindow,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::NothingMapped => "nothing mapped",
            Case::WindowOutside => "window mapped, I/O outside it",
            Case::InsideWindow => "I/O inside the mapped window",
        }
    }
}

fn main() {
    let iters: u64 = std::env::var("DAXD_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.img");
    let region = Arc::new(Region::open(&RegionConfig::new(path.clone(), Some(REGION))).unwrap());
    // Touch every page once so the measurement is not about page faults.
    region.write_bytes(0, &vec![1u8; REGION as usize]).unwrap();
    // The disk covers the whole region, the window its second half: the first half is
    // disk only, the second half is disk and guest-visible pmem.
    let layout = Layout::new(
        region.size(),
        vec![
            Window {
                name: "disk".into(),
                offset: 0,
                size: REGION,
                serve: Serve::Blk,
            },
            Window {
                name: "pm0".into(),
                offset: WINDOW,
                size: WINDOW,
                serve: Serve::Pmem,
            },
        ],
        true,
    )
    .unwrap();
    let registry = Arc::new(Registry::new(region.frames()));
    let faults = Arc::new(daxd_fault::Faults::new(vec!["disk".into()]));
    let rules: u64 = std::env::var("DAXD_BENCH_FAULT_RULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for rule in 0..rules {
        // Each matches the device and the queue, then misses on the operation.
        let text = format!("queue={},op=get-id,action=fail", rule % 2);
        faults.add(text.parse().unwrap()).unwrap();
    }
    let device = Arc::new(
        BlkDevice::new(
            region,
            registry.clone(),
            layout.blk().unwrap(),
            BlkConfig {
                num_queues: 2,
                queue_size: 256,
                read_only: false,
                sync: false,
                serial: Serial::new("bench").unwrap(),
            },
        )
        .unwrap()
        .with_faults(faults),
    );
    let guest_window = GuestWindow {
        gpa: WINDOW_GPA,
        len: WINDOW,
        region_offset: WINDOW,
    };
    let ram = dir.path().join("ram");
    std::fs::File::create(&ram)
        .unwrap()
        .set_len(2 * QUEUE_RAM)
        .unwrap();
    let plain = guest_memory::<()>(&path, &ram);
    let logging = guest_memory::<DirtyLog>(&path, &ram);

    let mut mapped = false;
    for case in [Case::NothingMapped, Case::WindowOutside, Case::InsideWindow] {
        if case != Case::NothingMapped && !mapped {
            let owner = registry.new_owner("bench");
            registry
                .map(
                    owner,
                    MappingRequest {
                        device: "bench".into(),
                        target: Target::GuestPhysical { gpa: WINDOW_GPA },
                        frames: FrameRange::covering(WINDOW, WINDOW),
                        writable: true,
                    },
                )
                .unwrap();
            mapped = true;
        }
        for (name, kind) in [
            ("read 4 KiB", VIRTIO_BLK_T_IN),
            ("write 4 KiB", VIRTIO_BLK_T_OUT),
        ] {
            for queues in [1, 2] {
                let (mut plain_ns, mut logging_ns) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    let (device, driver) = (&device, &plain);
                    plain_ns.push(run(
                        device,
                        driver,
                        &plain,
                        guest_window,
                        case,
                        kind,
                        queues,
                        iters,
                    ));
                    logging_ns.push(run(
                        device,
                        driver,
                        &logging,
                        guest_window,
                        case,
                        kind,
                        queues,
                        iters,
                    ));
                }
                let (plain_ns, logging_ns) = (median(plain_ns), median(logging_ns));
                println!(
                    "{name}, {}, {queues} queue(s): {plain_ns:.0} ns per request per queue on plain memory, {logging_ns:.0} ns with the dirty-log bitmap ({:+.1}%) (medians of {ROUNDS} alternating rounds of {iters} requests per queue)",
                    case.name(),
                    (logging_ns / plain_ns - 1.0) * 100.0
                );
            }
        }
    }
}

/// Alternating rounds per kind of memory.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Guest RAM for rings, headers and statuses mapped from the file at `ram`, and the window
/// mapped from the region file at `path` as QEMU maps a memory-backend-file, with bitmap
/// `B`. Every call maps the same memory again, so that the driver's side of the bench can
/// work on plain memory while the device's side uses the kind measured.
fn guest_memory<B: NewBitmap>(
    path: &std::path::Path,
    ram: &std::path::Path,
) -> Arc<GuestMemoryMmap<B>> {
    let open = |path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    };
    Arc::new(
        GuestMemoryMmap::<B>::from_ranges_with_files([
            (
                GuestAddress(0),
                2 * QUEUE_RAM as usize,
                Some(FileOffset::new(open(ram), 0)),
            ),
            (
                GuestAddress(WINDOW_GPA),
                WINDOW as usize,
                Some(FileOffset::new(open(path), WINDOW)),
            ),
        ])
        .unwrap(),
    )
}

/// Runs `iters` requests of `kind` on each of `queues` threads at once, the device's side
/// (ring, parse, execute) on `mem` and the driver's (header, avail index, status check) on
/// `driver`; returns the mean time per request of one queue.
#[allow(clippy::too_many_arguments)]
fn run<B>(
    device: &Arc<BlkDevice>,
    driver: &Arc<GuestMemoryMmap<()>>,
    mem: &Arc<GuestMemoryMmap<B>>,
    guest_window: GuestWindow,
    case: Case,
    kind: u32,
    queues: u64,
    iters: u64,
) -> f64
where
    B: Bitmap + Send + Sync + 'static,
    for<'a> <B as vm_memory::bitmap::WithBitmapSlice<'a>>::S: BitmapSlice,
{
    let barrier = Arc::new(Barrier::new(queues as usize));
    let threads: Vec<_> = (0..queues)
        .map(|q| {
            let (device, driver, mem, barrier) =
                (device.clone(), driver.clone(), mem.clone(), barrier.clone());
            std::thread::spawn(move || {
                let limits = device.limits(device.features());
                let windows: &[GuestWindow] = match case {
                    Case::InsideWindow => &[guest_window],
                    _ => &[],
                };
                let ram = q * QUEUE_RAM;
                let (hdr, status) = (ram + 0x1000, ram + 0x8000);
                let data = match case {
                    Case::InsideWindow => WINDOW_GPA + WINDOW_BUFFERS + q * MIB,
                    _ => ram + 0x2000,
                };
                // Sectors: the disk-only half, or the window half.
                let (first_page, pages) = match case {
                    Case::InsideWindow => (WINDOW / 4096, (WINDOW_BUFFERS / 4096)),
                    _ => (0, WINDOW / 4096),
                };
                let w = VRING_DESC_F_WRITE as u16;
                let data_flags = if kind == VIRTIO_BLK_T_IN { w } else { 0 };
                let expected = if kind == VIRTIO_BLK_T_IN { 4097 } else { 1 };
                let mut bufs = ChainBuffers::new();
                // One chain, always at descriptors 0..3 and always the ring's only entry;
                // the driver rewrites the header and makes it available again each time.
                let (desc_table, avail_ring, used_ring) = (ram, ram + 0x3000, ram + 0x4000);
                let chain = [
                    Descriptor::new(hdr, 16, VRING_DESC_F_NEXT as u16, 1),
                    Descriptor::new(data, 4096, data_flags | VRING_DESC_F_NEXT as u16, 2),
                    Descriptor::new(status, 1, w, 0),
                ];
                for (i, desc) in chain.into_iter().enumerate() {
                    driver
                        .write_obj(desc, GuestAddress(desc_table + 16 * i as u64))
                        .unwrap();
                }
                for slot in 0..u64::from(QUEUE_SIZE) {
                    driver
                        .write_obj(0u16, GuestAddress(avail_ring + 4 + 2 * slot))
                        .unwrap();
                }
                let mut queue = Queue::new(QUEUE_SIZE).unwrap();
                queue.set_desc_table_address(Some(desc_table as u32), Some(0));
                queue.set_avail_ring_address(Some(avail_ring as u32), Some(0));
                queue.set_used_ring_address(Some(used_ring as u32), Some(0));
                queue.set_event_idx(true);
                queue.set_ready(true);
                assert!(queue.is_valid(&*mem));
                barrier.wait();
                let start = Instant::now();
                for i in 0..iters {
                    // A different page each time, spread like random I/O.
                    let page = first_page + (i.wrapping_mul(2_654_435_761) + q) % pages;
                    let mut header = [0u8; 16];
                    header[..4].copy_from_slice(&kind.to_le_bytes());
                    header[8..].copy_from_slice(&(page * 8).to_le_bytes());
                    driver.write_slice(&header, GuestAddress(hdr)).unwrap();
                    driver
                        .store(
                            ((i + 1) as u16).to_le(),
                            GuestAddress(avail_ring + 2),
                            Ordering::Release,
                        )
                        .unwrap();
                    let head = queue.pop_descriptor_chain(&*mem).unwrap().head_index();
                    // Walked as daxd's queue walks it.
                    let chain = daxd_virtio::ChainWalk::new(
                        &*mem,
                        GuestAddress(queue.desc_table()),
                        queue.size(),
                        head,
                    );
                    let used = device.handle(q as usize, chain, &*mem, &limits, windows, &mut bufs);
                    let Handled::Done(used) = used else {
                        panic!("request {i} was not completed: {used:?}");
                    };
                    queue.add_used(&*mem, head, used).unwrap();
                    black_box(queue.needs_notification(&*mem).unwrap());
                    assert_eq!(driver.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
                    assert_eq!(used, expected);
                }
                start.elapsed().as_nanos() as f64 / iters as f64
            })
        })
        .collect();
    let total: f64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    total / queues as f64
}
