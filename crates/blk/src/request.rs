//! Parsing virtio-blk requests out of descriptor chains.
//!
//! A chain is read as two byte streams ([`daxd_virtio::Chain`]): the device-readable
//! stream starts with the 16-byte request header, and the last byte of the device-writable
//! stream is the status. Parsing checks everything about a request's shape, so execution
//! is refused only for what happens to the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use daxd_region::{SECTOR_SHIFT, SECTOR_SIZE};
use daxd_registry::PinSet;
use daxd_virtio::{Chain, ChainError};

use crate::wire::{DiscardWriteZeroes, RequestHeader};
use crate::DeviceLimits;

/// Size of the request header.
pub const HEADER_LEN: u64 = std::mem::size_of::<RequestHeader>() as u64;
/// Size of one discard or write-zeroes range.
pub const DISCARD_SEGMENT_LEN: u64 = std::mem::size_of::<DiscardWriteZeroes>() as u64;
/// Most discard or write-zeroes segments accepted in one request (config `max_discard_seg`
/// and `max_write_zeroes_seg`). One, as QEMU's virtio-blk, its vhost-user-blk export and
/// cloud-hypervisor advertise: the same config space whichever of them serves a disk, and
/// QEMU's own vhost-user-blk qtest expects a request with two segments to be refused.
pub const MAX_DISCARD_SEGMENTS: usize = 1;

/// A queue worker's scratch space, reused for every request so that serving one
/// allocates nothing once the vectors have grown: the chain being served and the pins of
/// its guest buffers.
#[derive(Debug, Default)]
pub struct ChainBuffers {
    pub(crate) chain: Chain,
    pub(crate) pins: PinSet,
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
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("no status byte")]
    NoStatus,
    #[error("guest memory changed while the request was read")]
    GuestMemory,
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

/// Loads one descriptor chain into `chain` and parses the request it carries.
/// `descriptors` yields the chain in order (indirect tables already followed, as
/// virtio-queue's `DescriptorChain` does).
pub fn parse<M: GuestMemoryBackend>(
    descriptors: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    limits: &DeviceLimits,
    chain: &mut Chain,
) -> ParsedChain {
    let loaded = chain.load(descriptors, mem);
    let Some(status) = chain.last_writable_byte(mem) else {
        return ParsedChain {
            status: None,
            request: Err(loaded
                .err()
                .map_or(RequestError::NoStatus, RequestError::from)),
        };
    };
    let request = match loaded {
        Err(fault) => Err(fault.into()),
        Ok(()) => parse_request(mem, limits, chain),
    };
    ParsedChain {
        status: Some(status),
        request,
    }
}

fn parse_request<M: GuestMemoryBackend>(
    mem: &M,
    limits: &DeviceLimits,
    chain: &Chain,
) -> Result<Request, RequestError> {
    let readable_len = chain.readable().len();
    // The writable stream always ends with the status byte.
    let writable_data = chain.writable().len() - 1;
    if readable_len < HEADER_LEN {
        return Err(RequestError::ShortHeader(readable_len));
    }
    let mut header = RequestHeader::default();
    chain
        .readable()
        .read_at(mem, 0, header.as_mut_slice())
        .map_err(|_| RequestError::GuestMemory)?;
    let kind = header.request_type.to_native();
    let sector = header.sector.to_native();
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
            let list = parse_discard_list(mem, limits, chain, readable_data, discard)?;
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
    chain: &Chain,
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
        let mut raw = DiscardWriteZeroes::default();
        chain
            .readable()
            .read_at(
                mem,
                HEADER_LEN + i as u64 * DISCARD_SEGMENT_LEN,
                raw.as_mut_slice(),
            )
            .map_err(|_| RequestError::GuestMemory)?;
        let segment = DiscardSegment {
            sector: raw.sector.to_native(),
            sectors: raw.num_sectors.to_native(),
            flags: raw.flags.to_native(),
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
