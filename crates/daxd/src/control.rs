//! The control socket, `daxd inspect` and `daxd resize`.
//!
//! Protocol: a client connects and writes one [`Request`] as a JSON line; daxd answers with
//! one JSON document (an [`Inspection`], or the outcome of a resize) and closes. A client
//! that sends nothing within a second, or closes its side, gets an inspection, so a stuck
//! or hostile client holds the event loop for at most the read and write timeouts.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

use daxd_blk::stats::{BlkMetrics, LatencyHistogram};
use daxd_blk::BlkDevice;
use daxd_region::{Layout, LayoutError, Region, Serve, Window, PAGE_SIZE};
use daxd_registry::{FrameRange, Registry, Snapshot, Target};
use daxd_vhost_user::ConfigNotifier;

use crate::error::Error;

/// What a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Inspect,
    /// Grow the disk to `bytes`.
    Resize {
        bytes: u64,
    },
}

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resized {
    pub window: String,
    pub before: u64,
    pub size: u64,
    pub frontend: FrontendNotice,
}

/// Whether the frontend heard of a new disk size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrontendNotice {
    /// The size did not change; nothing to tell.
    Unchanged,
    /// It acknowledged the config change: the guest sees the new capacity.
    Told,
    /// No frontend with a backend channel is connected; the next one reads the new size.
    NoChannel,
    /// It has not answered within the wait; it may still act on it.
    NoAnswer,
    /// The channel failed (e.g. the frontend just went away).
    Failed(String),
}

/// How long `daxd resize` waits for the frontend to acknowledge the config change.
const FRONTEND_WAIT: Duration = Duration::from_secs(5);

/// What `daxd inspect` receives: the same type on both ends of the socket, so that a
/// renamed field breaks the build, not the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub region: RegionInfo,
    pub windows: Vec<WindowInfo>,
    pub registry: Snapshot,
    /// The disk's counters (versioned: `blk.version`).
    pub blk: BlkMetrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub path: PathBuf,
    pub size: u64,
    pub frames: u64,
    pub map_sync: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowInfo {
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub serve: ServeKind,
}

/// How a window is served, as the control protocol spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeKind {
    Blk,
    Pmem,
    Both,
}

impl From<Serve> for ServeKind {
    fn from(serve: Serve) -> ServeKind {
        match serve {
            Serve::Blk => ServeKind::Blk,
            Serve::Pmem => ServeKind::Pmem,
            Serve::Both => ServeKind::Both,
        }
    }
}

impl Inspection {
    fn of(region: &Region, layout: &Layout, registry: &Registry, blk: &BlkDevice) -> Inspection {
        Inspection {
            region: RegionInfo {
                path: region.path().to_owned(),
                size: region.size(),
                frames: region.frames(),
                map_sync: region.is_map_sync(),
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
        }
    }
}

/// Serves inspections from the daemon's event loop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    region: Arc<Region>,
    /// The layout as it is now: a resize replaces it.
    layout: Arc<Layout>,
    registry: Arc<Registry>,
    blk: Arc<BlkDevice>,
    notifier: Arc<ConfigNotifier>,
}

