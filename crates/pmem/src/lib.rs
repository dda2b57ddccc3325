//! virtio-pmem (device id 27) for one pmem window of the region, without any transport.
//!
//! With `VIRTIO_PMEM_F_SHMEM_REGION` the guest finds the window in shared-memory region 0
//! (which the vhost-user glue fills with `VHOST_USER_BACKEND_SHMEM_MAP`), and the config
//! space's start/size are 0. The one queue carries FLUSH requests: each makes every
//! earlier write to the window durable before it completes. Requests are parsed
//! ([`parse`]) apart from being executed ([`PmemDevice::handle`]), as in the blk device.

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, Le32, Le64};

use daxd_fault::{Faults, Io, Op, Verdict};
use daxd_record::WindowRecorder;
use daxd_region::{Region, RegionError, Window, PMEM_ALIGN};
use daxd_registry::{
    FrameRange, MappingId, MappingRequest, OwnerId, Registry, RegistryError, Target,
};
use daxd_virtio::{Chain, ChainError, RefusalLog};

/// The window is in shared-memory region 0, not at config `start` (virtio 1.3, 5.19.3).
pub const VIRTIO_PMEM_F_SHMEM_REGION: u32 = 0;
/// Shared-memory region id the window is mapped into.
pub const SHMEM_REGION_ID: u8 = 0;
/// `virtio_pmem_req.type` of a flush, the only request virtio-pmem defines.
const VIRTIO_PMEM_REQ_TYPE_FLUSH: u32 = 0;
/// `virtio_pmem_resp.ret` for a failed request (Linux reports -EIO for any non-zero).
const RESP_ERROR: u32 = 1;

/// A virtio-pmem FLUSH as fault rules see it.
const FLUSH_IO: Io = Io {
    op: Op::PmemFlush,
    queue: 0,
    sectors: [0, 0],
};

/// `struct virtio_pmem_req`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PmemRequest {
    pub request_type: Le32,
}

// SAFETY: one little-endian integer; any bit pattern is valid.
unsafe impl ByteValued for PmemRequest {}

/// `struct virtio_pmem_resp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct PmemResponse {
    pub ret: Le32,
}

// SAFETY: one little-endian integer; any bit pattern is valid.
unsafe impl ByteValued for PmemResponse {}

/// `struct virtio_pmem_config`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VirtioPmemConfig {
    pub start: Le64,
    pub size: Le64,
}

// SAFETY: two little-endian integers, no padding; any bit pattern is valid.
unsafe impl ByteValued for VirtioPmemConfig {}

/// Errors in the device's configuration.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    #[error("window {0} is not served as pmem, is not 2 MiB aligned and sized, or lies outside the region")]
    BadWindow(String),
    #[error("queue size {0} is invalid: use a power of two from 2 to 32768")]
    QueueSize(u16),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PmemRequestError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("no 4-byte response buffer")]
    NoResponse,
    #[error("request of {0} bytes, 4 needed")]
    ShortRequest(u64),
    #[error("guest memory changed while the request was read")]
    GuestMemory,
    #[error("unknown request type {0}")]
    UnknownType(u32),
}

/// A request that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Flush,
}

/// A chain after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    /// Where the response goes; `None` when the chain has no room for one, in which case
    /// the request can only be dropped.
    pub response: Option<GuestAddress>,
    pub request: Result<Request, PmemRequestError>,
}

/// Loads one chain into `chain` and parses it: a 4-byte request in the device-readable
/// stream and a 4-byte response at the start of the device-writable one.
pub fn parse<M: GuestMemoryBackend>(
    descriptors: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    chain: &mut Chain,
) -> ParsedChain {
    let loaded = chain.load(descriptors, mem);
    let response_len = std::mem::size_of::<PmemResponse>() as u64;
    let response = chain
        .writable()
        .pieces(0, response_len)
        .next()
        .filter(|(_, len)| *len == response_len)
        .map(|(addr, _)| addr)
        .filter(|addr| GuestMemoryBackend::check_range(mem, *addr, response_len as usize));
    let Some(response) = response else {
        return ParsedChain {
            response: None,
            request: Err(loaded
                .err()
                .map_or(PmemRequestError::NoResponse, Into::into)),
        };
    };
    let request = loaded.map_err(PmemRequestError::from).and_then(|()| {
        let readable = chain.readable();
        if readable.len() < std::mem::size_of::<PmemRequest>() as u64 {
            return Err(PmemRequestError::ShortRequest(readable.len()));
        }
        let mut request = PmemRequest::default();
        readable
            .read_at(mem, 0, request.as_mut_slice())
            .map_err(|_| PmemRequestError::GuestMemory)?;
        match request.request_type.to_native() {
            VIRTIO_PMEM_REQ_TYPE_FLUSH => Ok(Request::Flush),
            other => Err(PmemRequestError::UnknownType(other)),
        }
    });
    ParsedChain {
        response: Some(response),
        request,
    }
}

