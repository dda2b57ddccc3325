//! Draining a virtqueue, shared by every device's backend. Public for the hot-path bench
//! (`benches/hot_path.rs`), which serves requests through [`drain`] as a queue worker does.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use daxd_virtio::{ChainWalk, RefusalLog};
use log::warn;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_ring::{vring_avail, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::dirty_log::{GuestMemory, Vring, VringState};
use crate::inflight::InflightArea;

/// How a device's queues are drained.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// How long an empty queue is polled before notifications are re-enabled (none: not
    /// at all).
    pub poll: Option<&'a AdaptivePoll>,
    /// Where refusals of a ring out of step are counted and logged.
    pub refusals: &'a RefusalLog,
}

/// A queue's polling window, adapted as QEMU's event loop adapts its own: a queue whose
/// driver comes back within the bound is polled for longer (from 4 us, doubling), one
/// that stays idle for longer than the bound is polled for less (halving, down to not at
/// all). A busy queue then never sleeps, an idle one costs one window after its last
/// request and nothing after.
#[derive(Debug)]
pub struct AdaptivePoll {
    max_ns: u64,
    window_ns: AtomicU64,
    /// When the worker last went to sleep, in ns since `epoch` (0: not since the start).
    slept_at_ns: AtomicU64,
    epoch: Instant,
}

/// The first window a queue that polling would have served gets.
const POLL_GROW_FROM_NS: u64 = 4_000;

