//! Command line. Option names follow vhost-user.rst "Backend program conventions" where
//! one exists (`--socket-path`, `--fd`, `--print-capabilities`, `--blk-file`,
//! `--read-only`), so libvirt and other supervisors can start daxd like any backend.

use std::os::fd::RawFd;
use std::path::PathBuf;

use clap::{ArgGroup, Args as ClapArgs, Parser, Subcommand};

use daxd_fault::RuleSpec;
use daxd_region::{Serve, Window};

/// The command line: serve (no subcommand), or one of the helper commands.
#[derive(Debug, Parser)]
#[command(
    name = "daxd",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
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
Set RUST_LOG (error, warn, info, debug, trace) to change how much is logged (default info)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Args,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a running daxd's windows, guest-visible mappings, page descriptors (mapped,
    /// pinned, dirty), busy ranges and flush epochs, read from its --control-socket.
    Inspect(InspectArgs),
    /// Grow a running daxd's disk while a guest uses it: the disk window grows inside the
    /// region (which must be large enough: start daxd with a larger --size and the disk as
    /// a --window), and the frontend is told (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), so the
    /// guest sees the new capacity without a reboot. Disks never shrink while served; a
    /// window also served as pmem never changes size.
    Resize(ResizeArgs),
    /// Print the QEMU options that attach this configuration's disk and pmem windows
    /// (same options as serving; nothing is opened or created).
    PrintQemuArgs(Box<PrintArgs>),
    /// Print the system calls each kind of daxd thread may make under --seccomp.
    PrintSeccomp,
    /// Make a running daxd's storage fail on purpose: add, list and clear fault rules
    /// (see --fault for the rule syntax). Rules act on requests from the next one on.
    #[command(subcommand)]
    Fault(FaultCommand),
    /// Set a named mark in a running daxd: fault rules with after=NAME act from then on,
    /// and a --record log notes it (a mark set after a guest's fsync returned tells
    /// crash-states checkers what every later state must hold).
    Mark(MarkArgs),
    /// Check what a host power cut may leave of a disk recorded with --record: make each
    /// crash state the recording allows as an image file and run a checker on it. The
    /// states: the disk as recording began; every FLUSH point (everything stored before
    /// the FLUSH, nothing after); and, between two FLUSH points and after the last,
    /// --samples states in which every 4 KiB block written since the earlier point holds
    /// one of the versions written to it or its old content, chosen from --seed. Stops at
    /// the first state the checker fails and says how to make that state again.
    CrashStates(CrashStatesArgs),
}

#[derive(Debug, ClapArgs)]
pub struct CrashStatesArgs {
    /// The --record directory of a daxd that has stopped.
    #[arg(long, value_name = "DIR")]
    pub record: PathBuf,
    /// Which recorded device: the disk, or a pmem window by name (recorded when daxd
    /// serves its virtio-pmem FLUSH, --pmem-socket-path: the state at each FLUSH, and
    /// samples of the pages changed between two).
    #[arg(long, value_name = "NAME", default_value = "disk")]
    pub device: String,
    /// The checker: a shell command run for each state, with {} replaced by the state's
    /// image file; an exit status other than 0 fails the state. For ext4, recover the
    /// journal as a mount would, then check: 'e2fsck -p -E journal_only {}; e2fsck -fn
    /// {}'. Its environment has DAXD_STATE (the state's number), DAXD_STATE_KIND (start,
    /// flush:N or sample:N:M, the Mth sample after FLUSH point N) and DAXD_MARKS (the
    /// marks the state must honour, one per line: those set before the FLUSH point after
    /// the last one the state includes).
    #[arg(long, value_name = "COMMAND", required_unless_present = "out")]
    pub check: Option<String>,
    /// Sampled states between two FLUSH points (and after the last).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub samples: u32,
    /// Seed of the samples: the same seed gives the same states.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// Stop after this many states.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_states: u64,
    /// Where states are made, one at a time (about twice the disk's allocated size);
    /// default: DIR/states.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Make only state N (with the same --samples and --seed as the run that reported
    /// it) and copy its image to --out, to look at it; no checker runs.
    #[arg(long, value_name = "N", requires = "out")]
    pub state: Option<u64>,
    /// Where --state puts the image.
    #[arg(long, value_name = "PATH", requires = "state")]
    pub out: Option<PathBuf>,
    /// Check every state, also after one fails.
    #[arg(long)]
    pub keep_going: bool,
}

