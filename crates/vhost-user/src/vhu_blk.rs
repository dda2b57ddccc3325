//! `VhostUserBackend` for the virtio-blk device: moves chains from the vrings to
//! [`BlkDevice::handle`] and completions back. One worker thread per queue.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::fs::File;

use arc_swap::ArcSwapOption;
use std::time::Duration;

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;

use crate::ConfigNotifier;
use vhost_user_backend::{DaemonThread, VhostUserBackend, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::dirty_log::{DirtyLog, GuestMemory, Vring};
use crate::flusher::{Completion, Flusher, Job};
use crate::inflight::{self, InflightArea, Recovery};
use crate::queue::{self, Tracking};
use daxd_blk::guest_windows::{GuestFile, GuestWindows};
use daxd_blk::{BlkDevice, ChainBuffers, Handled};
use daxd_region::SharedLayout;
use daxd_registry::OwnerId;

/// The blk device as seen by one vhost-user connection. A fresh one is made for every
/// connection so that no per-connection state (features, worker exit events) leaks into
/// the next frontend.
#[derive(Debug)]
pub struct VhostUserBlkBackend {
    device: Arc<BlkDevice>,
    layout: SharedLayout,
    notifier: Arc<ConfigNotifier>,
    /// This connection's mappings in the registry.
    owner: OwnerId,
    mem: GuestMemoryAtomic<GuestMemory>,
    /// Guest memory that is region pages (pmem windows the VMM mapped from the region
    /// file), read once per batch by the queue workers.
    guest_windows: GuestWindows,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// Scratch space for parsing, one per worker thread (uncontended).
    chain_buffers: Vec<Mutex<ChainBuffers>>,
    /// Per queue: how long its worker keeps polling after the queue ran empty.
    poll: Vec<queue::AdaptivePoll>,
    /// Where queue workers hand FLUSH requests, so that a queue keeps moving while the
    /// region is flushed.
    flusher: Flusher,
    /// The frontend's in-flight tracking area (`SET_INFLIGHT_FD`), if it sent one.
    inflight: ArcSwapOption<InflightArea>,
    /// Per queue: requests an earlier backend took and never completed, to serve before
    /// anything else (oldest first), found when the queue started.
    resubmit: Vec<Mutex<Vec<u16>>>,
}

impl VhostUserBlkBackend {
    pub fn new(
        device: Arc<BlkDevice>,
        layout: SharedLayout,
        notifier: Arc<ConfigNotifier>,
        owner: OwnerId,
        mem: GuestMemoryAtomic<GuestMemory>,
        poll: Duration,
    ) -> Self {
        let workers = usize::from(device.config().num_queues);
        let in_flight = workers * usize::from(device.config().queue_size);
        let flusher = Flusher::spawn(device.clone(), mem.clone(), in_flight);
        VhostUserBlkBackend {
            device,
            layout,
            notifier,
            owner,
            mem,
            guest_windows: GuestWindows::default(),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            chain_buffers: (0..workers).map(|_| Mutex::default()).collect(),
            poll: (0..workers)
                .map(|_| queue::AdaptivePoll::new(poll))
                .collect(),
            flusher,
            inflight: ArcSwapOption::empty(),
            resubmit: (0..workers).map(|_| Mutex::default()).collect(),
        }
    }

    /// Serves queue `queue`'s requests left from before a restart, then every available
    /// chain of `vring` (see [`queue::drain`]).
    fn process_queue(
        &self,
        vring: &Vring,
        queue: usize,
        bufs: &mut ChainBuffers,
    ) -> io::Result<()> {
        let limits = self
            .device
            .limits(self.acked_features.load(Ordering::Relaxed));
        let guest_windows = self.guest_windows.current();
        let tracking = Tracking {
            area: self.inflight.load_full(),
            queue,
        };
        let resubmit = self
            .resubmit
            .get(queue)
            .map(|list| std::mem::take(&mut *list.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default();
        queue::drain(
            vring,
            &self.mem,
            &queue::Settings {
                event_idx: self.event_idx.load(Ordering::Relaxed),
                poll: self.poll.get(queue),
                refusals: self.device.refusals(),
            },
            &tracking,
            resubmit,
            |head, descriptors, mem| match self.device.handle(
                queue,
                descriptors,
                mem,
                &limits,
                &guest_windows,
                bufs,
            ) {
                Handled::Done(used) => Some(used),
                handled => self.complete_off_queue(vring, &tracking, head, handled, mem),
            },
        )
    }
}

impl VhostUserBlkBackend {
    /// Hands a FLUSH, or a request a fault rule delays or holds, to the flusher thread to
    /// be completed there; returns the used length when it is to be completed now instead
    /// (there is no flusher thread).
    fn complete_off_queue(
        &self,
        vring: &Vring,
        tracking: &Tracking,
        head: u16,
        handled: Handled,
        mem: &GuestMemory,
    ) -> Option<u32> {
        let at = Completion {
            vring: vring.clone(),
            tracking: tracking.clone(),
            head,
        };
        let job = match handled {
            Handled::Done(used) => return Some(used),
            Handled::Flush(pending) => Job::Flush { at, pending },
            Handled::Later { used, release } => Job::Later { at, used, release },
        };
        match self.flusher.send(job) {
            Ok(()) => None,
            Err(Job::Flush { pending, .. }) => Some(self.device.complete_flush(
                &pending,
                self.device.flush(),
                mem,
            )),
            // Nobody to complete it later: now, without the delay or hold.
            Err(Job::Later { used, .. }) => Some(used),
        }
    }

    /// Tells the device's guest windows which guest memory is which file (QEMU puts a
    /// `memory-backend-file` pmem window into every vhost-user backend's memory table).
    fn register_guest_windows(&self, mem: &GuestMemory) {
        let files = mem.iter().filter_map(|guest_region| {
            guest_region.file_offset().map(|file_offset| GuestFile {
                gpa: guest_region.start_addr().0,
                len: guest_region.len(),
                file: file_offset.file(),
                offset: file_offset.start(),
            })
        });
        self.guest_windows
            .update(&self.device, self.owner, files, |offset, len| {
                self.layout
                    .load()
                    .pmem_window_at(offset, len)
                    .map(|w| format!("pmem window {}", w.name))
                    .unwrap_or_else(|| "no declared pmem window".to_owned())
            });
    }
}

impl Drop for VhostUserBlkBackend {
    fn drop(&mut self) {
        self.notifier.ended(self.owner);
    }
}

impl VhostUserBackend for VhostUserBlkBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.device.config().num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.config().queue_size)
    }

    fn features(&self) -> u64 {
        self.device.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        self.notifier.set(self.owner, backend);
    }

    fn get_inflight_fd(
        &self,
        request: &VhostUserInflight,
    ) -> io::Result<(VhostUserInflight, File)> {
        inflight::create(request, self.num_queues(), self.max_queue_size()).map_err(|e| {
            warn!("GET_INFLIGHT_FD refused: {e}");
            io::Error::other(e)
        })
    }

    fn set_inflight_fd(&self, request: &VhostUserInflight, file: File) -> io::Result<()> {
        let area = InflightArea::map(request, file, self.num_queues(), self.max_queue_size())
            .map_err(|e| {
                warn!("SET_INFLIGHT_FD refused: {e}");
                io::Error::other(e)
            })?;
        self.inflight.store(Some(Arc::new(area)));
        Ok(())
    }

    fn start_vring(&self, queue_index: u32, vring: &Vring) -> io::Result<()> {
        let queue = queue_index as usize;
        if let (Some(area), Some(resubmit)) = (self.inflight.load_full(), self.resubmit.get(queue))
        {
            let used = vring.queue_used_idx().map_err(io::Error::other)?;
            match area.recover(queue, used) {
                Recovery::Fresh => {}
                Recovery::Resume {
                    next_avail,
                    resubmit: heads,
                } => {
                    if !heads.is_empty() {
                        info!(
                            "queue {queue}: {} requests were in flight when the previous backend stopped; serving them first",
                            heads.len()
                        );
                    }
                    vring.set_queue_next_avail(next_avail);
                    *resubmit.lock().unwrap_or_else(|e| e.into_inner()) = heads;
                }
            }
        }
        queue::kick(vring)
    }

    /// The queue stops (`GET_VRING_BASE`: a migration, or the VM stopping): its worker has
    /// finished its batch (the handler took the vring's lock to mark it not ready, and a
    /// worker serves nothing from a queue that is not), so what is left are FLUSHes on the
    /// flusher thread. They are completed before the frontend reads the ring's state;
    /// after that nothing is written to guest memory nor signalled until the queue starts
    /// again.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let started = std::time::Instant::now();
        self.flusher.settle();
        // Part of a migration's downtime: worth seeing when it is long.
        info!(
            "queue {queue_index} stopped; FLUSHes in flight completed in {:.3} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        Ok(())
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

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // The handler has already updated the GuestMemoryAtomic we share with it; what is
        // left is to notice memory that is the region file itself.
        self.register_guest_windows(&mem.memory());
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues()).map(|queue| 1u64 << queue).collect()
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
        evset: EventSet,
        vrings: &[Vring],
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
        // One worker per queue: the worker's index is its queue's.
        self.process_queue(vring, thread_id, &mut bufs)
    }
}
