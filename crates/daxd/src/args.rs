//! Command line. Option names follow vhost-user.rst "Backend program conventions" where
//! one exists (`--socket-path`, `--fd`, `--print-capabilities`, `--blk-file`,
//! `--read-only`), so libvirt and other supervisors can start daxd like any backend.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{ArgGroup, Parser};

use daxd_blk::{BlkConfig, BlkError, Serial};
use daxd_region::{parse_size, RegionConfig};
use daxd_vhost_user::SocketAddr;

#[derive(Debug, Parser)]
#[command(
    name = "daxd",
    version,
    about = "Serve one host file to a VM over vhost-user as a virtio-blk disk.",
    long_about = "Serve one host file (the region) to a VM over vhost-user as a virtio-blk \
disk. Requests are served straight from a shared mapping of the file: no read/write system \
calls on the data path.\n\n\
QEMU: -chardev socket,id=blk0,path=SOCK -device vhost-user-blk-pci,chardev=blk0,num-queues=N \
(guest RAM must be shared: -object memory-backend-memfd,id=mem,size=...,share=on \
-numa node,memdev=mem).\n\
cloud-hypervisor: --disk vhost_user=on,socket=SOCK,num_queues=N\n\n\
daxd keeps serving after a frontend disconnects, so the VMM can reconnect. SIGINT and \
SIGTERM make every acknowledged write durable, remove the socket and exit with status 0. \
Set RUST_LOG (error, warn, info, debug, trace) to change how much is logged (default info).",
    group(ArgGroup::new("socket").args(["socket_path", "fd"])),
)]
pub struct Args {
    /// Backing file of the region. Created (sparse) when missing if --size is given.
    #[arg(
        long,
        alias = "blk-file",
        value_name = "PATH",
        required_unless_present = "print_capabilities"
    )]
    pub region: Option<PathBuf>,

    /// Region size, with optional K/M/G/T suffix (powers of 1024), a multiple of 4 KiB.
    /// Creates a missing file with this size; an existing file of another size is an error
    /// unless --resize is given.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub size: Option<u64>,

    /// Grow or shrink an existing region file to --size. Shrinking discards the tail.
    #[arg(long, requires = "size")]
    pub resize: bool,

    /// Serve read-only: the file is opened and mapped read-only, the disk reports
    /// VIRTIO_BLK_F_RO, and writes, discards and write-zeroes fail with IOERR.
    #[arg(long)]
    pub read_only: bool,

    /// Write-through: every write, discard and write-zeroes is durable on the host
    /// (msync/fdatasync) before it completes. The disk then offers no FLUSH and the guest
    /// sees a write-through cache. Without it, a write is durable once a later FLUSH
    /// completes (the guest sees a write-back cache).
    #[arg(long)]
    pub sync: bool,

    /// Require a synchronous DAX mapping (MAP_SYNC) of the region: the file must be on a
    /// DAX file system (host persistent memory), so data never sits in the host page
    /// cache. daxd refuses to start when the file system cannot do it.
    #[arg(long)]
    pub direct: bool,

    /// Path of the UNIX socket to create for the blk device (vhost-user server side).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["fd", "print_capabilities"])]
    pub socket_path: Option<PathBuf>,

    /// Serve the blk device on this inherited, already bound and listening UNIX socket
    /// instead of creating one.
    #[arg(long, value_name = "FD")]
    pub fd: Option<RawFd>,

    /// Number of request queues of the disk; one worker thread serves each. QEMU's
    /// vhost-user-blk-pci defaults to one queue per vCPU: pass it num-queues=N to match.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest queue size the frontend may choose (a power of two, 2..=32768).
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Serial number the guest reads (at most 20 bytes, /sys/block/vdX/serial). Default:
    /// derived from the region file's path and inode, so it stays the same across
    /// restarts for the same file.
    #[arg(long, value_name = "TEXT")]
    pub serial: Option<String>,

    /// Print the backend's capabilities as JSON (vhost-user.rst) and exit.
    #[arg(long)]
    pub print_capabilities: bool,
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

impl Args {
    pub fn region_config(&self) -> RegionConfig {
        RegionConfig {
            path: self.region.clone().unwrap_or_default(),
            size: self.size,
            resize: self.resize,
            read_only: self.read_only,
            direct: self.direct,
        }
    }

    pub fn socket(&self) -> SocketAddr {
        match (&self.socket_path, self.fd) {
            (_, Some(fd)) => SocketAddr::Fd(fd),
            (Some(path), None) => SocketAddr::Path(path.clone()),
            (None, None) => unreachable!("clap requires --socket-path or --fd"),
        }
    }

    /// The blk device configuration; `default_serial` is used when --serial is absent.
    pub fn blk_config(&self, default_serial: Serial) -> Result<BlkConfig, BlkError> {
        Ok(BlkConfig {
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            read_only: self.read_only,
            sync: self.sync,
            serial: match &self.serial {
                Some(text) => Serial::new(text)?,
                None => default_serial,
            },
        })
    }
}

/// vhost-user.rst: `{"type": "block", "features": [...]}` for vhost-user-blk backends.
pub const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn socket_path_and_fd_are_exclusive() {
        let err =
            Args::try_parse_from(["daxd", "--region", "r", "--socket-path", "s", "--fd", "3"])
                .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn sizes_take_units_and_blk_file_is_an_alias() {
        let args = Args::try_parse_from([
            "daxd",
            "--blk-file",
            "r.img",
            "--size",
            "4G",
            "--socket-path",
            "s",
        ])
        .unwrap();
        assert_eq!(args.size, Some(4 << 30));
        assert_eq!(args.region, Some(PathBuf::from("r.img")));
        assert!(
            Args::try_parse_from(["daxd", "--region", "r", "--size", "4Q", "--fd", "3"]).is_err()
        );
    }
}