#[derive(Debug, Subcommand)]
pub enum FaultCommand {
    /// Add a rule; prints its number.
    Add(FaultAddArgs),
    /// List the rules with their hits (requests each acted on).
    List(FaultListArgs),
    /// Remove one rule (by number) or all (--all); requests they hold complete.
    Clear(FaultClearArgs),
}

#[derive(Debug, ClapArgs)]
pub struct FaultAddArgs {
    /// The --control-socket of the daxd.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// The rule, in the short form or as JSON (see --fault).
    #[arg(value_name = "RULE", value_parser = parse_rule)]
    pub rule: RuleSpec,
}

#[derive(Debug, ClapArgs)]
pub struct FaultListArgs {
    /// The --control-socket of the daxd.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, ClapArgs)]
#[command(group(ArgGroup::new("which").args(["id", "all"]).required(true)))]
pub struct FaultClearArgs {
    /// The --control-socket of the daxd.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// The rule's number (from `fault add` or `fault list`).
    #[arg(value_name = "RULE")]
    pub id: Option<u64>,
    /// Every rule.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, ClapArgs)]
pub struct MarkArgs {
    /// The --control-socket of the daxd.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// The mark: 1 to 64 letters, digits, '-', '_' or '.'.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `--sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxArg {
    Auto,
    Namespace,
    None,
}

impl From<SandboxArg> for daxd_confine::sandbox::SandboxMode {
    fn from(arg: SandboxArg) -> daxd_confine::sandbox::SandboxMode {
        match arg {
            SandboxArg::Auto => daxd_confine::sandbox::SandboxMode::Auto,
            SandboxArg::Namespace => daxd_confine::sandbox::SandboxMode::Namespace,
            SandboxArg::None => daxd_confine::sandbox::SandboxMode::None,
        }
    }
}

/// `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompArg {
    Kill,
    Trap,
    Log,
    None,
}

impl From<SeccompArg> for daxd_confine::Mode {
    fn from(arg: SeccompArg) -> daxd_confine::Mode {
        match arg {
            SeccompArg::Kill => daxd_confine::Mode::Kill,
            SeccompArg::Trap => daxd_confine::Mode::Trap,
            SeccompArg::Log => daxd_confine::Mode::Log,
            SeccompArg::None => daxd_confine::Mode::None,
        }
    }
}

#[derive(Debug, ClapArgs)]
pub struct PrintArgs {
    #[command(flatten)]
    pub serve: Args,
    /// Guest RAM size to put in the printed -m and memory-backend options.
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub guest_ram: u64,
}

#[derive(Debug, ClapArgs)]
pub struct InspectArgs {
    /// The --control-socket of the daxd to inspect.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// Print JSON instead of tables (the `Inspection` type; its `blk` counters carry a
    /// schema `version`).
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,
    /// Print the counters in Prometheus text exposition format (for a node exporter's
    /// textfile collector or a scrape wrapper).
    #[arg(long)]
    pub prometheus: bool,
}

#[derive(Debug, ClapArgs)]
pub struct ResizeArgs {
    /// The --control-socket of the daxd whose disk grows.
    #[arg(long, value_name = "PATH")]
    pub control_socket: PathBuf,
    /// The disk's new size, with optional K/M/G/T suffix (powers of 1024), a multiple of
    /// 4 KiB, at least its current size.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    pub size: u64,
}

/// Options of the daxd that serves a region.
#[derive(Debug, Clone, ClapArgs)]
#[command(group(ArgGroup::new("socket").args(["socket_path", "fd"])))]
pub struct Args {
    /// Backing file of the region: a regular file (created sparse when missing if --size
    /// is given; on a DAX file system it is mapped with MAP_SYNC), a block device (claimed
    /// with O_EXCL; its size and block sizes come from the device), or a device-DAX device
    /// (/dev/daxX.Y; its size and alignment come from sysfs, and only a mapping reaches it).
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
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Grow or shrink an existing region file to --size. Shrinking discards the tail.
    #[arg(long, requires = "size")]
    pub resize: bool,

    /// Serve read-only: the file is opened and mapped read-only, the disk reports
    /// VIRTIO_BLK_F_RO, and writes, discards and write-zeroes fail with IOERR.
    #[arg(long)]
    pub read_only: bool,

    /// Write-through: every write, discard and write-zeroes is durable on the host
    /// (fdatasync of the region file) before it completes. The disk then offers no FLUSH and the guest
    /// sees a write-through cache. Without it, a write is durable once a later FLUSH
    /// completes (the guest sees a write-back cache).
    #[arg(long)]
    pub sync: bool,

