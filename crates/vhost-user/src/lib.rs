//! vhost-user glue: the listening socket and the per-connection daemon loop
//! (`server.rs`), and one `VhostUserBackend` per device type (`vhu_*.rs`) with what they
//! share: draining a queue, the flusher thread, in-flight tracking, the dirty log, the
//! config notifier. Device logic lives in its own crates.

mod config_notifier;
pub mod dirty_log;
mod flusher;
pub mod inflight;
pub mod queue;
mod server;
pub mod vhu_blk;
pub mod vhu_pmem;

pub use config_notifier::ConfigNotifier;
pub use server::{bind_unix, ServeError, Server, SocketAddr, Stopper, CONNECTIONS_AT_ONCE};
pub use vhu_blk::VhostUserBlkBackend;
pub use vhu_pmem::VhostUserPmemBackend;

/// Confines a thread vhost-user-backend started for a backend, before it handles a
/// message (the handler) or a request (a queue worker).
fn confine_daemon_thread(thread: vhost_user_backend::DaemonThread) {
    daxd_confine::enter_or_exit(match thread {
        vhost_user_backend::DaemonThread::Handler => daxd_confine::ThreadKind::Handler,
        vhost_user_backend::DaemonThread::Worker(_) => daxd_confine::ThreadKind::QueueWorker,
    });
}
