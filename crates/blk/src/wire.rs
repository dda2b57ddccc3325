//! virtio-blk structures as the guest sees them (virtio 1.2, 5.2): little endian,
//! `#[repr(C)]`, read and written whole with `read_obj`/`write_obj` or as byte slices.

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// `struct virtio_blk_req`'s header (`struct virtio_blk_outhdr` in Linux).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    pub request_type: Le32,
    pub reserved: Le32,
    pub sector: Le64,
}

// SAFETY: plain little-endian integers with no padding; any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

/// `struct virtio_blk_discard_write_zeroes`: one range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DiscardWriteZeroes {
    pub sector: Le64,
    pub num_sectors: Le32,
    pub flags: Le32,
}

// SAFETY: plain little-endian integers with no padding; any bit pattern is valid.
unsafe impl ByteValued for DiscardWriteZeroes {}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: the part
/// daxd defines. Packed because the spec's layout puts a 64-bit field first and the
/// struct ends at byte 60, not at a multiple of 8.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C, packed)]
pub struct VirtioBlkConfig {
    pub capacity: Le64,
    pub size_max: Le32,
    pub seg_max: Le32,
    pub geometry_cylinders: Le16,
    pub geometry_heads: u8,
    pub geometry_sectors: u8,
    pub blk_size: Le32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: Le16,
    pub opt_io_size: Le32,
    pub writeback: u8,
    pub unused0: u8,
    pub num_queues: Le16,
    pub max_discard_sectors: Le32,
    pub max_discard_seg: Le32,
    pub discard_sector_alignment: Le32,
    pub max_write_zeroes_sectors: Le32,
    pub max_write_zeroes_seg: Le32,
    pub write_zeroes_may_unmap: u8,
    pub unused1: [u8; 3],
}

// SAFETY: packed little-endian integers and bytes, no padding; any bit pattern is valid.
unsafe impl ByteValued for VirtioBlkConfig {}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == 16);
const _: () = assert!(std::mem::size_of::<DiscardWriteZeroes>() == 16);
const _: () = assert!(std::mem::size_of::<VirtioBlkConfig>() == 60);
