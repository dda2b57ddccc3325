//! `VhostUserBackend` for the virtio-blk device: moves chains from the vrings to
//! [`BlkDevice::handle`] and completions back. One worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use daxd_blk::{BlkDevice, ChainBuffers};

/// The blk device as seen by one vhost-user connection. A fresh one is made for every
/// connection so that no per-connection state (features, worker exit events) leaks into
/// the next frontend.
#[derive(Debug)]
pub struct VhostUserBlkBackend {
    device: Arc<BlkDevice>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// Scratch space for parsing, one per worker thread (uncontended).
    chain_buffers: Vec<Mutex<ChainBuffers>>,
}

impl VhostUserBlkBackend {
    pub fn new(device: Arc<BlkDevice>, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        let workers = usize::from(device.config().num_queues);
        VhostUserBlkBackend {
            device,
            mem,
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            chain_buffers: (0..workers).map(|_| Mutex::default()).collect(),
        }
    }

    /// Serves every available chain of `vring`. With EVENT_IDX, re-checks the ring after
    /// re-enabling notifications so that a chain added in between is not left waiting.
    fn process_queue(&self, vring: &VringRwLock, bufs: &mut ChainBuffers) -> io::Result<()> {
        let mem = self.mem.memory();
        let limits = self
            .device
            .limits(self.acked_features.load(Ordering::Relaxed));
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut state = vring.get_mut();
        loop {
            if event_idx {
                state.disable_notification().map_err(io::Error::other)?;
            }
            let mut completed = false;
            while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let used = self.device.handle(chain, &*mem, &limits, bufs);
                state.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
            if completed && state.needs_notification().map_err(io::Error::other)? {
                state.signal_used_queue()?;
            }
            if !event_idx || !state.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl VhostUserBackend for VhostUserBlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.device.config().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.config().queue_size)
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Nothing in daxd's config space is writable (no CONFIG_WCE).
        debug!(
            "ignoring write of {} config bytes at offset {offset}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        // The handler updates the GuestMemoryAtomic we share with it in place.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|queue| 1u64 << queue).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| warn!("cannot create a worker exit event: {e}"))
            .ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on queue event {device_event}");
        }
        // `device_event` indexes this worker's own vrings, not the device's queues.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Err(io::Error::other(format!(
                "event {device_event} for a queue worker {thread_id} does not serve"
            )));
        };
        let Some(bufs) = self.chain_buffers.get(thread_id) else {
            return Err(io::Error::other(format!("no worker {thread_id}")));
        };
        let mut bufs = bufs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.process_queue(vring, &mut bufs)
    }
}
