//! The control socket's server side, on the daemon's event loop.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;

use daxd_blk::{BlkDevice, BlkError};
use daxd_region::{Layout, LayoutError, Region, SharedLayout, Window};
use daxd_registry::Registry;
use daxd_vhost_user::ConfigNotifier;

use super::protocol::{
    FrontendNotice, Inspection, RegionInfo, Request, ResizeRefused, Resized, WindowInfo,
};
use crate::error::Error;
use crate::recording::Recording;

/// How long `daxd resize` waits for the frontend to acknowledge the config change.
const FRONTEND_WAIT: Duration = Duration::from_secs(5);

impl Inspection {
    pub(super) fn of(
        region: &Region,
        layout: &Layout,
        registry: &Registry,
        blk: &BlkDevice,
    ) -> Inspection {
        Inspection {
            region: RegionInfo {
                path: region.path().to_owned(),
                size: region.size(),
                frames: region.frames(),
                map_sync: region.is_map_sync(),
                kind: region.kind().describe().to_owned(),
                logical_block: region.kind().logical_block(),
                map_align: region.kind().map_align(),
                cache_write_back: region
                    .cache_write_back()
                    .map(|(how, line)| format!("{} ({line}-byte lines)", how.name())),
                written_back: region.write_back_stats().bytes,
                write_back_fdatasyncs: region.write_back_stats().fdatasyncs,
            },
            windows: layout
                .windows()
                .iter()
                .map(|w| WindowInfo {
                    name: w.name.clone(),
                    offset: w.offset,
                    size: w.size,
                    serve: w.serve.into(),
                })
                .collect(),
            registry: registry.snapshot(),
            blk: blk.metrics(),
            faults: blk.faults().list(),
        }
    }
}

/// Serves inspections from the daemon's event loop.
pub struct ControlSocket {
    pub(super) listener: UnixListener,
    path: PathBuf,
    region: Arc<Region>,
    /// The layout as it is now: a resize replaces it, for the blk backends too.
    layout: SharedLayout,
    registry: Arc<Registry>,
    blk: Arc<BlkDevice>,
    notifier: Arc<ConfigNotifier>,
    /// What `--record` writes to, which gets every mark.
    recording: Arc<Recording>,
}

