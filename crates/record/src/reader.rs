//! Reading a write log: daxd's own, or one dm-log-writes wrote. Every size in it is
//! checked against the file before it is used, so a damaged or truncated log is refused
//! with the entry and byte where it went wrong.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::{Header, LogError, Super, DISCARD, ENTRY_BYTES, FLUSH, FUA, MARK};

/// An open write log.
#[derive(Debug)]
pub struct LogReader {
    file: File,
    len: u64,
    sectorsize: u64,
    entries: u64,
}

/// One entry of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its number, from 0.
    pub index: u64,
    /// Everything logged before this entry's operation is durable (a FLUSH).
    pub flush_before: bool,
    pub op: Op,
    /// The operation itself was durable when it completed (FUA).
    pub durable: bool,
}

/// What an entry did to the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Nothing (a FLUSH alone, or an entry with no sectors).
    Nothing,
    /// `bytes` of data at byte `at` of the disk; the data is at byte `data_at` of the log.
    Write { at: u64, bytes: u64, data_at: u64 },
    /// `bytes` at byte `at` of the disk read back as zeroes from now on.
    Discard { at: u64, bytes: u64 },
    /// A named mark.
    Mark(String),
}

impl LogReader {
    pub fn open(path: &Path) -> Result<LogReader, LogError> {
        LogReader::from_file(File::open(path)?)
    }

    pub fn from_file(file: File) -> Result<LogReader, LogError> {
        let len = file.metadata()?.len();
        let mut head = [0u8; 28];
        if len < head.len() as u64 {
            return Err(LogError::NotALog);
        }
        file.read_exact_at(&mut head, 0)?;
        let sup = Super::decode(&head)?;
        Ok(LogReader {
            file,
            len,
            sectorsize: u64::from(sup.sectorsize),
            entries: sup.nr_entries,
        })
    }

    /// Entries the super block announces.
    pub fn announced(&self) -> u64 {
        self.entries
    }

    /// The entries in order; the first damaged one ends them with its error.
    pub fn entries(&self) -> impl Iterator<Item = Result<Entry, LogError>> + '_ {
        let mut at = self.sectorsize;
        let mut index = 0;
        let mut failed = false;
        std::iter::from_fn(move || {
            if failed || index >= self.entries {
                return None;
            }
            let entry = self.entry(index, at);
            match &entry {
                Ok((_, next)) => at = *next,
                Err(_) => failed = true,
            }
            index += 1;
            Some(entry.map(|(entry, _)| entry))
        })
    }

    /// Reads `buf.len()` bytes of the log at `at` (an entry's data).
    pub fn read_data(&self, at: u64, buf: &mut [u8]) -> Result<(), LogError> {
        Ok(self.file.read_exact_at(buf, at)?)
    }

    /// The entry at byte `at`, and where the next one starts.
    fn entry(&self, index: u64, at: u64) -> Result<(Entry, u64), LogError> {
        let bad = |why| LogError::BadEntry {
            entry: index,
            at,
            why,
        };
        let truncated = LogError::Truncated {
            entry: index,
            at,
            entries: self.entries,
        };
        let data_at = at
            .checked_add(self.sectorsize)
            .ok_or(bad("beyond any file"))?;
        if data_at > self.len {
            return Err(truncated);
        }
        let mut raw = [0u8; ENTRY_BYTES];
        self.file.read_exact_at(&mut raw, at)?;
        let header = Header::decode(&raw);
        let to_bytes = |sectors: u64| {
            sectors
                .checked_mul(self.sectorsize)
                .filter(|b| b.checked_add(data_at).is_some())
                .ok_or(bad("its sectors lie beyond any disk"))
        };
        let disk_at = to_bytes(header.sector)?;
        let bytes = to_bytes(header.nr_sectors)?;
        let flush_before = header.flags & FLUSH != 0;
        let durable = header.flags & FUA != 0;
        let (op, next) = if header.flags & MARK != 0 {
            if header.data_len > self.sectorsize - ENTRY_BYTES as u64 {
                return Err(bad("a mark's name longer than its sector"));
            }
            let mut name = vec![0u8; header.data_len as usize];
            self.file
                .read_exact_at(&mut name, at + ENTRY_BYTES as u64)?;
            let name = String::from_utf8_lossy(&name)
                .trim_end_matches('\0')
                .to_owned();
            (Op::Mark(name), data_at)
        } else if header.flags & DISCARD != 0 {
            if bytes == 0 {
                (Op::Nothing, data_at)
            } else {
                (Op::Discard { at: disk_at, bytes }, data_at)
            }
        } else if bytes == 0 {
            (Op::Nothing, data_at)
        } else {
            let next = data_at + bytes;
            if next > self.len {
                return Err(truncated);
            }
            (
                Op::Write {
                    at: disk_at,
                    bytes,
                    data_at,
                },
                next,
            )
        };
        Ok((
            Entry {
                index,
                flush_before,
                op,
                durable,
            },
            next,
        ))
    }
}
