//! Draining a virtqueue, shared by every device's backend.

use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::warn;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_ring::vring_avail;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Serves every available chain of `vring` with `handle`, which returns the chain's used
/// length, or `None` when it completes the chain later itself (a deferred FLUSH). One
/// lock of the vring and at most one notification per batch. With EVENT_IDX,
/// re-checks the ring after re-enabling notifications so that a chain added in between is
/// not left waiting. With `poll`, an empty queue is watched that long before
/// notifications are re-enabled: meanwhile the driver does not kick, and a new request is
/// picked up without a system call on either side.
pub(crate) fn drain(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    event_idx: bool,
    poll: Duration,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> io::Result<()> {
    let mut state = vring.get_mut();
    loop {
        if event_idx {
            state.disable_notification().map_err(io::Error::other)?;
        }
        let mut completed = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem) {
            let head = chain.head_index();
            if let Some(used) = handle(chain) {
                state.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
        }
        if completed && state.needs_notification().map_err(io::Error::other)? {
            state.signal_used_queue()?;
        }
        if !poll.is_zero() {
            // Poll without the vring's lock, so that deferred completions can land.
            let avail_ring = GuestAddress(state.get_queue().avail_ring());
            let next_avail = state.get_queue().next_avail();
            drop(state);
            let found = poll_for_work(avail_ring, next_avail, mem, poll)?;
            state = vring.get_mut();
            if found {
                continue;
            }
        }
        if !event_idx || !state.enable_notification().map_err(io::Error::other)? {
            return Ok(());
        }
    }
}

/// Completes a chain that [`drain`] left to its handler, from any thread.
pub(crate) fn complete_later(vring: &VringRwLock, head: u16, used: u32) -> io::Result<()> {
    vring.add_used(head, used).map_err(io::Error::other)?;
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Spins until the driver makes a chain available (the avail ring's index moves past
/// `next_avail`) or `poll` passes; true if it did.
fn poll_for_work(
    avail_ring: GuestAddress,
    next_avail: u16,
    mem: &GuestMemoryMmap,
    poll: Duration,
) -> io::Result<bool> {
    let idx = avail_ring
        .checked_add(std::mem::offset_of!(vring_avail, idx) as u64)
        .ok_or_else(|| io::Error::other("avail ring address overflows"))?;
    let deadline = Instant::now() + poll;
    loop {
        let avail = u16::from_le(
            mem.load::<u16>(idx, Ordering::Acquire)
                .map_err(io::Error::other)?,
        );
        if avail != next_avail {
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
