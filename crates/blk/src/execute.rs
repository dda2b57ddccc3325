//! Executing parsed requests on the region.
//!
//! The data path works on raw byte ranges of the mapping (sector -> page frame -> bytes):
//! one memmove per contiguous piece of guest memory, no system call, no per-page
//! bookkeeping.

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use vm_memory::GuestMemoryBackend;

use daxd_region::{Region, RegionError, SECTOR_SHIFT};

use crate::request::{try_for_each_piece, ChainBuffers, DiscardList, Request};
use crate::BlkConfig;

/// Why a well-formed request still failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("guest memory at {0:#x} is no longer mapped")]
    GuestMemory(u64),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("flush failed: {0}")]
    Flush(std::io::Error),
}

impl ExecError {
    pub fn status(&self) -> u8 {
        VIRTIO_BLK_S_IOERR as u8
    }
}

/// Executes `request`, whose buffers are in `bufs`, and returns how many bytes it wrote
/// into the chain's writable data (not counting the status byte).
pub fn execute<M: GuestMemoryBackend>(
    region: &Region,
    config: &BlkConfig,
    request: &Request,
    bufs: &ChainBuffers,
    mem: &M,
) -> Result<u64, ExecError> {
    match *request {
        Request::Read { offset, data } => {
            let mut at = offset;
            try_for_each_piece(&bufs.writable, data.skip, data.len, |addr, len| {
                for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
                    let slice = slice.map_err(|_| ExecError::GuestMemory(addr.0))?;
                    let n = slice.len() as u64;
                    region.read_into(at, slice)?;
                    at += n;
                }
                Ok::<(), ExecError>(())
            })?;
            Ok(data.len)
        }
        Request::Write { offset, data } => {
            let mut at = offset;
            try_for_each_piece(&bufs.readable, data.skip, data.len, |addr, len| {
                for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
                    let slice = slice.map_err(|_| ExecError::GuestMemory(addr.0))?;
                    let n = slice.len() as u64;
                    region.write_from(at, slice)?;
                    at += n;
                }
                Ok::<(), ExecError>(())
            })?;
            if config.sync {
                region.flush_range(offset, data.len)?;
            }
            Ok(0)
        }
        Request::Flush => {
            region.flush().map_err(ExecError::Flush)?;
            Ok(0)
        }
        Request::GetId { len } => {
            let serial = &config.serial.as_bytes()[..len as usize];
            let mut copied = 0usize;
            try_for_each_piece(&bufs.writable, 0, len, |addr, piece| {
                for slice in GuestMemoryBackend::get_slices(mem, addr, piece as usize) {
                    let slice = slice.map_err(|_| ExecError::GuestMemory(addr.0))?;
                    slice.copy_from(&serial[copied..copied + slice.len()]);
                    copied += slice.len();
                }
                Ok::<(), ExecError>(())
            })?;
            Ok(len)
        }
        Request::Discard(list) => {
            // Discarded sectors read back as zeroes: simplest for guests and for tests, and
            // it gives the space back to the host.
            zero_ranges(region, config, &list, |_| true)?;
            Ok(0)
        }
        Request::WriteZeroes(list) => {
            zero_ranges(region, config, &list, |segment| segment.unmap())?;
            Ok(0)
        }
    }
}

fn zero_ranges(
    region: &Region,
    config: &BlkConfig,
    list: &DiscardList,
    deallocate: impl Fn(&crate::request::DiscardSegment) -> bool,
) -> Result<(), ExecError> {
    for segment in list.as_slice() {
        let offset = segment.sector << SECTOR_SHIFT;
        let len = u64::from(segment.sectors) << SECTOR_SHIFT;
        if deallocate(segment) {
            region.punch_hole(offset, len)?;
        } else {
            region.write_zeroes(offset, len)?;
        }
    }
    if config.sync {
        // Holes and zero ranges are metadata: only fdatasync makes them durable.
        region.flush().map_err(ExecError::Flush)?;
    }
    Ok(())
}
