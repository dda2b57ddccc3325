//! The checked configuration of a serving daxd, made from the command line
//! (`TryFrom<Args>`), so that everything below the binary gets typed values, never option
//! strings.

use std::path::PathBuf;
use std::time::Duration;

use daxd_blk::Serial;
use daxd_fault::RuleSpec;
use daxd_region::{Layout, RegionConfig, Window};
use daxd_vhost_user::SocketAddr;

use crate::args::Args;
use crate::error::Error;
use crate::systemd;

/// Everything `daxd` needs to serve a region.
#[derive(Debug, Clone)]
pub struct Config {
    pub region: RegionConfig,
    pub windows: Vec<Window>,
    pub allow_overlap: bool,
    /// The blk device's socket.
    pub socket: SocketAddr,
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    pub sync: bool,
    /// `None`: derived from the region file.
    pub serial: Option<Serial>,
    pub poll: Duration,
    pub pmem_socket: Option<SocketAddr>,
    pub pmem_window: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_socket_mode: u32,
    /// Fault rules from the start.
    pub faults: Vec<RuleSpec>,
    /// Where the disk's crash states are recorded (`--record`).
    pub record: Option<PathBuf>,
    pub seccomp: daxd_confine::Mode,
    pub sandbox: daxd_confine::sandbox::SandboxMode,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Config, Error> {
        let path = args.region.ok_or(Error::Missing("--region"))?;
        let socket = match (
            args.socket_path,
            args.fd,
            systemd::find(&args.activated, systemd::BLK),
        ) {
            (_, Some(fd), _) => SocketAddr::Fd(fd),
            (Some(path), None, _) => SocketAddr::Path(path),
            (None, None, Some(fd)) => SocketAddr::Fd(fd),
            (None, None, None) => {
                return Err(Error::Missing(
                    "--socket-path or --fd (or a socket from systemd socket activation)",
                ))
            }
        };
        let pmem_socket = args
            .pmem_socket_path
            .map(SocketAddr::Path)
            .or_else(|| systemd::find(&args.activated, systemd::PMEM).map(SocketAddr::Fd));
        if args.pmem_window.is_some() && pmem_socket.is_none() {
            return Err(Error::Missing(
                "--pmem-socket-path (or a systemd socket named pmem) for --pmem-window",
            ));
        }
        let serial = args
            .serial
            .as_deref()
            .map(Serial::new)
            .transpose()
            .map_err(Error::Blk)?;
        Ok(Config {
            region: RegionConfig {
                path,
                size: args.size,
                resize: args.resize,
                read_only: args.read_only,
                direct: args.direct,
                lock: !args.no_lock,
                write_path: args.write_path.into(),
                flush_path: args.flush_path.into(),
            },
            windows: args.windows,
            allow_overlap: args.allow_overlap,
            socket,
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            read_only: args.read_only,
            sync: args.sync,
            serial,
            poll: Duration::from_micros(args.poll_us),
            pmem_socket,
            pmem_window: args.pmem_window,
            control_socket: args.control_socket,
            control_socket_mode: args.control_socket_mode,
            faults: args.faults,
            record: args.record,
            seccomp: args.seccomp.into(),
            sandbox: args.sandbox.into(),
        })
    }
}

impl Config {
    /// The windows checked against a region of `size` bytes.
    pub fn layout(&self, size: u64) -> Result<Layout, Error> {
        Layout::new(size, self.windows.clone(), self.allow_overlap).map_err(Error::Layout)
    }

    /// The window `--pmem-socket-path` serves.
    pub fn pmem_window<'a>(&self, layout: &'a Layout) -> Result<&'a Window, Error> {
        match &self.pmem_window {
            Some(name) => layout
                .pmem()
                .find(|w| &w.name == name)
                .ok_or_else(|| Error::NoSuchPmemWindow(name.clone())),
            None => {
                let mut pmem = layout.pmem();
                match (pmem.next(), pmem.next()) {
                    (Some(w), None) => Ok(w),
                    (None, _) => Err(Error::NoPmemWindow),
                    (Some(_), Some(_)) => Err(Error::SeveralPmemWindows),
                }
            }
        }
    }
}