/// The virtio-pmem device over one window.
#[derive(Debug)]
pub struct PmemDevice {
    region: Arc<Region>,
    registry: Arc<Registry>,
    window: Window,
    queue_size: u16,
    refusals: RefusalLog,
    /// Fault rules (none unless a user sets some); they name the window.
    faults: Arc<Faults>,
    /// Where the window's state at each FLUSH is recorded (`--record`).
    record: Option<Arc<WindowRecorder>>,
}

impl PmemDevice {
    /// The device over `window`, which must be a pmem window of `region`, 2 MiB aligned
    /// and sized.
    pub fn new(
        region: Arc<Region>,
        registry: Arc<Registry>,
        window: Window,
        queue_size: u16,
    ) -> Result<PmemDevice, PmemError> {
        if !window.serve.pmem()
            || window.offset % PMEM_ALIGN != 0
            || window.size % PMEM_ALIGN != 0
            || window.size == 0
            || region.check_range(window.offset, window.size).is_err()
        {
            return Err(PmemError::BadWindow(window.name));
        }
        if !queue_size.is_power_of_two() || queue_size < 2 {
            return Err(PmemError::QueueSize(queue_size));
        }
        Ok(PmemDevice {
            faults: Arc::new(Faults::new(vec![window.name.clone()])),
            record: None,
            region,
            registry,
            window,
            queue_size,
            refusals: RefusalLog::new("virtio-pmem"),
        })
    }

    /// The device with `faults` for its rules (shared with the disk and the control
    /// socket) instead of rules of its own.
    pub fn with_faults(mut self, faults: Arc<Faults>) -> PmemDevice {
        self.faults = faults;
        self
    }

    /// Makes the window ready for a guest to map: every block allocated, so that a
    /// guest's store never faults in the VMM when the host file system is full. Filled at
    /// start already; a discard through the disk (serve=both) may have punched holes
    /// since. Call only while nothing maps the window (zeroes are written into holes).
    pub fn prepare_mapping(&self) -> Result<(), RegionError> {
        self.region.fill_holes(self.window.offset, self.window.size)
    }

    /// The frontend mapped the window into shared-memory region `shmid` for `owner`:
    /// registers the mapping (its pages are guest-visible now), replacing `previous`
    /// (QEMU drops a mapping at a virtio reset without telling the backend).
    pub fn mapped_into_shared_memory(
        &self,
        owner: OwnerId,
        shmid: u8,
        previous: Option<MappingId>,
    ) -> Result<MappingId, RegistryError> {
        if let Some(old) = previous {
            if let Err(e) = self.registry.unmap(old) {
                log::error!("virtio-pmem: cannot unregister the old mapping: {e}");
            }
        }
        self.registry.map(
            owner,
            MappingRequest {
                device: "virtio-pmem (vhost-user shared memory)".into(),
                target: Target::SharedMemory { shmid, offset: 0 },
                frames: FrameRange::covering(self.window.offset, self.window.size),
                writable: true,
            },
        )
    }

    /// The device, recording the window's state at each FLUSH it serves with `record`.
    pub fn with_record(mut self, record: Arc<WindowRecorder>) -> PmemDevice {
        self.record = Some(record);
        self
    }

    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn window(&self) -> &Window {
        &self.window
    }

    /// Largest queue size the frontend may choose.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// What the device refused (malformed requests, rings out of step), counted and
    /// logged without flooding.
    pub fn refusals(&self) -> &RefusalLog {
        &self.refusals
    }

