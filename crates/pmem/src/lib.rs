//! virtio-pmem (device id 27) for one pmem window of the region, without any transport.
//!
//! With `VIRTIO_PMEM_F_SHMEM_REGION` the guest finds the window in shared-memory region 0
//! (which the vhost-user glue fills with `VHOST_USER_BACKEND_SHMEM_MAP`), and the config
//! space's start/size are 0. The one queue carries FLUSH requests: each makes every
//! earlier write to the window durable before it completes.

use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use daxd_region::{Region, Window};
use daxd_registry::Registry;

/// virtio device id of virtio-pmem.
pub const VIRTIO_ID_PMEM: u32 = 27;
/// The window is in shared-memory region 0, not at config `start`.
pub const VIRTIO_PMEM_F_SHMEM_REGION: u32 = 0;
/// Shared-memory region id the window is mapped into.
pub const SHMEM_REGION_ID: u8 = 0;
/// `struct virtio_pmem_config { le64 start; le64 size; }`.
pub const CONFIG_SPACE_LEN: usize = 16;
const REQ_TYPE_FLUSH: u32 = 0;
/// `virtio_pmem_resp.ret` for a failed request (Linux reports -EIO for any non-zero).
const RESP_ERROR: u32 = 1;

/// The virtio-pmem device over one window.
#[derive(Debug)]
pub struct PmemDevice {
    region: Arc<Region>,
    registry: Arc<Registry>,
    window: Window,
}

impl PmemDevice {
    /// `window` must be a pmem window of `region` (checked by the layout).
    pub fn new(region: Arc<Region>, registry: Arc<Registry>, window: Window) -> PmemDevice {
        PmemDevice {
            region,
            registry,
            window,
        }
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

    pub fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_PMEM_F_SHMEM_REGION
    }

    /// Exactly `size` bytes of config space from `offset`: all zero, since the window is
    /// described by the shared-memory region, not by start/size.
    pub fn read_config(&self, _offset: u32, size: u32) -> Vec<u8> {
        vec![0; size as usize]
    }

    /// Serves one chain and returns the used length. A chain is a 4-byte request
    /// (device-readable) and a 4-byte response (device-writable); anything else gets an
    /// error response if there is room for one, or is dropped.
    pub fn handle<M: GuestMemoryBackend>(
        &self,
        descriptors: impl IntoIterator<Item = Descriptor>,
        mem: &M,
    ) -> u32 {
        let mut request: Option<GuestAddress> = None;
        let mut response: Option<GuestAddress> = None;
        let mut malformed = None;
        for desc in descriptors {
            let fits = GuestMemoryBackend::check_range(mem, desc.addr(), 4);
            match (desc.is_write_only(), desc.len() >= 4 && fits) {
                (false, true) if request.is_none() && response.is_none() => {
                    request = Some(desc.addr())
                }
                (true, true) if response.is_none() => response = Some(desc.addr()),
                _ => malformed = Some(format!("unexpected descriptor {desc:?}")),
            }
        }
        let Some(response) = response else {
            warn!("virtio-pmem: dropping a request without a 4-byte response buffer");
            return 0;
        };
        let ret = match (request, malformed) {
            (Some(request), None) => match mem.read_obj::<u32>(request).map(u32::from_le) {
                Ok(REQ_TYPE_FLUSH) => match self.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        warn!(
                            "virtio-pmem: flush of window {} failed: {e}",
                            self.window.name
                        );
                        RESP_ERROR
                    }
                },
                Ok(other) => {
                    warn!("virtio-pmem: unknown request type {other}");
                    RESP_ERROR
                }
                Err(e) => {
                    warn!("virtio-pmem: cannot read the request: {e}");
                    RESP_ERROR
                }
            },
            (None, _) => {
                warn!("virtio-pmem: request without a 4-byte request buffer");
                RESP_ERROR
            }
            (_, Some(why)) => {
                warn!("virtio-pmem: malformed request: {why}");
                RESP_ERROR
            }
        };
        match mem.write_obj(ret.to_le(), response) {
            Ok(()) => 4,
            Err(e) => {
                warn!("virtio-pmem: cannot write the response: {e}");
                0
            }
        }
    }

    /// Makes every earlier write to the window durable.
    pub fn flush(&self) -> Result<(), daxd_region::RegionError> {
        let ticket = self.registry.flush_begin();
        self.region
            .flush_range(self.window.offset, self.window.size)?;
        self.registry.flush_complete(ticket);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daxd_region::{Layout, RegionConfig};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn device() -> (tempfile::TempDir, PmemDevice, GuestMemoryMmap) {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(
            Region::open(&RegionConfig {
                path: dir.path().join("r.img"),
                size: Some(4 << 20),
                resize: false,
                read_only: false,
                direct: false,
            })
            .unwrap(),
        );
        let window = Window::parse("name=pm0,offset=2M,size=2M,serve=pmem").unwrap();
        let layout = Layout::new(region.size(), vec![window], false).unwrap();
        let registry = Arc::new(Registry::new(region.frames()));
        let device = PmemDevice::new(region, registry, layout.pmem().next().unwrap().clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xeeee_eeeeu32, GuestAddress(0x2000)).unwrap();
        (dir, device, mem)
    }

    fn d(addr: u64, len: u32, flags: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, 0)
    }

    fn ret(mem: &GuestMemoryMmap) -> u32 {
        mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap()
    }

    #[test]
    fn flush_succeeds_and_advances_the_flush_epoch() {
        let (_dir, dev, mem) = device();
        mem.write_obj(REQ_TYPE_FLUSH, GuestAddress(0x1000)).unwrap();
        let before = dev.registry().snapshot().epoch;
        assert_eq!(dev.handle([d(0x1000, 4, 0), d(0x2000, 4, W)], &mem), 4);
        assert_eq!(ret(&mem), 0);
        assert_eq!(dev.registry().snapshot().last_flushed, before);
        assert_eq!(dev.features(), 1 << 32 | 1);
        assert_eq!(dev.read_config(0, 16), vec![0; 16]);
    }

    #[test]
    fn malformed_requests_get_an_error_or_are_dropped() {
        let (_dir, dev, mem) = device();
        mem.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        // Unknown type.
        assert_eq!(dev.handle([d(0x1000, 4, 0), d(0x2000, 4, W)], &mem), 4);
        assert_eq!(ret(&mem), RESP_ERROR);
        // No request, short request, request after response, request outside memory.
        for chain in [
            vec![d(0x2000, 4, W)],
            vec![d(0x1000, 2, 0), d(0x2000, 4, W)],
            vec![d(0x2000, 4, W), d(0x1000, 4, 0)],
            vec![d(0xfffe, 4, 0), d(0x2000, 4, W)],
        ] {
            mem.write_obj(0u32, GuestAddress(0x2000)).unwrap();
            assert_eq!(dev.handle(chain.clone(), &mem), 4, "{chain:?}");
            assert_eq!(ret(&mem), RESP_ERROR, "{chain:?}");
        }
        // No room for a response: dropped, nothing written.
        mem.write_obj(0x5555_5555u32, GuestAddress(0x2000)).unwrap();
        assert_eq!(dev.handle([d(0x1000, 4, 0), d(0x2000, 2, W)], &mem), 0);
        assert_eq!(dev.handle([d(0x1000, 4, 0), d(0xfffe, 4, W)], &mem), 0);
        assert_eq!(dev.handle([], &mem), 0);
        assert_eq!(ret(&mem), 0x5555_5555);
    }
}
