//! systemd integration: sockets handed over by socket activation (`LISTEN_FDS`,
//! `LISTEN_PID`, `LISTEN_FDNAMES`; resources/systemd/daxd@.socket) and readiness
//! notification (`NOTIFY_SOCKET`; `Type=notify` in daxd@.service). Both are no-ops when
//! systemd did not start daxd.

use std::os::fd::RawFd;

use log::warn;

use crate::error::Error;

/// Socket name (`FileDescriptorName=`) of the disk's socket; with one unnamed socket, that
/// one is the disk's.
pub const BLK: &str = "blk";
/// Socket name of the virtio-pmem device's socket (`--pmem-socket-path` without a path).
pub const PMEM: &str = "pmem";

/// The sockets systemd passed to this process, with their names; empty when it passed
/// none. Must run before any thread starts: it removes the variables from the
/// environment, so that nothing daxd starts takes the sockets for its own.
pub fn activated_sockets() -> Result<Vec<(RawFd, String)>, Error> {
    sd_notify::listen_fds_with_names(true)
        .map(Iterator::collect)
        .map_err(Error::io("read the sockets systemd passed (LISTEN_FDS)"))
}

/// The activated socket named `name`; for the disk, also the only socket when it has no
/// name of ours.
pub fn find(activated: &[(RawFd, String)], name: &str) -> Option<RawFd> {
    let named = activated.iter().find(|(_, n)| n == name).map(|(fd, _)| *fd);
    match (named, activated) {
        (Some(fd), _) => Some(fd),
        (None, [(fd, other)]) if name == BLK && other != PMEM => Some(*fd),
        _ => None,
    }
}

/// Tells systemd that daxd serves (`READY=1`), with a status line.
pub fn ready(status: &str) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
}

/// Tells systemd that daxd is stopping (`STOPPING=1`).
pub fn stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Not unset: both notifications go to the same socket.
    if let Err(e) = sd_notify::notify(false, states) {
        warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_found_by_name_or_alone() {
        let named = [(3, "pmem".to_owned()), (4, "blk".to_owned())];
        assert_eq!(find(&named, BLK), Some(4));
        assert_eq!(find(&named, PMEM), Some(3));
        let alone = [(3, "daxd@disk0.socket".to_owned())];
        assert_eq!(find(&alone, BLK), Some(3));
        assert_eq!(find(&alone, PMEM), None);
        assert_eq!(find(&[(3, "pmem".to_owned())], BLK), None);
        assert_eq!(find(&[], BLK), None);
    }
}
