//! The blk data path without sockets: parse + execute of 4 KiB reads and writes on a
//! region, as a queue worker does it. `cargo bench -p daxd-blk` prints ns per request;
//! under `valgrind --tool=callgrind` it gives repeatable instruction counts.
//!
//! Each kind runs twice: with nothing guest-visible, and with a pmem window mapped next to
//! the disk (the registry live, but none of the I/O touching mapped pages), which shows
//! what the registry checks cost the block path. Set DAXD_BENCH_ITERS to change the
//! number of requests per kind (default 1,000,000).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use daxd_blk::{BlkConfig, BlkDevice, ChainBuffers, Handled, Serial};
use daxd_region::{FrameRange, Layout, Region, RegionConfig, Window};
use daxd_registry::{MappingRequest, Registry, Target};

const REGION: u64 = 128 << 20;
/// The disk is the first half; the second half is a pmem window, mapped for the second
/// pass so that the registry is live while the disk's I/O never touches mapped pages.
const DISK: u64 = REGION / 2;

fn main() {
    let iters: u64 = std::env::var("DAXD_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let region = Arc::new(
        Region::open(&RegionConfig {
            path: dir.path().join("bench.img"),
            size: Some(REGION),
            resize: false,
            read_only: false,
            direct: false,
        })
        .unwrap(),
    );
    // Touch every page once so the measurement is not about page faults.
    region.write_bytes(0, &vec![1u8; REGION as usize]).unwrap();
    let layout = Layout::new(
        region.size(),
        vec![
            Window::parse("name=disk,offset=0,size=64M,serve=blk").unwrap(),
            Window::parse("name=pm0,offset=64M,size=64M,serve=pmem").unwrap(),
        ],
        false,
    )
    .unwrap();
    let registry = Arc::new(Registry::new(region.frames()));
    let device = BlkDevice::new(
        region,
        registry.clone(),
        layout.blk().unwrap(),
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            sync: false,
            serial: Serial::new("bench").unwrap(),
        },
    )
    .unwrap();
    let limits = device.limits(device.features());
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let mut bufs = ChainBuffers::new();
    let w = VRING_DESC_F_WRITE as u16;

    let kinds = [
        ("read 4 KiB", VIRTIO_BLK_T_IN, w),
        ("write 4 KiB", VIRTIO_BLK_T_OUT, 0),
    ];
    for pass in ["nothing mapped", "pmem window mapped"] {
        if pass == "pmem window mapped" {
            let owner = registry.new_owner("bench");
            registry
                .map(
                    owner,
                    MappingRequest {
                        device: "bench".into(),
                        target: Target::GuestPhysical { gpa: 1 << 32 },
                        frames: FrameRange::covering(DISK, REGION - DISK),
                        writable: true,
                    },
                )
                .unwrap();
        }
        for (name, kind, data_flags) in kinds {
            let start = Instant::now();
            for i in 0..iters {
                // A different page each time, spread over the region like random I/O.
                let sector = (i.wrapping_mul(2_654_435_761) % (DISK / 4096)) * 8;
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&kind.to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                mem.write_slice(&header, GuestAddress(0x1000)).unwrap();
                let chain = [
                    Descriptor::new(0x1000, 16, 0, 0),
                    Descriptor::new(0x2000, 4096, data_flags, 0),
                    Descriptor::new(0x8000, 1, w, 0),
                ];
                let used = device.handle(black_box(chain), &mem, &limits, &[], &mut bufs);
                assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
                let expected = if kind == VIRTIO_BLK_T_IN { 4097 } else { 1 };
                assert_eq!(black_box(used), Handled::Done(expected));
            }
            let ns = start.elapsed().as_nanos() as f64 / iters as f64;
            println!("{name}, {pass}: {ns:.0} ns per request ({iters} requests)");
        }
    }
}
