//! Carving a region into named windows ("namespaces", as in an NVDIMM region), each served
//! as a virtio-blk disk, as persistent memory, or both.
//!
//! Two windows may not share bytes unless the layout allows overlap: a disk and a pmem
//! mapping of the same bytes means a guest can discard what it has mapped, which daxd then
//! refuses request by request.

use crate::PAGE_SIZE;

/// Pmem windows are aligned and sized to this (huge-page mappings, and QEMU's
/// memory-device rules).
pub const PMEM_ALIGN: u64 = 2 << 20;

/// The layout as it is now, one copy shared by everything that reads it: a resize (the
/// control socket) stores a new one, readers load whichever is current.
pub type SharedLayout = std::sync::Arc<arc_swap::ArcSwap<Layout>>;

/// How a window is served.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// As the virtio-blk disk.
    Blk,
    /// As persistent memory the guest maps.
    Pmem,
    /// The same bytes as disk and as pmem: the registry then guards the disk's discards.
    Both,
}

impl Serve {
    pub fn blk(self) -> bool {
        matches!(self, Serve::Blk | Serve::Both)
    }

    pub fn pmem(self) -> bool {
        matches!(self, Serve::Pmem | Serve::Both)
    }
}

/// A named byte range of the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Unique within the layout; also the QEMU object id of its memory backend.
    pub name: String,
    pub offset: u64,
    pub size: u64,
    pub serve: Serve,
}

impl Window {
    pub fn end(&self) -> u64 {
        self.offset + self.size
    }

    fn overlaps(&self, other: &Window) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// Why a set of windows does not fit a region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("window {name}: offset and size must be multiples of 4 KiB, and size not 0")]
    Unaligned { name: String },
    #[error("window {name}: a pmem window's offset and size must be multiples of 2 MiB")]
    PmemUnaligned { name: String },
    #[error("window {name}: bytes {offset}+{size} are beyond the region's {region_size} bytes")]
    BeyondRegion {
        name: String,
        offset: u64,
        size: u64,
        region_size: u64,
    },
    #[error("window {name}: the region is a device-DAX device mapped in {align}-byte pages, so a pmem window's offset and size must be multiples of {align} bytes")]
    DeviceUnaligned { name: String, align: u64 },
    #[error("window name {name} is used twice")]
    DuplicateName { name: String },
    #[error("window {name} overlaps window {other}")]
    Overlap { name: String, other: String },
    #[error(
        "windows {first} and {second} are both served as blk; daxd serves one disk per process"
    )]
    SeveralDisks { first: String, second: String },
}

/// The checked windows of one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    windows: Vec<Window>,
    allow_overlap: bool,
}

impl Layout {
    /// Checks that every pmem window (which a VMM or a guest maps) starts and ends on a
    /// multiple of `align`, what every mapping of the region must be aligned to (see
    /// [`crate::RegionKind::map_align`]).
    pub fn check_map_align(&self, align: u64) -> Result<(), LayoutError> {
        match self
            .pmem()
            .find(|w| w.offset % align != 0 || w.size % align != 0)
        {
            Some(w) => Err(LayoutError::DeviceUnaligned {
                name: w.name.clone(),
                align,
            }),
            None => Ok(()),
        }
    }

    /// Checks `windows` against a region of `region_size` bytes. No windows means one
    /// window `disk` covering the whole region, served as blk.
    pub fn new(
        region_size: u64,
        windows: Vec<Window>,
        allow_overlap: bool,
    ) -> Result<Layout, LayoutError> {
        let windows = if windows.is_empty() {
            vec![Window {
                name: "disk".into(),
                offset: 0,
                size: region_size,
                serve: Serve::Blk,
            }]
        } else {
            windows
        };
        for (i, w) in windows.iter().enumerate() {
            let name = || w.name.clone();
            if w.size == 0 || w.offset % PAGE_SIZE != 0 || w.size % PAGE_SIZE != 0 {
                return Err(LayoutError::Unaligned { name: name() });
            }
            if w.serve.pmem() && (w.offset % PMEM_ALIGN != 0 || w.size % PMEM_ALIGN != 0) {
                return Err(LayoutError::PmemUnaligned { name: name() });
            }
            if w.offset
                .checked_add(w.size)
                .is_none_or(|end| end > region_size)
            {
                return Err(LayoutError::BeyondRegion {
                    name: name(),
                    offset: w.offset,
                    size: w.size,
                    region_size,
                });
            }
            for other in &windows[..i] {
                if other.name == w.name {
                    return Err(LayoutError::DuplicateName { name: name() });
                }
                if !allow_overlap && other.overlaps(w) {
                    return Err(LayoutError::Overlap {
                        name: name(),
                        other: other.name.clone(),
                    });
                }
                if other.serve.blk() && w.serve.blk() {
                    return Err(LayoutError::SeveralDisks {
                        first: other.name.clone(),
                        second: name(),
                    });
                }
            }
        }
        Ok(Layout {
            windows,
            allow_overlap,
        })
    }

    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Whether windows may share bytes.
    pub fn allows_overlap(&self) -> bool {
        self.allow_overlap
    }

