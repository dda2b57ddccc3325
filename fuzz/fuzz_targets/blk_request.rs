//! The virtio-blk request path (parse and execute) on any descriptor chain and guest
//! memory contents: it must never panic, and every completed request's used length must
//! fit in the chain's writable bytes.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

use daxd_blk::{BlkDevice, ChainBuffers, Handled};

#[path = "blk.rs"]
mod blk;
#[path = "common.rs"]
mod common;

fn device() -> &'static BlkDevice {
    static DEVICE: OnceLock<BlkDevice> = OnceLock::new();
    DEVICE.get_or_init(|| blk::device(&blk::layout(), 1))
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
            let used = device.complete_flush(&pending, device.flush(), &w.mem);
            assert!(used <= 1);
        }
        Handled::Later { used, .. } => assert!(u64::from(used) <= writable),
    }
});
