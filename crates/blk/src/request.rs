//! Parsing virtio-blk requests out of descriptor chains.
//!
//! A chain is read as two byte streams, as the virtio spec asks of devices (no assumption
//! about framing): the device-readable descriptors, which start with the 16-byte request
//! header, and the device-writable descriptors, whose last byte is the status. Every
//! descriptor is checked against guest memory here, so execution never meets an address
//! it cannot reach.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use daxd_region::{SECTOR_SHIFT, SECTOR_SIZE};

use crate::DeviceLimits;

/// Size of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const DISCARD_SEGMENT_LEN: u64 = 16;
/// Most discard or write-zeroes segments accepted in one request (config `max_discard_seg`).
pub const MAX_DISCARD_SEGMENTS: usize = 16;

/// One guest buffer: a descriptor's address and length, already checked against guest
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The descriptors of one chain, split by direction. Kept across requests by each queue
/// worker so that parsing allocates nothing once the vectors have grown.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub(crate) readable: Vec<Segment>,
    pub(crate) writable: Vec<Segment>,
}

impl ChainBuffers {
    pub fn new() -> Self {
        Self::default()
    }
}

/// A byte range of one of the chain's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataRange {
    /// Bytes of the stream to skip first.
    pub skip: u64,
    pub len: u64,
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardSegment {
    pub sector: u64,
    pub sectors: u32,
    pub flags: u32,
}

impl DiscardSegment {
    pub fn unmap(&self) -> bool {
        self.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
    }
}

/// The ranges of a discard or write-zeroes request, validated against capacity.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DiscardList {
    segments: [DiscardSegment; MAX_DISCARD_SEGMENTS],
    count: usize,
}

impl DiscardList {
    pub fn as_slice(&self) -> &[DiscardSegment] {
        &self.segments[..self.count]
    }
}

impl std::fmt::Debug for DiscardList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A request that passed every check; execution cannot be refused for its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Read `data.len` bytes at byte `offset` of the disk into the writable stream.
    Read {
        offset: u64,
        data: DataRange,
    },
    /// Write the readable stream's `data` to byte `offset` of the disk.
    Write {
        offset: u64,
        data: DataRange,
    },
    Flush,
    /// Write the serial into the first `len` bytes of the writable stream.
    GetId {
        len: u64,
    },
    Discard(DiscardList),
    WriteZeroes(DiscardList),
}

/// Why a request is refused; each maps to the status the spec prescribes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor at {addr:#x} of {len} bytes is outside guest memory")]
    BadDescriptor { addr: u64, len: u32 },
    #[error("device-readable descriptor after a device-writable one")]
    Misordered,
    #[error("header is {0} bytes, 16 needed")]
    ShortHeader(u64),
    #[error("unknown request type {0}")]
    UnknownType(u32),
    #[error("request type {0} was not negotiated")]
    NotNegotiated(u32),
    #[error("{what} data of {len} bytes is not a multiple of 512")]
    UnalignedLength { what: &'static str, len: u64 },
    #[error("{0} request carries data buffers in the wrong direction")]
    WrongDirection(&'static str),
    #[error("sectors {sector}+{bytes} bytes exceed the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        capacity: u64,
    },
    #[error("write to a read-only device")]
    ReadOnly,
    #[error("GET_ID without a buffer for the serial")]
    NoIdBuffer,
    #[error("discard/write-zeroes payload of {0} bytes is not a positive multiple of 16")]
    BadDiscardPayload(u64),
    #[error("{0} discard/write-zeroes segments, at most {MAX_DISCARD_SEGMENTS} supported")]
    TooManySegments(u64),
    #[error("discard/write-zeroes flags {0:#x} not supported for this request type")]
    BadDiscardFlags(u32),
    #[error("discard/write-zeroes segment of {sectors} sectors exceeds the limit of {max}")]
    SegmentTooLarge { sectors: u32, max: u32 },
}

