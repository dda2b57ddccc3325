//! Every class of request a guest can send, well-formed or not.

use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use daxd_region::{Layout, Region, RegionConfig, Serve, Window};
use daxd_registry::{FrameRange, MappingRequest, PinSet, Registry, Target};

use super::*;

const MEM_SIZE: usize = 0x10_0000;
const DISK_SECTORS: u64 = 2048; // 1 MiB
const W: u16 = VRING_DESC_F_WRITE as u16;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;
/// Written to guest memory and the disk before each test, so any stray byte shows.
const FILL: u8 = 0x5a;
const STATUS_UNTOUCHED: u8 = 0xee;

struct Fixture {
    _dir: tempfile::TempDir,
    device: BlkDevice,
    mem: GuestMemoryMmap,
    bufs: ChainBuffers,
}

fn fixture_with(read_only: bool, sync: bool) -> Fixture {
    fixture_in_region(read_only, sync, DISK_SECTORS)
}

/// A disk of [`DISK_SECTORS`] at the start of a region of `region_sectors`.
fn fixture_in_region(read_only: bool, sync: bool, region_sectors: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, vec![FILL; (region_sectors * 512) as usize]).unwrap();
    let region = Arc::new(
        Region::open(&RegionConfig {
            read_only,
            ..RegionConfig::new(path, None)
        })
        .unwrap(),
    );
    let registry = Arc::new(Registry::new(region.frames()));
    let disk = Window {
        name: "disk".into(),
        offset: 0,
        size: DISK_SECTORS * 512,
        serve: Serve::Blk,
    };
    let layout = Layout::new(region.size(), vec![disk], false).unwrap();
    let device = BlkDevice::new(
        region,
        registry,
        layout.blk().unwrap(),
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only,
            sync,
            serial: Serial::new("daxd-test-serial").unwrap(),
        },
    )
    .unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&vec![FILL; MEM_SIZE], GuestAddress(0))
        .unwrap();
    mem.write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS))
        .unwrap();
    Fixture {
        _dir: dir,
        device,
        mem,
        bufs: ChainBuffers::new(),
    }
}

fn fixture() -> Fixture {
    fixture_with(false, false)
}

fn all_features(f: &Fixture) -> DeviceLimits {
    f.device.limits(f.device.features())
}

fn header(f: &Fixture, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    f.mem.write_slice(&h, GuestAddress(at)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, 0)
}

/// Runs one chain and returns (used length, status byte in guest memory).
fn run(f: &mut Fixture, chain: &[Descriptor]) -> (u32, u8) {
    let limits = all_features(f);
    run_with(f, chain, &limits)
}

fn run_with(f: &mut Fixture, chain: &[Descriptor], limits: &DeviceLimits) -> (u32, u8) {
    let handled = f
        .device
        .handle(0, chain.iter().copied(), &f.mem, limits, &[], &mut f.bufs);
    (
        complete(f, handled),
        f.mem.read_obj(GuestAddress(STATUS)).unwrap(),
    )
}

/// The used length, completing a deferred FLUSH the way a queue worker's flusher does.
fn complete(f: &Fixture, handled: Handled) -> u32 {
    match handled {
        Handled::Done(used) => used,
        Handled::Flush(pending) => f.device.complete_flush(&pending, f.device.flush(), &f.mem),
        Handled::Later { used, .. } => used,
    }
}

fn disk(f: &Fixture, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    f.device.region().read_bytes(offset, &mut buf).unwrap();
    buf
}

fn guest(f: &Fixture, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    f.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn assert_disk_untouched(f: &Fixture) {
    assert!(
        disk(f, 0, (DISK_SECTORS * 512) as usize)
            .iter()
            .all(|&b| b == FILL),
        "the disk was modified"
    );
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_copies_disk_bytes_into_guest_buffers() {
    let mut f = fixture();
    f.device.region().write_bytes(4096, &[0xab; 4096]).unwrap();
    header(&f, HDR, VIRTIO_BLK_T_IN, 8);
    let (used, status) = run(&mut f, &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)]);
    assert_eq!((used, status), (4097, OK));
    assert!(guest(&f, DATA, 4096).iter().all(|&b| b == 0xab));
    assert_eq!(guest(&f, DATA + 4096, 1), [FILL], "read past its buffer");
}