impl ControlSocket {
    /// Creates the socket at `path` with permission bits `mode`. The file never has
    /// wider permissions than `mode`, not even between its creation and a chmod: it is
    /// created under a umask that leaves the owner alone, on the main thread before any
    /// other thread runs (the umask is the process's).
    pub fn bind(
        path: &Path,
        mode: u32,
        region: Arc<Region>,
        layout: SharedLayout,
        registry: Arc<Registry>,
        blk: Arc<BlkDevice>,
        notifier: Arc<ConfigNotifier>,
    ) -> Result<ControlSocket, Error> {
        let umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = daxd_vhost_user::bind_unix(path);
        rustix::process::umask(umask);
        let listener = bound.map_err(|source| Error::Control {
            path: path.to_owned(),
            source,
        })?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(Error::io("set the control socket's permissions"))?;
        listener
            .set_nonblocking(true)
            .map_err(Error::io("make the control socket non-blocking"))?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            region,
            layout,
            registry,
            blk,
            notifier,
            recording: Arc::default(),
        })
    }

    /// The socket, noting every mark in `recording` too.
    pub fn with_recording(mut self, recording: Arc<Recording>) -> ControlSocket {
        self.recording = recording;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn answer(&mut self, mut stream: UnixStream) {
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(1))))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(1))));
        if let Err(e) = prepared {
            warn!("control socket: cannot answer: {e}");
            return;
        }
        let mut line = String::new();
        // Nothing sent (EOF or the timeout) asks for an inspection.
        let _ = BufReader::new(&mut stream).take(4096).read_line(&mut line);
        let answer = match line.trim() {
            "" => Ok(Request::Inspect),
            text => serde_json::from_str::<Request>(text),
        };
        let json = match answer {
            Ok(Request::Inspect) => serde_json::to_vec(&Inspection::of(
                &self.region,
                &self.layout.load(),
                &self.registry,
                &self.blk,
            )),
            Ok(Request::Resize { bytes }) => serde_json::to_vec(&self.resize(bytes)),
            Ok(Request::FaultAdd { rule }) => {
                let text = rule.to_string();
                let added = self.blk.faults().add(rule).map_err(|e| e.to_string());
                match &added {
                    Ok(id) => info!("fault rule {id} added: {text}"),
                    Err(e) => warn!("fault rule refused ({text}): {e}"),
                }
                serde_json::to_vec(&added)
            }
            Ok(Request::FaultList) => serde_json::to_vec(&self.blk.faults().list()),
            Ok(Request::FaultClear { id }) => {
                let cleared = self.blk.faults().clear(id).map_err(|e| e.to_string());
                if let Ok(n) = &cleared {
                    info!("{n} fault rule(s) cleared");
                }
                serde_json::to_vec(&cleared)
            }
            Ok(Request::Mark { name }) => {
                let marked = self.blk.faults().mark(&name).map_err(|e| e.to_string());
                if marked.is_ok() {
                    self.recording.mark(&name, &self.region);
                }
                if marked.is_ok() {
                    info!("mark {name} set");
                }
                serde_json::to_vec(&marked)
            }
            Err(e) => {
                warn!("control socket: a request daxd does not understand: {e}");
                serde_json::to_vec(&Err::<Resized, _>(format!(
                    "daxd does not understand the request: {e}"
                )))
            }
        };
        match json {
            Ok(mut json) => {
                json.push(b'\n');
                if let Err(e) = stream.write_all(&json) {
                    warn!("control socket: cannot answer: {e}");
                }
            }
            Err(e) => error!("control socket: cannot encode the answer: {e}"),
        }
    }

    /// Grows the disk window to `bytes` inside the region, and tells the frontend.
    fn resize(&mut self, bytes: u64) -> Result<Resized, ResizeRefused> {
        let current = self.layout.load_full();
        let disk = current.blk().ok_or(ResizeRefused::NoDisk)?.clone();
        if disk.serve.pmem() {
            return Err(ResizeRefused::ServedAsPmem { window: disk.name });
        }
        let windows = current
            .windows()
            .iter()
            .map(|w| Window {
                size: if w.name == disk.name { bytes } else { w.size },
                ..w.clone()
            })
            .collect();
        let layout = Layout::new(self.region.size(), windows, current.allows_overlap()).map_err(
            |e| match e {
                LayoutError::BeyondRegion { region_size, .. } => ResizeRefused::BeyondRegion {
                    layout: e.to_string(),
                    largest: disk.size.min(region_size),
                },
                e => ResizeRefused::Layout(e.to_string()),
            },
        )?;
        let before = self.blk.grow(bytes).map_err(|e| match e {
            BlkError::Shrink { .. } => ResizeRefused::Shrink(e.to_string()),
            e => ResizeRefused::Disk(e.to_string()),
        })?;
        self.layout.store(Arc::new(layout));
        let frontend = if before == bytes {
            FrontendNotice::Unchanged
        } else {
            info!(
                "disk window {} grown from {before} to {bytes} bytes",
                disk.name
            );
            let frontend = self.tell_frontend();
            match &frontend {
                FrontendNotice::Told => info!("the frontend acknowledged the new disk size"),
                other => warn!("the frontend was not told of the new disk size: {other:?}"),
            }
            frontend
        };
        Ok(Resized {
            window: disk.name,
            before,
            size: bytes,
            frontend,
        })
    }

    /// Sends the config change from a thread of its own: the frontend may take its time
    /// (QEMU reads the config space back first) or never answer, and the event loop must
    /// not wait on it for longer than [`FRONTEND_WAIT`].
    fn tell_frontend(&self) -> FrontendNotice {
        let (done, outcome) = std::sync::mpsc::channel();
        let notifier = self.notifier.clone();
        let spawned = std::thread::Builder::new()
            .name("config-notifier".into())
            .spawn(move || {
                daxd_confine::enter_or_exit(daxd_confine::ThreadKind::ConfigNotifier);
                let _ = done.send(notifier.config_changed());
            });
        if let Err(e) = spawned {
            return FrontendNotice::Failed(format!("cannot start a thread: {e}"));
        }
        match outcome.recv_timeout(FRONTEND_WAIT) {
            Ok(Ok(true)) => FrontendNotice::Told,
            Ok(Ok(false)) => FrontendNotice::NoChannel,
            Ok(Err(e)) => FrontendNotice::Failed(e.to_string()),
            Err(_) => FrontendNotice::NoAnswer,
        }
    }
}

impl MutEventSubscriber for ControlSocket {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            self.answer(stream);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            error!("cannot watch the control socket: {e}");
        }
    }
}
