//! What a host power cut may leave of daxd's disk.
//!
//! While recording (`daxd --record DIR`), the disk's device appends every write, discard
//! and write-zeroes it stored and every FLUSH it made durable to a log ([`DiskLog`]), in
//! the order daxd stored them, and a test's named marks between them. The format is
//! dm-log-writes' (the kernel's `device-mapper/log-writes.rst`), so the tools written for
//! it (xfstests' `replay-log`) read daxd's logs too: a super block, then per entry a
//! 512-byte header block and the entry's data.
//!
//! [`states`] then enumerates the crash states the log allows: each FLUSH point
//! (everything stored before the FLUSH, nothing after) and, between two FLUSH points,
//! seeded samples in which every 4 KiB block written since the earlier one holds any of
//! the versions written to it, or its old content: the page cache writes back any subset,
//! in any order.

pub mod format;
pub mod reader;
pub mod states;
mod window;
mod writer;

#[cfg(test)]
mod tests;

pub use format::LogError;
pub use reader::{Entry, LogReader, Op};
pub use window::WindowRecorder;
pub use writer::{DiskLog, FlushSlot, FLUSH_FAILED};

/// The disk as recording began, in a recording's directory.
pub const BASE: &str = "disk.base";
/// The write log, in a recording's directory.
pub const LOG: &str = "disk.log";

/// A recorded device's files in a recording's directory: (as recording began, its log).
/// `disk` is the disk; any other name a pmem window.
pub fn files(device: &str) -> (String, String) {
    if device == "disk" {
        (BASE.to_owned(), LOG.to_owned())
    } else {
        (format!("pmem-{device}.base"), format!("pmem-{device}.log"))
    }
}

/// A mark that says the log does not show every FLUSH (a pmem window QEMU flushes
/// itself, recorded at marks): its crash states are its FLUSH points only, since samples
/// between them could break an order that FLUSHes the log does not show kept.
pub const NO_SAMPLES: &str = "daxd-flush-points-only";

/// Bytes per block a crash keeps or loses as a whole: a page of the host's page cache,
/// which is written back whole.
pub const BLOCK: u64 = 4096;