#[test]
fn write_lands_exactly_at_its_sectors() {
    let mut f = fixture();
    f.mem
        .write_slice(&[0x11; 1024], GuestAddress(DATA))
        .unwrap();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 3);
    let (used, status) = run(&mut f, &[d(HDR, 16, 0), d(DATA, 1024, 0), d(STATUS, 1, W)]);
    assert_eq!((used, status), (1, OK));
    assert!(disk(&f, 3 * 512, 1024).iter().all(|&b| b == 0x11));
    assert!(disk(&f, 0, 3 * 512).iter().all(|&b| b == FILL));
    assert!(disk(&f, 5 * 512, 512).iter().all(|&b| b == FILL));
}

#[test]
fn framing_does_not_matter() {
    // Header split over two descriptors, data and status sharing one descriptor, data
    // scattered over three buffers: all legal under VIRTIO 1.x.
    let mut f = fixture();
    let mut pattern = vec![0u8; 1536];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = i as u8;
    }
    f.device.region().write_bytes(0, &pattern).unwrap();
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    let chain = [
        d(HDR, 8, 0),
        d(HDR + 8, 8, 0),
        d(DATA, 512, W),
        d(DATA + 0x1000, 512, W),
        d(STATUS - 512, 513, W),
    ];
    let (used, status) = run(&mut f, &chain);
    assert_eq!((used, status), (1537, OK));
    assert_eq!(guest(&f, DATA, 512), pattern[..512]);
    assert_eq!(guest(&f, DATA + 0x1000, 512), pattern[512..1024]);
    assert_eq!(guest(&f, STATUS - 512, 512), pattern[1024..]);
}

#[test]
fn chain_without_status_byte_is_dropped_untouched() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    let (used, status) = run(&mut f, &[d(HDR, 16, 0), d(DATA, 512, 0)]);
    assert_eq!((used, status), (0, STATUS_UNTOUCHED));
    assert_disk_untouched(&f);
}

#[test]
fn empty_chain_is_dropped() {
    let mut f = fixture();
    assert_eq!(run(&mut f, &[]), (0, STATUS_UNTOUCHED));
}

#[test]
fn short_header_is_ioerr() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&mut f, &[d(HDR, 15, 0), d(STATUS, 1, W)]), (1, IOERR));
    assert_eq!(run(&mut f, &[d(STATUS, 1, W)]), (1, IOERR));
    assert_disk_untouched(&f);
}

#[test]
fn read_with_device_readable_data_is_ioerr() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    let (used, status) = run(&mut f, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]);
    assert_eq!((used, status), (1, IOERR));
    assert!(guest(&f, DATA, 512).iter().all(|&b| b == FILL));
}

#[test]
fn write_with_device_writable_data_is_ioerr() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    let (used, status) = run(&mut f, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]);
    assert_eq!((used, status), (1, IOERR));
    assert_disk_untouched(&f);
    assert!(guest(&f, DATA, 512).iter().all(|&b| b == FILL));
}

#[test]
fn readable_descriptor_after_writable_is_ioerr() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    let chain = [d(HDR, 16, 0), d(STATUS, 1, W), d(DATA, 512, 0)];
    // The last writable byte is still the status byte, so the error can be reported.
    assert_eq!(run(&mut f, &chain), (1, IOERR));
    assert_disk_untouched(&f);
}

#[test]
fn ranges_beyond_capacity_are_ioerr() {
    let mut f = fixture();
    for (sector, len) in [
        (DISK_SECTORS, 512),
        (DISK_SECTORS - 1, 1024),
        (u64::MAX, 512),
        (u64::MAX - 1, 1024),
        (u64::MAX >> 9, 512), // sector << 9 would overflow
    ] {
        header(&f, HDR, VIRTIO_BLK_T_OUT, sector);
        let chain = [d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, IOERR), "write at {sector}+{len}");
        header(&f, HDR, VIRTIO_BLK_T_IN, sector);
        let chain = [d(HDR, 16, 0), d(DATA, len, W), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, IOERR), "read at {sector}+{len}");
    }
    assert_disk_untouched(&f);
    assert!(guest(&f, DATA, 1024).iter().all(|&b| b == FILL));

    // The last sector itself is fine.
    header(&f, HDR, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let chain = [d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)];
    assert_eq!(run(&mut f, &chain), (513, OK));
}