    /// Require a synchronous DAX mapping (MAP_SYNC) of the region: the file must be on a
    /// DAX file system (host persistent memory), so data never sits in the host page
    /// cache. daxd refuses to start when the file system cannot do it.
    #[arg(long)]
    pub direct: bool,

    /// How writes into the region's allocated blocks reach the file. map: stores through
    /// the shared mapping (no system call per write; but a store into a page that a FLUSH
    /// cleaned faults, one into a page not in the page cache reads it from the disk first,
    /// and a store dirties the whole page-cache folio it lands in, which a FLUSH then
    /// writes back whole: up to 2 MiB for 4 KiB written in an image copied in with `cp`).
    /// pwrite: pwrite(2) from guest memory (a system call per write; dirties only the
    /// blocks written). auto: whichever FLUSHes show to be cheaper, looked at once a second
    /// at most: pwrite while the pages dirty at a FLUSH are at least half the bytes written
    /// since the previous one, the mapping again once they fall under a quarter (pages
    /// rewritten between FLUSHes); the mapping without FLUSHes. Durability is the same for
    /// all three.
    #[arg(long, value_enum, default_value_t = WritePathArg::Auto, value_name = "PATH")]
    pub write_path: WritePathArg,

    /// How a FLUSH makes writes durable where the region is mapped synchronously (a file
    /// on a DAX file system, which daxd maps with MAP_SYNC, or a device-DAX device). auto:
    /// daxd writes back the cache lines of the pages it stored into since the previous
    /// FLUSH (clwb, clflushopt or clflush; dc cvap or dc cvac), plus an fdatasync only when
    /// a request changed the file's blocks. fdatasync: the kernel's path, an fdatasync of
    /// the file (not on device-DAX). Elsewhere a FLUSH is always an fdatasync.
    #[arg(long, value_enum, default_value_t = FlushPathArg::Auto, value_name = "PATH")]
    pub flush_path: FlushPathArg,

    /// Do not lock the region file. By default a writable daxd holds an exclusive lock on
    /// it and a read-only one a shared lock (open file description locks, as QEMU's image
    /// locking), so a second writer (another daxd, a qemu-storage-daemon export) is
    /// refused. Only for a file that nothing else can change while daxd serves it.
    #[arg(long)]
    pub no_lock: bool,

    /// Path of the UNIX socket to create for the blk device (vhost-user server side).
    /// Not needed when systemd passes the socket (socket activation: the socket named
    /// "blk", or the only one).
    #[arg(long, value_name = "PATH")]
    pub socket_path: Option<PathBuf>,

    /// Serve the blk device on this inherited, already bound and listening UNIX socket
    /// instead of creating one.
    #[arg(long, value_name = "FD")]
    pub fd: Option<RawFd>,

    /// Number of request queues of the disk; one worker thread serves each. QEMU's
    /// vhost-user-blk-pci defaults to one queue per vCPU: pass it num-queues=N to match.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,

    /// Largest queue size the frontend may choose (a power of two, 2..=32768), for the
    /// disk's queues and the virtio-pmem device's queue alike.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Upper bound of each queue's adaptive polling, in microseconds. After a queue runs
    /// empty its worker keeps watching it for a window that grows while the guest keeps
    /// coming back within the bound and shrinks to nothing when it does not (as QEMU's
    /// iothreads poll): a busy queue is served without notifications on either side, an
    /// idle one costs at most one window after its last request. 0 turns polling off.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 50)]
    pub poll_us: u64,

    /// Serial number the guest reads (at most 20 bytes, /sys/block/vdX/serial). Default:
    /// derived from the region file's path and inode, so it stays the same across
    /// restarts for the same file.
    #[arg(long, value_name = "TEXT")]
    pub serial: Option<String>,

    /// Carve the region into named windows, each served as the disk, as persistent
    /// memory, or both: name=NAME,offset=SIZE,size=SIZE,serve=blk|pmem|both (repeatable).
    /// Pmem windows are 2 MiB aligned and sized; at most one window is the disk. Without
    /// --window the whole region is the disk. `daxd print-qemu-args` prints the QEMU
    /// options for each window.
    #[arg(long = "window", value_name = "OPTIONS", value_parser = parse_window)]
    pub windows: Vec<Window>,

