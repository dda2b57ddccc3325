//! The virtio-pmem request path on any descriptor chain and guest memory contents: it
//! must never panic, and the used length is 0 or the 4-byte response.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use daxd_pmem::PmemDevice;
use daxd_region::{Serve, Window};
use daxd_virtio::Chain;

#[path = "common.rs"]
mod common;

fn device() -> &'static PmemDevice {
    static DEVICE: OnceLock<PmemDevice> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let w = common::world();
        let window = Window {
            name: "pm0".into(),
            offset: 2 << 20,
            size: 2 << 20,
            serve: Serve::Pmem,
        };
        PmemDevice::new(w.region.clone(), w.registry.clone(), window, 256).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let w = common::world();
    let chain = common::chain(data, &w.mem);
    let used = device().handle(chain, &w.mem, &mut Chain::new());
    assert!(used == 0 || used == 4);
});