#[test]
fn a_grown_disk_serves_its_new_sectors_and_never_shrinks() {
    let mut f = fixture_in_region(false, false, 4 * DISK_SECTORS);
    let old = DISK_SECTORS * 512;
    header(&f, HDR, VIRTIO_BLK_T_IN, DISK_SECTORS);
    let chain = [d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)];
    assert_eq!(
        run(&mut f, &chain),
        (1, IOERR),
        "past the end before growing"
    );

    assert_eq!(f.device.grow(2 * old).unwrap(), old);
    assert_eq!(f.device.size(), 2 * old);
    assert_eq!(
        f.device.config_space().capacity.to_native(),
        2 * DISK_SECTORS
    );
    assert_eq!(all_features(&f).capacity_sectors, 2 * DISK_SECTORS);
    assert_eq!(run(&mut f, &chain), (513, OK), "the first new sector");

    let refused = |r: Result<u64, BlkError>| r.unwrap_err().to_string();
    assert!(refused(f.device.grow(old)).contains("only grows"));
    assert!(refused(f.device.grow(2 * old + 512)).contains("multiple of 4 KiB"));
    assert!(refused(f.device.grow(5 * old)).contains("the region has"));
    assert_eq!(f.device.size(), 2 * old, "a refused resize changes nothing");
    // Growing to the same size is a no-op, and the whole region is reachable.
    assert_eq!(f.device.grow(2 * old).unwrap(), 2 * old);
    assert_eq!(f.device.grow(4 * old).unwrap(), 2 * old);
}

#[test]
fn odd_sizes_are_ioerr() {
    let mut f = fixture();
    for len in [1, 511, 513, 1000] {
        header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
        let chain = [d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, IOERR), "write of {len}");
        header(&f, HDR, VIRTIO_BLK_T_IN, 0);
        let chain = [d(HDR, 16, 0), d(DATA, len, W), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, IOERR), "read of {len}");
    }
    assert_disk_untouched(&f);
}

#[test]
fn zero_length_transfers_succeed_and_move_nothing() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, OK));
    header(&f, HDR, VIRTIO_BLK_T_IN, DISK_SECTORS);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, OK));
    assert_disk_untouched(&f);
}

#[test]
fn writes_to_a_read_only_device_are_ioerr() {
    let mut f = fixture_with(true, false);
    assert_ne!(f.device.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f.device.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
    // A driver that accepted discard anyway, and plain writes.
    let mut limits = all_features(&f);
    limits.discard = true;
    limits.write_zeroes = true;
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    let chain = [d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)];
    assert_eq!(run_with(&mut f, &chain, &limits), (1, IOERR));
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&f, HDR, kind, 0);
        discard_segment(&f, HDR + 16, 0, 8, 0);
        let chain = [d(HDR, 32, 0), d(STATUS, 1, W)];
        assert_eq!(run_with(&mut f, &chain, &limits), (1, IOERR));
    }
    assert_disk_untouched(&f);
    // Reads and flushes still work.
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    let chain = [d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)];
    assert_eq!(run_with(&mut f, &chain, &limits), (513, OK));
    header(&f, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run_with(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)], &limits),
        (1, OK)
    );
}

#[test]
fn unknown_types_are_unsupp() {
    let mut f = fixture();
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        VIRTIO_BLK_T_ZONE_APPEND,
        99,
        u32::MAX,
    ] {
        header(&f, HDR, kind, 0);
        let chain = [d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, UNSUPP), "type {kind}");
    }
    assert!(guest(&f, DATA, 512).iter().all(|&b| b == FILL));
}

#[test]
fn descriptor_outside_guest_memory_is_ioerr() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    for (addr, len) in [
        (MEM_SIZE as u64, 512),
        (MEM_SIZE as u64 - 256, 512),
        (u64::MAX - 100, 512),
    ] {
        let chain = [d(HDR, 16, 0), d(addr, len, W), d(STATUS, 1, W)];
        assert_eq!(run(&mut f, &chain), (1, IOERR), "buffer at {addr:#x}");
    }
    assert!(guest(&f, MEM_SIZE as u64 - 256, 256)
        .iter()
        .all(|&b| b == FILL));
    // A header outside guest memory.
    let chain = [d(u64::MAX - 8, 16, 0), d(STATUS, 1, W)];
    assert_eq!(run(&mut f, &chain), (1, IOERR));
}

