//! Walking a chain by its head over any guest memory: never a panic, never more
//! descriptors than the table (or indirect table) holds, and, for a ring virtio-queue can
//! hold, exactly the descriptors virtio-queue's own chain yields.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use daxd_virtio::ChainWalk;

const MEM: usize = 0x1_0000;
/// Where the one-entry available ring for virtio-queue's walk goes (the fuzzer's bytes
/// there are overwritten).
const AVAIL: u64 = 0xff00;

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
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();

    let fields = |d: virtio_queue::desc::split::Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
    let mut walk = ChainWalk::new(mem, GuestAddress(table), size, head);
    let ours: Vec<_> = walk.by_ref().map(fields).collect();
    // One table's worth at most: the ring's, or an indirect table of up to 65535.
    assert!(ours.len() <= usize::from(u16::MAX));
    let mut checked = ChainWalk::new(mem, GuestAddress(table), size, head);
    match checked.check() {
        Ok(n) => assert_eq!(n, ours.len()),
        Err(e) => {
            assert_eq!(walk.broken(), Some(e));
            assert!(checked.next().is_none());
        }
    }

    // virtio-queue holds only aligned tables and sizes that are powers of two.
    if size.is_power_of_two() && size <= 32768 && table % 16 == 0 {
        let mut queue = Queue::new(size).unwrap();
        queue.set_desc_table_address(Some(table as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(0xff80), Some(0));
        queue.set_ready(true);
        let chain = queue.iter(mem).unwrap().next().unwrap();
        let theirs: Vec<_> = chain.map(fields).collect();
        assert_eq!(ours, theirs);
    }
});
