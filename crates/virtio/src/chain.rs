//! A descriptor chain as two byte streams, as the virtio spec asks devices to read it (no
//! assumption about framing): the device-readable descriptors, then the device-writable
//! ones. Every descriptor is checked against guest memory when the chain is loaded, so a
//! device never meets an address it cannot reach.

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::MS;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryError, VolatileSlice};

/// One guest buffer: a descriptor's address and length, checked against guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Why a chain is malformed as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor at {addr:#x} of {len} bytes is outside guest memory")]
    BadDescriptor { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    Misordered,
}

/// The descriptors of one chain, split by direction. Kept across requests by each queue
/// worker so that loading a chain allocates nothing once the vectors have grown.
#[derive(Debug, Default)]
pub struct Chain {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl Chain {
    pub fn new() -> Chain {
        Chain::default()
    }

    /// Reads `descriptors` (indirect tables already followed, as virtio-queue's
    /// `DescriptorChain` does). Every descriptor is kept, so that a device can still find
    /// where its status goes; the first fault is returned.
    pub fn load<M: GuestMemoryBackend>(
        &mut self,
        descriptors: impl IntoIterator<Item = Descriptor>,
        mem: &M,
    ) -> Result<(), ChainError> {
        self.readable.clear();
        self.writable.clear();
        let mut fault = None;
        for desc in descriptors {
            if desc.len() == 0 {
                continue;
            }
            let segment = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !GuestMemoryBackend::check_range(mem, segment.addr, segment.len as usize) {
                fault.get_or_insert(ChainError::BadDescriptor {
                    addr: segment.addr.0,
                    len: segment.len,
                });
            }
            if desc.is_write_only() {
                self.writable.push(segment);
            } else {
                if !self.writable.is_empty() {
                    fault.get_or_insert(ChainError::Misordered);
                }
                self.readable.push(segment);
            }
        }
        fault.map_or(Ok(()), Err)
    }

    /// The device-readable stream.
    pub fn readable(&self) -> Stream<'_> {
        Stream {
            segments: &self.readable,
        }
    }

    /// The device-writable stream.
    pub fn writable(&self) -> Stream<'_> {
        Stream {
            segments: &self.writable,
        }
    }

    /// The last byte of the writable stream, if there is one and it is in guest memory:
    /// where virtio-blk puts its status.
    pub fn last_writable_byte<M: GuestMemoryBackend>(&self, mem: &M) -> Option<GuestAddress> {
        let last = self.writable.last()?;
        let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
        GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
    }
}

/// One direction of a chain: its segments read as one run of bytes.
#[derive(Debug, Clone, Copy)]
pub struct Stream<'a> {
    segments: &'a [Segment],
}

impl<'a> Stream<'a> {
    /// Bytes in the stream.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The guest buffers (address, length) holding `len` bytes of the stream after
    /// `skip`; fewer if the stream is shorter.
    pub fn pieces(&self, skip: u64, len: u64) -> impl Iterator<Item = (GuestAddress, u64)> + 'a {
        let (mut skip, mut len) = (skip, len);
        self.segments.iter().filter_map(move |segment| {
            let seg_len = u64::from(segment.len);
            if len == 0 {
                return None;
            }
            if skip >= seg_len {
                skip -= seg_len;
                return None;
            }
            let take = (seg_len - skip).min(len);
            // Segments were checked against guest memory when loaded: no overflow.
            let piece = (segment.addr.unchecked_add(skip), take);
            len -= take;
            skip = 0;
            Some(piece)
        })
    }

    /// Calls `f` with each slice of guest memory holding `len` bytes of the stream after
    /// `skip`, in stream order: the one way daxd's devices copy to or from guest buffers.
    /// A slice that is no longer in guest memory (the memory table changed under a
    /// request) ends the walk with an error.
    pub fn try_for_each_slice<'m, M, E>(
        &self,
        mem: &'m M,
        skip: u64,
        len: u64,
        mut f: impl FnMut(VolatileSlice<'m, MS<'m, M>>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        M: GuestMemoryBackend,
        E: From<GuestMemoryError>,
    {
        for (addr, piece) in self.pieces(skip, len) {
            for slice in GuestMemoryBackend::get_slices(mem, addr, piece as usize) {
                f(slice?)?;
            }
        }
        Ok(())
    }

    /// Fills `out` from the stream, starting `skip` bytes in; the stream must hold them.
    pub fn read_at<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        skip: u64,
        out: &mut [u8],
    ) -> Result<(), GuestMemoryError> {
        let mut filled = 0;
        self.try_for_each_slice(mem, skip, out.len() as u64, |slice| {
            filled += slice.copy_to(&mut out[filled..]);
            Ok::<(), GuestMemoryError>(())
        })?;
        if filled < out.len() {
            return Err(GuestMemoryError::PartialBuffer {
                expected: out.len(),
                completed: filled,
            });
        }
        Ok(())
    }
}