#[test]
fn status_outside_guest_memory_is_dropped() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    let chain = [d(HDR, 16, 0), d(DATA, 512, 0), d(MEM_SIZE as u64, 1, W)];
    assert_eq!(run(&mut f, &chain), (0, STATUS_UNTOUCHED));
    assert_disk_untouched(&f);
}

#[test]
fn get_id_returns_the_serial_without_overrunning_small_buffers() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let chain = [d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)];
    assert_eq!(run(&mut f, &chain), (21, OK));
    assert_eq!(&guest(&f, DATA, 20)[..16], b"daxd-test-serial");
    assert_eq!(&guest(&f, DATA, 20)[16..], [0; 4]);

    let chain = [d(HDR, 16, 0), d(DATA + 100, 8, W), d(STATUS, 1, W)];
    assert_eq!(run(&mut f, &chain), (9, OK));
    assert_eq!(guest(&f, DATA + 100, 8), b"daxd-tes");
    assert_eq!(guest(&f, DATA + 108, 1), [FILL]);

    let chain = [d(HDR, 16, 0), d(STATUS, 1, W)];
    assert_eq!(run(&mut f, &chain), (1, IOERR));
}

#[test]
fn default_serial_is_stable_and_differs_between_files() {
    let dir = tempfile::tempdir().unwrap();
    let a = Serial::for_file(&dir.path().join("a.img"), 12);
    assert_eq!(a, Serial::for_file(&dir.path().join("a.img"), 12));
    assert_ne!(a, Serial::for_file(&dir.path().join("b.img"), 12));
    assert_ne!(a, Serial::for_file(&dir.path().join("a.img"), 13));
    assert_eq!(a.to_string().len(), 20);
    assert!(a.to_string().starts_with("daxd-"));
    assert!(Serial::new("123456789012345678901").is_err());
}

fn discard_segment(f: &Fixture, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    f.mem.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_zero_exactly_their_ranges() {
    let mut f = fixture();
    let chain = [d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)];
    for (kind, sector, sectors, flags) in [
        (VIRTIO_BLK_T_DISCARD, 8, 8, 0),
        (VIRTIO_BLK_T_DISCARD, 32, 16, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 100, 3, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            200,
            1,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
    ] {
        header(&f, HDR, kind, 0);
        discard_segment(&f, DATA, sector, sectors, flags);
        assert_eq!(run(&mut f, &chain), (1, OK));
    }

    let bytes = disk(&f, 0, (DISK_SECTORS * 512) as usize);
    let zeroed = |s: usize| {
        (8..16).contains(&s) || (32..48).contains(&s) || (100..103).contains(&s) || s == 200
    };
    for sector in 0..DISK_SECTORS as usize {
        let expect = if zeroed(sector) { 0 } else { FILL };
        assert!(
            bytes[sector * 512..(sector + 1) * 512]
                .iter()
                .all(|&b| b == expect),
            "sector {sector}"
        );
    }
}

#[test]
fn malformed_discards_are_refused_before_any_range_is_touched() {
    let mut f = fixture();
    let chain = [d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)];
    // Out of range.
    header(&f, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&f, DATA, DISK_SECTORS - 4, 8, 0);
    assert_eq!(run(&mut f, &chain), (1, IOERR));
    // Flags on a discard.
    discard_segment(&f, DATA, 16, 8, 1);
    assert_eq!(run(&mut f, &chain), (1, UNSUPP));
    // Unknown write-zeroes flag.
    header(&f, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    discard_segment(&f, DATA, 16, 8, 2);
    assert_eq!(run(&mut f, &chain), (1, UNSUPP));
    // Payload not a multiple of 16, or empty.
    discard_segment(&f, DATA, 16, 8, 0);
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, 31, 0), d(STATUS, 1, W)]),
        (1, IOERR)
    );
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, IOERR));
    // More segments than advertised (one, as QEMU's own tests expect of a backend).
    discard_segment(&f, DATA + 16, 24, 8, 0);
    let many = (request::MAX_DISCARD_SEGMENTS as u32 + 1) * 16;
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, many, 0), d(STATUS, 1, W)]),
        (1, UNSUPP)
    );
    // Larger than max_discard_sectors.
    discard_segment(&f, DATA, 0, MAX_DISCARD_SECTORS + 1, 0);
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)]),
        (1, IOERR)
    );
    // Data in the wrong direction.
    discard_segment(&f, DATA, 0, 8, 0);
    assert_eq!(
        run(
            &mut f,
            &[
                d(HDR, 16, 0),
                d(DATA, 16, 0),
                d(DATA + 512, 16, W),
                d(STATUS, 1, W)
            ]
        ),
        (1, IOERR)
    );
    assert_disk_untouched(&f);
}

