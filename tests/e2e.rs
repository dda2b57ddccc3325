//! daxd's end-to-end suites in one test binary, so that the helpers in `support` are
//! shared without dead-code allowances: the blkio client suite runs with `cargo test`,
//! the real-guest suites (marked ignored) with `cargo test --test e2e -- --ignored`.

mod blkio_client;
mod block_device;
mod ci_scripts;
mod cloud_hypervisor;
mod confine;
mod crash_states;
mod dax_host;
mod faults;
mod guest_blk;
mod guest_crash;
mod guest_faults;
mod guest_pmem;
mod hostile_frontend;
mod libvirt;
mod migration;
mod powercut;
mod resize;
mod restart;
mod support;
mod systemd;
mod writeback;
