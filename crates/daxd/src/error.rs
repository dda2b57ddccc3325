//! The binary's errors: each says what went wrong and, where the user can fix it, which
//! option to change. Library errors below carry no option names; the hints live here.

use std::io;
use std::path::PathBuf;

use daxd_blk::BlkError;
use daxd_pmem::PmemError;
use daxd_region::{LayoutError, RegionError};
use daxd_vhost_user::ServeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("cannot open the region{}", region_hint(.0))]
    Region(#[source] RegionError),
    #[error("the windows do not fit the region{}", layout_hint(.0))]
    Layout(#[source] LayoutError),
    #[error("no window is served as blk; add serve=blk or serve=both to one: QEMU's memory table, through which daxd sees pmem windows, reaches daxd over the disk's socket")]
    NoDisk,
    #[error("cannot give pmem window {window} all its blocks; free space on the host file system or make the window smaller")]
    PmemAllocation {
        window: String,
        #[source]
        source: RegionError,
    },
    #[error("cannot set up the disk")]
    Blk(#[source] BlkError),
    #[error("cannot make the crash states of {}", .dir.display())]
    CrashStates {
        dir: PathBuf,
        #[source]
        source: daxd_record::states::StatesError,
    },
    #[error("cannot run the checker {check:?}")]
    Checker {
        check: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{failed} crash state(s) failed the checker; the first, state {first}, again: {again}"
    )]
    StatesFailed {
        failed: u64,
        first: u64,
        again: String,
    },
    #[error("--record {}: cannot start recording there; give a writable directory with room for a copy of the disk and of everything written to it", .dir.display())]
    Record {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up virtio-pmem")]
    Pmem(#[source] PmemError),
    #[error("--pmem-window {0}: no pmem window of that name")]
    NoSuchPmemWindow(String),
    #[error("--pmem-socket-path needs a window with serve=pmem or serve=both")]
    NoPmemWindow,
    #[error("several pmem windows: say which one --pmem-socket-path serves with --pmem-window")]
    SeveralPmemWindows,
    #[error("cannot serve the {device} device{}", serve_hint(.source))]
    Serve {
        device: &'static str,
        #[source]
        source: ServeError,
    },
    #[error("the {device} device stopped serving")]
    Stopped {
        device: &'static str,
        #[source]
        source: ServeError,
    },
    #[error("the {0} server thread panicked")]
    Panicked(&'static str),
    #[error("cannot set up the control socket {}{}", .path.display(), serve_hint(.source))]
    Control {
        path: PathBuf,
        #[source]
        source: ServeError,
    },
    #[error("cannot reach daxd at {}; is daxd running with --control-socket {}?", .path.display(), .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the resize was refused")]
    Resize(#[source] crate::control::ResizeRefused),
    #[error("daxd refused: {0}")]
    Fault(String),
    #[error("--fault {rule}")]
    FaultRule {
        rule: String,
        #[source]
        source: daxd_fault::FaultError,
    },
    #[error("daxd at {} answered something this daxd does not understand (same version on both ends?)", .path.display())]
    BadInspection {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot create the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("flushing the region failed; recent writes may not be durable")]
    Flush(#[source] RegionError),
    #[error("cannot put daxd in its sandbox (--sandbox none runs without)")]
    Sandbox(#[source] daxd_confine::sandbox::SandboxError),
    #[error("daxd runs {0} threads before its sandbox, which needs one; this is a bug")]
    ThreadsBeforeSandbox(usize),
    #[error("cannot confine daxd's threads (--seccomp none runs without filters)")]
    Confine(#[source] daxd_confine::ConfineError),
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

fn region_hint(e: &RegionError) -> &'static str {
    match e {
        RegionError::MissingFile { .. } => " (pass --size to create it)",
        RegionError::SizeMismatch { .. } => {
            " (pass --resize to change its size, or drop --size to use the file as it is)"
        }
        RegionError::NotDax { .. } => " (drop --direct to serve it through the page cache)",
        RegionError::UnalignedSize(_) => " (choose a --size such as 1G)",
        RegionError::ReadOnlyResize { .. } => " (drop --read-only, or --size/--resize)",
        RegionError::Locked { .. } | RegionError::LockedByUnknown { .. } => {
            " (stop the process that uses it, `fuser -v FILE` names it; readers may share a file, a writer may not; --no-lock turns locking off)"
        }
        _ => "",
    }
}

fn layout_hint(e: &LayoutError) -> &'static str {
    match e {
        LayoutError::Overlap { .. } => {
            " (pass --allow-overlap if two devices may expose the same bytes)"
        }
        _ => "",
    }
}

fn serve_hint(e: &ServeError) -> &'static str {
    match e {
        ServeError::SocketInUse(_) => " (stop the other backend or choose another path)",
        ServeError::NotASocket(_) => " (remove the file or choose another path)",
        ServeError::BadFd { .. } => " (pass a UNIX socket that is already bound and listening)",
        _ => "",
    }
}

/// `e` and its sources, as one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