#[test]
fn discard_without_negotiation_is_unsupp() {
    let mut f = fixture();
    let limits = f
        .device
        .limits(1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&f, HDR, kind, 0);
        discard_segment(&f, DATA, 0, 8, 0);
        let chain = [d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)];
        assert_eq!(run_with(&mut f, &chain, &limits), (1, UNSUPP));
    }
    assert_disk_untouched(&f);
}

#[test]
fn flush_succeeds() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, OK));
}

#[test]
fn sync_mode_is_write_through() {
    let f = fixture_with(false, true);
    assert_eq!(f.device.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let f = fixture();
    assert_ne!(f.device.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
}

#[test]
fn config_space_matches_the_device() {
    let f = fixture();
    let c = f.device.read_config(0, 60);
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        DISK_SECTORS
    );
    assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
    assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 1);
    // Frontends ask for their own struct size; the answer must have exactly that length.
    assert_eq!(f.device.read_config(0, 96).len(), 96);
    assert_eq!(f.device.read_config(56, 40)[0], 1);
    assert_eq!(f.device.read_config(u32::MAX, 4), vec![0; 4]);
}

fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

#[test]
fn chains_from_a_real_split_queue_including_indirect_tables() {
    let mut f = fixture();
    f.device.region().write_bytes(0, &[0x77; 512]).unwrap();
    let mem = f.mem.clone();
    let queue = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    queue
        .add_desc_chains(
            &[
                raw(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
                raw(DATA, 512, W | VRING_DESC_F_NEXT as u16, 2),
                raw(STATUS, 1, W, 0),
            ],
            0,
        )
        .unwrap();
    let mut q: Queue = queue.create_queue().unwrap();
    let chain = q.iter(&mem).unwrap().next().unwrap();
    let limits = all_features(&f);
    assert_eq!(
        f.device.handle(0, chain, &mem, &limits, &[], &mut f.bufs),
        Handled::Done(513)
    );
    assert_eq!(guest(&f, DATA, 512), vec![0x77; 512]);

    // The same request through an indirect table.
    let mem = f.mem.clone();
    let mut queue = MockSplitQueue::create(&mem, GuestAddress(0x5_0000), 16);
    mem.write_slice(&[0; 512], GuestAddress(DATA)).unwrap();
    let table = [
        raw(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        raw(DATA, 512, W | VRING_DESC_F_NEXT as u16, 2),
        raw(STATUS, 1, W, 0),
    ];
    mem.write_slice(
        // SAFETY-free: RawDescriptor is ByteValued; serialise by hand for clarity.
        &table
            .iter()
            .flat_map(|r| vm_memory::ByteValued::as_slice(r).to_vec())
            .collect::<Vec<u8>>(),
        GuestAddress(0x6_0000),
    )
    .unwrap();
    queue
        .add_desc_chains(
            &[raw(
                0x6_0000,
                48,
                virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
                0,
            )],
            0,
        )
        .unwrap();
    let _ = &mut queue;
    let mut q: Queue = queue.create_queue().unwrap();
    let chain = q.iter(&mem).unwrap().next().unwrap();
    assert_eq!(
        f.device.handle(0, chain, &mem, &limits, &[], &mut f.bufs),
        Handled::Done(513)
    );
    assert_eq!(guest(&f, DATA, 512), vec![0x77; 512]);
}

#[test]
fn looping_chains_terminate() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let queue = MockSplitQueue::create(&mem, GuestAddress(0x4_0000), 16);
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    // Descriptor 1 points back to itself.
    queue
        .add_desc_chains(
            &[
                raw(HDR, 16, VRING_DESC_F_NEXT as u16, 1),
                raw(DATA, 512, W | VRING_DESC_F_NEXT as u16, 1),
            ],
            0,
        )
        .unwrap();
    let mut q: Queue = queue.create_queue().unwrap();
    let chain = q.iter(&mem).unwrap().next().unwrap();
    let limits = all_features(&f);
    // The loop is cut at the queue size: 15 data buffers of 512 bytes whose last byte is
    // taken as status; 7679 data bytes is not a sector multiple.
    assert_eq!(
        f.device.handle(0, chain, &mem, &limits, &[], &mut f.bufs),
        Handled::Done(1)
    );
    assert_disk_untouched(&f);
}

fn map_window(f: &Fixture, frames: FrameRange) -> daxd_registry::MappingId {
    let registry = f.device.registry();
    let owner = registry.new_owner("test");
    registry
        .map(
            owner,
            MappingRequest {
                device: "virtio-pmem".into(),
                target: Target::GuestPhysical { gpa: 1 << 32 },
                frames,
                writable: true,
            },
        )
        .unwrap()
}

#[test]
fn discard_and_write_zeroes_of_a_mapped_range_are_refused_and_change_nothing() {
    let mut f = fixture();
    // Frames 4..8 (sectors 32..64) are mapped by a guest.
    map_window(&f, FrameRange { start: 4, end: 8 });
    let chain = [d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)];
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&f, HDR, kind, 0);
        // Sectors 24..40 touch frame 4: nothing may happen, not even to frame 3.
        discard_segment(&f, DATA, 24, 16, 0);
        assert_eq!(run(&mut f, &chain), (1, IOERR), "type {kind}");
    }
    assert_disk_untouched(&f);
    // Next to the mapping, discard works.
    header(&f, HDR, VIRTIO_BLK_T_DISCARD, 0);
    discard_segment(&f, DATA, 64, 8, 0);
    assert_eq!(run(&mut f, &chain), (1, OK));
    discard_segment(&f, DATA, 0, 32, 0);
    assert_eq!(run(&mut f, &chain), (1, OK));
    assert!(disk(&f, 0, 32 * 512).iter().all(|&b| b == 0));
    assert!(disk(&f, 32 * 512, 32 * 512).iter().all(|&b| b == FILL));
}

