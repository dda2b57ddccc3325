//! The blk data path without sockets: 4 KiB reads and writes on a region, served the way
//! a queue worker serves them, through `queue::drain`: the batch's available index read,
//! the memory table loaded, the chain popped and walked (three descriptors), parsed and
//! executed, its used entry published with in-flight tracking around it, and the
//! notification decided (EVENT_IDX; no call eventfd, so the decision is measured and not
//! the write(2) a guest's interrupt costs). One request per batch, as at queue depth 1.
//! `cargo bench -p daxd-vhost-user` prints ns per request; under
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
//! Each without and with in-flight tracking (the area a frontend gives with
//! `SET_INFLIGHT_FD`, which QEMU and cloud-hypervisor do on every connection): the cost
//! of surviving a restart, on the request path. The two run alternately, three times, so
//! that a drift of the machine shows as a spread between rounds rather than as a
//! difference between them. Guest memory is daxd's (`dirty_log::GuestMemory`), with no
//! log attached, as whenever the VM is not being migrated.
//!
//! Set DAXD_BENCH_ITERS to change the number of requests per queue and case (default
//! 1,000,000), and DAXD_BENCH_FAULT_RULES to a number of fault rules that every request is
//! matched against and none acts on (default none: the cost of rules being possible).

use std::fs::OpenOptions;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::mmap::NewBitmap;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use daxd_vhost_user::dirty_log::{DirtyLog, GuestMemory, Vring};
use daxd_vhost_user::inflight::{self, InflightArea};
use daxd_vhost_user::queue::{self, Settings, Tracking};

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
    let driver = guest_memory::<()>(&path, &ram);
    let mem =
        GuestMemoryAtomic::new(Arc::try_unwrap(guest_memory::<DirtyLog>(&path, &ram)).unwrap());
    // The area QEMU asks for and gives back on every connection.
    let request = VhostUserInflight::new(0, 0, 2, QUEUE_SIZE);
    let (area, file) = inflight::create(&request, 2, QUEUE_SIZE.into()).unwrap();
    let area = Arc::new(InflightArea::map(&area, file, 2, QUEUE_SIZE.into()).unwrap());

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
                let (mut bare_ns, mut tracked_ns) = (Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    for (area, times) in [(None, &mut bare_ns), (Some(&area), &mut tracked_ns)] {
                        times.push(run(
                            &device,
                            &driver,
                            &mem,
                            area,
                            guest_window,
                            case,
                            kind,
                            queues,
                            iters,
                        ));
                    }
                }
                let (bare_ns, tracked_ns) = (median(bare_ns), median(tracked_ns));
                println!(
                    "{name}, {}, {queues} queue(s): {bare_ns:.0} ns per request per queue, {tracked_ns:.0} ns with in-flight tracking ({:+.1}%) (medians of {ROUNDS} alternating rounds of {iters} requests per queue)",
                    case.name(),
                    (tracked_ns / bare_ns - 1.0) * 100.0
                );
            }
        }
    }
}

/// Alternating rounds without and with tracking.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Guest RAM for rings, headers and statuses mapped from the file at `ram`, and the window
/// mapped from the region file at `path` as QEMU maps a memory-backend-file, with bitmap
/// `B`. Every call maps the same memory again: the driver's side of the bench works on
/// its own mapping, as a guest does.
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
/// (`queue::drain`: ring, parse, execute, tracking in `area` if any) on `mem` and the
/// driver's (header, avail index, status check) on `driver`; returns the mean time per
/// request of one queue.
#[allow(clippy::too_many_arguments)]
fn run(
    device: &Arc<BlkDevice>,
    driver: &Arc<GuestMemoryMmap<()>>,
    mem: &GuestMemoryAtomic<GuestMemory>,
    area: Option<&Arc<InflightArea>>,
    guest_window: GuestWindow,
    case: Case,
    kind: u32,
    queues: u64,
    iters: u64,
) -> f64 {
    let barrier = Arc::new(Barrier::new(queues as usize));
    let threads: Vec<_> = (0..queues)
        .map(|q| {
            let (device, driver, mem, barrier) =
                (device.clone(), driver.clone(), mem.clone(), barrier.clone());
            let tracking = Tracking {
                area: area.cloned(),
                queue: q as usize,
            };
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
                // One chain, always at descriptors 0..3 and always the batch's only entry;
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
                // A fresh ring each run: the indexes start at 0.
                for at in [avail_ring, used_ring] {
                    driver.write_obj(0u32, GuestAddress(at)).unwrap();
                }
                let vring = Vring::new(mem.clone(), QUEUE_SIZE).unwrap();
                vring.set_queue_size(QUEUE_SIZE);
                vring
                    .set_queue_info(desc_table, avail_ring, used_ring)
                    .unwrap();
                vring.set_queue_event_idx(true);
                vring.set_queue_ready(true);
                let settings = Settings {
                    event_idx: true,
                    poll: None,
                    refusals: device.refusals(),
                };
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
                    let mut served = 0;
                    queue::drain(
                        &vring,
                        &mem,
                        &settings,
                        &tracking,
                        Vec::new(),
                        |_, descriptors, mem| {
                            served += 1;
                            match device.handle(
                                q as usize,
                                descriptors,
                                mem,
                                &limits,
                                windows,
                                &mut bufs,
                            ) {
                                Handled::Done(used) => {
                                    assert_eq!(used, expected);
                                    Some(used)
                                }
                                handled => panic!("request {i} was not completed: {handled:?}"),
                            }
                        },
                    )
                    .unwrap();
                    assert_eq!(served, 1);
                    assert_eq!(driver.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
                }
                start.elapsed().as_nanos() as f64 / iters as f64
            })
        })
        .collect();
    let total: f64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    total / queues as f64
}
