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
use serde::Serialize;
use serde_json::Value;
use vmm_sys_util::epoll::EventSet;

use daxd_region::{Layout, Region, PAGE_SIZE};
use daxd_registry::Registry;

/// What `daxd inspect` receives.
#[derive(Debug, Serialize)]
pub struct Inspection<'a> {
    pub region: RegionInfo<'a>,
    pub windows: &'a Layout,
    pub registry: daxd_registry::Snapshot,
}

#[derive(Debug, Serialize)]
pub struct RegionInfo<'a> {
    pub path: &'a Path,
    pub size: u64,
    pub frames: u64,
    pub map_sync: bool,
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
    ) -> Result<ControlSocket, String> {
        let listener =
            daxd_vhost_user::bind_unix(path).map_err(|e| format!("control socket: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
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
        let inspection = Inspection {
            region: RegionInfo {
                path: self.region.path(),
                size: self.region.size(),
                frames: self.region.frames(),
                map_sync: self.region.is_map_sync(),
            },
            windows: &self.layout,
            registry: self.registry.snapshot(),
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
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
pub fn inspect(control_socket: &Path, json: bool) -> Result<String, String> {
    let mut stream = UnixStream::connect(control_socket).map_err(|e| {
        format!(
            "cannot connect to {}: {e}; is daxd running with --control-socket {}?",
            control_socket.display(),
            control_socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read from {}: {e}", control_socket.display()))?;
    if json {
        return Ok(text);
    }
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| format!("daxd answered something that is not an inspection: {e}"))?;
    Ok(tables(&value))
}

fn frames_text(frames: &Value) -> String {
    let start = frames["start"].as_u64().unwrap_or(0);
    let end = frames["end"].as_u64().unwrap_or(0);
    format!(
        "{start}..{end} (bytes {:#x}..{:#x})",
        start * PAGE_SIZE,
        end * PAGE_SIZE
    )
}

fn tables(v: &Value) -> String {
    let mut out = String::new();
    let region = &v["region"];
    let _ = writeln!(
        out,
        "region {}: {} bytes, {} page frames{}",
        region["path"].as_str().unwrap_or("?"),
        region["size"],
        region["frames"],
        if region["map_sync"].as_bool() == Some(true) {
            ", MAP_SYNC"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "\nWINDOW       OFFSET        SIZE          SERVE");
    for w in v["windows"]["windows"].as_array().into_iter().flatten() {
        let serve = match (w["serve"]["blk"].as_bool(), w["serve"]["pmem"].as_bool()) {
            (Some(true), Some(true)) => "both",
            (Some(true), _) => "blk",
            _ => "pmem",
        };
        let _ = writeln!(
            out,
            "{:<12} {:<13} {:<13} {serve}",
            w["name"].as_str().unwrap_or("?"),
            format!("{:#x}", w["offset"].as_u64().unwrap_or(0)),
            format!("{:#x}", w["size"].as_u64().unwrap_or(0)),
        );
    }
    let r = &v["registry"];
    let _ = writeln!(
        out,
        "\ndescriptors: {} ({} bytes); flush epoch {}, last flushed {}",
        r["descriptors"], r["descriptor_bytes"], r["epoch"], r["last_flushed"]
    );
    let _ = writeln!(out, "\nMAPPING  OWNER                            TARGET                 FRAMES                                   WRITABLE  DEVICE");
    for m in r["mappings"].as_array().into_iter().flatten() {
        let target = &m["target"];
        let target = if let Some(gpa) = target["guest_physical"]["gpa"].as_u64() {
            format!("gpa {gpa:#x}")
        } else {
            format!(
                "shm {} +{:#x}",
                target["shared_memory"]["shmid"],
                target["shared_memory"]["offset"].as_u64().unwrap_or(0)
            )
        };
        let _ = writeln!(
            out,
            "{:<8} {:<32} {:<22} {:<40} {:<9} {}",
            m["id"].to_string(),
            m["owner"].as_str().unwrap_or(""),
            target,
            frames_text(&m["frames"]),
            m["writable"].to_string(),
            m["device"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "\nDESCRIPTORS FOR FRAMES                         MAPPED    PINNED    DIRTY     MAX MAPS"
    );
    for s in r["sections"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<46} {:<9} {:<9} {:<9} {}",
            frames_text(&s["frames"]),
            s["mapped"].to_string(),
            s["pinned"].to_string(),
            s["dirty"].to_string(),
            s["max_map_count"]
        );
    }
    let busy = r["busy"].as_array().cloned().unwrap_or_default();
    if busy.is_empty() {
        let _ = writeln!(out, "\nbusy ranges: none");
    } else {
        let _ = writeln!(out, "\nBUSY FRAMES                                    FOR");
        for b in busy {
            let _ = writeln!(
                out,
                "{:<46} {}",
                frames_text(&b["frames"]),
                b["what"].as_str().unwrap_or("")
            );
        }
    }
    out
}
