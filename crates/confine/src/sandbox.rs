//! The process's view of the host once daxd has opened what it serves: an empty,
//! read-only root in a mount namespace of its own, no network namespace in common with the
//! host, no capabilities, and a bound on open files.
//!
//! After the region file, its sockets and the systemd notification socket are open, daxd
//! needs no path but those of its sockets: shutdown removes the socket files it created,
//! an inherited socket's accept is woken by connecting to it, and `STOPPING=1` goes to
//! `NOTIFY_SOCKET`. So the new root holds exactly those: each socket's directory, and the
//! notification socket, bind-mounted at the same paths; nothing else of the host file
//! system is reachable (not the region's directory unless a socket lives in it, not /proc,
//! /dev or /sys). Memory tables and in-flight areas come from the frontend as descriptors,
//! the region is an open descriptor, so serving needs no path at all.
//!
//! The namespaces are made with `unshare`, which only works while the process has one
//! thread: [`enter`] runs before any server starts. As root daxd has the capabilities it
//! needs for that; otherwise a user namespace (mapping daxd's own user and group only)
//! gives them, where the host allows unprivileged user namespaces.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};

/// `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// The namespace sandbox where the host allows it; otherwise a warning and none.
    Auto,
    /// The namespace sandbox, or daxd does not start.
    Namespace,
    /// No sandbox (capabilities and limits as daxd was started with).
    None,
}

/// Open files daxd may hold: two devices' connections with QEMU's largest memory tables
/// (509 regions), 64 queues' kick, call and error descriptors and each worker's epoll and
/// eventfds, with room to spare. A frontend that sends more gets errors, not a daxd that
/// takes the host's descriptors.
pub const MAX_OPEN_FILES: u64 = 4096;

/// Where the new root is built: an existing directory whose contents daxd never needs,
/// covered (only in daxd's namespace) by the new root's tmpfs.
const SCAFFOLD: &str = "/sys";
const OLD_ROOT: &str = ".old-root";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot create the sandbox's namespaces (as root daxd needs CAP_SYS_ADMIN; as another user, unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1, or AppArmor's kernel.apparmor_restrict_unprivileged_userns=0)")]
    Unshare(#[source] io::Error),
    #[error("cannot map daxd's user and group into its user namespace ({what})")]
    UserMap {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what} {}", .path.display())]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} must stay reachable but is not an absolute path", .0.display())]
    Relative(PathBuf),
    #[error("cannot drop capabilities")]
    Capabilities(#[source] io::Error),
    #[error("cannot limit open files to {MAX_OPEN_FILES}")]
    Limit(#[source] io::Error),
}

impl SandboxError {
    /// Errors that mean "this host does not let daxd make namespaces" (for `auto`), as
    /// opposed to a sandbox that went wrong half-way.
    pub fn is_unsupported(&self) -> bool {
        matches!(
            self,
            SandboxError::Unshare(_) | SandboxError::UserMap { .. }
        )
    }
}

/// Moves the process into its sandbox; `keep` are the paths that must stay reachable (at
/// the same place): socket directories and the notification socket. Must be called while
/// the process has a single thread.
pub fn enter(keep: &[PathBuf]) -> Result<(), SandboxError> {
    let keep = outermost(keep)?;
    unshare()?;
    build_root(&keep)?;
    limit_open_files()?;
    drop_capabilities()
}

/// The kept paths without those inside another kept directory (already reachable through
/// it; binding them too would create their mount points on the host).
fn outermost(keep: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let mut paths = BTreeSet::new();
    for path in keep {
        if !path.is_absolute() {
            return Err(SandboxError::Relative(path.clone()));
        }
        // A path that does not resolve (gone already) has nothing to keep.
        if let Ok(path) = std::fs::canonicalize(path) {
            paths.insert(path);
        }
    }
    let all: Vec<PathBuf> = paths.into_iter().collect();
    Ok(all
        .iter()
        .filter(|p| !all.iter().any(|q| q != *p && p.starts_with(q)))
        .cloned()
        .collect())
}

fn unshare() -> Result<(), SandboxError> {
    let namespaces = UnshareFlags::NEWNS | UnshareFlags::NEWIPC | network_namespace();
    let root = rustix::process::geteuid().is_root();
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    let flags = if root {
        namespaces
    } else {
        namespaces | UnshareFlags::NEWUSER
    };
    // SAFETY: the process has one thread (this function's contract, checked by the caller
    // before servers start), so no other thread shares the state unshare separates.
    unsafe { rustix::thread::unshare_unsafe(flags) }
        .map_err(|e| SandboxError::Unshare(e.into()))?;
    if !root {
        let write = |what: &'static str, file: &str, text: String| {
            std::fs::write(file, text).map_err(|source| SandboxError::UserMap { what, source })
        };
        write("setgroups", "/proc/self/setgroups", "deny".into())?;
        write(
            "uid_map",
            "/proc/self/uid_map",
            format!("{0} {0} 1", uid.as_raw()),
        )?;
        write(
            "gid_map",
            "/proc/self/gid_map",
            format!("{0} {0} 1", gid.as_raw()),
        )?;
    }
    Ok(())
}

