//! A minimal vhost-user-blk frontend for tests that need what no client library does: keep
//! the in-flight area across backend processes, put chains in the rings without kicking,
//! and look at the used ring directly. Built on the vhost crate's `Frontend`; guest memory
//! is a memfd mapped here and shared with the backend; one split virtqueue.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE_SIZE: u16 = 16;
pub const MEM_SIZE: usize = 4 << 20;
pub const DESC_TABLE: u64 = 0;
pub const AVAIL_RING: u64 = 0x1000;
pub const USED_RING: u64 = 0x2000;
/// Each head `h` owns 64 KiB of buffers from here: header, data, status.
const BUFFERS: u64 = 0x10000;
const PER_HEAD: u64 = 0x10000;
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Guest memory shared with every backend process the test connects to.
pub struct GuestMem {
    pub mem: GuestMemoryMmap,
    file: File,
}

impl GuestMem {
    pub fn new() -> GuestMem {
        let fd =
            rustix::fs::memfd_create("daxd-test-guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(MEM_SIZE as u64).unwrap();
        let region =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), MEM_SIZE).unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        GuestMem { mem, file }
    }

    /// The memory table entry for this memory, claiming all of it.
    pub fn table(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.user_addr(0),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Shrinks the file behind the memory to `len` bytes (a hostile frontend's memory
    /// table then claims more than the file holds); the test must not touch the rest.
    pub fn truncate(&self, len: u64) {
        self.file.set_len(len).unwrap();
    }

    fn user_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn header(head: u16) -> u64 {
        BUFFERS + u64::from(head) * PER_HEAD
    }

    pub fn status_addr(head: u16) -> u64 {
        Self::header(head) + PER_HEAD - 1
    }

    pub fn data_addr(head: u16) -> u64 {
        Self::header(head) + 16
    }

    /// Writes a request's chain at descriptors `head`, `head + 1`, `head + 2`: header, data
    /// (if any), status.
    pub fn put_request(&self, head: u16, kind: u32, sector: u64, data: Option<&[u8]>, read: usize) {
        let mem = &self.mem;
        let header = Self::header(head);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(header)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(Self::status_addr(head)))
            .unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        let mut descs = vec![Descriptor::new(header, 16, next, head + 1)];
        if let Some(data) = data {
            mem.write_slice(data, GuestAddress(Self::data_addr(head)))
                .unwrap();
            descs.push(Descriptor::new(
                Self::data_addr(head),
                data.len() as u32,
                next,
                head + 2,
            ));
        } else if read > 0 {
            descs.push(Descriptor::new(
                Self::data_addr(head),
                read as u32,
                next | write,
                head + 2,
            ));
        }
        descs.push(Descriptor::new(Self::status_addr(head), 1, write, 0));
        // Descriptor i of the chain sits at head + i; without data the status is at
        // head + 1, where the header's `next` points.
        for (i, d) in descs.iter().enumerate() {
            let at = DESC_TABLE + (u64::from(head) + i as u64) * 16;
            mem.write_obj(*d, GuestAddress(at)).unwrap();
        }
    }

    pub fn put_write(&self, head: u16, sector: u64, data: &[u8]) {
        self.put_request(head, VIRTIO_BLK_T_OUT, sector, Some(data), 0);
    }

    pub fn put_flush(&self, head: u16) {
        self.put_request(head, VIRTIO_BLK_T_FLUSH, 0, None, 0);
    }

    pub fn put_read(&self, head: u16, sector: u64, len: usize) {
        self.put_request(head, VIRTIO_BLK_T_IN, sector, None, len);
    }

    pub fn read_data(&self, head: u16, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(Self::data_addr(head)))
            .unwrap();
        buf
    }

    /// `len` bytes of guest memory from `at`.
    pub fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
        buf
    }

    pub fn status(&self, head: u16) -> u8 {
        self.mem
            .read_obj(GuestAddress(Self::status_addr(head)))
            .unwrap()
    }

    /// Makes `heads` available (after the ones already there), without a kick.
    pub fn make_available(&self, heads: &[u16]) {
        let idx = self.avail_idx();
        for (i, head) in heads.iter().enumerate() {
            let slot = (idx.wrapping_add(i as u16) % QUEUE_SIZE) as u64;
            self.mem
                .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot))
                .unwrap();
        }
        self.mem
            .store(
                idx.wrapping_add(heads.len() as u16).to_le(),
                GuestAddress(AVAIL_RING + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Sets the available ring's index, whatever it says (a hostile or confused driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .store(idx.to_le(), GuestAddress(AVAIL_RING + 2), Ordering::Release)
            .unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(AVAIL_RING + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(USED_RING + 2), Ordering::Acquire)
                .unwrap(),
        )
    }

    /// The used ring's entries `from..to` (indices), as (head, length).
    pub fn used(&self, from: u16, to: u16) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut i = from;
        while i != to {
            let slot = u64::from(i % QUEUE_SIZE);
            let at = USED_RING + 4 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((u32::from_le(id), u32::from_le(len)));
            i = i.wrapping_add(1);
        }
        out
    }

    /// Publishes a used entry as a backend would (for a test that plays the part of a
    /// backend that died right after it).
    pub fn push_used(&self, head: u16, len: u32) {
        let idx = self.used_idx();
        let at = USED_RING + 4 + 8 * u64::from(idx % QUEUE_SIZE);
        self.mem
            .write_obj(u32::from(head).to_le(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at + 4))
            .unwrap();
        self.mem
            .store(
                idx.wrapping_add(1).to_le(),
                GuestAddress(USED_RING + 2),
                Ordering::Release,
            )
            .unwrap();
    }
}

