//! Cost of mapping and unmapping a whole window, the registry's slow path: `cargo bench
//! -p daxd-registry` prints the best of 5 for a 1 GiB window (262144 descriptors), which
//! QEMU's memory table or a SHMEM_MAP brings in one piece.

use std::time::Instant;

use daxd_registry::{FrameRange, MappingRequest, Registry, Target};

fn main() {
    let frames = FrameRange {
        start: 1 << 18,
        end: 2 << 18,
    };
    let registry = Registry::new(1 << 20);
    let owner = registry.new_owner("bench");
    let (mut map, mut unmap) = (u128::MAX, u128::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        let id = registry
            .map(
                owner,
                MappingRequest {
                    device: "bench".into(),
                    target: Target::GuestPhysical { gpa: 1 << 32 },
                    frames,
                    writable: true,
                },
            )
            .unwrap();
        map = map.min(t.elapsed().as_micros());
        let t = Instant::now();
        registry.unmap(id).unwrap();
        unmap = unmap.min(t.elapsed().as_micros());
    }
    println!("1 GiB window (262144 pages): map {map} us, unmap {unmap} us (best of 5)");
}
