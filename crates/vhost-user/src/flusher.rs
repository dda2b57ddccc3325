//! The flusher thread of a blk connection: queue workers hand it FLUSH requests, so that a
//! queue keeps moving while the region is flushed, and one `fdatasync` completes every
//! FLUSH that arrived while the previous one ran (group commit). Each FLUSH covers every
//! write completed before a queue worker handed it over, since those writes were in the
//! mapping before this thread took it.
//!
//! It also completes the requests a fault rule delays or holds, when they are due: the
//! queue worker executes them and goes on serving. A delay is as exact as the flush running
//! at that moment lets it be; a hold is looked at every [`HOLD_POLL`]. A queue that stops
//! (a settle) and the end of the connection complete everything at once: nothing may be
//! written into guest memory after the frontend read the rings' state.
//!
//! The handover allocates nothing: the queue workers push into a vector made at the start
//! with room for every FLUSH the queues can have in flight at once, and the thread swaps
//! it for a second one of its own. (A channel allocates a block every few messages, on the
//! queue worker; see daxd_confine for why a confined thread should not allocate.)

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::warn;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

use daxd_blk::{BlkDevice, PendingFlush, Release};

use crate::dirty_log::{GuestMemory, Vring};
use crate::queue::{self, Tracking};

/// Most FLUSHes the handover has room for from the start; more in flight at once (only
/// with very many large queues) grows it once, and it keeps that room.
const ROOM: usize = 1024;

/// How often held requests are looked at (whether their rule was cleared).
pub(crate) const HOLD_POLL: Duration = Duration::from_millis(10);

/// Where a chain is completed: its queue and head.
pub(crate) struct Completion {
    pub vring: Vring,
    /// The chain stays in flight for a successor until its completion is published.
    pub tracking: Tracking,
    pub head: u16,
}

impl Completion {
    fn publish(&self, mem: &GuestMemory, used: u32) {
        if let Err(e) = queue::complete_later(&self.vring, mem, &self.tracking, self.head, used) {
            warn!("cannot complete a request: {e}");
        }
    }
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completion")
            .field("queue", &self.tracking.queue)
            .field("head", &self.head)
            .finish_non_exhaustive()
    }
}

/// What a queue worker hands the thread.
#[derive(Debug)]
pub(crate) enum Job {
    /// A FLUSH to flush for and complete.
    Flush {
        at: Completion,
        pending: PendingFlush,
    },
    /// A request executed already, to complete with `used` once `release` says so.
    Later {
        at: Completion,
        used: u32,
        release: Release,
    },
}

/// A request executed (or flushed for) and waiting for its release.
#[derive(Debug)]
struct Waiting {
    at: Completion,
    used: u32,
    release: Release,
}

#[derive(Debug, Default)]
struct Handoff {
    /// Jobs handed over that the thread has not taken yet.
    jobs: Vec<Job>,
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

    /// Hands a job over; gives it back if there is no flusher thread.
    pub(crate) fn send(&self, job: Job) -> Result<(), Job> {
        let mut handoff = self.shared.lock();
        if handoff.gone {
            return Err(job);
        }
        handoff.jobs.push(job);
        drop(handoff);
        self.shared.work.notify_one();
        Ok(())
    }

    /// Returns once every job handed over so far is completed (its used entry published
    /// and the driver notified), delayed and held requests included: a queue that is
    /// stopping must leave nothing behind that writes into guest memory later.
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

/// The thread's loop: takes every job handed over, flushes once for all the FLUSHes among
/// them, completes what is due, and answers the settles asked before it took them.
fn serve(
    shared: &Shared,
    device: &BlkDevice,
    mem: &GuestMemoryAtomic<GuestMemory>,
    mut batch: Vec<Job>,
) {
    let mut waiting: Vec<Waiting> = Vec::with_capacity(batch.capacity());
    loop {
        let (answering, settling, closing) = {
            let mut handoff = shared.lock();
            loop {
                if !handoff.jobs.is_empty()
                    || handoff.settles_answered != handoff.settles_asked
                    || handoff.closing
                {
                    break;
                }
                let Some(wait) = next_wake(&waiting) else {
                    handoff = shared.work.wait(handoff).unwrap_or_else(|e| e.into_inner());
                    continue;
                };
                let (guard, timeout) = shared
                    .work
                    .wait_timeout(handoff, wait)
                    .unwrap_or_else(|e| e.into_inner());
                handoff = guard;
                if timeout.timed_out() {
                    break;
                }
            }
            // The thread's empty vector (with its room) goes back for the next jobs.
            std::mem::swap(&mut handoff.jobs, &mut batch);
            let settling = handoff.settles_asked != handoff.settles_answered;
            (handoff.settles_asked, settling, handoff.closing)
        };
        let done = batch.is_empty() && closing;
        let mem = mem.memory();
        let flushed = batch
            .iter()
            .any(|job| matches!(job, Job::Flush { .. }))
            .then(|| device.flush());
        for job in batch.drain(..) {
            let (at, used, release) = match job {
                Job::Flush { at, pending } => {
                    let flushed = flushed.expect("flushed for every FLUSH taken");
                    let used = device.complete_flush(&pending, flushed, &*mem);
                    match pending.release {
                        Some(release) => (at, used, release),
                        None => {
                            at.publish(&mem, used);
                            continue;
                        }
                    }
                }
                Job::Later { at, used, release } => (at, used, release),
            };
            waiting.push(Waiting { at, used, release });
        }
        // A stopping queue or the connection's end takes everything with it.
        let everything = settling || closing;
        let now = Instant::now();
        waiting.retain(|w| {
            let due = everything || device.faults().due(&w.release, now);
            if due {
                w.at.publish(&mem, w.used);
            }
            !due
        });
        shared.lock().settles_answered = answering;
        shared.answered.notify_all();
        if done {
            return;
        }
    }
}

/// How long the thread may sleep before a waiting request is due: until the earliest
/// delay ends, at most [`HOLD_POLL`] while a request is held; `None` with nothing waiting.
fn next_wake(waiting: &[Waiting]) -> Option<Duration> {
    let now = Instant::now();
    waiting
        .iter()
        .map(|w| {
            w.release
                .at()
                .map_or(HOLD_POLL, |at| at.saturating_duration_since(now))
        })
        .min()
}

/// Marks the thread gone when it ends, however it ends, so that nobody waits for it.
struct Gone<'a>(&'a Shared);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.answered.notify_all();
    }
}
