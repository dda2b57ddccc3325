//! Executing parsed requests on the region.
//!
//! The data path works on raw byte ranges of the mapping (sector -> page frame -> bytes):
//! one memmove per contiguous piece of guest memory, no system call, no per-page
//! bookkeeping. The registry is consulted only where bytes are guest-visible: a disk range
//! that a pmem window exposes too (dirty marking, layout-busy checks) or guest buffers
//! that are themselves region pages (pins).

use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use vm_memory::GuestMemoryBackend;

use daxd_region::{FrameRange, RegionError, SECTOR_SHIFT};
use daxd_registry::{LayoutChange, Pin, RegistryError};

use crate::request::{try_for_each_piece, ChainBuffers, DiscardList, Request, Segment};
use crate::{BlkDevice, GuestWindow};

/// Why a well-formed request still failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("guest memory at {0:#x} is no longer mapped")]
    GuestMemory(u64),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("flush failed: {0}")]
    Flush(std::io::Error),
    #[error(transparent)]
    Busy(#[from] RegistryError),
}

impl ExecError {
    pub fn status(&self) -> u8 {
        VIRTIO_BLK_S_IOERR as u8
    }
}

impl BlkDevice {
    /// Executes `request`, whose buffers are in `bufs`, and returns how many bytes it
    /// wrote into the chain's writable data (not counting the status byte).
    pub(crate) fn execute<M: GuestMemoryBackend>(
        &self,
        request: &Request,
        bufs: &ChainBuffers,
        mem: &M,
        guest_windows: &[GuestWindow],
    ) -> Result<u64, ExecError> {
        let region = &*self.region;
        match *request {
            Request::Read { offset, data } => {
                let _pins =
                    self.pin_guest_buffers(&bufs.writable, data.skip, data.len, guest_windows);
                let mut at = self.base + offset;
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
                let _pins =
                    self.pin_guest_buffers(&bufs.readable, data.skip, data.len, guest_windows);
                let start = self.base + offset;
                let mut at = start;
                try_for_each_piece(&bufs.readable, data.skip, data.len, |addr, len| {
                    for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
                        let slice = slice.map_err(|_| ExecError::GuestMemory(addr.0))?;
                        let n = slice.len() as u64;
                        region.write_from(at, slice)?;
                        at += n;
                    }
                    Ok::<(), ExecError>(())
                })?;
                self.registry
                    .mark_dirty(FrameRange::covering(start, data.len));
                if self.config.sync {
                    region.flush_range(start, data.len)?;
                }
                Ok(0)
            }
            Request::Flush => {
                self.flush_region()?;
                Ok(0)
            }
            Request::GetId { len } => {
                let serial = &self.config.serial.as_bytes()[..len as usize];
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
                // Discarded sectors read back as zeroes: simplest for guests and for tests,
                // and it gives the space back to the host.
                self.zero_ranges(&list, "discard", |_| true)?;
                Ok(0)
            }
            Request::WriteZeroes(list) => {
                self.zero_ranges(&list, "write zeroes to", |segment| segment.unmap())?;
                Ok(0)
            }
        }
    }

    /// Makes every write completed so far durable and records the flush epoch.
    pub(crate) fn flush_region(&self) -> Result<(), ExecError> {
        let ticket = self.registry.flush_begin();
        self.region.flush().map_err(ExecError::Flush)?;
        self.registry.flush_complete(ticket);
        Ok(())
    }

    fn zero_ranges(
        &self,
        list: &DiscardList,
        what: &'static str,
        deallocate: impl Fn(&crate::request::DiscardSegment) -> bool,
    ) -> Result<(), ExecError> {
        let region = &*self.region;
        // Every segment's frames are claimed before any is changed, so a request that
        // touches a mapped page changes nothing at all.
        let mut claims: [Option<LayoutChange<'_>>; crate::request::MAX_DISCARD_SEGMENTS] =
            Default::default();
        for (claim, segment) in claims.iter_mut().zip(list.as_slice()) {
            let offset = self.base + (segment.sector << SECTOR_SHIFT);
            let len = u64::from(segment.sectors) << SECTOR_SHIFT;
            *claim = Some(
                self.registry
                    .begin_layout_change(FrameRange::covering(offset, len), what)?,
            );
        }
        for segment in list.as_slice() {
            let offset = self.base + (segment.sector << SECTOR_SHIFT);
            let len = u64::from(segment.sectors) << SECTOR_SHIFT;
            if deallocate(segment) {
                region.punch_hole(offset, len)?;
            } else {
                region.write_zeroes(offset, len)?;
            }
        }
        if self.config.sync {
            // Holes and zero ranges are metadata: only fdatasync makes them durable.
            region.flush().map_err(ExecError::Flush)?;
        }
        Ok(())
    }

    /// Pins the region frames behind guest buffers that lie in a guest-visible window, for
    /// as long as the returned pins live. Nothing to do (and no allocation) without windows.
    pub(crate) fn pin_guest_buffers(
        &self,
        segments: &[Segment],
        skip: u64,
        len: u64,
        guest_windows: &[GuestWindow],
    ) -> Vec<Pin<'_>> {
        let mut pins = Vec::new();
        if guest_windows.is_empty() {
            return pins;
        }
        let _ = try_for_each_piece(segments, skip, len, |addr, piece| {
            for w in guest_windows {
                let start = addr.0.max(w.gpa);
                let end = (addr.0 + piece).min(w.gpa + w.len);
                if start < end {
                    let offset = w.region_offset + (start - w.gpa);
                    pins.push(self.registry.pin(FrameRange::covering(offset, end - start)));
                }
            }
            Ok::<(), std::convert::Infallible>(())
        });
        pins
    }
}
