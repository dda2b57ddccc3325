//! vhost-user glue: the listening socket, the per-connection daemon loop, and one
//! `VhostUserBackend` per device type (`vhu_*.rs`). Device logic lives in its own crates.

mod queue;
pub mod vhu_blk;
pub mod vhu_pmem;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use daxd_blk::BlkDevice;
use daxd_pmem::PmemDevice;
use daxd_region::Layout;
use daxd_registry::{OwnerId, Registry};
use vhost_user_backend::VhostUserBackend;

pub use vhu_blk::VhostUserBlkBackend;
pub use vhu_pmem::VhostUserPmemBackend;

/// Errors setting up or serving a vhost-user socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {0} is in use by another running backend; stop it or choose another path")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket; remove it or choose another path")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("file descriptor {fd} is not a listening UNIX socket ({why}); pass a socket that is already bound and listening")]
    BadFd { fd: RawFd, why: String },
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("cannot accept a vhost-user connection: {0}")]
    Accept(String),
}

/// Where the frontend connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddr {
    /// daxd creates and listens on a UNIX socket at this path.
    Path(PathBuf),
    /// An inherited socket that is already bound and listening (vhost-user.rst "Backend
    /// program conventions", `--fd`).
    Fd(RawFd),
}

/// Opens the listening socket. A stale socket file left by a process that died is
/// replaced; one that a live process still accepts on is not.
pub fn listen(addr: &SocketAddr) -> Result<Listener, ServeError> {
    match addr {
        SocketAddr::Path(path) => listen_on_path(path),
        SocketAddr::Fd(fd) => listen_on_fd(*fd),
    }
}

fn listen_on_path(path: &Path) -> Result<Listener, ServeError> {
    bind_unix(path).map(Listener::from)
}

/// Binds a UNIX socket at `path`. A stale socket file left by a process that died is
/// replaced; one that a live process still accepts on, or a file that is not a socket,
/// is not.
pub fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServeError::SocketInUse(path.to_owned()));
            }
            info!("removing stale socket {}", path.display());
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn listen_on_fd(fd: RawFd) -> Result<Listener, ServeError> {
    let bad = |why: String| ServeError::BadFd { fd, why };
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(e.to_string()))?;
    if domain != libc::AF_UNIX {
        return Err(bad(format!("socket domain {domain}, not AF_UNIX")));
    }
    if sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? != 1 {
        return Err(bad("not listening".into()));
    }
    // SAFETY: `fd` was handed to this process for its exclusive use (the --fd convention)
    // and is an open listening UNIX socket, checked above; nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(Listener::from(UnixListener::from(owned)))
}

fn sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which is that large; an
    // fd that is not a socket only makes it fail.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Serves the blk device to one frontend after another, forever. The device and its
/// region carry over between connections, so a reconnecting frontend (QEMU,
/// cloud-hypervisor) finds its data.
/// `poll`: how long each queue worker keeps polling after its queue ran empty.
pub fn serve_blk(
    listener: &mut Listener,
    device: Arc<BlkDevice>,
    layout: Arc<Layout>,
    poll: std::time::Duration,
) -> Result<(), ServeError> {
    let registry = device.registry().clone();
    serve(listener, &registry, "blk", |owner, mem| {
        VhostUserBlkBackend::new(device.clone(), layout.clone(), owner, mem, poll)
    })
}

/// Serves the virtio-pmem device (vhost-user shared memory) like [`serve_blk`].
pub fn serve_pmem(listener: &mut Listener, device: Arc<PmemDevice>) -> Result<(), ServeError> {
    let registry = device.registry().clone();
    serve(listener, &registry, "pmem", |owner, mem| {
        VhostUserPmemBackend::new(device.clone(), owner, mem)
    })
}

/// One connection after another: each gets a fresh backend and daemon (no state of one
/// frontend leaks into the next) and a registry owner whose mappings go when it ends.
fn serve<B>(
    listener: &mut Listener,
    registry: &Registry,
    name: &str,
    backend: impl Fn(OwnerId, GuestMemoryAtomic<GuestMemoryMmap>) -> B,
) -> Result<(), ServeError>
where
    B: VhostUserBackend<Bitmap = (), Vring = vhost_user_backend::VringRwLock> + 'static,
{
    for connection in 1u64.. {
        let owner = registry.new_owner(&format!("vhost-user-{name} connection {connection}"));
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(backend(owner, mem.clone()));
        let mut daemon = VhostUserDaemon::new(format!("daxd-{name}-{connection}"), backend, mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(listener)
            .map_err(|e| ServeError::Accept(e.to_string()))?;
        info!("{name}: frontend connected (connection {connection})");
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("{name}: frontend disconnected (connection {connection})"),
            Err(e) => warn!("{name}: connection {connection} ended: {e}"),
        }
        // Dropping the daemon stops and joins its queue workers; then nothing of this
        // connection can still be using its mappings.
        drop(daemon);
        registry.release_owner(owner);
    }
    Ok(())
}
