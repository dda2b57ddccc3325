//! `VhostUserBackend` for virtio-pmem over vhost-user shared memory (QEMU >= 11.1,
//! `-device vhost-user-test-device-pci,virtio-id=27,num_vqs=1,config_size=16`).
//!
//! daxd maps the window's file range into the device's shared-memory region 0 with
//! `VHOST_USER_BACKEND_SHMEM_MAP`. Facts that shape this (QEMU 11.1.3): the map can only
//! be handled once the guest has set DRIVER_OK (earlier crashes QEMU), and sending it from
//! inside a message handler deadlocks (QEMU waits for that handler's reply while the vCPU
//! holds its lock). SET_FEATURES arrives as the device starts, after DRIVER_OK, so the map
//! is sent from a thread of its own started there. Until it is handled, guest accesses to
//! the region hit nothing; the time is logged. QEMU drops the mapping on a virtio reset
//! without telling the backend, so every start maps again; a map refused as overlapping
//! (stop/cont) means the old one is still in place.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::{error, info};
use vhost::vhost_user::message::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{DaemonThread, VhostUserBackend};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::dirty_log::{DirtyLog, GuestMemory, Vring};
use crate::queue;
use daxd_pmem::{PmemDevice, SHMEM_REGION_ID};
use daxd_registry::{MappingId, OwnerId};
use daxd_virtio::Chain;

/// The pmem device as seen by one vhost-user connection.
pub struct VhostUserPmemBackend {
    device: Arc<PmemDevice>,
    owner: OwnerId,
    mem: GuestMemoryAtomic<GuestMemory>,
    event_idx: AtomicBool,
    backend_req: Mutex<Option<Backend>>,
    /// The registry mapping of the shared-memory window, once QEMU accepted the map.
    mapping: Arc<Mutex<Option<MappingId>>>,
    /// Scratch space of the one queue worker.
    chain: Mutex<Chain>,
}

impl std::fmt::Debug for VhostUserPmemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserPmemBackend")
            .field("device", &self.device)
            .field("owner", &self.owner)
            .field("mapping", &self.mapping)
            .finish_non_exhaustive()
    }
}

impl VhostUserPmemBackend {
    pub fn new(
        device: Arc<PmemDevice>,
        owner: OwnerId,
        mem: GuestMemoryAtomic<GuestMemory>,
    ) -> Self {
        VhostUserPmemBackend {
            device,
            owner,
            mem,
            event_idx: AtomicBool::new(false),
            backend_req: Mutex::new(None),
            mapping: Arc::new(Mutex::new(None)),
            chain: Mutex::default(),
        }
    }

    /// Asks the frontend, from a thread of its own, to map the window into region 0.
    fn map_window(&self) {
        let backend = self
            .backend_req
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(backend) = backend else {
            error!(
                "virtio-pmem: the frontend set up no backend request channel (BACKEND_REQ), so daxd \
                 cannot map window {}: the guest's pmem device is backed by nothing",
                self.device.window().name
            );
            return;
        };
        let device = self.device.clone();
        let mapping = self.mapping.clone();
        let owner = self.owner;
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("daxd-pmem-map".into())
            .spawn(move || {
                daxd_confine::enter_or_exit(daxd_confine::ThreadKind::PmemMapper);
                let window = device.window();
                if let Err(e) = device.prepare_mapping() {
                    error!(
                        "virtio-pmem: not mapping window {}: {e}; the guest's pmem device is backed by nothing",
                        window.name
                    );
                    return;
                }
                let request = VhostUserMMap {
                    shmid: SHMEM_REGION_ID,
                    fd_offset: window.offset,
                    shm_offset: 0,
                    len: window.size,
                    flags: VhostUserMMapFlags::WRITABLE.bits(),
                    ..Default::default()
                };
                let result = backend.shmem_map(&request, device.region().shareable_file());
                let elapsed = started.elapsed();
                let mut mapping = mapping.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(_) => {
                        match device.mapped_into_shared_memory(owner, SHMEM_REGION_ID, mapping.take()) {
                            Ok(id) => *mapping = Some(id),
                            Err(e) => error!("virtio-pmem: cannot register window {}: {e}", window.name),
                        }
                        info!(
                            "virtio-pmem: window {} mapped into shared memory region {SHMEM_REGION_ID}, \
                             {:.2} ms after the device started (guest accesses before that hit nothing)",
                            window.name,
                            elapsed.as_secs_f64() * 1000.0
                        );
                    }
                    Err(e) if mapping.is_some() => info!(
                        "virtio-pmem: window {} is still mapped from before (frontend: {e})",
                        window.name
                    ),
                    Err(e) => {
                        // A device-DAX device maps only in its own pages, which a frontend
                        // that maps shared memory in 4 KiB pages (QEMU 11.1) cannot know.
                        let hint = match device.region().kind() {
                            daxd_region::RegionKind::DeviceDax(dax) => format!(
                                " (a device-DAX window needs a mapping aligned to the device's \
                                 {} byte pages: let QEMU map it as an NVDIMM instead, with the \
                                 options `daxd print-qemu-args` gives)",
                                dax.align
                            ),
                            _ => String::new(),
                        };
                        error!(
                            "virtio-pmem: the frontend refused to map window {}: {e}; the guest's \
                             pmem device is backed by nothing{hint}",
                            window.name
                        )
                    }
                }
            });
        if let Err(e) = spawned {
            error!("virtio-pmem: cannot start the map thread: {e}");
        }
    }

    fn process_queue(&self, vring: &Vring) -> io::Result<()> {
        let mut scratch = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        // FLUSH requests are rare and slow anyway: no polling.
        queue::drain(
            vring,
            &self.mem,
            &queue::Settings {
                event_idx: self.event_idx.load(Ordering::Relaxed),
                poll: None,
                refusals: self.device.refusals(),
            },
            &queue::Tracking::default(),
            Vec::new(),
            |_, chain, mem| Some(self.device.handle(chain, mem, &mut scratch)),
        )
    }
}

impl VhostUserBackend for VhostUserPmemBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size())
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, _features: u64) {
        // SET_FEATURES: the device is starting, after the guest's DRIVER_OK.
        self.map_window();
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_req.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.device.window().size]))
    }

    fn thread_started(&self, thread: DaemonThread) {
        crate::confine_daemon_thread(thread);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        queue::exit_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring),
            None => Err(io::Error::other(format!(
                "no queue for event {device_event}"
            ))),
        }
    }
}
