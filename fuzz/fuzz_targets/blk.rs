//! The disk the blk targets serve: the whole fuzz region, as one window.

use daxd_blk::{BlkConfig, BlkDevice, Serial};
use daxd_region::{Layout, Serve, Window};

use crate::common;

/// The region as one disk window.
pub fn layout() -> Layout {
    let w = common::world();
    Layout::new(
        w.region.size(),
        vec![Window {
            name: "disk".into(),
            offset: 0,
            size: w.region.size(),
            serve: Serve::Blk,
        }],
        false,
    )
    .unwrap()
}

/// A disk over `layout`'s window with `num_queues` queues.
pub fn device(layout: &Layout, num_queues: u16) -> BlkDevice {
    let w = common::world();
    BlkDevice::new(
        w.region.clone(),
        w.registry.clone(),
        layout.blk().unwrap(),
        BlkConfig {
            num_queues,
            queue_size: 256,
            read_only: false,
            sync: false,
            serial: Serial::new("fuzz").unwrap(),
        },
    )
    .unwrap()
}