    pub fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_PMEM_F_SHMEM_REGION
    }

    /// Exactly `size` bytes of config space from `offset`: all zero, since the window is
    /// described by the shared-memory region, not by start/size.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        daxd_virtio::config_bytes(VirtioPmemConfig::default().as_slice(), offset, size)
    }

    /// Serves one chain and returns the used length: 4 with a response written, or 0 for
    /// a chain without room for one (dropped).
    pub fn handle<M: GuestMemoryBackend>(
        &self,
        descriptors: impl IntoIterator<Item = Descriptor>,
        mem: &M,
        chain: &mut Chain,
    ) -> u32 {
        let parsed = parse(descriptors, mem, chain);
        let Some(response) = parsed.response else {
            if let Err(e) = parsed.request {
                self.refusals
                    .refused(format_args!("dropping a request: {e}"));
            }
            return 0;
        };
        let ret = match parsed.request {
            Ok(Request::Flush) => match self.faults.check(&self.window.name, &FLUSH_IO) {
                Verdict::Fail(_) => RESP_ERROR,
                // Acknowledged without making anything durable: a lost flush.
                Verdict::Drop => 0,
                _ => self.flush_or_refuse(),
            },
            Err(e) => {
                self.refusals
                    .refused(format_args!("refusing a request: {e}"));
                RESP_ERROR
            }
        };
        let reply = PmemResponse { ret: ret.into() };
        match mem.write_obj(reply, response) {
            Ok(()) => std::mem::size_of::<PmemResponse>() as u32,
            Err(e) => {
                self.refusals
                    .refused(format_args!("cannot write the response: {e}"));
                0
            }
        }
    }

    /// Flushes for a FLUSH request: its `ret`.
    fn flush_or_refuse(&self) -> u32 {
        match self.flush() {
            Ok(()) => {
                if let Some(record) = &self.record {
                    record.flushed(|offset, buf| {
                        self.region
                            .read_bytes(self.window.offset + offset, buf)
                            .map_err(std::io::Error::other)
                    });
                }
                0
            }
            Err(e) => {
                self.refusals.refused(format_args!(
                    "flush of window {} failed: {e}",
                    self.window.name
                ));
                RESP_ERROR
            }
        }
    }

    /// Requests refused so far.
    pub fn refused_requests(&self) -> u64 {
        self.refusals.count()
    }

    /// Makes every earlier write to the window durable: the guest's stores through its
    /// mapping of it, and daxd's own writes (see Region::flush_window).
    pub fn flush(&self) -> Result<(), RegionError> {
        self.registry.flushing(|| {
            self.region
                .flush_window(self.window.offset, self.window.size)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daxd_region::{RegionConfig, Serve};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn device() -> (tempfile::TempDir, PmemDevice, GuestMemoryMmap, Chain) {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(
            Region::open(&RegionConfig::new(dir.path().join("r.img"), Some(4 << 20))).unwrap(),
        );
        let window = Window {
            name: "pm0".into(),
            offset: 2 << 20,
            size: 2 << 20,
            serve: Serve::Pmem,
        };
        let registry = Arc::new(Registry::new(region.frames()));
        let device = PmemDevice::new(region, registry, window, 256).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xeeee_eeeeu32, GuestAddress(0x2000)).unwrap();
        (dir, device, mem, Chain::new())
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn ret(mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap()
    }

    #[test]
    fn flush_succeeds_and_advances_the_flush_epoch() {
        let (_dir, dev, mem, mut chain) = device();
        mem.write_obj(VIRTIO_PMEM_REQ_TYPE_FLUSH, GuestAddress(0x1000))
            .unwrap();
        let before = dev.registry().snapshot().epoch;
        assert_eq!(
            dev.handle([d(0x1000, 4, 0), d(0x2000, 4, W)], &mem, &mut chain),
            4
        );
        assert_eq!(ret(&mem), 0);
        assert_eq!(dev.registry().snapshot().last_flushed, before);
        assert_eq!(dev.features(), 1 << 32 | 1);
        assert_eq!(dev.read_config(0, 16), vec![0; 16]);
    }

    #[test]
    fn fault_rules_fail_or_drop_a_flush_without_flushing() {
        let (_dir, dev, mem, mut chain) = device();
        let faults = Arc::new(Faults::new(vec!["disk".into(), "pm0".into()]));
        let dev = dev.with_faults(faults.clone());
        mem.write_obj(VIRTIO_PMEM_REQ_TYPE_FLUSH, GuestAddress(0x1000))
            .unwrap();
        let mut flush = || {
            let epoch = dev.registry().snapshot().epoch;
            assert_eq!(
                dev.handle([d(0x1000, 4, 0), d(0x2000, 4, W)], &mem, &mut chain),
                4
            );
            (ret(&mem), dev.registry().snapshot().epoch > epoch)
        };
        faults
            .add("device=pm0,when=once,action=fail".parse().unwrap())
            .unwrap();
        faults
            .add(
                "device=pm0,op=pmem-flush,when=once,action=drop"
                    .parse()
                    .unwrap(),
            )
            .unwrap();
        // Rules on the disk do not touch the window.
        faults.add("action=fail".parse().unwrap()).unwrap();
        assert_eq!(flush(), (RESP_ERROR, false), "failed, nothing flushed");
        assert_eq!(flush(), (0, false), "acknowledged, nothing flushed");
        assert_eq!(flush(), (0, true), "flushed");
        let hits: Vec<u64> = faults.list().iter().map(|r| r.hits).collect();
        assert_eq!(hits, [1, 1, 0]);
    }

    #[test]
    fn malformed_requests_get_an_error_or_are_dropped() {
        let (_dir, dev, mem, mut chain) = device();
        mem.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        // Unknown type.
        assert_eq!(
            dev.handle([d(0x1000, 4, 0), d(0x2000, 4, W)], &mem, &mut chain),
            4
        );
        assert_eq!(ret(&mem), RESP_ERROR);
        // No request, short request, request after response, request outside memory.
        for descs in [
            vec![d(0x2000, 4, W)],
            vec![d(0x1000, 2, 0), d(0x2000, 4, W)],
            vec![d(0x2000, 4, W), d(0x1000, 4, 0)],
            vec![d(0xfffe, 4, 0), d(0x2000, 4, W)],
        ] {
            mem.write_obj(0u32, GuestAddress(0x2000)).unwrap();
            assert_eq!(dev.handle(descs.clone(), &mem, &mut chain), 4, "{descs:?}");
            assert_eq!(ret(&mem), RESP_ERROR, "{descs:?}");
        }
        // No room for a response: dropped, nothing written.
        mem.write_obj(0x5555_5555u32, GuestAddress(0x2000)).unwrap();
        assert_eq!(
            dev.handle([d(0x1000, 4, 0), d(0x2000, 2, W)], &mem, &mut chain),
            0
        );
        assert_eq!(
            dev.handle([d(0x1000, 4, 0), d(0xfffe, 4, W)], &mem, &mut chain),
            0
        );
        assert_eq!(dev.handle([], &mem, &mut chain), 0);
        assert_eq!(ret(&mem), 0x5555_5555);
        // Every one of them counted as refused (and logged, up to the rate limit).
        assert_eq!(dev.refused_requests(), 8);
    }

    #[test]
    fn only_pmem_windows_inside_the_region_make_a_device() {
        let (_dir, dev, ..) = device();
        let region = dev.region().clone();
        let registry = dev.registry().clone();
        let window = |offset: u64, size: u64, serve: Serve| Window {
            name: "w".into(),
            offset,
            size,
            serve,
        };
        let m = 1 << 20;
        for (w, queue) in [
            (window(0, 2 * m, Serve::Blk), 256),
            (window(m, 2 * m, Serve::Pmem), 256),
            (window(2 * m, 4 * m, Serve::Pmem), 256),
            (window(0, 2 * m, Serve::Pmem), 100),
        ] {
            assert!(
                PmemDevice::new(region.clone(), registry.clone(), w.clone(), queue).is_err(),
                "{w:?} {queue}"
            );
        }
        assert!(PmemDevice::new(region, registry, window(0, 4 * m, Serve::Both), 128).is_ok());
    }
}
