//! Walking a chain of a split ring's descriptor table from its head, one descriptor at a
//! time, for every request: the ones taken from the available ring and the ones an
//! earlier backend process took and did not complete, served again after a restart. The
//! walk is daxd's own rather than virtio-queue's `DescriptorChain` so that reading a
//! descriptor is one bounds check and a 16-byte load from the region that holds it:
//! vm-memory's general `read_obj` goes through an iterator over regions whose inlining
//! varies from build to build, and with it every request's cost (see docs/faults.md,
//! "Cost"). The rules are virtio-queue's, each broken one named: a head and every `next`
//! inside their table, one indirect table at most (a whole number of descriptors, never
//! nested), at most as many descriptors as the table holds (so a looping chain ends), and
//! at most 4 GiB in all (VIRTIO 1.2, 2.7.5.2).

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// Why a chain ends before its last descriptor.
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
    #[error("the chain's buffers add up to more than 4 GiB")]
    TooLong,
}

/// The descriptors of one chain, read as they are asked for. Ends at the chain's last
/// descriptor or at the first broken rule, which [`ChainWalk::broken`] then names.
#[derive(Debug)]
pub struct ChainWalk<'m, M> {
    mem: &'m M,
    table: GuestAddress,
    entries: u32,
    next: u32,
    /// Descriptors the chain may still have before it counts as looping.
    left: u32,
    indirect: bool,
    bytes: u32,
    done: bool,
    broken: Option<RingError>,
}

// Not derived: the walk copies a reference to the memory, which need not be `Clone`.
impl<M> Clone for ChainWalk<'_, M> {
    fn clone(&self) -> Self {
        ChainWalk { ..*self }
    }
}

impl<'m, M: GuestMemoryBackend> ChainWalk<'m, M> {
    /// The chain at `head` of the descriptor table at `table`, of a queue of `size`
    /// entries.
    pub fn new(mem: &'m M, table: GuestAddress, size: u16, head: u16) -> Self {
        let mut walk = ChainWalk {
            mem,
            table,
            entries: u32::from(size),
            next: u32::from(head),
            left: u32::from(size),
            indirect: false,
            bytes: 0,
            done: false,
            broken: None,
        };
        if head >= size {
            walk.stop(RingError::BadHead { head, size });
        }
        walk
    }

    /// Why the walk ended early, once it has.
    pub fn broken(&self) -> Option<RingError> {
        self.broken
    }

    /// How many descriptors the whole chain has (walking a copy), or the rule it breaks,
    /// in which case this walk yields nothing.
    pub fn check(&mut self) -> Result<usize, RingError> {
        let mut copy = self.clone();
        let count = copy.by_ref().count();
        if let Some(why) = copy.broken {
            self.stop(why);
            return Err(why);
        }
        Ok(count)
    }

    fn stop(&mut self, why: RingError) {
        self.done = true;
        self.broken = Some(why);
    }

    fn read(&self, index: u32) -> Result<Descriptor, RingError> {
        let at = self
            .table
            .checked_add(u64::from(index) * 16)
            .ok_or(RingError::Unreadable(self.table.0))?;
        match GuestMemoryBackend::get_slice(self.mem, at, 16) {
            Ok(slice) => slice.read_obj::<Descriptor>(0).ok(),
            // An indirect table need not be aligned, so an entry can straddle two regions.
            Err(_) => self.mem.read_obj::<Descriptor>(at).ok(),
        }
        .ok_or(RingError::Unreadable(at.0))
    }
}

