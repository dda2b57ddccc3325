//! One writer per region: open file description (OFD) locks on the whole region file, as
//! QEMU's image locking uses them. A writable region holds an exclusive lock, a read-only
//! one a shared lock, so a second writable daxd (or a qemu-storage-daemon export) on the
//! same file is refused, while read-only users may share it.
//!
//! OFD locks belong to the open file description, not the process: they go when the last
//! descriptor of that description closes (a dead daxd leaves no stale lock), and they
//! travel with the descriptor if it is passed to another process over a UNIX socket,
//! which is how a lock can be handed over without a gap. The flip side: whoever holds a
//! reference to the locked description keeps the lock, including a VMM that mapped the
//! file through it; descriptors handed to a VMM are therefore separate, unlocked opens
//! ([`crate::Region::shareable_file`]).

use std::fs::File;
use std::io;

use nix::fcntl::{fcntl, FcntlArg};

/// The lock a region holds on its file, or finds held by another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Read-only users: any number may share the file.
    Shared,
    /// A writer: nobody else may use the file.
    Exclusive,
}

impl std::fmt::Display for LockKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LockKind::Shared => "a shared (read-only)",
            LockKind::Exclusive => "an exclusive (writable)",
        })
    }
}

/// Why a lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another open of the file holds a conflicting lock (of this kind, if it could be
    /// read back).
    Conflict(Option<LockKind>),
    Io(io::Error),
}

fn whole_file(l_type: libc::c_short) -> libc::flock {
    libc::flock {
        l_type,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // Must be 0 for OFD locks.
        l_pid: 0,
    }
}

/// Takes `kind` on the whole of `file` without waiting.
pub(crate) fn lock(file: &File, kind: LockKind) -> Result<(), LockError> {
    let l_type = match kind {
        LockKind::Shared => libc::F_RDLCK,
        LockKind::Exclusive => libc::F_WRLCK,
    } as libc::c_short;
    match fcntl(file, FcntlArg::F_OFD_SETLK(&whole_file(l_type))) {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
            Err(LockError::Conflict(holder(file, l_type)))
        }
        Err(e) => Err(LockError::Io(e.into())),
    }
}

/// The kind of lock that blocks `l_type` on `file`, if the kernel tells.
fn holder(file: &File, l_type: libc::c_short) -> Option<LockKind> {
    let mut probe = whole_file(l_type);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut probe)).ok()?;
    match i32::from(probe.l_type) {
        libc::F_RDLCK => Some(LockKind::Shared),
        libc::F_WRLCK => Some(LockKind::Exclusive),
        _ => None,
    }
}