impl AdaptivePoll {
    /// Polling up to `max` (zero: never).
    pub(crate) fn new(max: Duration) -> AdaptivePoll {
        AdaptivePoll {
            max_ns: max.as_nanos().min(u128::from(u64::MAX)) as u64,
            window_ns: AtomicU64::new(0),
            slept_at_ns: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    /// The current window.
    pub(crate) fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// The worker goes to sleep until the driver's next notification.
    fn sleeping(&self) {
        self.slept_at_ns.store(self.now_ns(), Ordering::Relaxed);
    }

    /// The worker woke up for a notification: had it polled for as long as it slept,
    /// would it have caught the work?
    fn woke(&self) {
        let slept_at = self.slept_at_ns.swap(0, Ordering::Relaxed);
        if slept_at == 0 || self.max_ns == 0 {
            return;
        }
        let slept = self.now_ns().saturating_sub(slept_at);
        let window = self.window_ns.load(Ordering::Relaxed);
        let next = if slept <= self.max_ns {
            window
                .saturating_mul(2)
                .max(POLL_GROW_FROM_NS)
                .min(self.max_ns)
        } else if window / 2 < POLL_GROW_FROM_NS / 4 {
            0
        } else {
            window / 2
        };
        self.window_ns.store(next, Ordering::Relaxed);
    }
}

/// Where a queue's requests are tracked for a successor after a crash (in-flight I/O
/// tracking), if the frontend gave an area.
#[derive(Debug, Clone, Default)]
pub struct Tracking {
    pub area: Option<Arc<InflightArea>>,
    pub queue: usize,
}

impl Tracking {
    fn take(&self, head: u16) {
        if let Some(area) = &self.area {
            area.take(self.queue, head);
        }
    }

    /// Adds `head`'s used entry, with the tracking around it that lets a successor tell
    /// whether the entry was published.
    fn publish(
        &self,
        state: &mut VringState,
        mem: &GuestMemory,
        head: u16,
        used: u32,
    ) -> io::Result<()> {
        if let Some(area) = &self.area {
            area.publishing(self.queue, head);
        }
        state
            .get_queue_mut()
            .add_used(mem, head, used)
            .map_err(io::Error::other)?;
        if let Some(area) = &self.area {
            area.published(self.queue, head, state.get_queue().next_used());
        }
        Ok(())
    }
}

/// A chain's descriptors, as the devices read them.
pub type Descriptors<'m> = ChainWalk<'m, GuestMemory>;

/// Serves the chains in `resubmit` (heads an earlier backend took from the ring, oldest
/// first), then every available chain of `vring`, with `handle`, which gets the chain and
/// the guest memory it lies in and returns the chain's used length, or `None` when it
/// completes the chain later itself (a deferred FLUSH). One lock of the vring per batch;
/// the ring's entries are read and written through one load of `memory` per batch, not a
/// fresh load for each. That load is made after the batch's available index is read: a
/// frontend adds memory (ADD_MEM_REG, SET_MEM_TABLE) and waits for the backend's reply
/// before it makes chains available in it, so a table loaded before the index was read
/// (the worker preempted in between, or polling) could miss the region the chains use,
/// and they would be refused as outside guest memory (the reconnect soak met it once in
/// about a thousand connections under load). The driver is notified
/// (if it asks to be) at the end of each batch that completed something, and with
/// EVENT_IDX also every `NOTIFY_EARLY_EVERY` within one; with EVENT_IDX the ring is
/// checked again after notifications are re-enabled, so that a chain added in between is
/// not left waiting. With `poll`, an empty queue is watched that long before
/// notifications are re-enabled: meanwhile the driver does not kick, and a new request is
/// picked up without a system call on either side.
pub fn drain(
    vring: &Vring,
    memory: &GuestMemoryAtomic<GuestMemory>,
    settings: &Settings<'_>,
    tracking: &Tracking,
    resubmit: Vec<u16>,
    mut handle: impl FnMut(u16, Descriptors<'_>, &GuestMemory) -> Option<u32>,
) -> io::Result<()> {
    let Settings {
        event_idx,
        poll,
        refusals,
    } = *settings;
    if let Some(poll) = poll {
        poll.woke();
    }
    let mut state = vring.get_mut();
    let mut completed = false;
    // Work served since the last early notification, see NOTIFY_EARLY_EVERY.
    let mut served = 0u64;
    let mut guard = memory.memory();
    for head in resubmit {
        let mem = &*guard;
        let queue = state.get_queue();
        let mut descriptors =
            ChainWalk::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
        if let Err(e) = descriptors.check() {
            // Released without a status: what the earlier backend took is not a request.
            warn!("cannot read request {head} again after a restart: {e}");
        }
        if let Some(used) = handle(head, descriptors, mem) {
            tracking.publish(&mut state, mem, head, used)?;
            completed = true;
        }
    }
    loop {
        let mem = &*guard;
        if !state.get_queue().ready() {
            // Stopped (GET_VRING_BASE) while this worker polled without the lock: from now
            // on it writes nothing into guest memory, not even the event index.
            return Ok(());
        }
        if event_idx {
            state
                .get_queue_mut()
                .disable_notification(mem)
                .map_err(io::Error::other)?;
        }
        // The chains available now, to be read with the memory table as it is now (see
        // above).
        let avail = state
            .get_queue()
            .avail_idx(mem, Ordering::Acquire)
            .map_err(io::Error::other)?
            .0;
        let pending = avail.wrapping_sub(state.get_queue().next_avail());
        if pending > state.get_queue().size() {
            // virtio-queue would refuse every pop (logging each time) while the index
            // keeps saying there is work: the queue would spin. Nothing is served from a
            // ring in that state; the next kick or queue start looks again.
            refusals.refused(format_args!(
                "the driver made {pending} chains available on a ring of {} entries; ignoring the queue until it makes sense",
                state.get_queue().size()
            ));
            return Ok(());
        }
        let fresh = memory.memory();
        if !std::ptr::eq::<GuestMemory>(&*fresh, mem) {
            drop(state);
            guard = fresh;
            state = vring.get_mut();
            continue;
        }
        drop(fresh);
        while state.get_queue().next_avail() != avail {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            tracking.take(head);
            let queue = state.get_queue();
            let descriptors =
                ChainWalk::new(mem, GuestAddress(queue.desc_table()), queue.size(), head);
            if let Some(used) = handle(head, descriptors, mem) {
                tracking.publish(&mut state, mem, head, used)?;
                completed = true;
                served = served.saturating_add(REQUEST_BYTES + u64::from(used));
                if event_idx && served >= NOTIFY_EARLY_EVERY {
                    notify_if_needed(&mut state, mem)?;
                    (served, completed) = (0, false);
                }
            }
        }
        if completed {
            notify_if_needed(&mut state, mem)?;
        }
        completed = false;
        let window = poll.map_or(Duration::ZERO, AdaptivePoll::window);
        if !window.is_zero() {
            // Poll without the vring's lock, so that deferred completions can land.
            let avail_ring = GuestAddress(state.get_queue().avail_ring());
            let next_avail = state.get_queue().next_avail();
            drop(state);
            let found = poll_for_work(avail_ring, next_avail, mem, window)?;
            state = vring.get_mut();
            if found {
                continue;
            }
        }
        if !event_idx
            || !state
                .get_queue_mut()
                .enable_notification(mem)
                .map_err(io::Error::other)?
        {
            if let Some(poll) = poll {
                poll.sleeping();
            }
            return Ok(());
        }
    }
}

/// With EVENT_IDX, a batch also notifies the driver (if it asked) each time this much has
/// been served since the last time, in bytes returned plus [`REQUEST_BYTES`] a request,
/// rather than only when the batch ends: told before the batch ends, the driver refills
/// the ring while the rest is served. Not after every completion, as qemu-storage-daemon
/// does: a driver sharing its core with busy workers is then woken for every few requests
/// and spends its core waking (one blkio client, 2 cores, 2 queues: 0.45M IOPS, against
/// 1.15-1.7M notifying at the end of each batch only and 1.69-1.77M with this bound; one
/// queue: 4 KiB reads at QD32 0.83-0.86M against 0.57-0.6M, 128 KiB sequential reads
/// 14.1k-14.4k MiB/s against 10.3k-12.1k).
const NOTIFY_EARLY_EVERY: u64 = 256 << 10;

/// What serving a request counts for besides the bytes it returns: its parsing, guest
/// memory lookups and ring work, about what copying a page costs.
const REQUEST_BYTES: u64 = 4096;

/// Notifies the driver if the used entries added since the last check call for it: with
/// EVENT_IDX, when the used index passed the driver's `used_event`; without, unless the
/// driver set `VRING_AVAIL_F_NO_INTERRUPT` (it is polling the used ring, and the device
/// SHOULD NOT interrupt, VIRTIO 1.2, 2.7.10). virtio-queue 0.18's `needs_notification`
/// does not read the flag ("isn't supported yet"), so it is read here, after the full
/// fence that call makes between the used index written and the driver's flags read.
fn notify_if_needed(state: &mut VringState, mem: &GuestMemory) -> io::Result<()> {
    let queue = state.get_queue_mut();
    if !queue.needs_notification(mem).map_err(io::Error::other)? {
        return Ok(());
    }
    if !queue.event_idx_enabled() && driver_declines_interrupts(queue.avail_ring(), mem)? {
        return Ok(());
    }
    state.signal_used_queue()
}

/// Whether the available ring's flags say `VRING_AVAIL_F_NO_INTERRUPT`.
fn driver_declines_interrupts(avail_ring: u64, mem: &GuestMemory) -> io::Result<bool> {
    let flags = mem
        .get_slice(GuestAddress(avail_ring), std::mem::size_of::<u16>())
        .and_then(|s| Ok(s.load::<u16>(0, Ordering::Acquire)?))
        .map_err(io::Error::other)?;
    Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
}

/// Completes a chain that [`drain`] left to its handler, from any thread.
pub(crate) fn complete_later(
    vring: &Vring,
    mem: &GuestMemory,
    tracking: &Tracking,
    head: u16,
    used: u32,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    tracking.publish(&mut state, mem, head, used)?;
    notify_if_needed(&mut state, mem)
}

/// Makes the queue's worker look at the ring once, as if the driver had kicked: after a
/// restart, a driver waiting for requests an earlier backend took does not kick again.
pub(crate) fn kick(vring: &Vring) -> io::Result<()> {
    let state = vring.get_ref();
    let Some(kick) = state.get_kick() else {
        return Ok(());
    };
    // SAFETY: the descriptor belongs to the vring's kick EventConsumer, which the read
    // lock held in `state` keeps open for as long as the borrow lives.
    let fd = unsafe { BorrowedFd::borrow_raw(kick.as_raw_fd()) };
    rustix::io::write(fd, &1u64.to_ne_bytes())?;
    Ok(())
}

/// Spins until the driver makes a chain available (the avail ring's index moves past
/// `next_avail`) or `poll` passes; true if it did. The index's host address is resolved
/// once and the clock read every few spins: a spin is then one load, where a guest
/// address lookup and a clock read per spin took a fifth of a busy worker's time.
fn poll_for_work(
    avail_ring: GuestAddress,
    next_avail: u16,
    mem: &GuestMemory,
    poll: Duration,
) -> io::Result<bool> {
    /// Spins between clock reads (a few hundred ns).
    const SPINS_PER_CLOCK_READ: u32 = 32;
    let idx = avail_ring
        .checked_add(std::mem::offset_of!(vring_avail, idx) as u64)
        .ok_or_else(|| io::Error::other("avail ring address overflows"))?;
    let idx = mem
        .get_slice(idx, std::mem::size_of::<u16>())
        .map_err(io::Error::other)?;
    let deadline = Instant::now() + poll;
    loop {
        for _ in 0..SPINS_PER_CLOCK_READ {
            let avail = u16::from_le(
                idx.load::<u16>(0, Ordering::Acquire)
                    .map_err(io::Error::other)?,
            );
            if avail != next_avail {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// A worker's exit event (the library signals it when the connection ends).
pub(crate) fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .map_err(|e| warn!("cannot create a worker exit event: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slept(poll: &AdaptivePoll, for_: Duration) {
        poll.slept_at_ns.store(
            poll.now_ns().saturating_sub(for_.as_nanos() as u64).max(1),
            Ordering::Relaxed,
        );
        poll.woke();
    }

    #[test]
    fn polling_grows_while_the_guest_comes_back_in_time_and_stops_when_idle() {
        let poll = AdaptivePoll::new(Duration::from_micros(50));
        assert_eq!(poll.window(), Duration::ZERO);
        // Woken without having slept: nothing to learn.
        poll.woke();
        assert_eq!(poll.window(), Duration::ZERO);
        let mut windows = Vec::new();
        for _ in 0..6 {
            slept(&poll, Duration::from_micros(20));
            windows.push(poll.window().as_micros());
        }
        assert_eq!(windows, [4, 8, 16, 32, 50, 50]);
        // Idle for longer than the bound (a real sleep): halving down to nothing.
        let mut windows = Vec::new();
        for _ in 0..8 {
            poll.sleeping();
            std::thread::sleep(Duration::from_micros(200));
            poll.woke();
            windows.push(poll.window().as_nanos());
        }
        assert_eq!(windows, [25_000u128, 12_500, 6_250, 3_125, 1_562, 0, 0, 0]);
        // Off: never polls.
        let off = AdaptivePoll::new(Duration::ZERO);
        slept(&off, Duration::from_micros(1));
        assert_eq!(off.window(), Duration::ZERO);
    }
}

#[cfg(test)]
mod notification_tests {
    use std::fs::File;

    use rustix::event::{eventfd, EventfdFlags};
    use vhost_user_backend::VringT;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

    use super::*;

    const SIZE: u16 = 16;
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// A ring of `SIZE` entries with `chains` one-descriptor chains available, and the
    /// eventfd the backend notifies (non-blocking, read to see whether it was written).
    fn ring_with(chains: u16, event_idx: bool) -> (Vring, GuestMemoryAtomic<GuestMemory>, File) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        for head in 0..chains {
            mem.write_obj(
                Descriptor::new(0x8000, 16, 0, 0),
                GuestAddress(u64::from(head) * 16),
            )
            .unwrap();
            mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(head)))
                .unwrap();
        }
        mem.write_obj(chains, GuestAddress(AVAIL + 2)).unwrap();
        // used_event (after the avail ring's entries): the driver waits for the first
        // completion.
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE)))
            .unwrap();
        let mem = GuestMemoryAtomic::new(mem);
        let vring = Vring::new(mem.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring.set_queue_info(0, AVAIL, USED).unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        let call = File::from(eventfd(0, EventfdFlags::NONBLOCK).unwrap());
        vring.set_call(Some(call.try_clone().unwrap()));
        (vring, mem, call)
    }

    /// Whether the eventfd was written since the last look.
    fn notified(call: &File) -> bool {
        let mut count = [0u8; 8];
        rustix::io::read(call, &mut count).is_ok()
    }

    /// Which chains had a notification sent before they were handled, and whether one
    /// was sent after the last, when each chain returns `used` bytes.
    fn drain_noting_notifications(chains: u16, event_idx: bool, used: u32) -> (Vec<bool>, bool) {
        let (vring, mem, call) = ring_with(chains, event_idx);
        let refusals = RefusalLog::new("test");
        let settings = Settings {
            event_idx,
            poll: None,
            refusals: &refusals,
        };
        let mut before = Vec::new();
        drain(
            &vring,
            &mem,
            &settings,
            &Tracking::default(),
            Vec::new(),
            |_, _, _| {
                before.push(notified(&call));
                Some(used)
            },
        )
        .unwrap();
        (before, notified(&call))
    }

    #[test]
    fn with_event_idx_a_long_batch_tells_the_driver_before_it_ends() {
        // 64 KiB reads: the fourth completion brings the batch past NOTIFY_EARLY_EVERY.
        let (before, after) = drain_noting_notifications(6, true, 64 << 10);
        assert_eq!(
            before,
            [false, false, false, false, true, false],
            "notifications seen as each of 6 chains was handled (the driver waits for the first)"
        );
        assert!(
            !after,
            "notified again for completions the driver did not ask about"
        );
    }

    #[test]
    fn a_short_batch_notifies_once_at_its_end() {
        for event_idx in [true, false] {
            let (before, after) = drain_noting_notifications(4, event_idx, 1);
            assert_eq!(before, [false; 4], "EVENT_IDX {event_idx}");
            assert!(
                after,
                "EVENT_IDX {event_idx}: no notification after the batch"
            );
        }
    }

    #[test]
    fn without_event_idx_a_driver_that_declines_interrupts_gets_none() {
        for (flags, expected) in [(VRING_AVAIL_F_NO_INTERRUPT as u16, false), (0, true)] {
            let (vring, mem, call) = ring_with(4, false);
            mem.memory().write_obj(flags, GuestAddress(AVAIL)).unwrap();
            let refusals = RefusalLog::new("test");
            let settings = Settings {
                event_idx: false,
                poll: None,
                refusals: &refusals,
            };
            let tracking = Tracking::default();
            // Three chains complete in the batch, the fourth later from another thread (a
            // FLUSH does).
            drain(
                &vring,
                &mem,
                &settings,
                &tracking,
                Vec::new(),
                |head, _, _| (head != 3).then_some(1),
            )
            .unwrap();
            assert_eq!(
                notified(&call),
                expected,
                "avail flags {flags:#x}: interrupt sent at the end of the batch"
            );
            complete_later(&vring, &mem.memory(), &tracking, 3, 1).unwrap();
            assert_eq!(
                notified(&call),
                expected,
                "avail flags {flags:#x}: interrupt sent for a later completion"
            );
            let used = mem
                .memory()
                .read_obj::<u16>(GuestAddress(USED + 2))
                .unwrap();
            assert_eq!(used, 4, "the completions are in the used ring either way");
        }
    }

    /// A region the frontend adds while a worker drains, followed by a chain whose buffer
    /// lies in it: the chain is served with the new memory table, not refused with the
    /// table the worker loaded when it woke (as it was when one load served the whole
    /// drain and the batch popped whatever the driver had added meanwhile).
    #[test]
    fn a_chain_made_available_after_memory_was_added_is_served_in_it() {
        const NEW: u64 = 0x20000;
        for event_idx in [false, true] {
            let (vring, mem, _call) = ring_with(1, event_idx);
            let refusals = RefusalLog::new("test");
            let settings = Settings {
                event_idx,
                poll: None,
                refusals: &refusals,
            };
            let mut in_memory = Vec::new();
            let mut handle = |head: u16, _: Descriptors<'_>, table: &GuestMemory| {
                let buffer = if head == 1 { NEW } else { 0x8000 };
                in_memory.push(table.check_range(GuestAddress(buffer), 16));
                if head == 0 {
                    // While chain 0 is served: the frontend adds a region (and the handler
                    // has replied), then the driver makes chain 1 available in it.
                    let region =
                        vm_memory::GuestRegionMmap::from_range(GuestAddress(NEW), 0x1000, None)
                            .unwrap();
                    let added = mem
                        .memory()
                        .insert_region(std::sync::Arc::new(region))
                        .unwrap();
                    let ring = mem.memory();
                    ring.write_obj(Descriptor::new(NEW, 16, 0, 0), GuestAddress(16))
                        .unwrap();
                    ring.write_obj(1u16, GuestAddress(AVAIL + 4 + 2)).unwrap();
                    drop(ring);
                    mem.lock().unwrap().replace(added);
                    mem.memory()
                        .write_obj(2u16, GuestAddress(AVAIL + 2))
                        .unwrap();
                }
                Some(1)
            };
            // Without EVENT_IDX the batch ends at the index it read, and the driver kicks
            // for chain 1: a second drain.
            for _ in 0..if event_idx { 1 } else { 2 } {
                drain(
                    &vring,
                    &mem,
                    &settings,
                    &Tracking::default(),
                    Vec::new(),
                    &mut handle,
                )
                .unwrap();
            }
            assert_eq!(
                in_memory,
                [true, true],
                "EVENT_IDX {event_idx}: chain 1's buffer was outside the memory table it was served with"
            );
        }
    }
}
