//! Per-queue counters of the disk, for `daxd inspect` and Prometheus. Each queue's counters
//! sit on their own cache lines and are written by that queue's worker alone (FLUSH
//! completions by the flusher, with atomic adds), so counting is a load and a store per
//! field on a line no other core writes: nothing a benchmark can see.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::request::Request;

/// Request types as counted (named as [`Kind::name`] says, on the control socket too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    /// Refused while parsing, whatever its type: unknown type, malformed chain, range
    /// outside the disk, unnegotiated feature.
    Invalid,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Read,
        Kind::Write,
        Kind::Flush,
        Kind::GetId,
        Kind::Discard,
        Kind::WriteZeroes,
        Kind::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::GetId => "get_id",
            Kind::Discard => "discard",
            Kind::WriteZeroes => "write_zeroes",
            Kind::Invalid => "invalid",
        }
    }

    pub(crate) fn of(request: &Request) -> Kind {
        match request {
            Request::Read { .. } => Kind::Read,
            Request::Write { .. } => Kind::Write,
            Request::Flush => Kind::Flush,
            Request::GetId { .. } => Kind::GetId,
            Request::Discard(_) => Kind::Discard,
            Request::WriteZeroes(_) => Kind::WriteZeroes,
        }
    }
}

/// Latency histogram buckets: upper bounds in microseconds, powers of 4 from 4 µs to
/// about 4 s; the last bucket is everything above.
pub const LATENCY_BOUNDS_US: [u64; 11] = [
    4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
];

/// One in this many requests of a queue has its service time measured (FLUSHes: all).
pub const LATENCY_SAMPLE: u64 = 64;

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        LatencyHistogram {
            bounds_us: LATENCY_BOUNDS_US.to_vec(),
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The counters of one queue.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct QueueStats {
    requests: [AtomicU64; Kind::ALL.len()],
    /// Completions by status (OK, IOERR, UNSUPP), by the worker.
    statuses: [AtomicU64; 3],
    /// FLUSH completions by status, by the flusher: a separate line of counters, so that
    /// the worker's plain stores never race with the flusher's adds.
    flush_statuses: [AtomicU64; 3],
    /// Chains without a status byte, returned with nothing written.
    dropped: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// FLUSHes handed to the flusher and not completed yet.
    flushes_in_flight: AtomicU64,
    flush_latency: Histogram,
    request_latency: Histogram,
    sample: AtomicU64,
}

/// Adds to a counter only its queue's worker writes: no locked instruction needed.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

impl QueueStats {
    pub(crate) fn request(&self, kind: Kind, status: u8, bytes: u64) {
        bump(&self.requests[kind as usize], 1);
        if let Some(counter) = self.statuses.get(usize::from(status)) {
            bump(counter, 1);
        }
        match kind {
            Kind::Read => bump(&self.bytes_read, bytes),
            Kind::Write => bump(&self.bytes_written, bytes),
            _ => {}
        }
    }

    /// Bytes written by this queue's requests so far.
    pub(crate) fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    pub(crate) fn dropped(&self) {
        bump(&self.dropped, 1);
    }

    /// Whether this request's service time is to be measured.
    pub(crate) fn sampled(&self) -> bool {
        let n = self.sample.load(Ordering::Relaxed);
        self.sample.store(n.wrapping_add(1), Ordering::Relaxed);
        n % LATENCY_SAMPLE == 0
    }

    pub(crate) fn request_took(&self, took: Duration) {
        self.request_latency.record(took);
    }

    pub(crate) fn flush_started(&self) {
        bump(&self.requests[Kind::Flush as usize], 1);
        self.flushes_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A FLUSH completed by the flusher (another thread than the worker): atomic adds.
    pub(crate) fn flush_completed(&self, status: u8, took: Duration) {
        self.flushes_in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(counter) = self.flush_statuses.get(usize::from(status)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.flush_latency.record(took);
    }

    pub fn snapshot(&self, queue: usize) -> QueueMetrics {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueMetrics {
            queue,
            requests: Kind::ALL
                .iter()
                .map(|k| (*k, load(&self.requests[*k as usize])))
                .collect(),
            ok: load(&self.statuses[0]) + load(&self.flush_statuses[0]),
            ioerr: load(&self.statuses[1]) + load(&self.flush_statuses[1]),
            unsupp: load(&self.statuses[2]) + load(&self.flush_statuses[2]),
            dropped: load(&self.dropped),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            flushes_in_flight: load(&self.flushes_in_flight),
            flush_latency: self.flush_latency.snapshot(),
            request_latency: self.request_latency.snapshot(),
        }
    }
}

/// A latency histogram as reported: `counts[i]` requests took at most `bounds_us[i]`
/// microseconds (and more than the bound before); the last count is everything above.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub bounds_us: Vec<u64>,
    pub counts: Vec<u64>,
    pub sum_ns: u64,
}

impl LatencyHistogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// One queue's counters as `daxd inspect` reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMetrics {
    pub queue: usize,
    /// Requests by type, completed or in flight.
    pub requests: Vec<(Kind, u64)>,
    /// Completions by status.
    pub ok: u64,
    pub ioerr: u64,
    pub unsupp: u64,
    /// Chains without a status byte.
    pub dropped: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes_in_flight: u64,
    /// Every FLUSH, from its parsing to its completion.
    pub flush_latency: LatencyHistogram,
    /// Every [`LATENCY_SAMPLE`]th other request, from its parsing to its status.
    pub request_latency: LatencyHistogram,
}

impl QueueMetrics {
    /// Requests of type `kind`.
    pub fn count(&self, kind: Kind) -> u64 {
        self.requests
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

/// The disk's counters as `daxd inspect` reports them. `version` changes when a field's
/// meaning does (fields may be added without a change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkMetrics {
    pub version: u32,
    /// fdatasync calls for FLUSH requests (one may complete several).
    pub region_flushes: u64,
    /// Writes into allocated blocks go through pwrite(2) rather than the mapping (see
    /// `--write-path`).
    #[serde(default)]
    pub writes_pwrite: bool,
    /// How often `--write-path auto` changed the path.
    #[serde(default)]
    pub write_path_changes: u64,
    pub queues: Vec<QueueMetrics>,
}

/// The current [`BlkMetrics::version`].
pub const METRICS_VERSION: u32 = 1;
