//! daxd: parses the command line into a configuration, opens the region, and serves it.
//!
//! Threads: the main thread runs an event loop for the daemon's own events (signals, a
//! server thread ending, the control socket); one thread per vhost-user socket accepts
//! connections, and the vhost-user library runs one worker per queue. Shutdown stops the
//! servers, which joins every queue worker and flusher, and only then flushes the region.

mod args;
mod config;
mod control;
mod crash_states;
mod error;
mod qemu_args;
mod recording;
mod systemd;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use clap::Parser;
use daxd_confine::sandbox::SandboxMode;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::{error, info, warn};
use recording::Recording;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use arc_swap::ArcSwap;
use daxd_blk::{BlkConfig, BlkDevice, Serial};
use daxd_fault::Faults;
use daxd_pmem::PmemDevice;
use daxd_region::{Layout, Region, SharedLayout, Window};
use daxd_registry::Registry;
use daxd_vhost_user::{ConfigNotifier, ServeError, Server, SocketAddr, Stopper};

use args::{Cli, Command, FaultCommand, PrintArgs, CAPABILITIES};
use config::Config;
use error::Error;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut cli = Cli::parse();
    // Before any thread starts: it edits the environment.
    cli.serve.activated = match systemd::activated_sockets() {
        Ok(sockets) => sockets,
        Err(e) => {
            error!("{}", error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Inspect(inspect)) => {
            let format = match (inspect.json, inspect.prometheus) {
                (true, _) => control::Format::Json,
                (_, true) => control::Format::Prometheus,
                _ => control::Format::Tables,
            };
            control::inspect(&inspect.control_socket, format).map(|text| print!("{text}"))
        }
        Some(Command::Resize(resize)) => {
            control::resize(&resize.control_socket, resize.size).map(|text| print!("{text}"))
        }
        Some(Command::PrintQemuArgs(print)) => print_qemu_args(*print),
        Some(Command::Fault(FaultCommand::Add(add))) => {
            control::fault_add(&add.control_socket, add.rule).map(|text| print!("{text}"))
        }
        Some(Command::Fault(FaultCommand::List(list))) => {
            control::fault_list(&list.control_socket, list.json).map(|text| print!("{text}"))
        }
        Some(Command::Fault(FaultCommand::Clear(clear))) => {
            control::fault_clear(&clear.control_socket, clear.id).map(|text| print!("{text}"))
        }
        Some(Command::Mark(mark)) => {
            control::mark(&mark.control_socket, &mark.name).map(|text| print!("{text}"))
        }
        Some(Command::CrashStates(args)) => crash_states::run(&args),
        Some(Command::PrintSeccomp) => {
            print!("{}", seccomp_lists());
            Ok(())
        }
        None if cli.serve.print_capabilities => {
            println!("{CAPABILITIES}");
            Ok(())
        }
        None => Config::try_from(cli.serve).and_then(run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn print_qemu_args(print: PrintArgs) -> Result<(), Error> {
    let config = Config::try_from(print.serve)?;
    let path = &config.region.path;
    let (kind, size) = match (
        daxd_region::probe(path).map_err(Error::Region)?,
        config.region.size,
    ) {
        (Some(found), _) => found,
        (None, Some(size)) => (daxd_region::RegionKind::File, size),
        (None, None) => {
            return Err(Error::Region(daxd_region::RegionError::MissingFile {
                path: path.clone(),
            }))
        }
    };
    let layout = config.layout(size)?;
    layout
        .check_map_align(kind.map_align())
        .map_err(Error::Layout)?;
    // QEMU runs elsewhere: give it an absolute path.
    let absolute = std::path::absolute(path).map_err(Error::io("make the region path absolute"))?;
    print!(
        "{}",
        qemu_args::qemu_args(&config, &layout, &absolute, kind, print.guest_ram)
    );
    Ok(())
}

/// `daxd print-seccomp`: each kind of thread and the calls its filter allows.
fn seccomp_lists() -> String {
    let mut out = String::new();
    for kind in daxd_confine::ThreadKind::ALL {
        let names: Vec<&str> = kind
            .allowed()
            .into_iter()
            .map(|nr| daxd_confine::syscall_name(nr).unwrap_or("?"))
            .collect();
        out += &format!("{}: {}\n", kind.name(), names.join(" "));
    }
    out
}

/// Serves until SIGINT/SIGTERM or until a server fails.
fn run(config: Config) -> Result<(), Error> {
    // Registered before any thread starts, so no thread dies on SIGINT/SIGTERM.
    let signals = SignalPipe::new()?;
    let opened = Opened::open(&config)?;
    // Before any thread starts (they start serving in `serve`): a device-DAX region is
    // reached through its mapping alone, so its threads get no file calls at all, unless
    // a --record log needs them for its files.
    let io = match opened.region.kind() {
        daxd_region::RegionKind::DeviceDax(_) if config.record.is_none() => {
            daxd_confine::RegionIo::MappingOnly
        }
        _ => daxd_confine::RegionIo::SystemCalls,
    };
    daxd_confine::init(config.seccomp, io).map_err(Error::Confine)?;
    sandbox(config.sandbox, &opened)?;
    let status = format!(
        "serving {} on {}",
        opened.region.path().display(),
        describe(&config.socket)
    );
    // The signal pipe's handler runs on whichever thread takes the signal, and only the
    // main thread's filter allows its send: every other thread blocks SIGINT and SIGTERM,
    // as it inherits the mask the main thread has while it starts them.
    let termination = termination_signals();
    termination
        .thread_block()
        .map_err(|e| Error::io("block SIGINT and SIGTERM")(e.into()))?;
    let running = opened.serve(&config);
    termination
        .thread_unblock()
        .map_err(|e| Error::io("unblock SIGINT and SIGTERM")(e.into()))?;
    let running = running?;
    if let Err(e) = daxd_confine::enter(daxd_confine::ThreadKind::Main) {
        // Stopped as on SIGTERM (everything acknowledged made durable): an unconfined
        // daemon does not serve.
        if let Err(stopped) = running.shutdown() {
            error!("{}", error::chain(&stopped));
        }
        return Err(Error::Confine(e));
    }
    systemd::ready(&status);
    running.wait(signals)
}

/// Enters the sandbox (after everything daxd serves is open, before any thread starts),
/// keeping reachable the paths daxd still uses: its sockets' directories (removed or
/// connected to at shutdown) and systemd's notification socket.
fn sandbox(mode: SandboxMode, opened: &Opened) -> Result<(), Error> {
    if mode == SandboxMode::None {
        return Ok(());
    }
    let threads = std::fs::read_dir("/proc/self/task").map_or(1, |tasks| tasks.count());
    if threads != 1 {
        return Err(Error::ThreadsBeforeSandbox(threads));
    }
    let mut keep: Vec<PathBuf> = opened
        .sockets
        .iter()
        .map(PathBuf::as_path)
        .chain(opened.blk_server.inherited_path())
        .chain(opened.pmem.as_ref().and_then(|(_, s)| s.inherited_path()))
        .filter_map(|socket| absolute(socket).parent().map(Path::to_owned))
        .collect();
    if let Some(notify) = std::env::var_os("NOTIFY_SOCKET") {
        if !notify.as_encoded_bytes().starts_with(b"@") {
            keep.push(PathBuf::from(notify));
        }
    }
    keep.sort();
    keep.dedup();
    match daxd_confine::sandbox::enter(&keep) {
        Ok(()) => {
            info!(
                "sandbox: only {} reachable, no capabilities, at most {} open files",
                keep.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                daxd_confine::sandbox::MAX_OPEN_FILES
            );
            Ok(())
        }
        Err(e) if mode == SandboxMode::Auto && e.is_unsupported() => {
            warn!(
                "running without a sandbox: {}; --sandbox none silences this",
                error::chain(&e)
            );
            Ok(())
        }
        Err(e) => Err(Error::Sandbox(e)),
    }
}

fn termination_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set
}

/// `path` made absolute: the sandbox changes the working directory to its own root, and
/// shutdown removes the socket files by these paths.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// A socket as log lines name it.
fn describe(socket: &SocketAddr) -> String {
    match socket {
        SocketAddr::Path(path) => path.display().to_string(),
        SocketAddr::Fd(fd) => format!("inherited fd {fd}"),
    }
}

/// The fault rules of `config`, for the disk and the pmem window daxd serves (QEMU serves
/// the FLUSHes of the windows it maps itself).
fn fault_rules(config: &Config, pmem_window: Option<&Window>) -> Result<Arc<Faults>, Error> {
    let mut devices = vec![daxd_fault::DISK.to_owned()];
    devices.extend(pmem_window.map(|w| w.name.clone()));
    let faults = Arc::new(Faults::new(devices));
    for rule in &config.faults {
        let text = rule.to_string();
        let id = faults
            .add(rule.clone())
            .map_err(|source| Error::FaultRule {
                rule: text.clone(),
                source,
            })?;
        info!("fault rule {id}: {text}");
    }
    Ok(faults)
}

/// Gives every pmem window all its blocks (zeroes written into its holes) before anyone
/// maps it: a guest's DAX store into a hole would fault in the VMM when the host file
/// system is full.
fn allocate_pmem_windows(region: &Region, layout: &Layout) -> Result<(), Error> {
    for w in layout.pmem() {
        if !region.is_read_only() {
            region
                .fill_holes(w.offset, w.size)
                .map_err(|source| Error::PmemAllocation {
                    window: w.name.clone(),
                    source,
                })?;
        }
        info!(
            "pmem window {}: region bytes {:#x}+{:#x}, allocated (QEMU options: daxd print-qemu-args)",
            w.name, w.offset, w.size
        );
    }
    Ok(())
}

/// The disk: `disk` of the region as virtio-blk, recorded when `config` records.
fn open_disk(
    config: &Config,
    region: &Arc<Region>,
    registry: &Arc<Registry>,
    disk: &Window,
    faults: &Arc<Faults>,
    recording: &mut Recording,
) -> Result<Arc<BlkDevice>, Error> {
    let serial = config
        .serial
        .unwrap_or_else(|| Serial::for_file(region.path(), region.identity().ino));
    let blk_config = BlkConfig {
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        read_only: config.read_only,
        sync: config.sync,
        serial,
    };
    let mut blk = BlkDevice::new(region.clone(), registry.clone(), disk, blk_config)
        .map_err(Error::Blk)?
        .with_faults(faults.clone());
    if let Some(dir) = &config.record {
        let log = recording.record_disk(dir, region, disk)?;
        blk = blk.with_record(log);
    }
    Ok(Arc::new(blk))
}

/// Says what the disk serves, where, and how.
fn log_serving(config: &Config, region: &Region, disk: &Window, blk: &BlkDevice) {
    info!(
        "serving {} ({}, window {}: {} of {} bytes{}{}) as virtio-blk on {}: {} queue(s) of up to {}, serial {}{}",
        region.path().display(),
        region.kind().describe(),
        disk.name,
        blk.size(),
        region.size(),
        if region.is_read_only() { ", read-only" } else { "" },
        if region.is_map_sync() { ", MAP_SYNC" } else { "" },
        describe(&config.socket),
        blk.config().num_queues,
        blk.config().queue_size,
        blk.config().serial,
        if blk.config().sync { ", write-through" } else { "" },
    );
}

/// The virtio-pmem device daxd serves for `window`, recorded when `config` records.
fn open_pmem(
    config: &Config,
    region: &Arc<Region>,
    registry: &Arc<Registry>,
    window: Window,
    faults: &Arc<Faults>,
    recording: &mut Recording,
) -> Result<Arc<PmemDevice>, Error> {
    let mut device = PmemDevice::new(region.clone(), registry.clone(), window, config.queue_size)
        .map_err(Error::Pmem)?
        .with_faults(faults.clone());
    if let Some(dir) = &config.record {
        let recorder = recording.record_window(dir, region, device.window(), true)?;
        device = device.with_record(recorder);
    }
    Ok(Arc::new(device))
}

/// The region, its devices and their sockets, before any thread serves them.
struct Opened {
    region: Arc<Region>,
    layout: SharedLayout,
    /// The write logs, while recording.
    recording: Arc<Recording>,
    blk: Arc<BlkDevice>,
    notifier: Arc<ConfigNotifier>,
    blk_server: Server,
    pmem: Option<(Arc<PmemDevice>, Server)>,
    control: Option<control::ControlSocket>,
    /// Socket files daxd created and removes when it stops.
    sockets: Vec<PathBuf>,
}

impl Opened {
    fn open(config: &Config) -> Result<Opened, Error> {
        if let Some(size) = config.region.size {
            // Before the file is created or resized: a layout that cannot fit changes
            // nothing.
            config.layout(size)?;
        }
        let region = Arc::new(Region::open(&config.region).map_err(Error::Region)?);
        let layout: SharedLayout = Arc::new(ArcSwap::from_pointee(config.layout(region.size())?));
        let current = layout.load_full();
        current
            .check_map_align(region.kind().map_align())
            .map_err(Error::Layout)?;
        let registry = Arc::new(Registry::new(region.frames()));
        let disk = current.blk().ok_or(Error::NoDisk)?;
        // The devices rules may name: the disk, and the pmem window whose FLUSHes daxd
        // serves (QEMU serves those of the windows it maps itself).
        let pmem_window = match &config.pmem_socket {
            Some(_) => Some(config.pmem_window(&current)?.clone()),
            None => None,
        };
        let faults = fault_rules(config, pmem_window.as_ref())?;
        let mut recording = Recording::default();
        let blk = open_disk(config, &region, &registry, disk, &faults, &mut recording)?;
        allocate_pmem_windows(&region, &current)?;
        let notifier = Arc::new(ConfigNotifier::default());
        let mut sockets = Vec::new();
        let pmem = match (&config.pmem_socket, pmem_window) {
            (Some(addr), Some(window)) => {
                let pmem = open_pmem(config, &region, &registry, window, &faults, &mut recording)?;
                let server = Server::listen(addr, "pmem").map_err(|source| Error::Serve {
                    device: "pmem",
                    source,
                })?;
                if let SocketAddr::Path(path) = addr {
                    sockets.push(absolute(path));
                }
                info!(
                    "serving pmem window {} as vhost-user virtio-pmem on {}",
                    pmem.window().name,
                    describe(addr)
                );
                Some((pmem, server))
            }
            _ => None,
        };
        if let Some(dir) = &config.record {
            // The other pmem windows are QEMU's to map from the file and to flush.
            let served = pmem
                .as_ref()
                .map(|(device, _)| device.window().name.clone());
            for window in current.pmem() {
                if Some(&window.name) != served.as_ref() {
                    recording.record_window(dir, &region, window, false)?;
                }
            }
        }
        let recording = Arc::new(recording);
        let control = match &config.control_socket {
            Some(path) => {
                let control = control::ControlSocket::bind(
                    path,
                    config.control_socket_mode,
                    region.clone(),
                    layout.clone(),
                    registry.clone(),
                    blk.clone(),
                    notifier.clone(),
                )?
                .with_recording(recording.clone());
                sockets.push(absolute(path));
                Some(control)
            }
            None => None,
        };
        let blk_server = Server::listen(&config.socket, "blk").map_err(|source| Error::Serve {
            device: "blk",
            source,
        })?;
        if let SocketAddr::Path(path) = &config.socket {
            sockets.push(absolute(path));
        }
        log_serving(config, &region, disk, &blk);
        Ok(Opened {
            region,
            layout,
            recording,
            blk,
            notifier,
            blk_server,
            pmem,
            control,
            sockets,
        })
    }

    /// Starts one server thread per socket.
    fn serve(self, config: &Config) -> Result<Running, Error> {
        let exited = EventFd::new(EFD_NONBLOCK).map_err(Error::io("create an event fd"))?;
        let mut servers = Vec::new();
        let blk = self.blk;
        let layout = self.layout;
        let notifier = self.notifier;
        let poll = config.poll;
        servers.push(spawn_server(
            "blk",
            self.blk_server,
            &exited,
            move |server| server.serve_blk(blk, layout, notifier, poll),
        )?);
        if let Some((device, server)) = self.pmem {
            servers.push(spawn_server("pmem", server, &exited, move |server| {
                server.serve_pmem(device)
            })?);
        }
        Ok(Running {
            region: self.region,
            recording: self.recording,
            servers,
            exited,
            control: self.control,
            sockets: self.sockets,
        })
    }
}

/// A server thread and how to stop it.
struct ServerThread {
    device: &'static str,
    stopper: Stopper,
    thread: JoinHandle<Result<(), ServeError>>,
}

fn spawn_server(
    device: &'static str,
    server: Server,
    exited: &EventFd,
    serve: impl FnOnce(Server) -> Result<(), ServeError> + Send + 'static,
) -> Result<ServerThread, Error> {
    let stopper = server.stopper();
    let exited = exited.try_clone().map_err(Error::io("clone an event fd"))?;
    let thread = std::thread::Builder::new()
        .name(format!("daxd-{device}-accept"))
        .spawn(move || {
            let result = serve(server);
            // Wakes the main loop, which then stops everything.
            if let Err(e) = exited.write(1) {
                error!("cannot tell the main loop that the {device} server ended: {e}");
            }
            result
        })
        .map_err(Error::io("start a server thread"))?;
    Ok(ServerThread {
        device,
        stopper,
        thread,
    })
}

/// The serving daemon.
struct Running {
    region: Arc<Region>,
    recording: Arc<Recording>,
    servers: Vec<ServerThread>,
    exited: EventFd,
    control: Option<control::ControlSocket>,
    sockets: Vec<PathBuf>,
}

impl Running {
    /// Runs the event loop until a termination signal arrives or a server ends, then
    /// shuts down.
    fn wait(mut self, signals: SignalPipe) -> Result<(), Error> {
        let stop = signals.requested.clone();
        let mut events =
            EventManager::<Box<dyn MutEventSubscriber + Send>>::new().map_err(Error::EventLoop)?;
        events.add_subscriber(Box::new(signals));
        let exited = self
            .exited
            .try_clone()
            .map_err(Error::io("clone an event fd"))?;
        events.add_subscriber(Box::new(ServerExit {
            fd: exited,
            stop: stop.clone(),
        }));
        if let Some(control) = self.control.take() {
            info!("answering `daxd inspect` on {}", control.path().display());
            events.add_subscriber(Box::new(control));
        }
        while !stop.load(Ordering::Acquire) {
            if let Err(e) = events.run() {
                warn!("event loop: {e}");
            }
        }
        self.shutdown()
    }

    /// Stops every server (which joins their queue workers and flushers), then makes
    /// every acknowledged write durable and removes the sockets.
    fn shutdown(self) -> Result<(), Error> {
        info!("shutting down");
        systemd::stopping();
        for server in &self.servers {
            server.stopper.stop();
        }
        let mut failure = None;
        for server in self.servers {
            match server.thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    failure.get_or_insert(Error::Stopped {
                        device: server.device,
                        source,
                    });
                }
                Err(_) => {
                    failure.get_or_insert(Error::Panicked(server.device));
                }
            }
        }
        info!("flushing {}", self.region.path().display());
        let flushed = self.region.flush();
        for path in &self.sockets {
            if let Err(e) = std::fs::remove_file(path) {
                warn!("cannot remove socket {}: {e}", path.display());
            }
        }
        flushed.map_err(Error::Flush)?;
        // Every queue worker and flusher has been joined: nothing appends any more.
        self.recording.finish();
        info!("region flushed; exiting");
        failure.map_or(Ok(()), Err)
    }
}

/// A server thread ended (its frontend loop failed): stop the daemon.
struct ServerExit {
    fd: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for ServerExit {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Only the notification matters; a failed read means another wake-up comes.
        if self.fd.read().is_ok() {
            self.stop.store(true, Ordering::Release);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            error!("cannot watch the server threads: {e}");
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
    fn new() -> Result<SignalPipe, Error> {
        let pipe_error = Error::io("create the signal pipe");
        let (read, write) = UnixStream::pair().map_err(pipe_error)?;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let write = write
                .try_clone()
                .map_err(Error::io("create the signal pipe"))?;
            signal_hook::low_level::pipe::register(signal, write)
                .map_err(Error::io("handle SIGINT and SIGTERM"))?;
        }
        read.set_nonblocking(true)
            .map_err(Error::io("create the signal pipe"))?;
        Ok(SignalPipe {
            read,
            requested: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl MutEventSubscriber for SignalPipe {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut buf = [0u8; 16];
        // Drained until it would block; what was read does not matter, only that it came.
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
