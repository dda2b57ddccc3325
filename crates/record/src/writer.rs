//! Appending to a write log while daxd serves. Queue workers append writes, discards and
//! the place of each FLUSH they hand to the flusher; the flusher fills that place in when
//! the FLUSH's outcome is known; the control socket appends marks. Everything is written
//! under one mutex, so entries land in the order they were appended and the file is never
//! read back while recording; the cost is that recording queues serialise on it.
//!
//! A FLUSH's entry is placed where it was handed over, not where it completed: it covers
//! the writes stored before that point, and writes stored while it ran are not covered.
//! A FLUSH that fails leaves a mark named [`FLUSH_FAILED`] in its place instead.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use log::error;

use crate::format::{Header, Super, DISCARD, ENTRY_BYTES, FLUSH, MARK, SECTOR};

/// The mark left where a FLUSH that failed was handed over.
pub const FLUSH_FAILED: &str = "daxd-flush-failed";

/// FLUSHes whose outcome is pending, at most (more are still logged; the super block
/// then counts fewer entries until they resolve). Room is made at the start so that
/// appending allocates nothing on a queue worker.
const PENDING_FLUSHES: usize = 1024;

/// A write log being recorded.
#[derive(Debug)]
pub struct DiskLog {
    file: File,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Where the next entry goes.
    next: u64,
    entries: u64,
    /// Entry numbers of FLUSHes handed over and not yet resolved, oldest first.
    pending: VecDeque<u64>,
    /// Recording stopped after a write to the log failed.
    broken: bool,
}

/// The place of a FLUSH in the log, filled in once it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushSlot {
    entry: u64,
    at: u64,
}

impl DiskLog {
    /// Creates (or empties) the log at `path`.
    pub fn create(path: &Path) -> io::Result<DiskLog> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let log = DiskLog {
            file,
            state: Mutex::new(State {
                next: SECTOR,
                entries: 0,
                pending: VecDeque::with_capacity(PENDING_FLUSHES),
                broken: false,
            }),
        };
        log.write_super(0)?;
        Ok(log)
    }

    /// Logs a write of `bytes` (a whole number of sectors) at disk sector `sector`, whose
    /// data `data` writes into the log file at the offset it is given.
    pub fn write(&self, sector: u64, bytes: u64, data: impl FnOnce(&File, u64) -> io::Result<()>) {
        let header = Header {
            sector,
            nr_sectors: bytes.div_ceil(SECTOR),
            ..Header::default()
        };
        self.append(header, &[], bytes.div_ceil(SECTOR) * SECTOR, |file, at| {
            data(file, at)
        });
    }

    /// Logs a discard or write-zeroes of `bytes` at `sector`: on daxd's disk both read
    /// back as zeroes.
    pub fn discard(&self, sector: u64, bytes: u64) {
        let header = Header {
            sector,
            nr_sectors: bytes.div_ceil(SECTOR),
            flags: DISCARD,
            data_len: 0,
        };
        self.append(header, &[], 0, |_, _| Ok(()));
    }

    /// Logs a named mark (at most 479 bytes of it: the rest of its header's sector).
    pub fn mark(&self, name: &str) {
        let name = &name.as_bytes()[..name.len().min(SECTOR as usize - ENTRY_BYTES - 1)];
        let header = Header {
            flags: MARK,
            data_len: name.len() as u64,
            ..Header::default()
        };
        self.append(header, name, 0, |_, _| Ok(()));
    }

    /// Logs a FLUSH point here: everything logged so far is durable.
    pub fn flush_point(&self) {
        let header = Header {
            flags: FLUSH,
            ..Header::default()
        };
        self.append(header, &[], 0, |_, _| Ok(()));
    }

    /// Reserves the place of a FLUSH handed over now; [`DiskLog::flushed`] fills it.
    pub fn flush_handed_over(&self) -> FlushSlot {
        let mut state = self.lock();
        let slot = FlushSlot {
            entry: state.entries,
            at: state.next,
        };
        state.next += SECTOR;
        state.entries += 1;
        state.pending.push_back(slot.entry);
        slot
    }

    /// Fills in the place of a FLUSH: a FLUSH entry if it made the disk durable, the mark
    /// [`FLUSH_FAILED`] if it did not.
    pub fn flushed(&self, slot: FlushSlot, durable: bool) {
        let header = if durable {
            Header {
                flags: FLUSH,
                ..Header::default()
            }
        } else {
            Header {
                flags: MARK,
                data_len: FLUSH_FAILED.len() as u64,
                ..Header::default()
            }
        };
        let name: &[u8] = if durable {
            &[]
        } else {
            FLUSH_FAILED.as_bytes()
        };
        let mut state = self.lock();
        if let Some(i) = state.pending.iter().position(|&e| e == slot.entry) {
            state.pending.remove(i);
        }
        if state.broken {
            return;
        }
        let mut block = [0u8; SECTOR as usize];
        block[..ENTRY_BYTES].copy_from_slice(&header.encode());
        block[ENTRY_BYTES..ENTRY_BYTES + name.len()].copy_from_slice(name);
        let complete = state.pending.front().copied().unwrap_or(state.entries);
        let written = self
            .file
            .write_all_at(&block, slot.at)
            .and_then(|()| self.write_super(complete));
        if let Err(e) = written {
            Self::stop(&mut state, e);
        }
    }

    /// Writes the super block with every entry counted; call once nothing appends any
    /// more (at shutdown).
    pub fn finish(&self) {
        let mut state = self.lock();
        if state.broken {
            return;
        }
        let entries = state.pending.front().copied().unwrap_or(state.entries);
        if let Err(e) = self
            .write_super(entries)
            .and_then(|()| self.file.sync_data())
        {
            Self::stop(&mut state, e);
        }
    }

    fn append(
        &self,
        header: Header,
        inline: &[u8],
        data_bytes: u64,
        data: impl FnOnce(&File, u64) -> io::Result<()>,
    ) {
        let mut state = self.lock();
        if state.broken {
            return;
        }
        let mut block = [0u8; SECTOR as usize];
        block[..ENTRY_BYTES].copy_from_slice(&header.encode());
        block[ENTRY_BYTES..ENTRY_BYTES + inline.len()].copy_from_slice(inline);
        let at = state.next;
        let written = self
            .file
            .write_all_at(&block, at)
            .and_then(|()| data(&self.file, at + SECTOR));
        match written {
            Ok(()) => {
                state.next = at + SECTOR + data_bytes;
                state.entries += 1;
            }
            Err(e) => Self::stop(&mut state, e),
        }
    }

    fn write_super(&self, entries: u64) -> io::Result<()> {
        let mut block = [0u8; SECTOR as usize];
        block[..28].copy_from_slice(
            &Super {
                nr_entries: entries,
                sectorsize: SECTOR as u32,
            }
            .encode(),
        );
        self.file.write_all_at(&block, 0)
    }

    fn stop(state: &mut State, e: io::Error) {
        state.broken = true;
        error!("recording stopped: cannot write the disk's write log: {e}; the log keeps what it had, the disk is served as before");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
