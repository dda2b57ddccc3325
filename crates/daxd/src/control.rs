//! The control socket and `daxd inspect`.
//!
//! Protocol: a client connects; daxd writes one JSON document (an [`Inspection`]) and
//! closes. Nothing is read from the client, so a stuck or hostile client cannot hold the
//! event loop for longer than the write timeout.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

use daxd_region::{Layout, Region, Serve, PAGE_SIZE};
use daxd_registry::{FrameRange, Registry, Snapshot, Target};

use crate::error::Error;

/// What `daxd inspect` receives: the same type on both ends of the socket, so that a
/// renamed field breaks the build, not the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inspection {
    pub region: RegionInfo,
    pub windows: Vec<WindowInfo>,
    pub registry: Snapshot,
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
    fn of(region: &Region, layout: &Layout, registry: &Registry) -> Inspection {
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
        }
    }
}

/// Serves inspections from the daemon's event loop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    region: Arc<Region>,
    layout: Arc<Layout>,
    registry: Arc<Registry>,
}

impl ControlSocket {
    pub fn bind(
        path: &Path,
        region: Arc<Region>,
        layout: Arc<Layout>,
        registry: Arc<Registry>,
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
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn answer(&self, mut stream: UnixStream) {
        let inspection = Inspection::of(&self.region, &self.layout, &self.registry);
        let prepared = stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(1))));
        if let Err(e) = prepared {
            warn!("control socket: cannot answer: {e}");
            return;
        }
        match serde_json::to_vec(&inspection) {
            Ok(mut json) => {
                json.push(b'\n');
                if let Err(e) = stream.write_all(&json) {
                    warn!("control socket: cannot answer: {e}");
                }
            }
            Err(e) => error!("control socket: cannot encode the inspection: {e}"),
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

/// `daxd inspect`: fetches one inspection and prints it as JSON or tables.
pub fn inspect(control_socket: &Path, json: bool) -> Result<String, Error> {
    let inspection = fetch(control_socket)?;
    if json {
        let mut text =
            serde_json::to_string(&inspection).map_err(|source| Error::BadInspection {
                path: control_socket.to_owned(),
                source,
            })?;
        text.push('\n');
        return Ok(text);
    }
    Ok(tables(&inspection))
}

/// One inspection from a running daxd.
pub fn fetch(control_socket: &Path) -> Result<Inspection, Error> {
    let unreachable = |source| Error::Inspect {
        path: control_socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(control_socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
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
        let path = dir.path().join("control.sock");
        let socket =
            ControlSocket::bind(&path, region.clone(), layout.clone(), registry.clone()).unwrap();
        let expected = Inspection::of(&region, &layout, &registry);
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
    }
}
