//! What the request-path targets share: a small region and guest memory made once, and
//! a descriptor chain read from the fuzzer's input.

use std::sync::{Arc, OnceLock};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use daxd_region::{Region, RegionConfig};
use daxd_registry::Registry;

/// Guest memory: 64 KiB at 0 and 64 KiB at 1 MiB, with a gap between them.
pub const MEM: [(u64, usize); 2] = [(0, 0x1_0000), (0x10_0000, 0x1_0000)];

pub struct World {
    pub _dir: tempfile::TempDir,
    pub region: Arc<Region>,
    pub registry: Arc<Registry>,
    pub mem: GuestMemoryMmap,
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(
            Region::open(&RegionConfig {
                lock: false,
                ..RegionConfig::new(dir.path().join("fuzz.img"), Some(4 << 20))
            })
            .unwrap(),
        );
        let registry = Arc::new(Registry::new(region.frames()));
        let mem = GuestMemoryMmap::from_ranges(&MEM.map(|(addr, len)| (GuestAddress(addr), len)))
            .unwrap();
        World {
            _dir: dir,
            region,
            registry,
            mem,
        }
    })
}

/// Splits `data` into a descriptor chain (up to 16 descriptors of 8 bytes each: address,
/// length, flags) and bytes for guest memory, which are written at the start of both
/// memory ranges.
pub fn chain(data: &[u8], mem: &GuestMemoryMmap) -> Vec<Descriptor> {
    let Some((&count, rest)) = data.split_first() else {
        return Vec::new();
    };
    let count = usize::from(count % 17).min(rest.len() / 8);
    let (descs, bytes) = rest.split_at(count * 8);
    for (base, len) in MEM {
        let n = bytes.len().min(len);
        mem.write_slice(&bytes[..n], GuestAddress(base)).unwrap();
    }
    descs
        .chunks(8)
        .map(|d| {
            // Addresses near both ranges and the gap, lengths up to 64 KiB.
            let addr = u64::from(u32::from_le_bytes([d[0], d[1], d[2], 0])) * 2;
            let len = u32::from(u16::from_le_bytes([d[3], d[4]])) + u32::from(d[5] & 1) * 0x1_0000;
            let flags = u16::from(d[6]) & 0x2; // VRING_DESC_F_WRITE only: chains are flat
            Descriptor::new(addr, len, flags, 0)
        })
        .collect()
}
