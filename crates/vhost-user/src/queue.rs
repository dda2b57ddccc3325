//! Draining a virtqueue, shared by every device's backend.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Serves every available chain of `vring` with `handle`, which returns the chain's used
/// length. One lock of the vring and at most one notification per batch. With EVENT_IDX,
/// re-checks the ring after re-enabling notifications so that a chain added in between is
/// not left waiting. With `poll`, an empty queue is watched that long before
/// notifications are re-enabled: meanwhile the driver does not kick, and a new request is
/// picked up without a system call on either side.
pub(crate) fn drain(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    event_idx: bool,
    poll: Duration,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    loop {
        if event_idx {
            state.disable_notification().map_err(io::Error::other)?;
        }
        let mut completed = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used = handle(chain);
            state.add_used(head, used).map_err(io::Error::other)?;
            completed = true;
        }
        if completed && state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        if !poll.is_zero() && poll_for_work(state.get_queue(), mem, poll)? {
            continue;
        }
        if !event_idx || !state.enable_notification().map_err(io::Error::other)? {
            return Ok(());
        }
    }
}

/// Spins until the driver makes a chain available or `poll` passes; true if it did.
fn poll_for_work(queue: &Queue, mem: &GuestMemoryMmap, poll: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + poll;
    let next = Wrapping(queue.next_avail());
    loop {
        let avail = queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(io::Error::other)?;
        if avail != next {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::hint::spin_loop();
    }
}

/// A worker's exit event (the library signals it when the connection ends).
pub(crate) fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .map_err(|e| warn!("cannot create a worker exit event: {e}"))
        .ok()
}
