//! Executing parsed requests on the region.
//!
//! The data path works on raw byte ranges of the mapping (sector -> page frame -> bytes):
//! one memmove per contiguous piece of guest memory, no system call, no per-page
//! bookkeeping. The registry is consulted only where bytes are guest-visible: a disk range
//! that a pmem window exposes too (dirty marking, layout-busy checks) or guest buffers
//! that are themselves region pages (pins); neither takes a lock or allocates.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use vm_memory::{GuestMemoryBackend, GuestMemoryError};

use daxd_region::{RegionError, SECTOR_SHIFT};
use daxd_registry::{FrameRange, LayoutChange, Pins, RegistryError};
use daxd_virtio::Stream;

use crate::request::{ChainBuffers, DiscardList, DiscardSegment, Request, MAX_DISCARD_SEGMENTS};
use crate::stats::QueueStats;
use crate::{BlkDevice, GuestWindow};

/// Why a well-formed request still failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("guest memory changed under the request")]
    GuestMemory(#[from] GuestMemoryError),
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Busy(#[from] RegistryError),
    #[error("a fault rule failed it")]
    Fault(daxd_fault::Status),
}

impl ExecError {
    pub fn status(&self) -> u8 {
        match self {
            ExecError::Fault(daxd_fault::Status::Unsupp) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What executing a request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Executed {
    /// Done; bytes written into the chain's writable data (not counting the status).
    Done(u64),
    /// A FLUSH, left for the caller to complete off the queue.
    Flush,
    /// A write, discard or write-zeroes that a fault rule dropped: nothing was stored.
    Dropped,
}

impl BlkDevice {
    /// Executes `request`, whose chain is in `bufs`.
    // Inlined into both callers: out of line, the call costs about 55 instructions a
    // request (callgrind, the hot-path bench), 1 % of the whole request path.
    #[inline(always)]
    pub(crate) fn execute<M: GuestMemoryBackend>(
        &self,
        request: &Request,
        bufs: &mut ChainBuffers,
        mem: &M,
        guest_windows: &[GuestWindow],
    ) -> Result<Executed, ExecError> {
        let region = &*self.region;
        let ChainBuffers { chain, pins } = bufs;
        match *request {
            Request::Read { offset, data } => {
                let writable = chain.writable();
                let _pins =
                    self.pin_guest_buffers(pins, writable, data.skip, data.len, guest_windows);
                let mut at = self.base + offset;
                writable.try_for_each_slice(mem, data.skip, data.len, |slice| {
                    let n = slice.len() as u64;
                    region.read_into(at, slice)?;
                    at += n;
                    Ok::<(), ExecError>(())
                })?;
                Ok(Executed::Done(data.len))
            }
            Request::Write { offset, data } => {
                let readable = chain.readable();
                let _pins =
                    self.pin_guest_buffers(pins, readable, data.skip, data.len, guest_windows);
                let start = self.base + offset;
                let mut at = start;
                readable.try_for_each_slice(mem, data.skip, data.len, |slice| {
                    let n = slice.len() as u64;
                    region.write_from(at, slice)?;
                    at += n;
                    Ok::<(), ExecError>(())
                })?;
                self.registry
                    .mark_dirty(FrameRange::covering(start, data.len));
                if self.config.sync {
                    // Each write is its own flush: it picks the write path as a FLUSH does.
                    region.flush_after_writes(data.len)?;
                }
                Ok(Executed::Done(0))
            }
            Request::Flush => Ok(Executed::Flush),
            Request::GetId { len } => {
                let serial = &self.config.serial.as_bytes()[..len as usize];
                let mut copied = 0;
                chain.writable().try_for_each_slice(mem, 0, len, |slice| {
                    slice.copy_from(&serial[copied..copied + slice.len()]);
                    copied += slice.len();
                    Ok::<(), ExecError>(())
                })?;
                Ok(Executed::Done(len))
            }
            Request::Discard(list) => {
                // Discarded sectors read back as zeroes: simplest for guests and for tests,
                // and it gives the space back to the host.
                self.zero_ranges(&list, "discard", |_| true)?;
                Ok(Executed::Done(0))
            }
            Request::WriteZeroes(list) => {
                self.zero_ranges(&list, "write zeroes to", DiscardSegment::unmap)?;
                Ok(Executed::Done(0))
            }
        }
    }

    /// Applies a corrupt rule to an executed read or write: XORs disk byte `at` (which the
    /// request covers) with `mask`, in the guest's buffer for a read, in the region for a
    /// write.
    pub(crate) fn corrupt<M: GuestMemoryBackend>(
        &self,
        request: &Request,
        bufs: &mut ChainBuffers,
        mem: &M,
        at: u64,
        mask: u8,
    ) -> Result<(), ExecError> {
        match *request {
            Request::Read { offset, data } if (offset..offset + data.len).contains(&at) => bufs
                .chain
                .writable()
                .try_for_each_slice(mem, data.skip + (at - offset), 1, |slice| {
                    let mut byte = [0u8];
                    slice.copy_to(&mut byte[..]);
                    byte[0] ^= mask;
                    slice.copy_from(&byte[..]);
                    Ok::<(), ExecError>(())
                }),
            Request::Write { offset, data } if (offset..offset + data.len).contains(&at) => {
                let mut byte = [0u8];
                self.region.read_bytes(self.base + at, &mut byte)?;
                byte[0] ^= mask;
                self.region.write_bytes(self.base + at, &byte)?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Makes every write completed so far durable and records the flush epoch.
    pub(crate) fn flush_region(&self) -> Result<(), ExecError> {
        let written: u64 = self.stats.iter().map(QueueStats::bytes_written).sum();
        let since = written.saturating_sub(self.written_at_flush.swap(written, Ordering::Relaxed));
        // Under --sync every write flushed itself and looked at what it left dirty.
        let since = if self.config.sync { 0 } else { since };
        Ok(self
            .registry
            .flushing(|| self.region.flush_after_writes(since))?)
    }

    fn zero_ranges(
        &self,
        list: &DiscardList,
        what: &'static str,
        deallocate: impl Fn(&DiscardSegment) -> bool,
    ) -> Result<(), ExecError> {
        let region = &*self.region;
        // Every segment's frames are claimed before any is changed, so a request that
        // touches a mapped page changes nothing at all.
        let mut claims: [Option<LayoutChange<'_>>; MAX_DISCARD_SEGMENTS] = Default::default();
        for (claim, segment) in claims.iter_mut().zip(list.as_slice()) {
            let (offset, len) = self.segment_bytes(segment);
            *claim = Some(
                self.registry
                    .begin_layout_change(FrameRange::covering(offset, len), what)?,
            );
        }
        for segment in list.as_slice() {
            let (offset, len) = self.segment_bytes(segment);
            if deallocate(segment) {
                region.punch_hole(offset, len)?;
            } else {
                region.write_zeroes(offset, len)?;
            }
        }
        if self.config.sync {
            // Holes and zero ranges are metadata: only fdatasync makes them durable.
            region.flush()?;
        }
        Ok(())
    }

    /// The region bytes of a discard or write-zeroes segment.
    fn segment_bytes(&self, segment: &DiscardSegment) -> (u64, u64) {
        (
            self.base + (segment.sector << SECTOR_SHIFT),
            u64::from(segment.sectors) << SECTOR_SHIFT,
        )
    }

    /// Pins the region frames behind guest buffers that lie in a guest-visible window, for
    /// as long as the returned guard lives. Without windows it pins and costs nothing.
    pub(crate) fn pin_guest_buffers<'a>(
        &'a self,
        set: &'a mut daxd_registry::PinSet,
        stream: Stream<'_>,
        skip: u64,
        len: u64,
        guest_windows: &[GuestWindow],
    ) -> Pins<'a, &'a mut daxd_registry::PinSet> {
        let mut pins = self.registry.pins(set);
        if guest_windows.is_empty() {
            return pins;
        }
        for (addr, piece) in stream.pieces(skip, len) {
            for w in guest_windows {
                let start = addr.0.max(w.gpa);
                let end = (addr.0 + piece).min(w.gpa + w.len);
                if start < end {
                    let offset = w.region_offset + (start - w.gpa);
                    pins.pin(FrameRange::covering(offset, end - start));
                }
            }
        }
        pins
    }
}
