//! Reading a chain of a split ring's descriptor table by its head, for requests taken from
//! the ring by an earlier backend process and served again after a restart. virtio-queue
//! builds a `DescriptorChain` only from the available ring, so the walk is done here, with
//! its rules: a `next` index inside the table, one indirect table at most (as the chain's
//! only descriptor's target, never nested), and at most as many descriptors as the table
//! holds, so a looping chain ends.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Why a chain cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("head {head} is outside the descriptor table of {size} entries")]
    BadHead { head: u16, size: u16 },
    #[error("descriptor table entry at {0:#x} is outside guest memory")]
    Unreadable(u64),
    #[error("descriptor's next index {next} is outside its table of {size} entries")]
    BadNext { next: u16, size: u32 },
    #[error("indirect table of {0} bytes is not a whole number of descriptors")]
    BadIndirect(u32),
    #[error("nested indirect table")]
    NestedIndirect,
    #[error("the chain loops")]
    Loop,
}

/// The descriptors of the chain at `head` of the descriptor table at `table` (queue of
/// `size` entries), indirect tables followed.
pub fn chain_at<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, RingError> {
    if head >= size {
        return Err(RingError::BadHead { head, size });
    }
    let read = |table: GuestAddress, index: u32| -> Result<Descriptor, RingError> {
        let at = table
            .checked_add(u64::from(index) * 16)
            .ok_or(RingError::Unreadable(table.0))?;
        mem.read_obj::<Descriptor>(at)
            .map_err(|_| RingError::Unreadable(at.0))
    };
    let mut out = Vec::new();
    let (mut table, mut entries, mut index) = (table, u32::from(size), u32::from(head));
    let mut indirect = false;
    loop {
        if out.len() > entries as usize {
            return Err(RingError::Loop);
        }
        let desc = read(table, index)?;
        if desc.refers_to_indirect_table() {
            if indirect {
                return Err(RingError::NestedIndirect);
            }
            if desc.len() == 0 || desc.len() % 16 != 0 || desc.len() / 16 > u32::from(u16::MAX) {
                return Err(RingError::BadIndirect(desc.len()));
            }
            (table, entries, index, indirect) = (desc.addr(), desc.len() / 16, 0, true);
            out.clear();
            continue;
        }
        out.push(desc);
        if !desc.has_next() {
            return Ok(out);
        }
        index = u32::from(desc.next());
        if index >= entries {
            return Err(RingError::BadNext {
                next: desc.next(),
                size: entries,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vm_memory::GuestMemoryMmap;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put(mem: &GuestMemoryMmap, table: u64, index: u64, desc: Descriptor) {
        mem.write_obj(desc, GuestAddress(table + index * 16))
            .unwrap();
    }

    #[test]
    fn chains_direct_and_indirect() {
        let m = mem();
        put(&m, 0, 2, Descriptor::new(0x1000, 16, NEXT, 5));
        put(&m, 0, 5, Descriptor::new(0x2000, 512, NEXT, 1));
        put(&m, 0, 1, Descriptor::new(0x3000, 1, WRITE, 0));
        let chain = chain_at(&m, GuestAddress(0), 8, 2).unwrap();
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x1000, 0x2000, 0x3000]);
        assert!(chain[2].is_write_only());

        put(&m, 0, 3, Descriptor::new(0x8000, 32, INDIRECT, 0));
        put(&m, 0x8000, 0, Descriptor::new(0x4000, 16, NEXT, 1));
        put(&m, 0x8000, 1, Descriptor::new(0x5000, 1, WRITE, 0));
        let chain = chain_at(&m, GuestAddress(0), 8, 3).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].addr().0, 0x5000);
    }

    #[test]
    fn hostile_chains_end() {
        let m = mem();
        assert_eq!(
            chain_at(&m, GuestAddress(0), 8, 8).err(),
            Some(RingError::BadHead { head: 8, size: 8 })
        );
        put(&m, 0, 0, Descriptor::new(0x1000, 16, NEXT, 1));
        put(&m, 0, 1, Descriptor::new(0x1000, 16, NEXT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0), 8, 0).err(),
            Some(RingError::Loop)
        );
        put(&m, 0, 2, Descriptor::new(0x1000, 16, NEXT, 9));
        assert!(matches!(
            chain_at(&m, GuestAddress(0), 8, 2),
            Err(RingError::BadNext { next: 9, .. })
        ));
        put(&m, 0, 3, Descriptor::new(0x8000, 17, INDIRECT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0), 8, 3).err(),
            Some(RingError::BadIndirect(17))
        );
        put(&m, 0, 4, Descriptor::new(0x8000, 16, INDIRECT, 0));
        put(&m, 0x8000, 0, Descriptor::new(0x8000, 16, INDIRECT, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0), 8, 4).err(),
            Some(RingError::NestedIndirect)
        );
        assert!(matches!(
            chain_at(&m, GuestAddress(0xfff0), 8, 1),
            Err(RingError::Unreadable(_))
        ));
    }
}
