//! dm-log-writes' on-disk format (Linux `drivers/md/dm-log-writes.c`), little endian:
//! a super block at byte 0 (`magic, version, nr_entries: u64, sectorsize: u32`), padded
//! to `sectorsize`; from byte `sectorsize` on, per entry a header (`sector, nr_sectors,
//! flags, data_len: u64`) padded to `sectorsize` (a mark's name follows the header inside
//! that block), then, for a write, `nr_sectors * sectorsize` bytes of data. Sectors count
//! in `sectorsize` units; daxd's logs use 512, the disk's logical block size.

use std::io;

pub const MAGIC: u64 = 0x006a_7366_7773_6872;
pub const VERSION: u64 = 1;
/// The sector size of the logs daxd writes.
pub const SECTOR: u64 = 512;

/// Everything stored before this entry is durable.
pub const FLUSH: u64 = 1 << 0;
/// This entry's write was durable when it completed.
pub const FUA: u64 = 1 << 1;
/// A discard: the range reads back as zeroes (on daxd's disk); no data follows.
pub const DISCARD: u64 = 1 << 2;
/// A named mark; the name follows the header.
pub const MARK: u64 = 1 << 3;
/// A hint from the kernel's block layer; no meaning for replay.
pub const METADATA: u64 = 1 << 4;

/// Bytes of an entry header.
pub const ENTRY_BYTES: usize = 32;

/// Why a log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the log")]
    Io(#[from] io::Error),
    #[error("not a write log (dm-log-writes' magic {MAGIC:#x} missing at byte 0)")]
    NotALog,
    #[error("write log version {0}; only version {VERSION} is known")]
    Version(u64),
    #[error("write log sector size {0} is not a power of two from 512 to 65536")]
    SectorSize(u32),
    #[error("entry {entry} at byte {at}: the log ends inside it (truncated; {entries} entries are announced)")]
    Truncated { entry: u64, at: u64, entries: u64 },
    #[error("entry {entry} at byte {at}: {why}")]
    BadEntry {
        entry: u64,
        at: u64,
        why: &'static str,
    },
}

/// The super block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    pub nr_entries: u64,
    pub sectorsize: u32,
}

impl Super {
    pub fn encode(&self) -> [u8; 28] {
        let mut out = [0u8; 28];
        out[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        out[8..16].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.nr_entries.to_le_bytes());
        out[24..28].copy_from_slice(&self.sectorsize.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8; 28]) -> Result<Super, LogError> {
        if le64(&bytes[0..8]) != MAGIC {
            return Err(LogError::NotALog);
        }
        let version = le64(&bytes[8..16]);
        if version != VERSION {
            return Err(LogError::Version(version));
        }
        let sectorsize = u32::from_le_bytes(bytes[24..28].try_into().unwrap_or_default());
        if !sectorsize.is_power_of_two() || !(512..=65536).contains(&sectorsize) {
            return Err(LogError::SectorSize(sectorsize));
        }
        Ok(Super {
            nr_entries: le64(&bytes[16..24]),
            sectorsize,
        })
    }
}

/// An entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    pub data_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        for (i, v) in [self.sector, self.nr_sectors, self.flags, self.data_len]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8; ENTRY_BYTES]) -> Header {
        Header {
            sector: le64(&bytes[0..8]),
            nr_sectors: le64(&bytes[8..16]),
            flags: le64(&bytes[16..24]),
            data_len: le64(&bytes[24..32]),
        }
    }
}

fn le64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}