impl ControlSocket {
    pub fn bind(
        path: &Path,
        region: Arc<Region>,
        layout: Arc<Layout>,
        registry: Arc<Registry>,
        blk: Arc<BlkDevice>,
        notifier: Arc<ConfigNotifier>,
    ) -> Result<ControlSocket, Error> {
        let listener = daxd_vhost_user::bind_unix(path).map_err(|source| Error::Control {
            path: path.to_owned(),
            source,
        })?;
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn answer(&mut self, mut stream: UnixStream) {
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
                &self.layout,
                &self.registry,
                &self.blk,
            )),
            Ok(Request::Resize { bytes }) => serde_json::to_vec(&self.resize(bytes)),
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
    fn resize(&mut self, bytes: u64) -> Result<Resized, String> {
        let disk = self.layout.blk().ok_or("daxd serves no disk")?.clone();
        if disk.serve.pmem() {
            return Err(format!(
                "window {} is served as pmem too, and a VMM maps pmem windows at a fixed size; only a window served as blk alone can grow",
                disk.name
            ));
        }
        let windows = self
            .layout
            .windows()
            .iter()
            .map(|w| Window {
                size: if w.name == disk.name { bytes } else { w.size },
                ..w.clone()
            })
            .collect();
        let layout = Layout::new(self.region.size(), windows, self.layout.allows_overlap())
            .map_err(|e| match e {
                LayoutError::BeyondRegion { region_size, .. } => format!(
                    "{e}. daxd grows the disk inside its region file, which it does not grow while serving: to leave room, start daxd with a larger --size (a sparse region file costs no space until written) and the disk as a window, e.g. --window name=disk,size={},serve=blk",
                    disk.size.min(region_size)
                ),
                e => e.to_string(),
            })?;
        let before = self.blk.grow(bytes).map_err(|e| e.to_string())?;
        self.layout = Arc::new(layout);
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

/// How `daxd inspect` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tables,
    Json,
    Prometheus,
}

/// `daxd inspect`: fetches one inspection and prints it as tables, JSON or Prometheus
/// text.
pub fn inspect(control_socket: &Path, format: Format) -> Result<String, Error> {
    let inspection = fetch(control_socket)?;
    Ok(match format {
        Format::Json => {
            let mut text =
                serde_json::to_string(&inspection).map_err(|source| Error::BadInspection {
                    path: control_socket.to_owned(),
                    source,
                })?;
            text.push('\n');
            text
        }
        Format::Tables => tables(&inspection),
        Format::Prometheus => prometheus(&inspection),
    })
}

/// One inspection from a running daxd.
pub fn fetch(control_socket: &Path) -> Result<Inspection, Error> {
    ask(control_socket, Request::Inspect)
}

/// `daxd resize`: asks a running daxd to grow its disk to `bytes`; prints what it did.
pub fn resize(control_socket: &Path, bytes: u64) -> Result<String, Error> {
    let resized: Result<Resized, String> = ask(control_socket, Request::Resize { bytes })?;
    let resized = resized.map_err(Error::Resize)?;
    let mut text = format!(
        "disk window {}: {} bytes (was {})\n",
        resized.window, resized.size, resized.before
    );
    text.push_str(match &resized.frontend {
        FrontendNotice::Unchanged => "unchanged; the frontend was not told\n",
        FrontendNotice::Told => {
            "the frontend acknowledged the change; the guest sees the new capacity\n"
        }
        FrontendNotice::NoChannel => {
            "no frontend with a backend channel is connected; the next one reads the new size\n"
        }
        FrontendNotice::NoAnswer => "the frontend has not acknowledged the change yet\n",
        FrontendNotice::Failed(_) => {
            "telling the frontend failed; it reads the new size when it next asks\n"
        }
    });
    if let FrontendNotice::Failed(e) = &resized.frontend {
        let _ = writeln!(text, "({e})");
    }
    Ok(text)
}

/// Sends `request` and reads the answer.
fn ask<T: serde::de::DeserializeOwned>(
    control_socket: &Path,
    request: Request,
) -> Result<T, Error> {
    let unreachable = |source| Error::Inspect {
        path: control_socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(control_socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_string(&request).expect("a request encodes");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(unreachable)?;
    serde_json::from_str(&text).map_err(|source| Error::BadInspection {
        path: control_socket.to_owned(),
        source,
    })
}

fn frames_text(frames: FrameRange) -> String {
    format!(
        "{}..{} (bytes {:#x}..{:#x})",
        frames.start,
        frames.end,
        frames.start * PAGE_SIZE,
        frames.end * PAGE_SIZE
    )
}

// Writing into a String cannot fail; the results of writeln! below are ignored for that
// reason.
fn tables(v: &Inspection) -> String {
    let mut out = String::new();
    let region = &v.region;
    let _ = writeln!(
        out,
        "region {}: {} bytes, {} page frames{}",
        region.path.display(),
        region.size,
        region.frames,
        if region.map_sync { ", MAP_SYNC" } else { "" }
    );
    let _ = writeln!(out, "\nWINDOW       OFFSET        SIZE          SERVE");
    for w in &v.windows {
        let serve = match w.serve {
            ServeKind::Blk => "blk",
            ServeKind::Pmem => "pmem",
            ServeKind::Both => "both",
        };
        let _ = writeln!(
            out,
            "{:<12} {:<13} {:<13} {serve}",
            w.name,
            format!("{:#x}", w.offset),
            format!("{:#x}", w.size),
        );
    }
    let r = &v.registry;
    let _ = writeln!(
        out,
        "\ndescriptors: {} ({} bytes); flush epoch {}, last flushed {}",
        r.descriptors, r.descriptor_bytes, r.epoch, r.last_flushed
    );
    let _ = writeln!(out, "\nMAPPING  OWNER                            TARGET                 FRAMES                                   WRITABLE  DEVICE");
    for m in &r.mappings {
        let target = match &m.target {
            Target::GuestPhysical { gpa } => format!("gpa {gpa:#x}"),
            Target::SharedMemory { shmid, offset } => format!("shm {shmid} +{offset:#x}"),
        };
        let _ = writeln!(
            out,
            "{:<8} {:<32} {:<22} {:<40} {:<9} {}",
            m.id.0,
            m.owner,
            target,
            frames_text(m.frames),
            m.writable,
            m.device
        );
    }
    let _ = writeln!(
        out,
        "\nDESCRIPTORS FOR FRAMES                         MAPPED    PINNED    DIRTY     MAX MAPS"
    );
    for s in &r.sections {
        let _ = writeln!(
            out,
            "{:<46} {:<9} {:<9} {:<9} {}",
            frames_text(s.frames),
            s.mapped,
            s.pinned,
            s.dirty,
            s.max_map_count
        );
    }
    if r.busy.is_empty() {
        let _ = writeln!(out, "\nbusy ranges: none");
    } else {
        let _ = writeln!(out, "\nBUSY FRAMES                                    FOR");
        for b in &r.busy {
            let _ = writeln!(out, "{:<46} {}", frames_text(b.frames), b.what);
        }
    }
    let blk = &v.blk;
    let _ = writeln!(
        out,
        "\nQUEUE  READ       WRITE      FLUSH      DISCARD    WZEROES    GET_ID     INVALID    OK         IOERR      UNSUPP     READ BYTES       WRITTEN BYTES    FLUSH p50/max"
    );
    for q in &blk.queues {
        let count = |kind: &str| {
            q.requests
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |(_, n)| *n)
        };
        let _ = writeln!(
            out,
            "{:<6} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<10} {:<16} {:<16} {}",
            q.queue,
            count("read"),
            count("write"),
            count("flush"),
            count("discard"),
            count("write_zeroes"),
            count("get_id"),
            count("invalid"),
            q.ok,
            q.ioerr,
            q.unsupp,
            q.bytes_read,
            q.bytes_written,
            percentiles(&q.flush_latency),
        );
    }
    let _ = writeln!(
        out,
        "region flushes: {}; FLUSHes in flight: {}",
        blk.region_flushes,
        blk.queues.iter().map(|q| q.flushes_in_flight).sum::<u64>()
    );
    out
}

/// "p50/max" of a histogram as bucket bounds ("<=64us/<=1ms"), "-" when empty.
fn percentiles(h: &LatencyHistogram) -> String {
    let total = h.count();
    if total == 0 {
        return "-".to_owned();
    }
    let bound = |i: usize| match h.bounds_us.get(i) {
        Some(us) if *us >= 1000 => format!("<={}ms", us / 1000),
        Some(us) => format!("<={us}us"),
        None => format!(">{}ms", h.bounds_us.last().copied().unwrap_or(0) / 1000),
    };
    let mut seen = 0;
    let mut p50 = None;
    let mut max = 0;
    for (i, n) in h.counts.iter().enumerate() {
        seen += n;
        if p50.is_none() && seen * 2 >= total {
            p50 = Some(i);
        }
        if *n > 0 {
            max = i;
        }
    }
    format!("{}/{}", bound(p50.unwrap_or(0)), bound(max))
}

/// A metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Prometheus text exposition (format 0.0.4) of an inspection.
pub fn prometheus(v: &Inspection) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "daxd_region_bytes",
        "gauge",
        "Size of the region file.",
    );
    let _ = writeln!(out, "daxd_region_bytes {}", v.region.size);
    family(
        &mut out,
        "daxd_registry_descriptors",
        "gauge",
        "Page descriptors for guest-visible pages.",
    );
    let _ = writeln!(out, "daxd_registry_descriptors {}", v.registry.descriptors);
    family(
        &mut out,
        "daxd_blk_region_flushes_total",
        "counter",
        "fdatasync calls for FLUSH requests.",
    );
    let _ = writeln!(
        out,
        "daxd_blk_region_flushes_total {}",
        v.blk.region_flushes
    );
    let blk = &v.blk.queues;
    family(
        &mut out,
        "daxd_blk_requests_total",
        "counter",
        "Requests by queue and type.",
    );
    for q in blk {
        for (kind, n) in &q.requests {
            let _ = writeln!(
                out,
                "daxd_blk_requests_total{{queue=\"{}\",type=\"{kind}\"}} {n}",
                q.queue
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_completions_total",
        "counter",
        "Completions by queue and status; dropped: chains without a status byte.",
    );
    for q in blk {
        for (status, n) in [
            ("ok", q.ok),
            ("ioerr", q.ioerr),
            ("unsupp", q.unsupp),
            ("dropped", q.dropped),
        ] {
            let _ = writeln!(
                out,
                "daxd_blk_completions_total{{queue=\"{}\",status=\"{status}\"}} {n}",
                q.queue
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_bytes_total",
        "counter",
        "Bytes read from and written to the disk, by queue.",
    );
    for q in blk {
        for (direction, n) in [("read", q.bytes_read), ("write", q.bytes_written)] {
            let _ = writeln!(
                out,
                "daxd_blk_bytes_total{{queue=\"{}\",direction=\"{direction}\"}} {n}",
                q.queue
            );
        }
    }
    family(
        &mut out,
        "daxd_blk_flushes_in_flight",
        "gauge",
        "FLUSH requests waiting for the region flush, by queue.",
    );
    for q in blk {
        let _ = writeln!(
            out,
            "daxd_blk_flushes_in_flight{{queue=\"{}\"}} {}",
            q.queue, q.flushes_in_flight
        );
    }
    for (name, help, pick) in [
        (
            "daxd_blk_flush_latency_seconds",
            "FLUSH latency, from parsing to completion, by queue.",
            (|q| &q.flush_latency) as fn(&daxd_blk::stats::QueueMetrics) -> &LatencyHistogram,
        ),
        (
            "daxd_blk_request_latency_seconds",
            "Service time of every 64th other request, by queue.",
            |q| &q.request_latency,
        ),
    ] {
        family(&mut out, name, "histogram", help);
        for q in blk {
            let h = pick(q);
            let mut cumulative = 0;
            for (i, n) in h.counts.iter().enumerate() {
                cumulative += n;
                let le = h
                    .bounds_us
                    .get(i)
                    .map_or("+Inf".to_owned(), |us| format!("{}", *us as f64 / 1e6));
                let _ = writeln!(
                    out,
                    "{name}_bucket{{queue=\"{}\",le=\"{le}\"}} {cumulative}",
                    q.queue
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{queue=\"{}\"}} {}",
                q.queue,
                h.sum_ns as f64 / 1e9
            );
            let _ = writeln!(out, "{name}_count{{queue=\"{}\"}} {cumulative}", q.queue);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use daxd_registry::{MappingRequest, Target};

    #[test]
    fn an_inspection_crosses_the_socket_unchanged_and_renders() {
        let dir = tempfile::tempdir().unwrap();
        let region = Arc::new(
            Region::open(&daxd_region::RegionConfig {
                path: dir.path().join("r.img"),
                size: Some(8 << 20),
                resize: false,
                read_only: false,
                direct: false,
                lock: true,
            })
            .unwrap(),
        );
        let layout = Arc::new(
            Layout::new(
                region.size(),
                vec![
                    daxd_region::Window {
                        name: "disk".into(),
                        offset: 0,
                        size: 4 << 20,
                        serve: Serve::Blk,
                    },
                    daxd_region::Window {
                        name: "pm0".into(),
                        offset: 4 << 20,
                        size: 4 << 20,
                        serve: Serve::Pmem,
                    },
                ],
                false,
            )
            .unwrap(),
        );
        let registry = Arc::new(Registry::new(region.frames()));
        let owner = registry.new_owner("connection 1");
        registry
            .map(
                owner,
                MappingRequest {
                    device: "virtio-pmem".into(),
                    target: Target::SharedMemory {
                        shmid: 0,
                        offset: 0,
                    },
                    frames: FrameRange::covering(4 << 20, 4 << 20),
                    writable: true,
                },
            )
            .unwrap();
        let blk = Arc::new(
            BlkDevice::new(
                region.clone(),
                registry.clone(),
                layout.blk().unwrap(),
                daxd_blk::BlkConfig {
                    num_queues: 2,
                    queue_size: 128,
                    read_only: false,
                    sync: false,
                    serial: daxd_blk::Serial::new("control-test").unwrap(),
                },
            )
            .unwrap(),
        );
        let path = dir.path().join("control.sock");
        let mut socket = ControlSocket::bind(
            &path,
            region.clone(),
            layout.clone(),
            registry.clone(),
            blk.clone(),
            Default::default(),
        )
        .unwrap();
        let expected = Inspection::of(&region, &layout, &registry, &blk);
        let server = std::thread::spawn(move || {
            let (stream, _) = loop {
                match socket.listener.accept() {
                    Ok(accepted) => break accepted,
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            };
            socket.answer(stream);
        });
        let fetched = fetch(&path).unwrap();
        server.join().unwrap();
        assert_eq!(fetched, expected);
        assert_eq!(fetched.registry.descriptors, 1024);
        assert_eq!(fetched.windows[1].serve, ServeKind::Pmem);
        let text = tables(&fetched);
        assert!(text.contains("shm 0 +0x0"), "{text}");
        assert!(
            text.contains("pm0          0x400000      0x400000      pmem"),
            "{text}"
        );
        assert!(text.contains("descriptors: 1024 (16384 bytes)"), "{text}");
        assert_eq!(fetched.blk.queues.len(), 2);
        assert!(text.contains("region flushes: 0"), "{text}");

        // Every Prometheus line is a comment or `name{labels} value`, every family is
        // declared before its samples, and histograms end in +Inf, _sum and _count.
        let exposition = prometheus(&fetched);
        let mut declared = std::collections::HashSet::new();
        for line in exposition.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| declared.contains(*f))
                .unwrap_or(name);
            assert!(declared.contains(family), "undeclared: {line}");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
        }
        assert!(
            exposition.contains("daxd_blk_flush_latency_seconds_bucket{queue=\"1\",le=\"+Inf\"} 0")
        );
        assert!(exposition.contains("daxd_blk_requests_total{queue=\"0\",type=\"read\"} 0"));
    }
}
