//! What daxd's virtio devices share below their own logic: reading a descriptor chain as
//! the two byte streams the virtio spec defines ([`chain`]), and logging refused requests
//! without letting a guest flood the host's log ([`RefusalLog`]).

pub mod chain;
pub mod ring;

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};

use log::warn;

pub use chain::{Chain, ChainError, Segment, Stream};
pub use ring::{ChainWalk, RingError};

/// Exactly `size` bytes of a config space from `offset`, zero beyond what the device
/// defines: frontends read their own `sizeof` of the config struct, and vhost-user
/// frontends reject an answer of any other length.
pub fn config_bytes(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    (u64::from(offset)..u64::from(offset) + u64::from(size))
        .map(|i| space.get(i as usize).copied().unwrap_or(0))
        .collect()
}

/// Refused requests logged in full before logging falls back to one line in 10000, so a
/// hostile guest cannot fill the host's disk with log lines.
const REFUSALS_LOGGED: u64 = 100;

/// Counts a device's refused requests and logs the first ones, then one in 10000.
#[derive(Debug)]
pub struct RefusalLog {
    device: &'static str,
    refused: AtomicU64,
}

impl RefusalLog {
    pub const fn new(device: &'static str) -> RefusalLog {
        RefusalLog {
            device,
            refused: AtomicU64::new(0),
        }
    }

    /// Counts one refusal; `what` is formatted only when the line is logged, so pass
    /// `format_args!` rather than a `String`.
    pub fn refused(&self, what: impl Display) {
        let n = self.refused.fetch_add(1, Ordering::Relaxed);
        if n < REFUSALS_LOGGED || n % 10_000 == 0 {
            warn!("{}: {what} ({} refused so far)", self.device, n + 1);
        }
    }

    /// Requests refused so far.
    pub fn count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}