    /// The window served as the disk, if any.
    pub fn blk(&self) -> Option<&Window> {
        self.windows.iter().find(|w| w.serve.blk())
    }

    pub fn pmem(&self) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(|w| w.serve.pmem())
    }

    /// The pmem window holding bytes `offset..offset+len`, if one does.
    pub fn pmem_window_at(&self, offset: u64, len: u64) -> Option<&Window> {
        self.pmem()
            .find(|w| w.offset <= offset && offset.saturating_add(len) <= w.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    fn w(name: &str, offset: u64, size: u64, serve: Serve) -> Window {
        Window {
            name: name.into(),
            offset,
            size,
            serve,
        }
    }

    #[test]
    fn no_windows_means_the_whole_region_as_a_disk() {
        let layout = Layout::new(4 * G, vec![], false).unwrap();
        assert_eq!(layout.blk().unwrap().size, 4 * G);
        assert_eq!(layout.pmem().count(), 0);
    }

    #[test]
    fn checks_alignment_bounds_names_and_overlap() {
        let ok = Layout::new(
            4 * G,
            vec![
                w("disk", 0, 3 * G, Serve::Blk),
                w("pm0", 3 * G, G, Serve::Pmem),
            ],
            false,
        )
        .unwrap();
        assert_eq!(ok.pmem_window_at(3 * G + 4096, 4096).unwrap().name, "pm0");
        assert!(ok.pmem_window_at(3 * G - 4096, 8192).is_none());

        let err =
            |windows: Vec<Window>, allow: bool| Layout::new(4 * G, windows, allow).unwrap_err();
        let name = |n: &str| n.to_owned();
        assert_eq!(
            err(vec![w("p", M, 2 * M, Serve::Pmem)], false),
            LayoutError::PmemUnaligned { name: name("p") }
        );
        assert_eq!(
            err(vec![w("p", 0, 3 * M, Serve::Pmem)], false),
            LayoutError::PmemUnaligned { name: name("p") }
        );
        assert_eq!(
            err(vec![w("d", 512, M, Serve::Blk)], false),
            LayoutError::Unaligned { name: name("d") }
        );
        assert!(matches!(
            err(vec![w("d", 3 * G, 2 * G, Serve::Blk)], false),
            LayoutError::BeyondRegion { .. }
        ));
        assert_eq!(
            err(
                vec![w("d", 0, G, Serve::Blk), w("d", G, G, Serve::Pmem)],
                false
            ),
            LayoutError::DuplicateName { name: name("d") }
        );
        let overlap = vec![
            w("disk", 0, 4 * G, Serve::Blk),
            w("pm0", 2 * G, G, Serve::Pmem),
        ];
        assert_eq!(
            err(overlap.clone(), false),
            LayoutError::Overlap {
                name: name("pm0"),
                other: name("disk")
            }
        );
        assert!(Layout::new(4 * G, overlap, true).unwrap().allows_overlap());
        assert!(matches!(
            err(
                vec![w("a", 0, G, Serve::Blk), w("b", G, G, Serve::Both)],
                false
            ),
            LayoutError::SeveralDisks { .. }
        ));
    }

    #[test]
    fn pmem_windows_of_a_device_dax_region_follow_its_pages() {
        let layout = Layout::new(
            4 << 30,
            vec![
                Window {
                    name: "pm0".into(),
                    offset: 2 << 20,
                    size: 1 << 30,
                    serve: Serve::Pmem,
                },
                Window {
                    name: "disk".into(),
                    offset: (1 << 30) + (2 << 20),
                    size: 4096 * 3,
                    serve: Serve::Blk,
                },
            ],
            false,
        )
        .unwrap();
        layout.check_map_align(4096).unwrap();
        layout.check_map_align(2 << 20).unwrap();
        // 1 GiB pages: the window starts 2 MiB in; the disk window is not mapped.
        let err = layout.check_map_align(1 << 30).unwrap_err();
        assert!(
            matches!(&err, LayoutError::DeviceUnaligned { name, align } if name == "pm0" && *align == 1 << 30),
            "{err}"
        );
    }
}