impl RequestError {
    /// The virtio status to report: UNSUPP for what the device does not implement or was
    /// not negotiated, IOERR for everything malformed.
    pub fn status(&self) -> u8 {
        let status = match self {
            RequestError::UnknownType(_)
            | RequestError::NotNegotiated(_)
            | RequestError::TooManySegments(_)
            | RequestError::BadDiscardFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }
}

/// A chain after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    /// Where the status byte goes; `None` when the chain has no writable byte, in which
    /// case the request can only be dropped (returned with no bytes written).
    pub status: Option<GuestAddress>,
    pub request: Result<Request, RequestError>,
}

/// Parses one descriptor chain. `descriptors` yields the chain in order (indirect tables
/// already followed, as virtio-queue's `DescriptorChain` does).
pub fn parse<M: GuestMemoryBackend>(
    descriptors: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    limits: &DeviceLimits,
    bufs: &mut ChainBuffers,
) -> ParsedChain {
    bufs.readable.clear();
    bufs.writable.clear();
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
            fault.get_or_insert(RequestError::BadDescriptor {
                addr: segment.addr.0,
                len: segment.len,
            });
        }
        if desc.is_write_only() {
            bufs.writable.push(segment);
        } else {
            if !bufs.writable.is_empty() {
                fault.get_or_insert(RequestError::Misordered);
            }
            bufs.readable.push(segment);
        }
    }

    let Some(status) = status_address(&bufs.writable, mem) else {
        return ParsedChain {
            status: None,
            request: Err(fault.unwrap_or(RequestError::BadDescriptor { addr: 0, len: 0 })),
        };
    };
    let request = match fault {
        Some(fault) => Err(fault),
        None => parse_request(mem, limits, bufs),
    };
    ParsedChain {
        status: Some(status),
        request,
    }
}

