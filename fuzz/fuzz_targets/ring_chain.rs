//! Re-reading a chain by its head (requests resubmitted after a restart) over any guest
//! memory: never a panic, never more descriptors than the table (or indirect table) holds.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use daxd_virtio::chain_at;

const MEM: usize = 0x1_0000;

fn mem() -> &'static GuestMemoryMmap {
    static MEM_: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM_.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap())
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let size = u16::from_le_bytes([data[0], data[1]]);
    let head = u16::from_le_bytes([data[2], data[3]]);
    let table = u64::from(u16::from_le_bytes([data[4], data[5]]));
    let mem = mem();
    let bytes = &data[6..];
    let len = bytes.len().min(MEM);
    mem.write_slice(&bytes[..len], GuestAddress(0)).unwrap();
    if let Ok(chain) = chain_at(mem, GuestAddress(table), size, head) {
        assert!(!chain.is_empty());
        // One table's worth at most: the ring's, or an indirect table of up to 65535.
        assert!(chain.len() <= usize::from(u16::MAX));
        assert!(chain.iter().all(|d| !d.refers_to_indirect_table()));
    }
});
