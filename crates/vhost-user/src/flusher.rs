//! The flusher thread of a blk connection: queue workers hand it FLUSH requests, so that a
//! queue keeps moving while the region is flushed, and one `fdatasync` completes every
//! FLUSH that arrived while the previous one ran (group commit). Each FLUSH covers every
//! write completed before a queue worker handed it over, since those writes were in the
//! mapping before this thread took it.
//!
//! The handover allocates nothing: the queue workers push into a vector made at the start
//! with room for every FLUSH the queues can have in flight at once, and the thread swaps
//! it for a second one of its own. (A channel allocates a block every few messages, on the
//! queue worker; see daxd_confine for why a confined thread should not allocate.)

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use log::warn;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use daxd_blk::{BlkDevice, PendingFlush};

use crate::dirty_log::{GuestMemory, Vring};
use crate::queue::{self, Tracking};

/// Most FLUSHes the handover has room for from the start; more in flight at once (only
/// with very many large queues) grows it once, and it keeps that room.
const ROOM: usize = 1024;

/// A FLUSH request waiting for the flusher.
pub(crate) struct FlushJob {
    pub vring: Vring,
    /// The FLUSH stays in flight for a successor until its completion is published.
    pub tracking: Tracking,
    pub head: u16,
    pub pending: PendingFlush,
}

impl std::fmt::Debug for FlushJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushJob")
            .field("queue", &self.tracking.queue)
            .field("head", &self.head)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Handoff {
    /// FLUSHes handed over that the thread has not taken yet.
    jobs: Vec<FlushJob>,
    /// Settles asked for so far, and how many of them are answered: a settle is answered
    /// once every FLUSH handed over before it was asked is completed.
    settles_asked: u64,
    settles_answered: u64,
    /// The connection ends: the thread completes what is left and exits.
    closing: bool,
    /// The thread is gone (never started, exited, or panicked): queue workers flush
    /// themselves and nobody waits for it.
    gone: bool,
}

#[derive(Debug, Default)]
struct Shared {
    handoff: Mutex<Handoff>,
    /// The thread waits here for jobs, settles and the end.
    work: Condvar,
    /// Settles wait here for their answer.
    answered: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Handoff> {
        // A panic under the lock leaves the handoff consistent: every field is set in
        // one step.
        self.handoff.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The connection's flusher thread. Dropping it completes what was handed over and joins
/// the thread.
#[derive(Debug)]
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread for `device`'s FLUSHes, with room for `in_flight` of them at once
    /// (every queue's entries). Without a thread (it could not start) queue workers flush
    /// inline.
    pub(crate) fn spawn(
        device: Arc<BlkDevice>,
        mem: GuestMemoryAtomic<GuestMemory>,
        in_flight: usize,
    ) -> Flusher {
        let room = in_flight.min(ROOM);
        let shared = Arc::new(Shared::default());
        shared.lock().jobs.reserve(room);
        let spawned = std::thread::Builder::new()
            .name("daxd-blk-flush".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    let _gone = Gone(&shared);
                    daxd_confine::enter_or_exit(daxd_confine::ThreadKind::Flusher);
                    serve(&shared, &device, &mem, Vec::with_capacity(room));
                }
            });
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(e) => {
                warn!("cannot start the flush thread ({e}); flushing on the queue workers");
                shared.lock().gone = true;
                None
            }
        };
        Flusher { shared, thread }
    }

    /// Hands a FLUSH over; gives it back if there is no flusher thread.
    pub(crate) fn send(&self, job: FlushJob) -> Result<(), FlushJob> {
        let mut handoff = self.shared.lock();
        if handoff.gone {
            return Err(job);
        }
        handoff.jobs.push(job);
        drop(handoff);
        self.shared.work.notify_one();
        Ok(())
    }

    /// Returns once every FLUSH handed over so far is completed (its used entry published
    /// and the driver notified): a queue that is stopping must leave nothing behind that
    /// writes into guest memory later.
    pub(crate) fn settle(&self) {
        let mut handoff = self.shared.lock();
        handoff.settles_asked += 1;
        let ticket = handoff.settles_asked;
        self.shared.work.notify_one();
        while handoff.settles_answered < ticket && !handoff.gone {
            handoff = self
                .shared
                .answered
                .wait(handoff)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("the flush thread panicked");
            }
        }
    }
}

/// The thread's loop: takes every FLUSH handed over, flushes once for all of them,
/// completes them, and answers the settles asked before it took them.
fn serve(
    shared: &Shared,
    device: &BlkDevice,
    mem: &GuestMemoryAtomic<GuestMemory>,
    mut batch: Vec<FlushJob>,
) {
    loop {
        let (answering, closing) = {
            let mut handoff = shared.lock();
            while handoff.jobs.is_empty()
                && handoff.settles_answered == handoff.settles_asked
                && !handoff.closing
            {
                handoff = shared.work.wait(handoff).unwrap_or_else(|e| e.into_inner());
            }
            // The thread's empty vector (with its room) goes back for the next jobs.
            std::mem::swap(&mut handoff.jobs, &mut batch);
            (handoff.settles_asked, handoff.closing)
        };
        let done = batch.is_empty() && closing;
        if !batch.is_empty() {
            let mem = mem.memory();
            let flushed = device.flush();
            for job in batch.drain(..) {
                let used = device.complete_flush(&job.pending, flushed, &*mem);
                if let Err(e) =
                    queue::complete_later(&job.vring, &mem, &job.tracking, job.head, used)
                {
                    warn!("cannot complete a FLUSH request: {e}");
                }
            }
        }
        shared.lock().settles_answered = answering;
        shared.answered.notify_all();
        if done {
            return;
        }
    }
}

/// Marks the thread gone when it ends, however it ends, so that nobody waits for it.
struct Gone<'a>(&'a Shared);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.answered.notify_all();
    }
}