    /// Let windows share bytes (e.g. a disk over the whole region and a pmem window
    /// inside it). daxd then refuses, per request, to discard or zero bytes the guest has
    /// mapped or pinned.
    #[arg(long)]
    pub allow_overlap: bool,

    /// Also serve a pmem window as a vhost-user virtio-pmem device on this socket (QEMU >=
    /// 11.1: -device vhost-user-test-device-pci,chardev=...,virtio-id=27,num_vqs=1,config_size=16).
    /// Under systemd socket activation, a socket named "pmem" does the same.
    /// daxd maps the window into the device's shared memory itself. With QEMU 10.0, leave
    /// this out and let QEMU map the window from the file (see print-qemu-args).
    #[arg(long, value_name = "PATH")]
    pub pmem_socket_path: Option<PathBuf>,

    /// The window the --pmem-socket-path device serves (default: the only pmem window).
    #[arg(long, value_name = "NAME")]
    pub pmem_window: Option<String>,

    /// How daxd confines itself once the region and its sockets are open: namespace (a
    /// mount namespace whose read-only root holds only the directories of daxd's sockets
    /// and systemd's notification socket, a network and an IPC namespace of its own, every
    /// capability dropped, at most 4096 open files; as root, or as another user where
    /// unprivileged user namespaces are allowed), none, or auto (namespace where the host
    /// allows it, otherwise a warning and none).
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SandboxArg::Auto)]
    pub sandbox: SandboxArg,

    /// What a thread's system call outside its seccomp allow-list does: kill (end the
    /// process), trap (print the call's number and thread, then end the process), log
    /// (let it through; the kernel logs it: "audit: type=1326 ... syscall=N" in dmesg or
    /// journalctl -k), none (no filters). Each kind of thread (main, server, vhost-user
    /// handler, queue worker, flusher, pmem mapper) installs its own list before it
    /// handles anything a frontend or guest sent; `daxd print-seccomp` prints the lists.
    #[arg(long, value_name = "ACTION", value_enum, default_value_t = SeccompArg::Kill)]
    pub seccomp: SeccompArg,

    /// UNIX socket on which daxd answers `daxd inspect`, `daxd resize`, `daxd fault` and
    /// `daxd mark`. Whoever can connect to it can make the guest's storage fail or return
    /// corrupted data: it is created with --control-socket-mode (owner only by default).
    /// Neither a guest nor a vhost-user frontend can reach it.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Permission bits of the --control-socket file, in octal (e.g. 660 to let the
    /// socket's group in too).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode)]
    pub control_socket_mode: u32,

    /// A fault rule set from the start (repeatable; `daxd fault` changes them at run time).
    /// Short form: comma-separated key=value fields, e.g.
    /// op=read,sectors=2048..4096,action=fail. Keys: device=disk|PMEM-WINDOW (default
    /// disk; a pmem window served on --pmem-socket-path matches op=pmem-flush),
    /// op=any|read|write|flush|discard|write-zeroes|get-id|pmem-flush, sectors=START..END
    /// (end exclusive) or sectors=N, queue=N, when=always|once|nth:N|every:N|times:N|
    /// probability:P (with seed=S: reproducible), after=MARK (acts only once `daxd mark
    /// MARK` was set), action= one of: fail, fail:ioerr or fail:unsupp (complete with that
    /// status, touch nothing); delay:TIME (e.g. 20ms; the queue keeps serving); hold
    /// (complete only when the rule is cleared); drop (acknowledge a write, discard,
    /// write-zeroes or FLUSH without doing it); corrupt, corrupt:OFFSET or
    /// corrupt:OFFSET:MASK (XOR byte OFFSET of the rule's sectors, default 0, with MASK,
    /// default 0xff, in what reads return or writes store); bad-blocks (dm-dust: reads of
    /// the sectors fail until written; needs sectors=). A rule can also be given as JSON
    /// (docs/faults.md). The first rule that acts on a request decides.
    #[arg(long = "fault", value_name = "RULE", value_parser = parse_rule)]
    pub faults: Vec<RuleSpec>,

    /// Record what a host power cut may leave of the disk, for `daxd crash-states`: DIR
    /// (created if missing) gets disk.base, the disk as daxd starts (holes kept), and
    /// disk.log, every write, discard and write-zeroes daxd stores, every FLUSH it makes
    /// durable and every mark `daxd mark` sets, in the order they happen, in
    /// dm-log-writes' format. Files of an earlier recording there are replaced. Costs a
    /// copy of every byte written, and the disk's queues take turns at the log.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,

    /// Print the backend's capabilities as JSON (vhost-user.rst) and exit.
    #[arg(long)]
    pub print_capabilities: bool,

    /// Sockets systemd passed (socket activation), with their names; read from the
    /// environment, not the command line.
    #[arg(skip)]
    pub activated: Vec<(RawFd, String)>,
}

