//! The blk data path without sockets: parse + execute of 4 KiB reads and writes on a
//! region, as queue workers do it. `cargo bench -p daxd-blk` prints ns per request;
//! under `valgrind --tool=callgrind` it gives repeatable instruction counts.
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
//! log, on the request path.
//!
//! Set DAXD_BENCH_ITERS to change the number of requests per queue and case (default
//! 1,000,000).

use std::fs::OpenOptions;
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
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
/// Per-queue guest RAM: header at +0x1000, status at +0x8000, data at +0x2000.
const QUEUE_RAM: u64 = 0x10000;
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
    let region = Arc::new(
        Region::open(&RegionConfig {
            path: path.clone(),
            size: Some(REGION),
            resize: false,
            read_only: false,
            direct: false,
            lock: true,
        })
        .unwrap(),
    );
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
        .unwrap(),
    );
    let guest_window = GuestWindow {
        gpa: WINDOW_GPA,
        len: WINDOW,
        region_offset: WINDOW,
    };
    let plain = guest_memory::<()>(&path);
    let logging = guest_memory::<DirtyLog>(&path);

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
                let plain_ns = run(&device, &plain, guest_window, case, kind, queues, iters);
                let logging_ns = run(&device, &logging, guest_window, case, kind, queues, iters);
                println!(
                    "{name}, {}, {queues} queue(s): {plain_ns:.0} ns per request per queue on plain memory, {logging_ns:.0} ns with the dirty-log bitmap ({:+.1}%) ({iters} requests per queue)",
                    case.name(),
                    (logging_ns / plain_ns - 1.0) * 100.0
                );
            }
        }
    }
}

/// Guest RAM for headers and statuses, and the window mapped from the region file at
/// `path` as QEMU maps a memory-backend-file, with bitmap `B`.
fn guest_memory<B: NewBitmap>(path: &std::path::Path) -> Arc<GuestMemoryMmap<B>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    Arc::new(
        GuestMemoryMmap::<B>::from_ranges_with_files([
            (GuestAddress(0), 2 * QUEUE_RAM as usize, None),
            (
                GuestAddress(WINDOW_GPA),
                WINDOW as usize,
                Some(FileOffset::new(file, WINDOW)),
            ),
        ])
        .unwrap(),
    )
}

/// Runs `iters` requests of `kind` on each of `queues` threads at once; returns the mean
/// time per request of one queue.
fn run<B>(
    device: &Arc<BlkDevice>,
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
            let (device, mem, barrier) = (device.clone(), mem.clone(), barrier.clone());
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
                barrier.wait();
                let start = Instant::now();
                for i in 0..iters {
                    // A different page each time, spread like random I/O.
                    let page = first_page + (i.wrapping_mul(2_654_435_761) + q) % pages;
                    let mut header = [0u8; 16];
                    header[..4].copy_from_slice(&kind.to_le_bytes());
                    header[8..].copy_from_slice(&(page * 8).to_le_bytes());
                    mem.write_slice(&header, GuestAddress(hdr)).unwrap();
                    let chain = [
                        Descriptor::new(hdr, 16, 0, 0),
                        Descriptor::new(data, 4096, data_flags, 0),
                        Descriptor::new(status, 1, w, 0),
                    ];
                    let used = device.handle(
                        q as usize,
                        black_box(chain),
                        &*mem,
                        &limits,
                        windows,
                        &mut bufs,
                    );
                    assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
                    assert_eq!(black_box(used), Handled::Done(expected));
                }
                start.elapsed().as_nanos() as f64 / iters as f64
            })
        })
        .collect();
    let total: f64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    total / queues as f64
}