impl<M: GuestMemoryBackend> Iterator for ChainWalk<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.done {
                return None;
            }
            if self.left == 0 {
                self.stop(RingError::Loop);
                return None;
            }
            let desc = match self.read(self.next) {
                Ok(desc) => desc,
                Err(e) => {
                    self.stop(e);
                    return None;
                }
            };
            if desc.refers_to_indirect_table() {
                if self.indirect {
                    self.stop(RingError::NestedIndirect);
                    return None;
                }
                let len = desc.len();
                if len == 0 || len % 16 != 0 || len / 16 > u32::from(u16::MAX) {
                    self.stop(RingError::BadIndirect(len));
                    return None;
                }
                (self.table, self.entries, self.next) = (desc.addr(), len / 16, 0);
                (self.left, self.indirect) = (len / 16, true);
                continue;
            }
            match self.bytes.checked_add(desc.len()) {
                Some(bytes) => self.bytes = bytes,
                None => {
                    self.stop(RingError::TooLong);
                    return None;
                }
            }
            self.left -= 1;
            if desc.has_next() {
                self.next = u32::from(desc.next());
                if self.next >= self.entries {
                    // The descriptor itself is served; the chain ends after it.
                    self.stop(RingError::BadNext {
                        next: desc.next(),
                        size: self.entries,
                    });
                }
            } else {
                self.done = true;
            }
            return Some(desc);
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

    fn chain_at(
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Result<Vec<Descriptor>, RingError> {
        let mut walk = ChainWalk::new(mem, table, size, head);
        walk.check()?;
        Ok(walk.collect())
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

    #[test]
    fn a_chain_that_ends_early_keeps_what_came_before() {
        let m = mem();
        put(&m, 0, 0, Descriptor::new(0x1000, 16, NEXT, 9));
        let mut walk = ChainWalk::new(&m, GuestAddress(0), 8, 0);
        assert_eq!(walk.next().map(|d| d.addr().0), Some(0x1000));
        assert!(walk.next().is_none());
        assert_eq!(walk.broken(), Some(RingError::BadNext { next: 9, size: 8 }));
        // A checked walk of a broken chain yields nothing at all.
        let mut walk = ChainWalk::new(&m, GuestAddress(0), 8, 0);
        assert!(walk.check().is_err());
        assert!(walk.next().is_none());

        put(&m, 0, 1, Descriptor::new(0x1000, u32::MAX, NEXT, 2));
        put(&m, 0, 2, Descriptor::new(0x2000, 2, 0, 0));
        assert_eq!(
            chain_at(&m, GuestAddress(0), 8, 1).err(),
            Some(RingError::TooLong)
        );
    }

    #[test]
    fn an_indirect_entry_across_two_regions_is_read() {
        let m = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        put(&m, 0, 0, Descriptor::new(0xff8, 32, INDIRECT, 0));
        put(&m, 0xff8, 0, Descriptor::new(0x1800, 16, NEXT, 1));
        put(&m, 0xff8, 1, Descriptor::new(0x1900, 1, WRITE, 0));
        let chain = chain_at(&m, GuestAddress(0), 8, 0).unwrap();
        let addrs: Vec<u64> = chain.iter().map(|d| d.addr().0).collect();
        assert_eq!(addrs, [0x1800, 0x1900]);
    }

    /// What virtio-queue's own chain yields for the chain at `head`, taken from a ring.
    fn virtio_queue_chain(m: &GuestMemoryMmap, size: u16, head: u16) -> Vec<Descriptor> {
        use virtio_queue::{Queue, QueueOwnedT, QueueT};
        const AVAIL: u64 = 0x8000;
        m.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(0x9000), Some(0));
        q.set_ready(true);
        let chain = q.iter(m).unwrap().next().unwrap();
        chain.collect()
    }

    #[test]
    fn walks_every_chain_as_virtio_queue_does() {
        // Random tables of 8 entries (a seeded xorshift), with links, indirect tables
        // (some nested, some misaligned in length) and lengths that overflow 4 GiB.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let m = mem();
        for round in 0..5000 {
            for table in [0u64, 0x4000] {
                for index in 0..8 {
                    let flags = [0, NEXT, NEXT, WRITE, NEXT | WRITE, INDIRECT][rand(6) as usize];
                    let (addr, len) = if flags & INDIRECT != 0 {
                        (0x4000, [0, 16, 32, 128, 17, 200][rand(6) as usize])
                    } else {
                        (
                            0x1000 * rand(3),
                            [1, 512, u32::MAX / 2 + 1][rand(3) as usize],
                        )
                    };
                    let next = rand(10) as u16;
                    put(&m, table, index, Descriptor::new(addr, len, flags, next));
                }
            }
            let head = rand(8) as u16;
            let fields = |d: Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
            let ours: Vec<_> = ChainWalk::new(&m, GuestAddress(0), 8, head)
                .map(fields)
                .collect();
            let theirs: Vec<_> = virtio_queue_chain(&m, 8, head)
                .into_iter()
                .map(fields)
                .collect();
            assert_eq!(ours, theirs, "round {round}");
        }
    }
}