#[test]
fn writes_to_visible_pages_are_dirty_until_a_flush() {
    let mut f = fixture();
    map_window(&f, FrameRange { start: 2, end: 4 });
    header(&f, HDR, VIRTIO_BLK_T_OUT, 16); // frame 2
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)]),
        (1, OK)
    );
    let registry = f.device.registry().clone();
    assert_ne!(registry.descriptor(2).unwrap().dirty_epoch, 0);
    assert_eq!(registry.descriptor(3).unwrap().dirty_epoch, 0);
    header(&f, HDR, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, OK));
    assert_eq!(registry.descriptor(2).unwrap().dirty_epoch, 0);
    assert_ne!(registry.snapshot().last_flushed, 0);
}

#[test]
fn guest_buffers_in_a_visible_window_are_pinned_only_while_in_use() {
    let mut f = fixture();
    // Guest memory 0x2000..0x4000 is region bytes 64 KiB.. (frames 16, 17).
    let windows = [GuestWindow {
        gpa: DATA,
        len: 0x2000,
        region_offset: 16 * 4096,
    }];
    map_window(&f, FrameRange { start: 16, end: 18 });
    f.device.region().write_bytes(0, &[0x42; 512]).unwrap();
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    let limits = all_features(&f);
    let chain = [d(HDR, 16, 0), d(DATA + 4096, 512, W), d(STATUS, 1, W)];
    let used = f.device.handle(
        0,
        chain.iter().copied(),
        &f.mem,
        &limits,
        &windows,
        &mut f.bufs,
    );
    assert_eq!(used, Handled::Done(513));
    assert_eq!(guest(&f, DATA + 4096, 512), vec![0x42; 512]);
    let registry = f.device.registry();
    assert_eq!(
        registry.descriptor(17).unwrap().pin_count,
        0,
        "pin outlived the request"
    );
    // What the request held while it ran: the frame behind its buffer, nothing else.
    let mut set = PinSet::default();
    let pins = f
        .device
        .pin_guest_buffers(&mut set, f.bufs.chain.writable(), 0, 512, &windows);
    let ranges: Vec<FrameRange> = pins.frames().collect();
    assert_eq!(ranges, vec![FrameRange { start: 17, end: 18 }]);
    assert_eq!(registry.descriptor(17).unwrap().pin_count, 1);
    assert_eq!(registry.descriptor(16).unwrap().pin_count, 0);
    drop(pins);
    assert_eq!(registry.descriptor(17).unwrap().pin_count, 0);
    let mut set = PinSet::default();
    assert_eq!(
        f.device
            .pin_guest_buffers(&mut set, f.bufs.chain.writable(), 0, 512, &[])
            .frames()
            .count(),
        0
    );
}

