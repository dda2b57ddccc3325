//! Guest memory that is the region file itself: a pmem window the VMM mapped from the
//! region (QEMU's `memory-backend-file`) appears in the memory table of every
//! vhost-user backend of the guest, the disk's included. Such pages are guest-visible, so
//! they get page descriptors, and a request whose buffers lie there pins them (see
//! [`crate::execute`]). Files are matched by device and inode, never by descriptor
//! number, which changes with every memory table.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use log::{info, warn};

use daxd_region::PAGE_SIZE;
use daxd_registry::{FrameRange, MappingId, MappingRequest, OwnerId, Target};

use crate::{BlkDevice, GuestWindow};

/// One file-backed piece of a guest's memory table.
#[derive(Debug, Clone, Copy)]
pub struct GuestFile<'a> {
    /// Guest physical address and length.
    pub gpa: u64,
    pub len: u64,
    pub file: &'a File,
    /// Where in the file the piece starts.
    pub offset: u64,
}

/// One connection's guest windows and their registry mappings.
#[derive(Debug, Default)]
pub struct GuestWindows {
    /// Read once per batch by the queue workers.
    current: ArcSwap<Vec<GuestWindow>>,
    mappings: Mutex<Vec<(GuestWindow, MappingId)>>,
}

impl GuestWindows {
    /// The windows as the last memory table had them.
    pub fn current(&self) -> arc_swap::Guard<Arc<Vec<GuestWindow>>> {
        self.current.load()
    }

    /// Brings the windows and the registry in step with a new memory table, `files`,
    /// mapping for `owner`; `name(offset, len)` says what a window of the region is, for
    /// the log.
    pub fn update<'a>(
        &self,
        device: &BlkDevice,
        owner: OwnerId,
        files: impl Iterator<Item = GuestFile<'a>>,
        name: impl Fn(u64, u64) -> String,
    ) {
        let region = device.region();
        let identity = region.identity();
        let mut found = Vec::new();
        for piece in files {
            let Ok(meta) = piece.file.metadata() else {
                continue;
            };
            if (meta.dev(), meta.ino()) != (identity.dev, identity.ino) {
                continue;
            }
            let window = GuestWindow {
                gpa: piece.gpa,
                len: piece.len,
                region_offset: piece.offset,
            };
            if region
                .check_range(window.region_offset, window.len)
                .is_err()
            {
                warn!(
                    "guest memory at {:#x} maps bytes {}+{} of the region file, beyond the region; not tracked",
                    window.gpa, window.region_offset, window.len
                );
                continue;
            }
            found.push(window);
        }

        let registry = device.registry();
        let mut mappings = self.mappings.lock().unwrap_or_else(|e| e.into_inner());
        mappings.retain(|(window, id)| {
            let keep = found.contains(window);
            if !keep {
                if let Err(e) = registry.unmap(*id) {
                    warn!("cannot unregister guest memory at {:#x}: {e}", window.gpa);
                }
                info!(
                    "guest memory at {:#x} no longer maps the region",
                    window.gpa
                );
            }
            keep
        });
        for window in found {
            if mappings.iter().any(|(w, _)| *w == window) {
                continue;
            }
            let name = name(window.region_offset, window.len);
            // Filled when daxd started; the guest may be using the mapping already, so holes
            // punched since (discards through the disk) cannot be filled safely here.
            if region.has_holes(window.region_offset, window.len) {
                warn!(
                    "guest memory at {:#x} maps region bytes with holes: when the host file system is full, a guest store there faults in the VMM",
                    window.gpa
                );
            }
            let request = MappingRequest {
                device: "memory-backend-file in the vhost-user-blk memory table".into(),
                target: Target::GuestPhysical { gpa: window.gpa },
                frames: FrameRange::covering(window.region_offset, window.len),
                writable: true,
            };
            match registry.map(owner, request) {
                Ok(id) => {
                    info!(
                        "guest maps region bytes {:#x}+{:#x} ({name}) at guest address {:#x}: {} pages guest-visible",
                        window.region_offset,
                        window.len,
                        window.gpa,
                        window.len.div_ceil(PAGE_SIZE)
                    );
                    mappings.push((window, id));
                }
                Err(e) => warn!("cannot register guest memory at {:#x}: {e}", window.gpa),
            }
        }
        let windows: Vec<GuestWindow> = mappings.iter().map(|(w, _)| *w).collect();
        self.current.store(Arc::new(windows));
    }
}