/// The last writable byte of the chain, if the chain has one and it is in guest memory.
fn status_address<M: GuestMemoryBackend>(writable: &[Segment], mem: &M) -> Option<GuestAddress> {
    let last = writable.last()?;
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    GuestMemoryBackend::check_range(mem, addr, 1).then_some(addr)
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

fn parse_request<M: GuestMemoryBackend>(
    mem: &M,
    limits: &DeviceLimits,
    bufs: &ChainBuffers,
) -> Result<Request, RequestError> {
    let readable_len = total_len(&bufs.readable);
    // The writable stream always ends with the status byte.
    let writable_data = total_len(&bufs.writable) - 1;
    if readable_len < HEADER_LEN {
        return Err(RequestError::ShortHeader(readable_len));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, &bufs.readable, 0, &mut header);
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let readable_data = readable_len - HEADER_LEN;

    match kind {
        VIRTIO_BLK_T_IN => {
            if readable_data != 0 {
                return Err(RequestError::WrongDirection("read"));
            }
            let offset = check_sectors(limits, sector, "read", writable_data)?;
            Ok(Request::Read {
                offset,
                data: DataRange {
                    skip: 0,
                    len: writable_data,
                },
            })
        }
        VIRTIO_BLK_T_OUT => {
            if writable_data != 0 {
                return Err(RequestError::WrongDirection("write"));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let offset = check_sectors(limits, sector, "write", readable_data)?;
            Ok(Request::Write {
                offset,
                data: DataRange {
                    skip: HEADER_LEN,
                    len: readable_data,
                },
            })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if writable_data == 0 {
                return Err(RequestError::NoIdBuffer);
            }
            Ok(Request::GetId {
                len: writable_data.min(crate::SERIAL_LEN as u64),
            })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            let negotiated = if discard {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !negotiated {
                return Err(RequestError::NotNegotiated(kind));
            }
            if writable_data != 0 {
                return Err(RequestError::WrongDirection(if discard {
                    "discard"
                } else {
                    "write-zeroes"
                }));
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let list = parse_discard_list(mem, limits, bufs, readable_data, discard)?;
            Ok(if discard {
                Request::Discard(list)
            } else {
                Request::WriteZeroes(list)
            })
        }
        other => Err(RequestError::UnknownType(other)),
    }
}

fn parse_discard_list<M: GuestMemoryBackend>(
    mem: &M,
    limits: &DeviceLimits,
    bufs: &ChainBuffers,
    payload: u64,
    discard: bool,
) -> Result<DiscardList, RequestError> {
    if payload == 0 || payload % DISCARD_SEGMENT_LEN != 0 {
        return Err(RequestError::BadDiscardPayload(payload));
    }
    let count = payload / DISCARD_SEGMENT_LEN;
    if count > MAX_DISCARD_SEGMENTS as u64 {
        return Err(RequestError::TooManySegments(count));
    }
    let allowed_flags = if discard {
        0
    } else {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    };
    let mut list = DiscardList {
        segments: [DiscardSegment::default(); MAX_DISCARD_SEGMENTS],
        count: count as usize,
    };
    for (i, slot) in list.segments[..list.count].iter_mut().enumerate() {
        let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
        gather(
            mem,
            &bufs.readable,
            HEADER_LEN + i as u64 * DISCARD_SEGMENT_LEN,
            &mut raw,
        );
        let segment = DiscardSegment {
            sector: u64::from_le_bytes(raw[0..8].try_into().unwrap()),
            sectors: u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(raw[12..16].try_into().unwrap()),
        };
        if segment.flags & !allowed_flags != 0 {
            return Err(RequestError::BadDiscardFlags(segment.flags));
        }
        let max = if discard {
            limits.max_discard_sectors
        } else {
            limits.max_write_zeroes_sectors
        };
        if segment.sectors > max {
            return Err(RequestError::SegmentTooLarge {
                sectors: segment.sectors,
                max,
            });
        }
        check_sectors(
            limits,
            segment.sector,
            "discard",
            u64::from(segment.sectors) << SECTOR_SHIFT,
        )?;
        *slot = segment;
    }
    Ok(list)
}

/// Checks `bytes` at `sector` against the capacity and returns the byte offset.
fn check_sectors(
    limits: &DeviceLimits,
    sector: u64,
    what: &'static str,
    bytes: u64,
) -> Result<u64, RequestError> {
    if bytes % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength { what, len: bytes });
    }
    let out_of_range = || RequestError::OutOfRange {
        sector,
        bytes,
        capacity: limits.capacity_sectors,
    };
    let end = sector
        .checked_add(bytes >> SECTOR_SHIFT)
        .ok_or_else(out_of_range)?;
    if end > limits.capacity_sectors {
        return Err(out_of_range());
    }
    Ok(sector << SECTOR_SHIFT)
}

/// Copies `out.len()` bytes starting `skip` bytes into the stream formed by `segments`.
/// The caller has checked the stream is long enough and every segment is in guest memory.
fn gather<M: GuestMemoryBackend>(mem: &M, segments: &[Segment], skip: u64, out: &mut [u8]) {
    let mut filled = 0;
    let _ = try_for_each_piece(segments, skip, out.len() as u64, |addr, len| {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize).flatten() {
            filled += slice.copy_to(&mut out[filled..]);
        }
        Ok::<(), std::convert::Infallible>(())
    });
}

/// Calls `f(addr, len)` for each piece of guest memory making up `len` bytes of the stream
/// after skipping `skip` bytes, stopping at the first error. Stops early if the stream is
/// shorter.
pub(crate) fn try_for_each_piece<E>(
    segments: &[Segment],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(GuestAddress, u64) -> Result<(), E>,
) -> Result<(), E> {
    for segment in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let take = (seg_len - skip).min(len);
        // Segments were checked against guest memory, so this cannot overflow.
        f(segment.addr.unchecked_add(skip), take)?;
        len -= take;
        skip = 0;
    }
    Ok(())
}