/// A network namespace of its own, unless systemd's notification socket is an abstract
/// one (`@name`): those live in the network namespace.
fn network_namespace() -> UnshareFlags {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if socket.as_encoded_bytes().starts_with(b"@") => UnshareFlags::empty(),
        _ => UnshareFlags::NEWNET,
    }
}

fn build_root(keep: &[PathBuf]) -> Result<(), SandboxError> {
    let failed = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |e: rustix::io::Errno| SandboxError::Mount {
            what,
            path,
            source: e.into(),
        }
    };
    let io_failed = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| SandboxError::Mount { what, path, source }
    };
    // Nothing daxd mounts from here on shows outside, nor anything mounted outside in here.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(failed("make private the mounts under", Path::new("/")))?;
    let scaffold = Path::new(SCAFFOLD);
    rustix::mount::mount(
        "daxd-sandbox",
        scaffold,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0755,size=1M",
    )
    .map_err(failed("mount the sandbox's root on", scaffold))?;
    for path in keep {
        let inside = scaffold.join(path.strip_prefix("/").unwrap_or(path));
        if path.is_dir() {
            std::fs::create_dir_all(&inside).map_err(io_failed("create", &inside))?;
        } else {
            if let Some(parent) = inside.parent() {
                std::fs::create_dir_all(parent).map_err(io_failed("create", parent))?;
            }
            std::fs::File::create(&inside).map_err(io_failed("create", &inside))?;
        }
        rustix::mount::mount_bind(path, &inside).map_err(failed("bind-mount", path))?;
    }
    let old = scaffold.join(OLD_ROOT);
    std::fs::create_dir(&old).map_err(io_failed("create", &old))?;
    rustix::process::pivot_root(scaffold, &old).map_err(failed("pivot the root to", scaffold))?;
    rustix::process::chdir("/").map_err(failed("change directory to", Path::new("/")))?;
    let old = Path::new("/").join(OLD_ROOT);
    rustix::mount::unmount(&old, UnmountFlags::DETACH).map_err(failed("unmount", &old))?;
    std::fs::remove_dir(&old).map_err(io_failed("remove", &old))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::BIND
            | MountFlags::RDONLY
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC,
        c"",
    )
    .map_err(failed("make read-only", Path::new("/")))
}

fn limit_open_files() -> Result<(), SandboxError> {
    let current = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let bound = |limit: Option<u64>| Some(limit.map_or(MAX_OPEN_FILES, |l| l.min(MAX_OPEN_FILES)));
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: bound(current.current),
            maximum: bound(current.maximum),
        },
    )
    .map_err(|e| SandboxError::Limit(e.into()))
}

/// Every capability gone, from every set including the bounding set, so that none can come
/// back: daxd needs none to serve what it has open.
fn drop_capabilities() -> Result<(), SandboxError> {
    for bit in 0..64 {
        let capability = CapabilitySet::from_bits_retain(1 << bit);
        // Capabilities this kernel does not know answer EINVAL: nothing to drop.
        if rustix::thread::capability_is_in_bounding_set(capability).unwrap_or(false) {
            rustix::thread::remove_capability_from_bounding_set(capability)
                .map_err(|e| SandboxError::Capabilities(e.into()))?;
        }
    }
    rustix::thread::clear_ambient_capability_set()
        .map_err(|e| SandboxError::Capabilities(e.into()))?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: CapabilitySet::empty(),
            permitted: CapabilitySet::empty(),
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|e| SandboxError::Capabilities(e.into()))
}
