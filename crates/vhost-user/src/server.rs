//! The listening socket and the per-connection daemon loop: one `VhostUserDaemon` per
//! frontend, at most [`CONNECTIONS_AT_ONCE`] at a time, each with its own registry owner.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;

use crate::dirty_log::{DirtyLog, GuestMemory, Vring};
use crate::{ConfigNotifier, VhostUserBlkBackend, VhostUserPmemBackend};

use daxd_blk::BlkDevice;
use daxd_pmem::PmemDevice;
use daxd_region::SharedLayout;
use daxd_registry::{OwnerId, Registry};

/// Errors setting up or serving a vhost-user socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("socket {0} is in use by another running backend")]
    SocketInUse(PathBuf),
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("file descriptor {fd} is not a listening UNIX socket")]
    BadFd {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    // vhost_user_backend::Error implements Display but not std::error::Error, so it is
    // carried as a field, not as a source.
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("cannot accept a vhost-user connection: {0}")]
    Accept(vhost_user_backend::Error),
    #[error("cannot confine the server thread")]
    Confine(#[source] daxd_confine::ConfineError),
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
            // A failure shows up as the bind error below.
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

fn listen_on_fd(fd: RawFd) -> Result<UnixListener, ServeError> {
    let bad = |source: io::Error| ServeError::BadFd { fd, source };
    // SAFETY: `fd` was handed to this process for its exclusive use (the --fd convention),
    // so nothing else owns or closes it; a number that is not an open socket only makes
    // the checks below fail.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let domain = rustix::net::sockopt::socket_domain(&owned).map_err(|e| bad(e.into()))?;
    if domain != rustix::net::AddressFamily::UNIX {
        return Err(bad(io::Error::other("not a UNIX socket")));
    }
    if !rustix::net::sockopt::socket_acceptconn(&owned).map_err(|e| bad(e.into()))? {
        return Err(bad(io::Error::other("not listening")));
    }
    Ok(UnixListener::from(owned))
}

/// Stops a [`Server`] from another thread: no new connection is accepted, and the
/// current ones are shut down, which makes their queue workers finish their batch and
/// exit.
#[derive(Clone)]
pub struct Stopper {
    state: Arc<StopState>,
}

struct StopState {
    stopped: AtomicBool,
    /// The listening socket (a second descriptor of it), to wake a thread blocked in
    /// accept.
    listener: OwnedFd,
    /// The path of a socket handed to daxd (`--fd`, systemd socket activation): its owner
    /// keeps listening on it after daxd stops, so it is not shut down; a connection to the
    /// path wakes accept instead.
    inherited: Option<PathBuf>,
    /// The connections being served, by number.
    connections: Mutex<Vec<(u64, ShutdownHandle)>>,
    /// Signalled when a connection ends (a slot is free) or the server stops.
    changed: Condvar,
}

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stopper")
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Stopper {
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        for (_, connection) in self.lock_connections().drain(..) {
            connection.shutdown();
        }
        self.state.changed.notify_all();
        // The serving loop may be waiting in accept for another frontend.
        if !self.wake_by_connecting() {
            // shutdown(2) wakes accept, and ends listening for every holder of the socket.
            if let Err(e) = rustix::net::shutdown(&self.state.listener, rustix::net::Shutdown::Both)
            {
                warn!("cannot shut down a listening socket: {e}");
            }
        }
    }

    /// Wakes accept with a connection of its own to the socket's path, leaving the socket
    /// listening for its owner (systemd keeps it for the next daxd). False if the socket
    /// has no path or cannot be reached.
    fn wake_by_connecting(&self) -> bool {
        self.state
            .inherited
            .as_deref()
            .is_some_and(|path| UnixStream::connect(path).is_ok())
    }

    pub fn is_stopped(&self) -> bool {
        self.state.stopped.load(Ordering::SeqCst)
    }

    fn lock_connections(&self) -> std::sync::MutexGuard<'_, Vec<(u64, ShutdownHandle)>> {
        self.state
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection being served, and returns the numbers of the others being
    /// served; shuts it down at once if a stop came first.
    fn serving(&self, number: u64, connection: Option<ShutdownHandle>) -> Vec<u64> {
        let mut current = self.lock_connections();
        let others = current.iter().map(|(n, _)| *n).collect();
        match connection {
            Some(connection) if self.is_stopped() => connection.shutdown(),
            Some(connection) => current.push((number, connection)),
            None => {}
        }
        others
    }

    /// A connection ended: its slot is free.
    fn ended(&self, number: u64) {
        self.lock_connections().retain(|(n, _)| *n != number);
        self.state.changed.notify_all();
    }

    /// Waits until fewer than `max` connections are served, or the server stops.
    fn wait_for_a_slot(&self, max: usize) {
        let mut current = self.lock_connections();
        while current.len() >= max && !self.is_stopped() {
            current = self
                .state
                .changed
                .wait_timeout(current, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How many frontends one socket serves at once: a VM's, and during a live migration on
/// this host the destination's, which connects while the source still runs (QEMU
/// starting with `-incoming` sets up its devices before the migration starts, and it
/// cannot start while a backend does not answer). Both are served by this process through
/// the one mapping of the region, so neither can see data older than the other wrote, and
/// the region keeps its one writer. A third frontend waits until one of them leaves.
pub const CONNECTIONS_AT_ONCE: usize = 2;

/// A listening vhost-user socket and the loop that serves one frontend after another.
pub struct Server {
    name: &'static str,
    listener: Listener,
    stopper: Stopper,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .field("stopper", &self.stopper)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Opens the listening socket for device `name` ("blk", "pmem").
    pub fn listen(addr: &SocketAddr, name: &'static str) -> Result<Server, ServeError> {
        let (listener, inherited) = match addr {
            SocketAddr::Path(path) => (bind_unix(path)?, None),
            SocketAddr::Fd(fd) => {
                let listener = listen_on_fd(*fd)?;
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf));
                if path.is_none() {
                    warn!(
                        "socket fd {fd} has no path: stopping will shut it down for its owner too"
                    );
                }
                (listener, path)
            }
        };
        let second = listener
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| ServeError::BadFd {
                fd: listener.as_raw_fd(),
                source,
            })?;
        Ok(Server {
            name,
            listener: Listener::from(listener),
            stopper: Stopper {
                state: Arc::new(StopState {
                    stopped: AtomicBool::new(false),
                    listener: second,
                    inherited,
                    connections: Mutex::new(Vec::new()),
                    changed: Condvar::new(),
                }),
            },
        })
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// The path of an inherited socket, which stopping connects to (so it must stay
    /// reachable); `None` for a socket daxd created.
    pub fn inherited_path(&self) -> Option<&Path> {
        self.stopper.state.inherited.as_deref()
    }

    /// Serves the blk device until stopped. The device and its region carry over between
    /// connections, so a reconnecting frontend (QEMU, cloud-hypervisor) finds its data.
    /// `poll`: how long each queue worker keeps polling after its queue ran empty.
    pub fn serve_blk(
        self,
        device: Arc<BlkDevice>,
        layout: SharedLayout,
        notifier: Arc<ConfigNotifier>,
        poll: std::time::Duration,
    ) -> Result<(), ServeError> {
        let registry = device.registry().clone();
        self.serve(&registry, |owner, mem| {
            VhostUserBlkBackend::new(
                device.clone(),
                layout.clone(),
                notifier.clone(),
                owner,
                mem,
                poll,
            )
        })
    }

    /// Serves the virtio-pmem device (vhost-user shared memory) like [`Server::serve_blk`].
    pub fn serve_pmem(self, device: Arc<PmemDevice>) -> Result<(), ServeError> {
        let registry = device.registry().clone();
        self.serve(&registry, |owner, mem| {
            VhostUserPmemBackend::new(device.clone(), owner, mem)
        })
    }

    /// Serves frontends, up to [`CONNECTIONS_AT_ONCE`] at a time: each connection gets a
    /// fresh backend and daemon (no state of one frontend leaks into another) and a
    /// registry owner whose mappings go when it ends.
    fn serve<B>(
        mut self,
        registry: &Registry,
        backend: impl Fn(OwnerId, GuestMemoryAtomic<GuestMemory>) -> B,
    ) -> Result<(), ServeError>
    where
        B: VhostUserBackend<Bitmap = DirtyLog, Vring = Vring> + 'static,
    {
        let name = self.name;
        // Before the first frontend: everything a connection's threads do is bounded by
        // this thread's list, since they inherit it.
        daxd_confine::enter(daxd_confine::ThreadKind::Server).map_err(ServeError::Confine)?;
        let stopper = self.stopper.clone();
        // What is left to do when a connection has ended and its daemon is dropped.
        let forget = |connection: u64, owner: OwnerId| {
            stopper.ended(connection);
            registry.release_owner(owner);
        };
        let result = std::thread::scope(|scope| {
            for connection in 1u64.. {
                stopper.wait_for_a_slot(CONNECTIONS_AT_ONCE);
                if stopper.is_stopped() {
                    break;
                }
                let owner =
                    registry.new_owner(&format!("vhost-user-{name} connection {connection}"));
                let mem = GuestMemoryAtomic::new(GuestMemory::new());
                let backend = Arc::new(backend(owner, mem.clone()));
                // On an error, the connections being served are ended too: the scope
                // returns only once they have.
                let mut daemon =
                    match VhostUserDaemon::new(format!("daxd-{name}-{connection}"), backend, mem) {
                        Ok(daemon) => daemon,
                        Err(e) => {
                            registry.release_owner(owner);
                            stopper.stop();
                            return Err(ServeError::Daemon(e));
                        }
                    };
                if let Err(e) = daemon.start(&mut self.listener) {
                    registry.release_owner(owner);
                    if stopper.is_stopped() {
                        break;
                    }
                    stopper.stop();
                    return Err(ServeError::Accept(e));
                }
                match stopper.serving(connection, daemon.shutdown_handle()).as_slice() {
                    [] => info!("{name}: frontend connected (connection {connection})"),
                    [other] => info!(
                        "{name}: frontend connected (connection {connection}) while connection {other} is served, as a live migration's destination does; both are served through the one mapping of the region"
                    ),
                    others => info!(
                        "{name}: frontend connected (connection {connection}) while connections {others:?} are served"
                    ),
                }
                let forget = &forget;
                let waiter = std::thread::Builder::new()
                    .name(format!("daxd-{name}-conn"))
                    .spawn_scoped(scope, move || {
                        match daemon.wait() {
                            Ok(())
                            | Err(vhost_user_backend::Error::HandleRequest(
                                VhostUserError::Disconnected | VhostUserError::PartialMessage,
                            )) => info!("{name}: frontend disconnected (connection {connection})"),
                            Err(e) => warn!("{name}: connection {connection} ended: {e}"),
                        }
                        // Dropping the daemon stops and joins its queue workers; then nothing
                        // of this connection can still be using its mappings.
                        drop(daemon);
                        forget(connection, owner);
                    });
                if let Err(e) = waiter {
                    // The daemon moved into the closure was dropped with it, which ended
                    // the connection.
                    warn!("{name}: cannot start a thread for connection {connection}: {e}");
                    forget(connection, owner);
                }
            }
            Ok(())
        });
        info!("{name}: stopped serving");
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use daxd_blk::{BlkConfig, Serial};
    use daxd_region::{Region, RegionConfig};

    fn blk_device(dir: &Path) -> (Arc<BlkDevice>, SharedLayout) {
        let region =
            Arc::new(Region::open(&RegionConfig::new(dir.join("r.img"), Some(1 << 20))).unwrap());
        let layout = Arc::new(daxd_region::Layout::new(region.size(), vec![], false).unwrap());
        let registry = Arc::new(Registry::new(region.frames()));
        let device = BlkDevice::new(
            region,
            registry,
            layout.blk().unwrap(),
            BlkConfig {
                num_queues: 1,
                queue_size: 64,
                read_only: false,
                sync: false,
                serial: Serial::new("stop-test").unwrap(),
            },
        )
        .unwrap();
        (Arc::new(device), Arc::new(arc_swap::ArcSwap::new(layout)))
    }

    /// Stops a server thread and returns how long it took to end, and how.
    fn stop_and_join(
        stopper: Stopper,
        thread: std::thread::JoinHandle<Result<(), ServeError>>,
    ) -> (Duration, Result<(), ServeError>) {
        let start = Instant::now();
        stopper.stop();
        while !thread.is_finished() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(thread.is_finished(), "the server did not stop");
        (start.elapsed(), thread.join().unwrap())
    }

    #[test]
    fn a_stop_ends_a_server_waiting_for_its_first_frontend() {
        let dir = tempfile::tempdir().unwrap();
        let (device, layout) = blk_device(dir.path());
        let server = Server::listen(&SocketAddr::Path(dir.path().join("s.sock")), "blk").unwrap();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || {
            server.serve_blk(device, layout, Default::default(), Duration::ZERO)
        });
        std::thread::sleep(Duration::from_millis(100));
        let (_, result) = stop_and_join(stopper, thread);
        assert!(result.is_ok(), "{result:?}");
    }

    #[test]
    fn a_stop_ends_a_connected_frontend_and_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let (device, layout) = blk_device(dir.path());
        let path = dir.path().join("s.sock");
        let server = Server::listen(&SocketAddr::Path(path.clone()), "blk").unwrap();
        let stopper = server.stopper();
        let thread = std::thread::spawn(move || {
            server.serve_blk(device, layout, Default::default(), Duration::ZERO)
        });
        // A frontend that connects and then says nothing: the daemon waits on it.
        let frontend = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (_, result) = stop_and_join(stopper, thread);
        assert!(result.is_ok(), "{result:?}");
        drop(frontend);
    }
}