/// One connection to a backend, its queue 0 started.
pub struct Connection {
    /// Kept open: closing it ends the connection.
    pub frontend: Frontend,
    kick: EventFd,
    /// Kept open for the backend's completions (the test polls the used ring).
    _call: EventFd,
}

/// The in-flight area a frontend keeps across backend processes.
pub struct Inflight {
    pub info: VhostUserInflight,
    pub file: File,
}

impl Inflight {
    /// Byte `at` of the area.
    pub fn write(&self, at: u64, bytes: &[u8]) {
        rustix::io::pwrite(&self.file, bytes, self.info.mmap_offset + at).unwrap();
    }

    /// `N` bytes of the area from `at`.
    pub fn read<const N: usize>(&self, at: u64) -> [u8; N] {
        let mut buf = [0u8; N];
        rustix::io::pread(&self.file, &mut buf, self.info.mmap_offset + at).unwrap();
        buf
    }
}

impl Connection {
    /// Connects to `socket` and starts queue 0 as QEMU does, with the ring continuing at
    /// `base` (QEMU sends the used index when the old backend died). Asks for an in-flight
    /// area if `inflight` holds none yet, and hands it over.
    pub fn start(
        socket: &Path,
        mem: &GuestMem,
        inflight: &mut Option<Inflight>,
        base: u16,
    ) -> Connection {
        let frontend = handshake(socket);
        frontend.set_mem_table(&[mem.table()]).unwrap();
        Connection::finish(frontend, mem, inflight, base)
    }

    /// Starts queue 0 on a connection whose memory table is set.
    pub fn finish(
        mut frontend: Frontend,
        mem: &GuestMem,
        inflight: &mut Option<Inflight>,
        base: u16,
    ) -> Connection {
        if inflight.is_none() {
            let request = VhostUserInflight::new(0, 0, 1, QUEUE_SIZE);
            let (info, file) = frontend.get_inflight_fd(&request).unwrap();
            *inflight = Some(Inflight { info, file });
        }
        let area = inflight.as_ref().unwrap();
        frontend
            .set_inflight_fd(&area.info, area.file.as_raw_fd())
            .unwrap();
        frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
        frontend.set_vring_base(0, base).unwrap();
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: mem.user_addr(DESC_TABLE),
            used_ring_addr: mem.user_addr(USED_RING),
            avail_ring_addr: mem.user_addr(AVAIL_RING),
            log_addr: None,
        };
        frontend.set_vring_addr(0, &config).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(0).unwrap();
        frontend.set_vring_kick(0, &kick).unwrap();
        frontend.set_vring_call(0, &call).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        Connection {
            frontend,
            kick,
            _call: call,
        }
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// Waits until the used index is at least `target`.
    pub fn wait_used(&self, mem: &GuestMem, target: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while (mem.used_idx().wrapping_sub(target) as i16) < 0 {
            assert!(
                Instant::now() < deadline,
                "used index {} did not reach {target} within 10 s",
                mem.used_idx()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The virtio features [`handshake`] acks.
pub const FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | VHOST_USER_F_PROTOCOL_FEATURES;

/// Connects and negotiates features and protocol features (in-flight tracking included),
/// up to the memory table.
pub fn handshake(socket: &Path) -> Frontend {
    handshake_with(socket, 0, VhostUserProtocolFeatures::empty())
}

/// [`handshake`], acking `features` and `protocol` on top of its own (each must be
/// offered).
pub fn handshake_with(
    socket: &Path,
    features: u64,
    protocol: VhostUserProtocolFeatures,
) -> Frontend {
    let mut frontend = connect(socket);
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert!(offered & VHOST_USER_F_PROTOCOL_FEATURES != 0);
    assert_eq!(
        offered & features,
        features,
        "the backend does not offer features {features:#x}"
    );
    frontend.set_features(FEATURES | features).unwrap();
    let offered = frontend.get_protocol_features().unwrap();
    assert!(
        offered.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        "the backend does not offer in-flight tracking: {offered:?}"
    );
    assert!(
        offered.contains(protocol),
        "the backend does not offer {protocol:?}: {offered:?}"
    );
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD
                | protocol,
        )
        .unwrap();
    // Every request waits for the backend's answer, so that a refusal shows where it
    // happens.
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
}

fn connect(socket: &Path) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Frontend::connect(socket, 1) {
            Ok(frontend) => return frontend,
            Err(e) if Instant::now() > deadline => panic!("connect to {}: {e}", socket.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