#[test]
fn flushes_are_deferred_and_completed_together() {
    let mut f = fixture();
    let limits = all_features(&f);
    header(&f, HDR, VIRTIO_BLK_T_FLUSH, 0);
    f.mem
        .write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS + 1))
        .unwrap();
    let first = f.device.handle(
        0,
        [d(HDR, 16, 0), d(STATUS, 1, W)],
        &f.mem,
        &limits,
        &[],
        &mut f.bufs,
    );
    let second = f.device.handle(
        0,
        [d(HDR, 16, 0), d(STATUS + 1, 1, W)],
        &f.mem,
        &limits,
        &[],
        &mut f.bufs,
    );
    let (Handled::Flush(a), Handled::Flush(b)) = (first, second) else {
        panic!("flushes were not deferred: {first:?} {second:?}");
    };
    // Nothing is reported before the flush ran.
    assert_eq!(guest(&f, STATUS, 2), [STATUS_UNTOUCHED, STATUS_UNTOUCHED]);
    let epoch = f.device.registry().snapshot().last_flushed;
    let flushed = f.device.flush();
    assert_eq!(
        [a, b].map(|pending| f.device.complete_flush(&pending, flushed, &f.mem)),
        [1, 1]
    );
    assert_eq!(guest(&f, STATUS, 2), [OK, OK]);
    assert!(
        f.device.registry().snapshot().last_flushed > epoch,
        "one flush epoch completed"
    );
}

#[test]
fn every_request_is_counted_by_type_status_and_bytes() {
    let mut f = fixture();
    header(&f, HDR, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, 4096, 0), d(STATUS, 1, W)]),
        (1, OK)
    );
    header(&f, HDR, VIRTIO_BLK_T_IN, 0);
    for _ in 0..2 {
        assert_eq!(
            run(&mut f, &[d(HDR, 16, 0), d(DATA, 1024, W), d(STATUS, 1, W)]),
            (1025, OK)
        );
    }
    // Past the end of the disk, an unknown type, no status byte.
    header(&f, HDR, VIRTIO_BLK_T_IN, DISK_SECTORS);
    assert_eq!(
        run(&mut f, &[d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)]),
        (1, IOERR)
    );
    header(&f, HDR, 77, 0);
    assert_eq!(run(&mut f, &[d(HDR, 16, 0), d(STATUS, 1, W)]), (1, UNSUPP));
    assert_eq!(run(&mut f, &[d(HDR, 16, 0)]).0, 0);
    // A FLUSH is in flight until the flusher completes it.
    header(&f, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let limits = f.device.limits(f.device.features());
    let handled = f.device.handle(
        0,
        [d(HDR, 16, 0), d(STATUS, 1, W)],
        &f.mem,
        &limits,
        &[],
        &mut f.bufs,
    );
    assert_eq!(f.device.metrics().queues[0].flushes_in_flight, 1);
    assert_eq!(complete(&f, handled), 1);

    let m = f.device.metrics();
    assert_eq!(m.version, stats::METRICS_VERSION);
    assert_eq!(m.region_flushes, 1);
    let q = &m.queues[0];
    let count = |kind| q.count(kind);
    assert_eq!(
        (
            count(stats::Kind::Write),
            count(stats::Kind::Read),
            count(stats::Kind::Flush),
            count(stats::Kind::Invalid)
        ),
        (1, 2, 1, 2)
    );
    assert_eq!((q.ok, q.ioerr, q.unsupp, q.dropped), (4, 1, 1, 1));
    assert_eq!((q.bytes_written, q.bytes_read), (4096, 2048));
    assert_eq!(q.flushes_in_flight, 0);
    assert_eq!(q.flush_latency.count(), 1);
    // Request 0 of every 64 is timed: the first write.
    assert_eq!(q.request_latency.count(), 1);
}
