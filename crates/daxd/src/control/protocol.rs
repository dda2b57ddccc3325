//! What crosses the control socket: one [`Request`] as a JSON line from the client, one
//! JSON document back. The same types on both ends, so that a renamed field breaks the
//! build, not the output.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use daxd_blk::stats::BlkMetrics;
use daxd_fault::{RuleInfo, RuleSpec};
use daxd_region::Serve;
use daxd_registry::Snapshot;

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Inspect,
    /// Grow the disk to `bytes`.
    Resize {
        bytes: u64,
    },
    /// Add a fault rule; answered with its number.
    FaultAdd {
        rule: RuleSpec,
    },
    /// The fault rules and their hits.
    FaultList,
    /// Remove rule `id`, or every rule; answered with how many went.
    FaultClear {
        id: Option<u64>,
    },
    /// Set a named mark (rules `after=NAME` act from then on).
    Mark {
        name: String,
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

/// Why a running daxd did not resize its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum ResizeRefused {
    #[error("daxd serves no disk")]
    NoDisk,
    #[error("window {window} is served as pmem too, and a VMM maps pmem windows at a fixed size; only a window served as blk alone can grow")]
    ServedAsPmem { window: String },
    /// The new size does not fit in the region; `largest` is what the disk could have.
    #[error("{layout}. daxd grows the disk inside its region file, which it does not grow while serving: to leave room, start daxd with a larger --size (a sparse region file costs no space until written) and the disk as a window, e.g. --window name=disk,size={largest},serve=blk")]
    BeyondRegion { layout: String, largest: u64 },
    /// Another layout rule (alignment, overlap), as the layout states it.
    #[error("{0}")]
    Layout(String),
    /// The disk would shrink, as the device states it.
    #[error("{0} (shrink it offline: stop daxd, change --window or --size with --resize)")]
    Shrink(String),
    /// The disk could not grow, as the device states it.
    #[error("{0}")]
    Disk(String),
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
    /// The channel failed (e.g. the frontend just went away); the error as text, since
    /// it crosses the control socket only to be shown.
    Failed(String),
}

/// What `daxd inspect` receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inspection {
    pub region: RegionInfo,
    pub windows: Vec<WindowInfo>,
    pub registry: Snapshot,
    /// The disk's counters (versioned: `blk.version`).
    pub blk: BlkMetrics,
    /// The fault rules set, with their hits.
    #[serde(default)]
    pub faults: Vec<RuleInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    pub path: PathBuf,
    pub size: u64,
    pub frames: u64,
    pub map_sync: bool,
    /// "file", "block device" or "device-dax".
    #[serde(default)]
    pub kind: String,
    /// The disk's `blk_size`: 512 for files, the device's logical block size.
    #[serde(default)]
    pub logical_block: u32,
    /// What every mapping of the region is aligned to: a page, or a device-DAX device's
    /// alignment.
    #[serde(default)]
    pub map_align: u64,
    /// On a synchronous mapping (MAP_SYNC, device-DAX), how a FLUSH writes cache lines
    /// back ("clwb", "dc cvap", ...); `None` with a page cache (a FLUSH is fdatasync).
    #[serde(default)]
    pub cache_write_back: Option<String>,
    /// Bytes of cache lines FLUSHes wrote back so far.
    #[serde(default)]
    pub written_back: u64,
    /// fdatasync calls FLUSHes of a synchronous mapping made (the file's blocks changed).
    #[serde(default)]
    pub write_back_fdatasyncs: u64,
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