/// Parses a fault rule (short form or JSON).
pub fn parse_rule(text: &str) -> Result<RuleSpec, String> {
    RuleSpec::parse(text).map_err(|e| e.to_string())
}

/// Parses permission bits in octal.
pub fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not permission bits in octal (e.g. 600)"))
}

/// Parses a `--window` option: `name=NAME,offset=SIZE,size=SIZE,serve=blk|pmem|both`.
/// `offset` defaults to 0; the name is also the QEMU object id print-qemu-args uses.
pub fn parse_window(text: &str) -> Result<Window, String> {
    let (mut name, mut offset, mut size, mut serve) = (None, None, None, None);
    for part in text.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        match key {
            "name" => {
                if value.is_empty()
                    || !value
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(format!("name {value:?}: use letters, digits, - or _"));
                }
                name = Some(value.to_owned());
            }
            "offset" => offset = Some(parse_size(value)?),
            "size" => size = Some(parse_size(value)?),
            "serve" => {
                serve = Some(match value {
                    "blk" => Serve::Blk,
                    "pmem" => Serve::Pmem,
                    "both" => Serve::Both,
                    other => return Err(format!("serve={other}: use blk, pmem or both")),
                })
            }
            other => {
                return Err(format!(
                    "unknown key {other:?}; keys are name, offset, size and serve"
                ))
            }
        }
    }
    Ok(Window {
        name: name.ok_or("name= is missing")?,
        offset: offset.unwrap_or(0),
        size: size.ok_or("size= is missing")?,
        serve: serve.ok_or("serve= is missing")?,
    })
}

/// Parses a byte count with an optional binary unit suffix: `4096`, `512K`, `4G`, `1TiB`.
///
/// Units are powers of 1024 (`K`, `M`, `G`, `T`, optionally followed by `iB` or `B`),
/// case-insensitive, because disk images are sized in whole pages and gibibytes; decimal
/// units would give sizes that are not page multiples.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix (e.g. 4G)")
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits_end == 0 {
        return Err(invalid());
    }
    let number: u64 = trimmed[..digits_end].parse().map_err(|_| invalid())?;
    let shift = match trimmed[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid()),
    };
    number.checked_mul(1u64 << shift).ok_or_else(invalid)
}

