//! The virtio-blk request path (parse and execute) on any descriptor chain and guest
//! memory contents: it must never panic, and every completed request's used length must
//! fit in the chain's writable bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use daxd_blk::{BlkConfig, BlkDevice, ChainBuffers, Handled, Serial};
use daxd_region::{Layout, Serve, Window};

#[path = "common.rs"]
mod common;

fn device() -> &'static BlkDevice {
    static DEVICE: OnceLock<BlkDevice> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let w = common::world();
        let layout = Layout::new(
            w.region.size(),
            vec![Window {
                name: "disk".into(),
                offset: 0,
                size: w.region.size(),
                serve: Serve::Blk,
            }],
            false,
        )
        .unwrap();
        BlkDevice::new(
            w.region.clone(),
            w.registry.clone(),
            layout.blk().unwrap(),
            BlkConfig {
                num_queues: 1,
                queue_size: 256,
                read_only: false,
                sync: false,
                serial: Serial::new("fuzz").unwrap(),
            },
        )
        .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let w = common::world();
    let device = device();
    let chain = common::chain(data, &w.mem);
    let writable: u64 = chain
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    let limits = device.limits(device.features());
    let mut bufs = ChainBuffers::new();
    match device.handle(0, chain, &w.mem, &limits, &[], &mut bufs) {
        Handled::Done(used) => assert!(u64::from(used) <= writable),
        Handled::Flush(pending) => {
            let used = device.complete_flushes(&[pending], &w.mem);
            assert!(used[0] <= 1);
        }
    }
});
