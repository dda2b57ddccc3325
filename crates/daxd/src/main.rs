//! daxd: parses the command line into a configuration, opens the region, and serves it.
//!
//! Threads: the main thread runs an event loop for the daemon's own events (signals);
//! one thread accepts vhost-user connections for the blk device, and the vhost-user
//! library runs one worker per queue.

mod args;
mod control;
mod qemu_args;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;

use daxd_blk::{BlkDevice, Serial};
use daxd_pmem::PmemDevice;
use daxd_region::{Layout, Region, Window};
use daxd_registry::Registry;
use daxd_vhost_user::SocketAddr;

use args::{Args, Cli, Command, PrintArgs, CAPABILITIES};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Inspect(inspect)) => {
            control::inspect(&inspect.control_socket, inspect.json).map(|text| print!("{text}"))
        }
        Some(Command::PrintQemuArgs(print)) => print_qemu_args(print),
        None if cli.serve.print_capabilities => {
            println!("{CAPABILITIES}");
            Ok(())
        }
        None => run(&cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn print_qemu_args(print: &PrintArgs) -> Result<(), String> {
    let args = &print.serve;
    let path = args.region.clone().ok_or("--region is required")?;
    let size = match (std::fs::metadata(&path), args.size) {
        (Ok(meta), _) => meta.len(),
        (Err(_), Some(size)) => size,
        (Err(e), None) => {
            return Err(format!(
                "{}: {e}; pass --size for a file daxd will create",
                path.display()
            ))
        }
    };
    let layout =
        Layout::new(size, args.windows.clone(), args.allow_overlap).map_err(|e| e.to_string())?;
    // QEMU runs elsewhere: give it an absolute path.
    let absolute = std::path::absolute(&path).map_err(|e| e.to_string())?;
    print!(
        "{}",
        qemu_args::qemu_args(args, &layout, &absolute, print.guest_ram)
    );
    Ok(())
}

/// The window `--pmem-socket-path` serves.
pub(crate) fn pmem_window<'a>(args: &Args, layout: &'a Layout) -> Result<&'a Window, String> {
    match &args.pmem_window {
        Some(name) => layout
            .pmem()
            .find(|w| &w.name == name)
            .ok_or_else(|| format!("--pmem-window {name}: no pmem window of that name")),
        None => {
            let mut pmem = layout.pmem();
            match (pmem.next(), pmem.next()) {
                (Some(w), None) => Ok(w),
                (None, _) => Err("--pmem-socket-path needs a window with serve=pmem or serve=both".into()),
                (Some(_), Some(_)) => Err("several pmem windows: say which one --pmem-socket-path serves with --pmem-window".into()),
            }
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    // Registered before any thread starts, so no thread dies on SIGINT/SIGTERM.
    let signals = SignalPipe::new()?;

    let region = Arc::new(Region::open(&args.region_config()).map_err(|e| e.to_string())?);
    let layout = Arc::new(
        Layout::new(region.size(), args.windows.clone(), args.allow_overlap)
            .map_err(|e| e.to_string())?,
    );
    let registry = Arc::new(Registry::new(region.frames()));
    let identity = region.identity();
    let blk_config = args
        .blk_config(Serial::for_file(region.path(), identity.ino))
        .map_err(|e| e.to_string())?;
    let disk = layout.blk().ok_or(
        "no window is served as blk; add serve=blk or serve=both to one: QEMU's memory table, \
         through which daxd sees pmem windows, reaches daxd over the disk's socket",
    )?;
    let device = Arc::new(
        BlkDevice::new(region.clone(), registry.clone(), disk, blk_config)
            .map_err(|e| e.to_string())?,
    );
    for w in layout.pmem() {
        info!(
            "pmem window {}: region bytes {:#x}+{:#x} (QEMU options: daxd print-qemu-args)",
            w.name, w.offset, w.size
        );
    }
    let pmem = match &args.pmem_socket_path {
        Some(path) => {
            let window = pmem_window(args, &layout)?.clone();
            let listener = daxd_vhost_user::listen(&SocketAddr::Path(path.clone()))
                .map_err(|e| e.to_string())?;
            info!(
                "serving pmem window {} as vhost-user virtio-pmem on {}",
                window.name,
                path.display()
            );
            let device = Arc::new(PmemDevice::new(region.clone(), registry.clone(), window));
            Some((listener, device, path.clone()))
        }
        None => None,
    };
    let control = args
        .control_socket
        .as_ref()
        .map(|path| {
            control::ControlSocket::bind(path, region.clone(), layout.clone(), registry.clone())
        })
        .transpose()?;

    let socket = args.socket();
    let mut listener = daxd_vhost_user::listen(&socket).map_err(|e| e.to_string())?;
    let socket_path = match &socket {
        SocketAddr::Path(path) => Some(path.clone()),
        SocketAddr::Fd(_) => None,
    };
    info!(
        "serving {} (window {}: {} of {} bytes{}{}) as virtio-blk on {}: {} queue(s) of up to {}, serial {}{}",
        region.path().display(),
        disk.name,
        device.size(),
        region.size(),
        if region.is_read_only() {
            ", read-only"
        } else {
            ""
        },
        if region.is_map_sync() {
            ", MAP_SYNC"
        } else {
            ""
        },
        match &socket {
            SocketAddr::Path(path) => path.display().to_string(),
            SocketAddr::Fd(fd) => format!("inherited fd {fd}"),
        },
        device.config().num_queues,
        device.config().queue_size,
        device.config().serial,
        if device.config().sync {
            ", write-through"
        } else {
            ""
        },
    );

    let server_socket = socket_path.clone();
    let server_layout = layout.clone();
    let poll = std::time::Duration::from_micros(args.poll_us);
    std::thread::Builder::new()
        .name("daxd-blk-accept".into())
        .spawn(move || {
            if let Err(e) = daxd_vhost_user::serve_blk(&mut listener, device, server_layout, poll) {
                error!("blk device stopped: {e}");
                remove_socket(server_socket.as_ref());
                std::process::exit(1);
            }
        })
        .map_err(|e| format!("cannot start the blk server thread: {e}"))?;

    let pmem_socket = pmem.as_ref().map(|(_, _, path)| path.clone());
    if let Some((mut listener, device, path)) = pmem {
        std::thread::Builder::new()
            .name("daxd-pmem-accept".into())
            .spawn(move || {
                if let Err(e) = daxd_vhost_user::serve_pmem(&mut listener, device) {
                    error!("pmem device stopped: {e}");
                    remove_socket(Some(&path));
                    std::process::exit(1);
                }
            })
            .map_err(|e| format!("cannot start the pmem server thread: {e}"))?;
    }

    let shutdown = signals.requested.clone();
    let mut events = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    events.add_subscriber(Box::new(signals));
    let control_path = control.as_ref().map(|c| c.path().to_owned());
    if let Some(control) = control {
        info!("answering `daxd inspect` on {}", control.path().display());
        events.add_subscriber(Box::new(control));
    }
    while !shutdown.load(Ordering::Acquire) {
        events
            .run()
            .map_err(|e| format!("event loop failed: {e}"))?;
    }

    info!("shutting down: flushing {}", region.path().display());
    let flushed = region.flush();
    remove_socket(socket_path.as_ref());
    remove_socket(control_path.as_ref());
    remove_socket(pmem_socket.as_ref());
    // Queue workers may be mid-request; the process exits under them. Every request they
    // acknowledged is in the file (the mapping is the page cache) and flushed above.
    match flushed {
        Ok(()) => {
            info!("region flushed; exiting");
            std::process::exit(0)
        }
        Err(e) => Err(format!(
            "flushing {} failed: {e}; recent writes may not be durable",
            region.path().display()
        )),
    }
}

fn remove_socket(path: Option<&PathBuf>) {
    if let Some(path) = path {
        if let Err(e) = std::fs::remove_file(path) {
            warn!("cannot remove socket {}: {e}", path.display());
        }
    }
}

/// SIGINT and SIGTERM, delivered as bytes on a socket pair so the event loop can wait for
/// them next to its other events.
struct SignalPipe {
    read: UnixStream,
    requested: Arc<AtomicBool>,
}

impl SignalPipe {
    fn new() -> Result<SignalPipe, String> {
        let (read, write) =
            UnixStream::pair().map_err(|e| format!("cannot create signal pipe: {e}"))?;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let write = write
                .try_clone()
                .map_err(|e| format!("cannot create signal pipe: {e}"))?;
            signal_hook::low_level::pipe::register(signal, write)
                .map_err(|e| format!("cannot handle signal {signal}: {e}"))?;
        }
        read.set_nonblocking(true)
            .map_err(|e| format!("cannot create signal pipe: {e}"))?;
        Ok(SignalPipe {
            read,
            requested: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl MutEventSubscriber for SignalPipe {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut buf = [0u8; 16];
        while matches!(self.read.read(&mut buf), Ok(n) if n > 0) {}
        info!("received a termination signal");
        self.requested.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.read, EventSet::IN)) {
            error!("cannot watch for signals: {e}");
        }
    }
}