/// vhost-user.rst: `{"type": "block", "features": [...]}` for vhost-user-blk backends; the
/// description file QEMU's tools find is resources/50-daxd.json.
pub const CAPABILITIES: &str = r#"{"type":"block","features":["read-only","blk-file"]}"#;

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// QEMU's docs/interop/vhost-user.json (10.0): the `VhostUserBackend` struct's members
    /// (`*` optional), the `VHostUserBackendType` values and the block features.
    const DESCRIPTION_MEMBERS: [&str; 4] = ["description", "type", "binary", "*tags"];
    const BACKEND_TYPES: [&str; 15] = [
        "9p",
        "balloon",
        "block",
        "caif",
        "console",
        "crypto",
        "gpu",
        "input",
        "net",
        "rng",
        "rpmsg",
        "rproc-serial",
        "scsi",
        "vsock",
        "fs",
    ];
    const BLOCK_FEATURES: [&str; 2] = ["read-only", "blk-file"];

    #[test]
    fn the_description_file_fits_qemus_schema_and_the_capabilities() {
        let text = include_str!("../../../resources/50-daxd.json");
        let description: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).unwrap();
        for (key, value) in &description {
            assert!(
                DESCRIPTION_MEMBERS.contains(&key.as_str())
                    || DESCRIPTION_MEMBERS.contains(&format!("*{key}").as_str()),
                "member {key} is not in QEMU's VhostUserBackend"
            );
            match key.as_str() {
                "tags" => assert!(value.as_array().unwrap().iter().all(|t| t.is_string())),
                _ => assert!(value.is_string(), "{key} must be a string"),
            }
        }
        for required in DESCRIPTION_MEMBERS.iter().filter(|m| !m.starts_with('*')) {
            assert!(description.contains_key(*required), "{required} missing");
        }
        let kind = description["type"].as_str().unwrap();
        assert!(BACKEND_TYPES.contains(&kind));
        // The path the install step puts daxd at, as the systemd unit starts it.
        assert_eq!(description["binary"], "/usr/local/bin/daxd");
        assert!(include_str!("../../../resources/systemd/daxd@.service")
            .contains("ExecStart=/usr/local/bin/daxd "));

        let capabilities: serde_json::Value = serde_json::from_str(CAPABILITIES).unwrap();
        assert_eq!(capabilities["type"], kind);
        let features = capabilities["features"].as_array().unwrap();
        assert!(!features.is_empty());
        for feature in features {
            assert!(BLOCK_FEATURES.contains(&feature.as_str().unwrap()));
        }
        // What the features promise, the command line takes (vhost-user.rst: --blk-file
        // and --read-only).
        let cli = Cli::try_parse_from([
            "daxd",
            "--blk-file",
            "disk.img",
            "--read-only",
            "--socket-path",
            "s.sock",
        ])
        .unwrap();
        assert!(cli.serve.read_only);
        assert_eq!(
            cli.serve.region.as_deref(),
            Some(std::path::Path::new("disk.img"))
        );
    }

    #[test]
    fn sizes_accept_plain_and_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        for bad in ["", "G", "-1G", "4X", "4 G B", "1.5G", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn windows_parse_from_option_strings() {
        assert_eq!(
            parse_window("name=pm0,offset=1G,size=256M,serve=pmem").unwrap(),
            Window {
                name: "pm0".into(),
                offset: 1 << 30,
                size: 256 << 20,
                serve: Serve::Pmem,
            }
        );
        assert_eq!(
            parse_window("name=a,size=1M,serve=both").unwrap().serve,
            Serve::Both
        );
        for bad in [
            "name=a,size=1M",
            "size=1M,serve=blk",
            "name=a b,size=1M,serve=blk",
            "name=a,size=1M,serve=disk",
            "name=a,size=1M,serve=blk,colour=red",
            "name=a,size=lots,serve=blk",
            "name",
        ] {
            assert!(parse_window(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_do_not_need_serving_options() {
        let cli =
            Cli::try_parse_from(["daxd", "inspect", "--control-socket", "c", "--json"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Inspect(InspectArgs { json: true, .. }))
        ));
        let cli = Cli::try_parse_from([
            "daxd",
            "print-qemu-args",
            "--region",
            "r",
            "--socket-path",
            "s",
            "--window",
            "name=pm0,offset=0,size=2M,serve=pmem",
        ])
        .unwrap();
        let Some(Command::PrintQemuArgs(args)) = cli.command else {
            panic!()
        };
        assert_eq!(args.serve.windows[0].name, "pm0");
        assert_eq!(args.guest_ram, 1 << 30);
    }

    #[test]
    fn socket_path_and_fd_are_exclusive() {
        let err = Cli::try_parse_from(["daxd", "--region", "r", "--socket-path", "s", "--fd", "3"])
            .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn sizes_take_units_and_blk_file_is_an_alias() {
        let args = Cli::try_parse_from([
            "daxd",
            "--blk-file",
            "r.img",
            "--size",
            "4G",
            "--socket-path",
            "s",
        ])
        .unwrap()
        .serve;
        assert_eq!(args.size, Some(4 << 30));
        assert_eq!(args.region, Some(PathBuf::from("r.img")));
        assert!(
            Cli::try_parse_from(["daxd", "--region", "r", "--size", "4Q", "--fd", "3"]).is_err()
        );
    }
}

/// `--flush-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlushPathArg {
    Auto,
    Fdatasync,
}

impl From<FlushPathArg> for daxd_region::FlushPath {
    fn from(arg: FlushPathArg) -> Self {
        match arg {
            FlushPathArg::Auto => daxd_region::FlushPath::Auto,
            FlushPathArg::Fdatasync => daxd_region::FlushPath::Fdatasync,
        }
    }
}

/// `--write-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WritePathArg {
    Auto,
    Map,
    Pwrite,
}

impl From<WritePathArg> for daxd_region::WritePath {
    fn from(arg: WritePathArg) -> Self {
        match arg {
            WritePathArg::Auto => daxd_region::WritePath::Auto,
            WritePathArg::Map => daxd_region::WritePath::Map,
            WritePathArg::Pwrite => daxd_region::WritePath::Pwrite,
        }
    }
}
