//! What `daxd inspect` sees of the registry.

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use crate::chunk::Descriptor;
use crate::frames::CHUNK_FRAMES;

use crate::frames::FrameRange;
use crate::{MappingId, Registry, Target};

impl Registry {
    /// Everything `daxd inspect` shows. Sections are the runs of frames with descriptors.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        let mut descriptors = 0;
        let mut sections: Vec<SectionSnapshot> = Vec::new();
        for &i in &inner.chunks {
            let Some(chunk) = self.slots[i].load_full() else {
                continue;
            };
            for (at, d) in chunk.descs.iter().enumerate() {
                let d = d.read();
                if d.map_count == 0 && d.pin_count == 0 {
                    continue;
                }
                descriptors += 1;
                let frame = i as u64 * CHUNK_FRAMES + at as u64;
                let section = match sections.last_mut() {
                    Some(s) if s.frames.end == frame => s,
                    _ => {
                        sections.push(SectionSnapshot {
                            frames: FrameRange {
                                start: frame,
                                end: frame,
                            },
                            mapped: 0,
                            pinned: 0,
                            dirty: 0,
                            max_map_count: 0,
                        });
                        sections.last_mut().expect("just pushed")
                    }
                };
                section.frames.end = frame + 1;
                section.mapped += u64::from(d.map_count > 0);
                section.pinned += u64::from(d.pin_count > 0);
                section.dirty += u64::from(d.dirty_epoch != 0);
                section.max_map_count = section.max_map_count.max(d.map_count);
            }
        }
        let mappings = inner
            .mappings
            .iter()
            .map(|(id, m)| MappingSnapshot {
                id: *id,
                owner: inner.owners.get(&m.owner).cloned().unwrap_or_default(),
                device: m.request.device.clone(),
                target: m.request.target.clone(),
                frames: m.request.frames,
                writable: m.request.writable,
            })
            .collect();
        Snapshot {
            descriptors,
            descriptor_bytes: inner.chunks.len() as u64
                * CHUNK_FRAMES
                * std::mem::size_of::<Descriptor>() as u64,
            epoch: self.epoch.load(Ordering::SeqCst),
            last_flushed: inner.last_flushed,
            mappings,
            sections,
            busy: inner
                .busy
                .iter()
                .map(|(_, frames, what)| BusySnapshot {
                    frames: *frames,
                    what: (*what).to_owned(),
                })
                .collect(),
        }
    }
}

/// `daxd inspect`'s view of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub descriptors: u64,
    pub descriptor_bytes: u64,
    /// The epoch new writes are recorded in.
    pub epoch: u32,
    /// The newest epoch a completed flush covered (0: none yet).
    pub last_flushed: u32,
    pub mappings: Vec<MappingSnapshot>,
    pub sections: Vec<SectionSnapshot>,
    pub busy: Vec<BusySnapshot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingSnapshot {
    pub id: MappingId,
    pub owner: String,
    pub device: String,
    pub target: Target,
    pub frames: FrameRange,
    pub writable: bool,
}

/// A run of frames with descriptors and how many of them are in each state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionSnapshot {
    pub frames: FrameRange,
    pub mapped: u64,
    pub pinned: u64,
    pub dirty: u64,
    pub max_map_count: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusySnapshot {
    pub frames: FrameRange,
    pub what: String,
}
